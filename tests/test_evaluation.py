"""Perplexity against a direct computation, the speed benchmark, and the report on fixture results."""

import math

import pytest
import torch
from omegaconf import OmegaConf

import nbl
from nbl.evaluation import perplexity
from nbl.runner import measure_speed
from nbl.speed import cache_bytes, cached_decode
from tests.conftest import make_tiny, token_batches


def test_perplexity_matches_token_by_token_computation():
    model = make_tiny("llama")
    ids = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            for t in range(1, len(row)):  # predict token t from the prefix alone
                logits = model(row[:t].unsqueeze(0)).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, -1)[row[t]])
                count += 1
    assert perplexity(model, ids, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_cached_decode_really_grows_the_cache():
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=1), progress=False)
    nbl.linearize(model, stats, [0])  # layer 0 gone: the cache length must still be right
    prompt = torch.randint(3, 256, (1, 10))
    cache = cached_decode(model, prompt, new_tokens=7)
    assert cache.get_seq_length() == 17
    used = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    assert len(used) == 3 and all(layer.keys.shape[-2] == 17 for layer in used)
    assert cache_bytes(cache) == 3 * 2 * (2 * 17 * 16) * 4  # layers x (K, V) x (kv heads x tokens x head dim) x fp32


def test_speed_benchmark_returns_its_keys():
    base = make_tiny("llama")
    replaced = make_tiny("llama")
    stats = nbl.calibrate(replaced, token_batches(n_batches=1), progress=False)
    nbl.linearize(replaced, stats, [1, 2])
    cfg = OmegaConf.create({"batch_size": 1, "prompt_len": 16, "new_tokens": 4, "repeats": 2, "warmup": 1})
    speed = measure_speed(base, replaced, cfg)
    for key in ("prefill_tok_s_base", "prefill_tok_s_nbl", "decode_tok_s_base", "decode_tok_s_nbl"):
        assert speed[key] > 0
    assert speed["prefill_speedup_predicted"] > 1.0 and speed["decode_speedup_predicted"] > 1.0
    assert speed["prefill_speedup"] == pytest.approx(speed["prefill_tok_s_nbl"] / speed["prefill_tok_s_base"])
    # 4 layers, 2 replaced: half the cache, for the 16 prompt + 4 decoded tokens
    assert speed["kv_cache_bytes_base"] == 4 * 2 * 2 * 16 * 20 * 4
    assert speed["kv_cache_bytes_nbl"] == speed["kv_cache_bytes_base"] // 2


def test_unsupported_lm_eval_version_is_named(monkeypatch):
    import importlib.metadata

    from nbl.evaluation import check_lm_eval_version

    assert check_lm_eval_version().startswith("0.4.")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.3.0")
    with pytest.raises(RuntimeError, match=r"lm-eval 0\.3\.0 is not supported"):
        check_lm_eval_version()
