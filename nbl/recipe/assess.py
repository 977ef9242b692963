"""Stages that measure: the unmodified model beside the replaced one, lm-eval tasks and perplexity, speed."""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from nbl.cache import cached_json
from nbl.core.accounting import predicted_speedups
from nbl.core.checkpoint import save_linearized
from nbl.core.surgery import first_conv_shape, replaced_layers, replaced_mlps
from nbl.data import load_texts, token_sequences
from nbl.measure.evaluation import average_headline, perplexity, run_lm_eval
from nbl.measure.speed import decode_memory, decode_timer, interleaved, prefill, random_prompt, timed
from nbl.quantization import quantize_model
from nbl.recipe.keys import base_eval_fields, task_folder
from nbl.recipe.state import RunState

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def evaluate_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eval_cfg: DictConfig, cache_dir: Path
                   ) -> dict[str, Any]:  # fmt: skip
    """lm-eval tasks and perplexity of one model, in this process (``eval.backend=hf``) or served by vLLM."""
    start = time.perf_counter()
    ppl = eval_cfg.perplexity
    kind = str(ppl.get("windows", "stream")) if ppl else "stream"
    windows = {
        text: token_sequences(tokenizer, load_texts(text), ppl.num_sequences, ppl.seq_len, seed=0, windows=kind)
        for text in ([ppl.source, *eval_cfg.domains] if ppl else [])
    }  # the perplexity text, then further texts with the same window count, length and kind
    if eval_cfg.get("backend", "hf") == "vllm":
        tasks, scores = served_evaluation(model, tokenizer, eval_cfg, cache_dir, windows)
    else:
        tasks = run_lm_eval(
            model, tokenizer, list(eval_cfg.tasks), task_folder(cache_dir), offline=eval_cfg.offline,
            limit=eval_cfg.limit, batch_size=eval_cfg.batch_size, num_fewshot=dict(eval_cfg.num_fewshot or {}),
        )  # fmt: skip
        scores = {text: perplexity(model, ids) for text, ids in windows.items()}
    out: dict[str, Any] = {"tasks": tasks, "average": average_headline(tasks)}
    if ppl:
        out["perplexity"] = scores[ppl.source]
        out["perplexity_text"] = ppl.source if ppl.source != "wikipedia" else "wikipedia (WikiText-2 stand-in)"
        for domain in eval_cfg.domains:
            out.setdefault("domains", {})[domain] = scores[domain]
    out["backend"], out["seconds"] = eval_cfg.get("backend", "hf"), time.perf_counter() - start
    return out


def served_evaluation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eval_cfg: DictConfig,
                      cache_dir: Path, windows: dict[str, torch.Tensor]) -> tuple[dict, dict[str, float]]:  # fmt: skip
    """The model written as a checkpoint and evaluated by vLLM (:mod:`nbl.measure.served_eval`), the app's copy
    off the accelerator meanwhile (the engine sizes its memory from what is free)."""
    from nbl.measure.served_eval import evaluate_served

    device = next(model.parameters()).device
    ppl = eval_cfg.perplexity
    settings = {"offline": eval_cfg.offline, "limit": eval_cfg.limit, "num_fewshot": dict(eval_cfg.num_fewshot or {}),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "kv_cache_gib": eval_cfg.kv_cache_gib,
                "max_model_len": max(2048, ppl.seq_len if ppl else 0)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nbl-eval-") as tmp:
        folder = save_linearized(model, Path(tmp) / "checkpoint", tokenizer)
        free_device(model)
        try:
            out = evaluate_served(folder, list(eval_cfg.tasks), task_folder(cache_dir), windows, settings)
        finally:
            model.to(device)
    return out["tasks"], out["perplexity"]


def measure_speed(base: PreTrainedModel, replaced: PreTrainedModel, speed_cfg: DictConfig) -> dict[str, Any]:
    """Interleaved base vs replaced: prefill and cached-decode tokens/s, ratios, FLOP-model predictions."""
    device = next(base.parameters()).device
    prompt = random_prompt(base, speed_cfg.batch_size, speed_cfg.prompt_len)
    times = interleaved(
        {
            "prefill_base": timed(lambda: prefill(base, prompt), device),
            "prefill_nbl": timed(lambda: prefill(replaced, prompt), device),
            "decode_base": decode_timer(base, prompt, speed_cfg.new_tokens),
            "decode_nbl": decode_timer(replaced, prompt, speed_cfg.new_tokens),
        },
        repeats=speed_cfg.repeats,
        warmup=speed_cfg.warmup,
    )
    n_prefill = speed_cfg.batch_size * speed_cfg.prompt_len
    n_decode = speed_cfg.batch_size * speed_cfg.new_tokens
    predicted = predicted_speedups(
        base.config, replaced_layers(replaced), speed_cfg.prompt_len, speed_cfg.new_tokens, replaced_mlps(replaced),
        first_conv_shape(replaced),
    )
    memory = {name: decode_memory(m, prompt, speed_cfg.new_tokens) for name, m in (("base", base), ("nbl", replaced))}
    return {
        "device": str(device),
        "prefill_tok_s_base": n_prefill / times["prefill_base"].median_s,
        "prefill_tok_s_nbl": n_prefill / times["prefill_nbl"].median_s,
        "decode_tok_s_base": n_decode / times["decode_base"].median_s,
        "decode_tok_s_nbl": n_decode / times["decode_nbl"].median_s,
        "prefill_speedup": times["prefill_base"].median_s / times["prefill_nbl"].median_s,
        "decode_speedup": times["decode_base"].median_s / times["decode_nbl"].median_s,
        "prefill_speedup_predicted": predicted["prefill_speedup"],
        "decode_speedup_predicted": predicted["decode_speedup"],
        **{f"{key}_{name}": value for name, m in memory.items() for key, value in m.items()},
        "repeats": speed_cfg.repeats,
        "settings": OmegaConf.to_container(speed_cfg, resolve=True),
    }


def baseline(state: RunState) -> None:
    """The unmodified model beside the one to be replaced: a copy for the speed test (quantized like the replaced
    model will be), and its evaluation (cached: a sweep evaluates it once)."""
    cfg, model, scheme = state.cfg, state.model, state.cfg.quantize.scheme
    evaluates = cfg.eval.evaluate_base and state.wants_eval
    if cfg.speed.enabled:
        if cfg.model.device_map is not None:
            log.warning("speed test skipped: a sharded model (device_map) cannot be copied for an interleaved run")
        else:
            state.base = copy.deepcopy(model)
    if scheme != "none" and state.base is None and evaluates:
        state.base = copy.deepcopy(model)
    if state.base is not None:
        quantize_model(state.base, scheme)
    if evaluates:
        evaluated = state.base if scheme != "none" else model
        state.eval_base, _ = cached_json(
            state.cache_dir / "base_eval",
            base_eval_fields(cfg, state.config),
            lambda: evaluate_model(evaluated, state.tokenizer, cfg.eval, state.cache_dir),
        )


def evaluate(state: RunState) -> None:
    """lm-eval tasks and perplexity of the replaced model."""
    if state.wants_eval:
        state.eval_nbl = evaluate_model(state.model, state.tokenizer, state.cfg.eval, state.cache_dir)


def speed(state: RunState) -> None:
    """Base and replaced model timed alike: in this process, interleaved (engine transformers), or served by vLLM
    (engine vllm). The base copy is freed after."""
    if state.cfg.speed.enabled and state.base is not None:
        if state.cfg.speed.engine == "vllm":
            try:
                state.results["speed"] = served_speed(state.base, state.model, state.tokenizer, state.cfg.speed)
            except RuntimeError as error:  # the engine refused or failed: the evaluation is not lost for it
                log.error("vLLM speed test failed; results.json records why: %s", error)
                state.results["speed_error"] = {"engine": "vllm", "error": str(error)}  # the root cause: nbl.serve.jobs.error_excerpt
        else:
            state.results["speed"] = measure_speed(state.base, state.model, state.cfg.speed)
    state.base = None


def served_speed(base: PreTrainedModel, replaced: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 speed_cfg: DictConfig) -> dict[str, Any]:  # fmt: skip
    """Both models written as checkpoints and served by vLLM (:mod:`nbl.serve.bench`): KV capacity for the same
    budget, batch-1 prefill and decode, long-context decode, saturating-batch throughput; ratios beside the FLOP
    and bytes models' predictions."""
    from nbl.serve.bench import ServeSettings, measure, ratio

    settings = ServeSettings(
        prompt_len=speed_cfg.prompt_len, new_tokens=speed_cfg.new_tokens, batch=speed_cfg.saturating_batch,
        batch_prompt_len=speed_cfg.batch_prompt_len, long_prompt_len=speed_cfg.long_prompt_len,
        repeats=speed_cfg.repeats, warmup=speed_cfg.warmup, kv_cache_gib=speed_cfg.kv_cache_gib,
        dtype=str(next(base.parameters()).dtype).removeprefix("torch."), enforce_eager=speed_cfg.enforce_eager,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nbl-serve-") as tmp:
        folders = {name: save_linearized(m, Path(tmp) / name, tokenizer) for name, m in (("base", base), ("nbl", replaced))}
        for m in (base, replaced):  # the engines size their memory from what is free: the app's copies leave the GPU
            free_device(m)
        served = measure(folders, settings)
    predicted = predicted_speedups(base.config, replaced_layers(replaced), speed_cfg.prompt_len, speed_cfg.new_tokens,
                                   replaced_mlps(replaced), conv=first_conv_shape(replaced))  # fmt: skip
    b, n = served["base"], served["nbl"]
    return {
        "engine": "vllm",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        **{f"{key}_{name}": r[key] for name, r in served.items() for key in SERVED},
        **{f"{case}_speedup": ratio(n[f"{case}_tok_s"], b[f"{case}_tok_s"])
           for case in ("prefill", "decode", "long_decode", "throughput", "concurrent")},
        "kv_capacity_ratio": n["kv_cache_tokens"] / b["kv_cache_tokens"],
        "prefill_speedup_predicted": predicted["prefill_speedup"],
        "decode_speedup_predicted": predicted["decode_speedup"],
        "decode_bytes_speedup_predicted": predicted["decode_bytes_speedup"],
        "repeats": speed_cfg.repeats,
        "settings": OmegaConf.to_container(speed_cfg, resolve=True),
    }


def free_device(model: PreTrainedModel) -> None:
    """Move a model that is on an accelerator to host memory and release the accelerator's cached blocks."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# what a served model's measurement reports, per model (nbl.serve.bench)
SERVED = ("kv_cache_tokens", "prefill_tok_s", "decode_tok_s", "long_decode_tok_s", "throughput_tok_s",
          "concurrent_requests", "concurrent_tok_s", "prefix_cache_hits", "preemptions")  # fmt: skip
