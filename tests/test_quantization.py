"""Quantization on top of NBL: what torchao stores and computes, checked against a per-channel int8 closed form."""

import copy

import pytest
import torch

import nbl
from nbl.quantization import quantize_model
from tests.conftest import make_tiny, token_batches


def test_int8_weight_only_is_per_channel_symmetric_int8_of_every_decoder_linear_including_the_maps():
    model = make_tiny("llama")
    stats = nbl.calibrate_parts(model, token_batches(n_batches=2), ("attention", "mlp"), progress=False)
    nbl.linearize(model, stats["attention"], [0], part="attention")
    nbl.linearize(model, stats["mlp"], [2], part="mlp")
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = quantize_model(model, "int8_weight")
    assert "model.layers.0.attn_linear" in names and "model.layers.2.mlp.linear" in names
    assert "lm_head" not in names and len(names) == len(floats) - 1  # every linear but the (tied) head
    for name in names:
        module = model.get_submodule(name)
        x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(0))
        w, q = floats[name], module.weight
        scale = w.abs().amax(1) / 127.5  # symmetric int8 over [-128, 127], one scale per output row
        torch.testing.assert_close(q.scale.flatten(), scale, rtol=1e-6, atol=0)
        expected = (w / scale[:, None]).round().clamp(-128, 127)
        assert q.qdata.dtype == torch.int8 and (q.qdata.float() - expected).abs().max() <= 1  # ties may round apart
        assert (q.qdata.float() == expected).float().mean() > 0.99
        dequantized = q.qdata.float() * q.scale.reshape(-1, 1)
        bias = module.bias if module.bias is not None else 0
        torch.testing.assert_close(module(x), x @ dequantized.T + bias, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight.dtype == torch.float32


def test_quantized_model_stays_close_to_the_float_one_and_generates_the_same_with_the_cache():
    model = make_tiny("qwen2")
    stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    nbl.linearize(model, stats, [1])
    quantized = copy.deepcopy(model)
    quantize_model(quantized, "int8_weight")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference, got = model(ids).logits, quantized(ids).logits
    assert 0 < (got - reference).abs().max() < 0.05 * reference.abs().max()
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        quantized.generate(ids, use_cache=True, **kwargs), quantized.generate(ids, use_cache=False, **kwargs)
    )


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        quantize_model(make_tiny(), "int3")
