"""Surgery against the unmodified model: fidelity, cached generation, KV cache, removed weights."""

import copy
import pickle
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import nbl
from nbl.models import random_model, tiny_config
from tests.conftest import greedy_cached_and_uncached, make_tiny, token_batches


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
    cached, uncached = greedy_cached_and_uncached(model, prompt)
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
    with pytest.raises(ValueError, match="already have a replaced attention"):
        nbl.linearize(model, stats, [1])


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(nbl.UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        nbl.calibrate(gpt2, [torch.zeros(1, 4, dtype=torch.long)], progress=False)


def _with_attention_output(model, index: int, fn):
    """Hooks that make layer ``index``'s attention output fn(x), x the layer input (before LN1)."""
    layer = model.model.layers[index]
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def swap(module, args, output):
        return (fn(seen["x"]), *output[1:])

    return [layer.register_forward_pre_hook(grab, with_kwargs=True), layer.self_attn.register_forward_hook(swap)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_replaced_layer_is_exactly_the_original_with_attention_output_w_x_plus_b(family, dtype):
    base = make_tiny(family).to(dtype)
    stats = nbl.calibrate(base, token_batches(), progress=False)
    replaced = copy.deepcopy(base)
    nbl.linearize(replaced, stats, [1])
    lin = replaced.model.layers[1].attn_linear
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = replaced(ids).logits
        handles = _with_attention_output(base, 1, lin)
        hooked = base(ids).logits
        for h in handles:
            h.remove()
        # mutation check: the same hook with W transposed is a clearly different model
        handles = _with_attention_output(base, 1, lambda x: torch.nn.functional.linear(x, lin.weight.T, lin.bias))
        transposed = base(ids).logits
        for h in handles:
            h.remove()
    assert torch.equal(expected, hooked)
    assert not torch.allclose(transposed, expected, rtol=0.0, atol=1e-2)


def test_statistics_of_another_hidden_size_leave_the_model_untouched():
    model = make_tiny("llama")
    other = make_tiny("llama", hidden_size=32)
    stats = nbl.calibrate(other, token_batches(), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="hidden size is 64"):
        nbl.linearize(model, stats, [0, 1])
    assert nbl.replaced_layers(model) == {}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_mixed_sliding_and_full_attention_keeps_each_attention_in_a_slot_of_its_type():
    config = tiny_config("qwen2")
    config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config.use_sliding_window, config.sliding_window = True, 8
    model = random_model(config)
    stats = nbl.calibrate(model, token_batches(), progress=False)
    with pytest.raises(NotImplementedError, match="every full_attention layer"):
        nbl.linearize(model, stats, [0, 2])  # positions are read from slot 0, a full one: no full layer would fill it
    assert nbl.replaced_layers(model) == {}
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    nbl.linearize(model, stats, [0, 3])  # layer 1 (sliding) keeps slot 1, layer 2 (full) takes slot 0
    assert [model.model.layers[i].self_attn.layer_idx for i in (1, 2)] == [1, 0]
    assert [model.model.layers[i].cache_slot for i in (0, 3)] == [2, 3]
    prompt = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))  # past the 8-token window
    cached, uncached = greedy_cached_and_uncached(model, prompt)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("layers", ["12", [1.5], [True], 3])
def test_layer_indices_must_be_integers(layers):
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=1), progress=False)
    with pytest.raises(TypeError):
        nbl.linearize(model, stats, layers)
    assert nbl.replaced_layers(model) == {}
    assert nbl.linearize(model, stats, [torch.tensor(1)]) == {1: "linear"}  # integer tensors are indices


def test_linearized_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    model = make_tiny("qwen2")
    nbl.linearize(model, nbl.calibrate(model, token_batches(), progress=False), [0, 2])
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits
    clone = pickle.loads(pickle.dumps(model))
    assert nbl.replaced_layers(clone) == {0: "linear", 2: "linear"}
    torch.save(model, tmp_path / "model.pt")
    torch.save({"ids": ids, "logits": logits}, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "m = torch.load(sys.argv[1], weights_only=False); e = torch.load(sys.argv[2])\n"
        "with torch.no_grad(): assert torch.equal(m(e['ids']).logits, e['logits'])\n"
        "print(type(m.model.layers[0]).__name__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model.pt"), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "LinearizedQwen2DecoderLayer"
