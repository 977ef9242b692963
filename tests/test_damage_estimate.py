"""The second-order damage estimate against per-token derivatives taken another way: the loss differentiated with
respect to an explicit scale on each token's map error, and a finite difference of the loss itself."""

import pytest
import torch

import nbl
from nbl.calib.hooks import part_modules
from nbl.core.adapters import get_adapter
from nbl.select.damage import Probe
from nbl.select.estimate import estimated_damage, taylor_terms
from tests.conftest import make_tiny, token_batches


def _loss_with_error(model, batches, layer: int, part: str, mode: str, stats, scale) -> torch.Tensor:
    """Summed next-token loss with the part's output a_t moved to a_t + scale_t * e_t (e: the map's error, computed
    here from nbl.fit_lmmse); ``scale``: one tensor per batch, (B, S), or a float for every token."""
    adapter = get_adapter(model)
    entry, exit_ = part_modules(adapter, adapter.layers(model)[layer], part)
    w, b = nbl.fit_lmmse(stats[layer])
    seen, total = {}, 0.0
    for n, ids in enumerate(batches):
        s = scale[n] if isinstance(scale, list) else scale

        def keep(module, args, kwargs):
            seen["x"] = args[0] if args else kwargs["hidden_states"]

        def move(module, args, output, s=s):
            out = output[0] if isinstance(output, tuple) else output
            a = out - seen["x"] if part == "block" else out
            error = -a if mode == "drop" else seen["x"] @ w.T.to(out.dtype) + b.to(out.dtype) - a
            moved = out + (s[..., None] if torch.is_tensor(s) else s) * error
            return (moved, *output[1:]) if isinstance(output, tuple) else moved

        handles = [entry.register_forward_pre_hook(keep, with_kwargs=True), exit_.register_forward_hook(move)]
        try:
            logits = model(ids, use_cache=False).logits[:, :-1]
            total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        finally:
            for h in handles:
                h.remove()
    return total


@pytest.mark.parametrize(("part", "mode"), [("attention", "linear"), ("attention", "drop"), ("mlp", "linear"),
                                            ("block", "linear")])  # fmt: skip
def test_taylor_terms_equal_per_token_derivatives_of_the_loss(part, mode):
    model = make_tiny("llama").double()
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False, part=part)
    heldout = token_batches(n_batches=2, seed=9)
    terms = taylor_terms(Probe(model, stats, heldout, mode=mode, part=part, progress=False))
    for i in range(4):
        scale = [torch.zeros(ids.shape, dtype=torch.float64, requires_grad=True) for ids in heldout]
        grads = torch.autograd.grad(_loss_with_error(model, heldout, i, part, mode, stats, scale), scale)
        per_token = torch.cat([g.flatten() for g in grads])  # d loss / d scale_t = g_t . e_t
        assert terms[i].first == pytest.approx(float(per_token.sum()), rel=1e-7, abs=1e-9)
        assert terms[i].second == pytest.approx(float((per_token**2).sum()), rel=1e-7)
        assert terms[i].tokens == sum(ids[:, 1:].numel() for ids in heldout)


def test_first_order_term_is_the_derivative_of_the_loss_and_the_model_is_left_as_it_was():
    model = make_tiny("mistral").double()
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    heldout = token_batches(n_batches=2, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    probe = Probe(model, stats, heldout, progress=False)
    terms = taylor_terms(probe)
    estimate = estimated_damage(probe)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert nbl.replaced_layers(model) == {}
    model.eval()
    eps = 1e-3  # rotary and softmax keep float32 steps in a float64 model: a smaller step drowns in their rounding
    with torch.no_grad():
        for i in (0, 2):
            up, down = (float(_loss_with_error(model, heldout, i, "attention", "linear", stats, s)) for s in (eps, -eps))
            assert (up - down) / (2 * eps) == pytest.approx(terms[i].first, rel=5e-4)
            t = terms[i]
            assert estimate[i] == pytest.approx((t.first + 0.5 * t.second) / t.tokens)


def test_estimate_refuses_the_kl_measure():
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    with pytest.raises(ValueError, match="measure=loss"):
        estimated_damage(Probe(model, stats, token_batches(n_batches=1), measure="kl", progress=False))
