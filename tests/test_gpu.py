"""CUDA paths (skipped on machines without a GPU): statistics and maps equal the CPU's, bf16 surgery, cached
decoding, per-model memory."""

import copy

import numpy as np
import pytest
import torch

import nbl
from nbl.measure.speed import decode_memory, model_bytes
from tests.conftest import make_tiny, token_batches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_statistics_and_maps_equal_the_cpu_ones():
    model = make_tiny("llama")
    batches = token_batches(n_batches=2)
    cpu = nbl.calibrate(model, batches, progress=False)
    gpu = nbl.calibrate(copy.deepcopy(model).to("cuda"), batches, progress=False)
    assert gpu[0].sum_xx.device.type == "cuda" and gpu[0].sum_xx.dtype == torch.float64
    for i in cpu:
        for name, t in cpu[i].state_dict().items():  # fp32 kernels differ slightly between devices
            torch.testing.assert_close(gpu[i].state_dict()[name], t, rtol=1e-4, atol=1e-4)
        w_cpu, b_cpu = nbl.fit_lmmse(cpu[i])
        w_gpu, b_gpu = nbl.fit_lmmse(gpu[i])
        torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(b_gpu.cpu(), b_cpu, rtol=1e-3, atol=1e-4)
    assert [nbl.cca_bound(gpu[i]) for i in gpu] == pytest.approx([nbl.cca_bound(cpu[i]) for i in cpu], rel=1e-4)


def test_rank_deficient_fit_is_the_same_on_gpu_and_cpu():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(300, 3))
    x = torch.from_numpy(np.hstack([base, base[:, :2] * 2.0]))
    a = torch.from_numpy(rng.normal(size=(300, 5)))
    accs = []
    for device in ("cpu", "cuda"):
        acc = nbl.CovarianceAccumulator(5, 5, device=device)
        acc.update(x.to(device), a.to(device))
        accs.append(nbl.fit_lmmse(acc))
    torch.testing.assert_close(accs[1][0].cpu(), accs[0][0], rtol=1e-8, atol=1e-10)


def test_bf16_surgery_keeps_the_model_dtype():
    model = make_tiny("qwen2").to("cuda", torch.bfloat16)
    nbl.linearize(model, nbl.calibrate(model, token_batches(n_batches=2), progress=False), [0])
    assert model.model.layers[0].attn_linear.weight.dtype == torch.bfloat16


def test_cached_generation_equals_uncached_with_layer_zero_replaced():
    # fp32: in bf16 the cached and uncached kernels round differently, which can flip near-tied greedy steps
    model = make_tiny("qwen2").to("cuda")
    stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    nbl.linearize(model, stats, [0, 3])
    prompt = torch.randint(3, 256, (1, 8), device="cuda")
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs)
    )


def test_peak_memory_counts_the_model_alone():
    model = make_tiny("llama", hidden_size=256).to("cuda")
    prompt = torch.randint(3, 256, (1, 64), device="cuda")
    alone = decode_memory(model, prompt, 8)["peak_memory_bytes"]
    other = copy.deepcopy(model)  # another model resident on the device, as in the interleaved speed test
    beside = decode_memory(model, prompt, 8)["peak_memory_bytes"]
    del other
    assert alone > model_bytes(model)
    assert beside == pytest.approx(alone, rel=0.05)


def test_damage_estimate_on_gpu_equals_the_cpu_one():
    """selection.damage=estimated runs a backward pass: the same terms on a GPU (bf16 models: float32 logits)."""
    from nbl.select.damage import Probe
    from nbl.select.estimate import taylor_terms

    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    heldout = token_batches(n_batches=1, seed=4)
    cpu, _ = taylor_terms(Probe(model, stats, heldout, progress=False))
    gpu_model = copy.deepcopy(model).to("cuda")
    gpu, unreplaced = taylor_terms(Probe(gpu_model, stats.to("cuda"), heldout, progress=False))
    assert unreplaced.inputs[0][0].device.type == "cuda"
    for i, t in cpu.items():
        assert gpu[i].damage == pytest.approx(t.damage, rel=1e-3, abs=1e-6)
    bf16, _ = taylor_terms(Probe(gpu_model.to(torch.bfloat16), stats.to("cuda"), heldout, progress=False))
    assert all(np.isfinite(t.damage) for t in bf16.values())
