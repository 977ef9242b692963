"""The second-order damage estimate against per-token derivatives taken another way: the change a replacement makes
to a layer's output, computed in a replaced copy of the model, scaled per token and the loss differentiated with
respect to the scales; a finite difference of the loss; and the held-out state it hands to set validation against
the one validation measures itself."""

import copy

import pytest
import torch

import nbl
from nbl.select.damage import Probe, validate_sets
from nbl.select.estimate import estimated_damage, taylor_terms
from tests.conftest import make_tiny, token_batches


def _layer_outputs(model, batches, layer: int) -> list[torch.Tensor]:
    outs = []
    handle = model.model.layers[layer].register_forward_hook(
        lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach())
    )
    with torch.no_grad():
        for ids in batches:
            model(ids, use_cache=False)
    handle.remove()
    return outs


def _changes(model, stats, batches, layer: int, mode: str, part: str) -> list[torch.Tensor]:
    """What replacing ``layer``'s part does to that layer's output (the layers below are untouched, so both models
    give the layer the same input)."""
    replaced = copy.deepcopy(model)
    nbl.linearize(replaced, stats, [layer], mode=mode, part=part)
    new, old = _layer_outputs(replaced, batches, layer), _layer_outputs(model, batches, layer)
    return [a - b for a, b in zip(new, old, strict=True)]


def _loss_with_change(model, batches, layer: int, changes, scale) -> torch.Tensor:
    """Summed next-token loss with ``layer``'s output moved by scale_t * change_t (``scale``: a (B, S) tensor per
    batch, or one float)."""
    total = 0.0
    for ids, change, s in zip(batches, changes, scale if isinstance(scale, list) else [scale] * len(batches),
                              strict=True):  # fmt: skip

        def move(module, args, output, change=change, s=s):
            out = output[0] if isinstance(output, tuple) else output
            moved = out + (s[..., None] if torch.is_tensor(s) else s) * change
            return (moved, *output[1:]) if isinstance(output, tuple) else moved

        handle = model.model.layers[layer].register_forward_hook(move)
        try:
            logits = model(ids, use_cache=False).logits[:, :-1]
            total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        finally:
            handle.remove()
    return total


@pytest.mark.parametrize(("part", "mode"), [("attention", "linear"), ("attention", "drop"), ("mlp", "linear"),
                                            ("block", "linear")])  # fmt: skip
def test_taylor_terms_equal_per_token_derivatives_of_the_loss(part, mode):
    model = make_tiny("llama").double()
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False, part=part)
    heldout = token_batches(n_batches=2, seed=9)
    terms, _ = taylor_terms(Probe(model, stats, heldout, mode=mode, part=part, progress=False))
    for i in range(4):
        changes = _changes(model, stats, heldout, i, mode, part)
        scale = [torch.zeros(ids.shape, dtype=torch.float64, requires_grad=True) for ids in heldout]
        grads = torch.autograd.grad(_loss_with_change(model, heldout, i, changes, scale), scale)
        per_token = torch.cat([g.flatten() for g in grads])  # d loss / d scale_t = g_t . d_t
        assert terms[i].first == pytest.approx(float(per_token.sum()), rel=1e-6, abs=1e-9)
        assert terms[i].second == pytest.approx(float((per_token**2).sum()), rel=1e-6)
        assert terms[i].tokens == sum(ids[:, 1:].numel() for ids in heldout)


def test_first_order_term_is_the_derivative_of_the_loss_and_the_model_is_left_as_it_was():
    model = make_tiny("mistral").double()
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    heldout = token_batches(n_batches=2, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    probe = Probe(model, stats, heldout, progress=False)
    terms, _ = taylor_terms(probe)
    estimate = estimated_damage(probe)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert nbl.replaced_layers(model) == {}
    model.eval()
    eps = 1e-3  # rotary and softmax keep float32 steps in a float64 model: a smaller step drowns in their rounding
    with torch.no_grad():
        for i in (0, 2):
            changes = _changes(model, stats, heldout, i, "linear", "attention")
            up, down = (float(_loss_with_change(model, heldout, i, changes, s)) for s in (eps, -eps))
            assert (up - down) / (2 * eps) == pytest.approx(terms[i].first, rel=5e-4)
            t = terms[i]
            assert estimate[i] == pytest.approx((t.first + 0.5 * t.second) / t.tokens)


def test_estimate_hands_set_validation_the_held_out_state_it_would_measure():
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    probe = Probe(model, stats, token_batches(n_batches=2, seed=5), progress=False)
    _, unreplaced = taylor_terms(probe)
    proposals = {"a": [1, 3], "b": [0, 2]}
    reused = {tuple(c.layers): c.damage for c in validate_sets(probe, proposals, unreplaced)}
    measured = {tuple(c.layers): c.damage for c in validate_sets(probe, proposals)}
    assert reused.keys() == measured.keys()
    for key, damage in measured.items():
        assert reused[key] == pytest.approx(damage, abs=1e-5)


def test_estimate_refuses_the_kl_measure():
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    with pytest.raises(ValueError, match="measure=loss"):
        estimated_damage(Probe(model, stats, token_batches(n_batches=1), measure="kl", progress=False))


ESTIMATE_PEAK = """
import sys, torch, nbl
from pathlib import Path
from nbl.measure.speed import current_rss_bytes, peak_rss_bytes
from nbl.models import random_model, tiny_config
from nbl.select.damage import Probe
from nbl.select.estimate import taylor_terms
model = random_model(tiny_config("llama", hidden_size=256, num_layers=4, vocab_size=32000))
g = torch.Generator().manual_seed(0)
stats = nbl.calibrate(model, [torch.randint(3, 32000, (4, 128), generator=g)], progress=False)
batch = int(sys.argv[1])
heldout = [torch.randint(3, 32000, (batch, 256), generator=g) for _ in range(8 // batch)]
start = current_rss_bytes()
Path("/proc/self/clear_refs").write_text("5")
taylor_terms(Probe(model, stats, heldout, progress=False), candidates=[1])
print(peak_rss_bytes() - start)
"""


@pytest.mark.slow
def test_the_estimate_pass_peak_does_not_grow_with_the_held_out_batch():
    """8 held-out windows of 256 tokens as 8 batches of 1 or 1 batch of 8, each in a fresh process: the same peak
    (the held-out states kept for set validation are the same in both). A whole batch's logits would be
    8 x 256 x 32000 float32 values, 250 MB, each kept with its softmax gradient."""
    import subprocess
    import sys

    peaks = {}
    for batch in (1, 8):
        proc = subprocess.run([sys.executable, "-c", ESTIMATE_PEAK, str(batch)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[batch] = int(proc.stdout.splitlines()[-1])
    assert peaks[8] - peaks[1] < 48 * 2**20, peaks


def test_the_estimate_loss_slices_equal_the_whole_loss(monkeypatch):
    import nbl.select.estimate as estimate

    model = make_tiny("llama")
    ids = token_batches(n_batches=1, batch=2, seq=20)[0]
    hidden = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    whole = torch.nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    (expected,) = torch.autograd.grad(whole, hidden)
    monkeypatch.setattr(estimate, "LOGIT_VALUES", 3 * 2 * 256)  # slices of 3 positions
    sliced = estimate.next_token_loss(model.lm_head, hidden, ids[:, 1:])
    (got,) = torch.autograd.grad(sliced, hidden)
    torch.testing.assert_close(sliced, whole)
    torch.testing.assert_close(got, expected)
