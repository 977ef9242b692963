"""Surgery against the unmodified model: fidelity, cached generation, KV cache, removed weights."""

import copy

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import nbl
from tests.conftest import make_tiny, token_batches


def _logit_error(model, reference, batches) -> float:
    with torch.no_grad():
        return sum(float((model(b).logits - reference(b).logits).pow(2).mean()) for b in batches)


def test_linear_replacement_beats_drop(family):
    base = make_tiny(family)
    batches = token_batches()
    stats = nbl.calibrate(base, batches, progress=False)
    for layer in range(4):
        linear, dropped = copy.deepcopy(base), copy.deepcopy(base)
        nbl.linearize(linear, stats, [layer], mode="linear")
        nbl.linearize(dropped, stats, [layer], mode="drop")
        assert _logit_error(linear, base, batches) < _logit_error(dropped, base, batches)


def test_linear_layer_holds_the_fitted_map():
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(), progress=False)
    w, b = nbl.fit_lmmse(stats[2])
    nbl.linearize(model, stats, [2])
    layer = model.model.layers[2]
    torch.testing.assert_close(layer.attn_linear.weight, w.float())
    torch.testing.assert_close(layer.attn_linear.bias, b.float())


@pytest.mark.parametrize("layers", [[0], [3], [0, 3], [0, 1, 2, 3]], ids=["first", "last", "first+last", "all"])
@pytest.mark.parametrize("mode", ["linear", "drop"])
def test_cached_generation_equals_uncached(family, layers, mode):
    model = make_tiny(family)
    stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    nbl.linearize(model, stats, layers, mode=mode)
    prompt = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, uncached)


def _cache_bytes(model, ids) -> int:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None
    )


def test_kv_cache_shrinks_with_replaced_layers(family):
    model = make_tiny(family)
    ids = torch.randint(3, 256, (1, 16))
    before = _cache_bytes(model, ids)
    stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    nbl.linearize(model, stats, [0, 2])
    after = _cache_bytes(model, ids)
    assert after == before // 2
    assert after == nbl.model_kv_bytes_per_token(model) * 16


def test_replaced_layers_keep_no_attention_weights(family):
    model = make_tiny(family)
    stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    nbl.linearize(model, stats, [1], mode="linear")
    nbl.linearize(model, stats, [2], mode="drop")
    keys = model.state_dict().keys()
    for i in (1, 2):
        assert not [
            k for k in keys if k.startswith(f"model.layers.{i}.self_attn") or f"layers.{i}.input_layernorm" in k
        ]
        assert f"model.layers.{i}.mlp.down_proj.weight" in keys
    assert "model.layers.1.attn_linear.weight" in keys and "model.layers.2.attn_linear.weight" not in keys
    assert nbl.replaced_layers(model) == {1: "linear", 2: "drop"}


def test_hidden_states_still_cover_every_layer():
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=1), progress=False)
    nbl.linearize(model, stats, [1], mode="drop")
    out = model(torch.randint(3, 256, (1, 8)), output_hidden_states=True)
    assert len(out.hidden_states) == 5


def test_bad_layers_leave_model_untouched():
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=1), progress=False)
    with pytest.raises(IndexError, match="out of range"):
        nbl.linearize(model, stats, [1, 7])
    with pytest.raises(ValueError, match="duplicate"):
        nbl.linearize(model, stats, [1, 1])
    with pytest.raises(ValueError, match="unknown replacement mode"):
        nbl.linearize(model, stats, [1], mode="prune")
    assert nbl.replaced_layers(model) == {}
    nbl.linearize(model, stats, [1])
    with pytest.raises(ValueError, match="already replaced"):
        nbl.linearize(model, stats, [1])


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(nbl.UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        nbl.calibrate(gpt2, [torch.zeros(1, 4, dtype=torch.long)], progress=False)
