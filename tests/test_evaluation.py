"""Perplexity against a direct computation, the speed benchmark, and the report on fixture results."""

import math

import pytest
import torch
from omegaconf import OmegaConf

import nbl
from nbl.measure.evaluation import perplexity
from nbl.measure.speed import Timing, cache_bytes, cached_decode, interleaved, model_bytes
from nbl.recipe.assess import measure_speed
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


def test_speed_benchmark_measures_both_models(monkeypatch):
    base = make_tiny("llama")
    replaced = make_tiny("llama")
    stats = nbl.calibrate(replaced, token_batches(n_batches=1), progress=False)
    nbl.linearize(replaced, stats, [1, 2])
    cfg = OmegaConf.create({"batch_size": 1, "prompt_len": 16, "new_tokens": 4, "repeats": 2, "warmup": 1})
    speed = measure_speed(base, replaced, cfg)
    for key in ("prefill_tok_s_base", "prefill_tok_s_nbl", "decode_tok_s_base", "decode_tok_s_nbl"):
        assert speed[key] > 0
    assert speed["prefill_speedup_predicted"] > 1.0 and speed["decode_speedup_predicted"] > 1.0
    # 4 layers, 2 replaced: half the cache, for the 16 prompt + 4 decoded tokens
    assert speed["kv_cache_bytes_base"] == 4 * 2 * 2 * 16 * 20 * 4
    assert speed["kv_cache_bytes_nbl"] == speed["kv_cache_bytes_base"] // 2
    assert speed["weights_bytes_base"] == model_bytes(base) > speed["weights_bytes_nbl"] == model_bytes(replaced)
    assert speed["peak_memory_bytes_base"] is None  # measured on CUDA only


def test_speedups_are_base_time_over_replaced_time(monkeypatch):
    import nbl.recipe.assess

    seconds = {"prefill_base": 2.0, "prefill_nbl": 1.0, "decode_base": 3.0, "decode_nbl": 4.0}
    monkeypatch.setattr(
        nbl.recipe.assess, "interleaved", lambda fns, repeats, warmup: {n: Timing(seconds[n], 0, 0, 1) for n in fns}
    )
    model = make_tiny("llama")
    cfg = OmegaConf.create({"batch_size": 2, "prompt_len": 8, "new_tokens": 6, "repeats": 1, "warmup": 0})
    speed = measure_speed(model, model, cfg)
    assert speed["prefill_speedup"] == 2.0 and speed["decode_speedup"] == 0.75
    assert speed["prefill_tok_s_base"] == 2 * 8 / 2.0 and speed["decode_tok_s_nbl"] == 2 * 6 / 4.0


def test_interleaved_discards_warmup_alternates_and_takes_medians():
    calls: list[str] = []

    def timer(name, values):
        it = iter(values)

        def run():
            calls.append(name)
            return next(it)

        return run

    out = interleaved(
        {"a": timer("a", [9.0, 1.0, 5.0, 3.0]), "b": timer("b", [9.0, 2.0, 2.0, 8.0])}, repeats=3, warmup=1
    )
    assert calls == ["a", "b"] * 4
    assert (out["a"].median_s, out["a"].min_s, out["a"].max_s, out["a"].samples) == (3.0, 1.0, 5.0, 3)
    assert out["b"].median_s == 2.0 and out["b"].max_s == 8.0


def test_model_bytes_counts_tied_weights_once():
    model = make_tiny("llama")
    expected = sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert model_bytes(model) == expected
    model.lm_head.weight = model.model.embed_tokens.weight
    assert model_bytes(model) == expected - model.lm_head.weight.numel() * 4


def test_unsupported_lm_eval_version_is_named(monkeypatch):
    import importlib.metadata

    from nbl.measure.evaluation import check_lm_eval_version

    assert check_lm_eval_version().startswith("0.4.")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.3.0")
    with pytest.raises(RuntimeError, match=r"lm-eval 0\.3\.0 is not supported"):
        check_lm_eval_version()


def test_perplexity_windows_start_at_each_documents_bos_when_asked(converted_models, tmp_path):
    """``eval.perplexity.windows=documents``: every window the model is scored on starts at a document's BOS (what
    models trained with one expect at position 0: Gemma); the default cuts them from the joined text."""
    from transformers import AutoTokenizer

    from nbl.data import load_texts, token_sequences
    from nbl.recipe.assess import evaluate_model

    tokenizer = AutoTokenizer.from_pretrained(converted_models / "smollm2-135m-instruct")
    model = nbl.models.random_model(nbl.models.tiny_config("llama", vocab_size=len(tokenizer)), seed=0)
    scores = {}
    for windows in ("stream", "documents"):
        settings = {"tasks": [], "limit": None, "batch_size": 2, "num_fewshot": {}, "offline": True, "domains": [],
                    "perplexity": {"source": "wikipedia", "seq_len": 64, "num_sequences": 3, "windows": windows}}  # fmt: skip
        ids = token_sequences(tokenizer, load_texts("wikipedia"), 3, 64, seed=0, windows=windows)
        assert (ids[:, 0] == tokenizer.bos_token_id).all() == (windows == "documents")
        scores[windows] = evaluate_model(model, tokenizer, OmegaConf.create(settings), tmp_path)["perplexity"]
        assert scores[windows] == pytest.approx(perplexity(model, ids), rel=1e-6)
    assert scores["stream"] != scores["documents"]


def test_documents_windows_key_the_base_evaluation_apart_while_stream_keeps_the_old_key():
    """A cached evaluation of the base model is never reused across window kinds; keys written before the setting
    existed (stream windows) stay valid (their names are pinned in tests/test_cache_keys.py)."""
    from hydra import compose, initialize_config_dir

    from nbl.__main__ import CONF_DIR
    from nbl.recipe.keys import base_eval_fields
    from nbl.recipe.schema import checked_config

    evals = {}
    for windows in ("stream", "documents"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = checked_config(compose("config", overrides=[f"eval.perplexity.windows={windows}"]))
        evals[windows] = base_eval_fields(cfg, make_tiny("llama").config)["eval"]
    assert "windows" not in evals["stream"]["perplexity"] and evals["documents"]["perplexity"]["windows"] == "documents"
    evals["documents"]["perplexity"].pop("windows")
    assert evals["documents"] == evals["stream"]  # the windows are the only difference
