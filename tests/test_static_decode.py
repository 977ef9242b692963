"""Static KV cache with compact slots and the compiled decode protocol, against dynamic-cache decoding."""

import shutil

import pytest
import torch

import nbl
from nbl.measure.speed import cache_bytes, cached_decode, compiled_step, static_decode
from tests.conftest import make_tiny, token_batches


def _replaced(family="llama", layers=(0, 2)):
    model = make_tiny(family)
    nbl.linearize(model, nbl.calibrate(model, token_batches(n_batches=2), progress=False), list(layers))
    return model


def _dynamic_tokens(model, prompt, new_tokens):
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    return model.generate(prompt, use_cache=True, **kwargs)[:, prompt.shape[1] :]


def test_static_decode_equals_dynamic_decode_and_allocates_only_live_slots(family):
    model = _replaced(family)
    prompt = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    tokens, cache = static_decode(model, prompt, 9)
    assert torch.equal(tokens, _dynamic_tokens(model, prompt, 9))
    allocated = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    assert len(allocated) == 2 and len(cache.layers) == 4  # 4 layers, 2 replaced: their slots hold nothing
    # 2 live layers x (K, V) x batch 2 x kv heads 2 x 16 cache positions x head dim 16 x fp32
    assert cache_bytes(cache) == 2 * 2 * 2 * 2 * 16 * 16 * 4
    assert cache_bytes(cached_decode(model, prompt, 8)) == 2 * 2 * 2 * 2 * 15 * 16 * 4  # dynamic: 7 + 8 tokens


def test_transformers_static_cache_leaves_replaced_slots_unallocated():
    model = _replaced("qwen2", layers=(1, 3))
    prompt = torch.randint(3, 256, (1, 6))
    out = model.generate(
        prompt,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        cache_implementation="static",
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences[:, 6:], _dynamic_tokens(model, prompt, 5))
    allocated = [layer for layer in out.past_key_values.layers if getattr(layer, "keys", None) is not None]
    assert len(out.past_key_values.layers) == 4 and len(allocated) == 2  # lazily initialised: slots 2, 3 stay empty


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_static_decode_gives_the_eager_tokens():
    model = _replaced("llama", layers=(0, 3))
    prompt = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    eager, _ = static_decode(model, prompt, 12)
    compiled, _ = static_decode(model, prompt, 12, step=compiled_step(model))
    assert torch.equal(compiled, eager)
    assert torch.equal(eager, _dynamic_tokens(model, prompt, 12))
