"""Models dispatched by accelerate (device_map with CPU and disk offload, where the hooks are active):
calibration, surgery, cached generation and checkpoints work as on an unsharded model."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import nbl
from nbl.calib.layerwise import calibrate_layerwise
from tests.conftest import make_tiny, token_batches

DEVICE_MAP = {
    "model.embed_tokens": "disk",  # even the embedding's weights are on the meta device between calls
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture
def pair(tmp_path):
    base = make_tiny("llama")
    base.save_pretrained(tmp_path / "model")
    dispatched = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    )
    assert dispatched.model.layers[1].mlp.gate_proj.weight.device.type == "meta"  # really offloaded
    return base, dispatched


def test_dispatched_model_calibrates_linearizes_generates_and_saves_like_an_unsharded_one(pair, tmp_path):
    base, dispatched = pair
    batches = token_batches(n_batches=2)
    stats = nbl.calibrate(dispatched, batches, progress=False)
    reference_stats = nbl.calibrate(base, batches, progress=False)
    for i in reference_stats:
        torch.testing.assert_close(stats[i].sum_ax, reference_stats[i].sum_ax)
    reference = copy.deepcopy(base)
    nbl.linearize(reference, reference_stats, [1, 2])  # layer 1 offloaded to disk, layer 2 resident
    nbl.linearize(dispatched, stats, [1, 2])
    assert dispatched.model.layers[1].attn_linear.weight.device.type == "cpu"  # real weights, not meta
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(dispatched(ids).logits, reference(ids).logits)
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    cached = dispatched.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, dispatched.generate(ids, use_cache=False, **kwargs))
    assert torch.equal(cached, reference.generate(ids, use_cache=True, **kwargs))
    reloaded = nbl.load_linearized(nbl.save_linearized(dispatched, tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits)


def test_layerwise_calibration_refuses_a_dispatched_model(pair):
    with pytest.raises(NotImplementedError, match="without device_map"):
        calibrate_layerwise(pair[1], token_batches(n_batches=1), progress=False)


class _MovesInputs:
    """An accelerate hook that changes a layer's hidden states on the way in, as AlignDevicesHook moves them onto
    the layer's device across a GPU boundary: the CPU stand-in for that boundary (a shift instead of a move)."""

    def __init__(self, shift: float) -> None:
        from accelerate.hooks import ModelHook

        self.hook = type("Shift", (ModelHook,), {"pre_forward": self._shift})()
        self.shift = shift

    def _shift(self, module, *args, **kwargs):
        if args:
            args = (args[0] + self.shift, *args[1:])
        else:
            kwargs["hidden_states"] = kwargs["hidden_states"] + self.shift
        return args, kwargs


@pytest.mark.parametrize("part", ["attention", "block"])
def test_statistics_hold_what_the_layer_computes_with_after_its_dispatch_hook(part):
    """x is taken where the layer reads it: after the hook that moves (here: shifts) its input."""
    from accelerate.hooks import add_hook_to_module

    model = make_tiny("llama")
    add_hook_to_module(model.model.layers[2], _MovesInputs(0.5).hook)
    batches = token_batches(n_batches=2)
    stats = nbl.calibrate(model, batches, progress=False, part=part)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (what LN1 read, what the sub-block added)
    layer = model.model.layers[2]
    with torch.no_grad():
        for ids in batches:
            got: dict[str, torch.Tensor] = {}

            def keep(name, value, got=got):  # a hook returning None leaves the module's input and output alone
                got[name] = value

            handles = [
                layer.input_layernorm.register_forward_pre_hook(lambda m, a: keep("x", a[0])),
                layer.self_attn.register_forward_hook(lambda m, a, out: keep("attn", out[0])),
                layer.register_forward_hook(lambda m, a, out: keep("out", out)),
            ]
            model(ids)
            for h in handles:
                h.remove()
            added = got["attn"] if part == "attention" else got["out"] - got["x"]
            seen.append((got["x"].reshape(-1, 64).double(), added.reshape(-1, 64).double()))
    x, a = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
    torch.testing.assert_close(stats[2].sum_x, x.sum(0), rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(stats[2].sum_ax, a.T @ x, rtol=1e-9, atol=1e-6)
