"""Perplexity against a direct computation, the speed benchmark, and the report on fixture results."""

import math

import pytest
import torch
from omegaconf import OmegaConf

import nbl
from nbl.evaluation import perplexity
from nbl.report import table_rows, write_report
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


def _fixture_run(strategy, mode, k, avg, seed=0):
    return {
        "model": "m",
        "selection": {"strategy": strategy, "seed": seed},
        "replacement": {"mode": mode},
        "num_layers": k,
        "eval": {"piqa": {"acc": avg, "acc_norm": avg + 0.01}, "boolq": {"acc": avg}},
        "eval_base": {"piqa": {"acc": 0.7, "acc_norm": 0.72}, "boolq": {"acc": 0.6}},
        "average": avg + 0.005,
        "average_base": 0.66,
        "perplexity": {"nbl": 20.0 + k, "base": 18.0},
        "speed": {"prefill_speedup": 1 + k / 100, "decode_speedup": 1 + k / 90},
        "params": {"sparsity": k / 100},
    }


def test_report_writes_paper_shaped_table(tmp_path):
    runs = [
        _fixture_run("cca", "linear", 4, 0.65),
        _fixture_run("cca", "linear", 8, 0.62),
        _fixture_run("cosine", "drop", 8, 0.60),
        _fixture_run("random", "drop", 8, 0.50, seed=0),
        _fixture_run("random", "drop", 8, 0.40, seed=1),
    ]
    rows = table_rows(runs)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"baseline", "Attn NBL-4", "Attn NBL-8", "Attn DROP-8", "random+drop"}
    assert by_method["baseline"]["piqa"] == 0.72  # headline metric for piqa is acc_norm
    assert by_method["random+drop"]["n"] == 2 and by_method["random+drop"]["avg"] == pytest.approx(0.455)
    assert by_method["random+drop"]["avg_std"] == pytest.approx(0.0707, abs=1e-3)
    files = write_report(runs, tmp_path)
    text = files["markdown"].read_text()
    assert "| Attn NBL-8 | 8 | 1 | 8.0% |" in text
    assert files["csv"].read_text().count("\n") == 6
    assert files["m_acc_vs_k"].stat().st_size > 1000 and files["m_acc_vs_speedup"].is_file()
    assert files["m_ppl_vs_k"].is_file()


def test_unsupported_lm_eval_version_is_named(monkeypatch):
    import importlib.metadata

    from nbl.evaluation import check_lm_eval_version

    assert check_lm_eval_version().startswith("0.4.")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.3.0")
    with pytest.raises(RuntimeError, match=r"lm-eval 0\.3\.0 is not supported"):
        check_lm_eval_version()
