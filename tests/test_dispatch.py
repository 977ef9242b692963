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
