"""Checkpoints served by vLLM, measured alike: KV capacity from vLLM's own numbers, and speed in three cases.

Every checkpoint gets its own engine, all of them alive in one process, and the measurement rounds alternate
between them (base, NBL, base, NBL, ... after a warm-up round), so drift on a noisy machine hits all alike;
medians over the rounds. Cases (prompts of random token ids, ``ignore_eos``: every request runs to its length):

- batch 1: one prompt of ``prompt_len`` tokens; prefill = the time of a 1-token request, decode tokens/s = the
  further ``new_tokens - 1`` tokens over the extra time of a ``new_tokens`` request;
- saturating: ``batch`` prompts of ``batch_prompt_len`` tokens at once, generated tokens per second;
- long context: one prompt of ``long_prompt_len`` tokens, decode tokens/s as for batch 1;
- KV-bound (``concurrency``): as many requests of ``long_prompt_len`` + ``new_tokens`` tokens at once as the
  engine's KV budget holds without preemption (vLLM's own count), generated tokens per second: where a smaller
  KV cache per token pays.

Every request has a prompt of its own (fresh random ids per request, case and round) and the engines run without
prefix caching, so no prefill is a cache hit: the results count the hits (``prefix_cache_hits``, 0) and the
preemptions (``preemptions``) vLLM saw.

The engines run in a fresh process (``python -m nbl.serve.bench``, :mod:`nbl.serve.jobs`): :func:`measure` starts it
and reads its JSON.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nbl.serve.jobs import job_main, run_job


@dataclass(frozen=True)
class ServeSettings:
    prompt_len: int = 512
    new_tokens: int = 64
    batch: int = 64
    batch_prompt_len: int = 128
    long_prompt_len: int = 2048
    repeats: int = 3
    warmup: int = 1
    kv_cache_gib: float = 2  # the KV budget every engine gets
    dtype: str = "float32"
    enforce_eager: bool = False  # true: no torch.compile (starts faster, decodes slower)
    gpu_memory_utilization: float | None = None  # GPU: each engine's share (None: 0.9 of the free memory, split)
    seed: int = 0
    tensor_parallel_size: int = 1
    concurrency: bool = True  # the KV-bound case


def measure(checkpoints: dict[str, str | Path], settings: ServeSettings, greedy: list[list[int]] | None = None,
            greedy_tokens: int = 32, timeout_s: float = 3600) -> dict[str, Any]:  # fmt: skip
    """Speed and KV capacity of each checkpoint (name -> folder) in vLLM: ``{name: {...}}``. ``greedy``: prompts
    (token ids) whose greedy continuations of ``greedy_tokens`` tokens, and the log-probability of each, are also
    returned (``"greedy"``, a list per prompt of (token, logprob) pairs); ``settings.repeats=0``: those alone."""
    job = {"checkpoints": {k: str(v) for k, v in checkpoints.items()}, "greedy": greedy,
           "greedy_tokens": greedy_tokens, **asdict(settings)}  # fmt: skip
    # no VLLM_CPU_KVCACHE_SPACE: vLLM's CPU backend lets that legacy setting (whole GiB) override
    # kv_cache_memory_bytes, which turned a 0.5 GiB budget into 1 GiB
    return run_job("nbl.serve.bench", job, {}, "vLLM measurement", timeout_s)


def ratio(value: float | None, base: float | None) -> float | None:
    """A speed-up over the base; None where either rate could not be measured (see :func:`_rate`)."""
    return value / base if value is not None and base is not None else None


def ratio_table(served: dict[str, dict[str, Any]], predicted: dict[str, dict[str, float]],
                extra: tuple[str, dict[str, str]] | None = None) -> list[str]:  # fmt: skip
    """Markdown rows: each served model against ``served["base"]`` (KV capacity, the speed cases) beside the FLOP
    and bytes models' ``predicted`` speed-ups; ``extra``: (header, model -> cell), one more column."""
    base, one = served["base"], {"prefill_speedup": 1.0, "decode_speedup": 1.0, "decode_bytes_speedup": 1.0}
    header = ["model", "KV capacity (tokens)", "capacity x", "prefill x", "decode x (batch 1)", "decode x (long)",
              "throughput x (batch)", "long requests at once", "throughput x (KV-bound)",
              "predicted prefill / decode (FLOPs)", "predicted decode (bytes)"]  # fmt: skip
    header += [extra[0]] if extra else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in served.items():
        p = predicted.get(name, one)
        cells = [name, f"{r['kv_cache_tokens']:,}", f"{r['kv_cache_tokens'] / base['kv_cache_tokens']:.2f}"]
        for case in ("prefill", "decode", "long_decode", "throughput"):
            x = ratio(r[f"{case}_tok_s"], base[f"{case}_tok_s"])
            cells.append("-" if x is None else f"{x:.2f}")
        x = ratio(r.get("concurrent_tok_s"), base.get("concurrent_tok_s"))
        cells += [str(r.get("concurrent_requests", "-")), "-" if x is None else f"{x:.2f}"]
        cells += [f"{p['prefill_speedup']:.2f} / {p['decode_speedup']:.2f}", f"{p['decode_bytes_speedup']:.2f}"]
        cells += [extra[1][name]] if extra else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def transformers_greedy(model: Any, prompts: list[list[int]], max_tokens: int) -> list[list[tuple[int, float]]]:
    """The reference: greedy decoding in transformers with the KV cache, EOS not special (as ``ignore_eos``), and
    each chosen token's log-probability."""
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            step = model(torch.tensor([prompt]), use_cache=True)
            chosen: list[tuple[int, float]] = []
            for _ in range(max_tokens):
                logp = torch.log_softmax(step.logits[0, -1].double(), dim=-1)
                token = int(logp.argmax())
                chosen.append((token, float(logp[token])))
                step = model(torch.tensor([[token]]), past_key_values=step.past_key_values, use_cache=True)
            out.append(chosen)
    return out


def _random_prompts(n: int, length: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    import random

    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(length)]} for _ in range(n)]


def _timed(llm: Any, prompts: list, max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def _counter(llm: Any, name: str) -> float:
    """A vLLM counter (``vllm:prefix_cache_hits``, ``vllm:num_preemptions``) summed over its labels."""
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


def _round(llm: Any, s: ServeSettings, vocab: int, seed: int, concurrent: int) -> dict[str, float]:
    """One round of every case on one engine: seconds per request kind; every request's prompt is new."""
    prompts = iter(range(seed * 16, seed * 16 + 16))  # a fresh seed per request kind

    def fresh(n: int, length: int) -> list[dict[str, list[int]]]:
        return _random_prompts(n, length, vocab, next(prompts))

    times = {
        "prefill": _timed(llm, fresh(1, s.prompt_len), 1),
        "batch1": _timed(llm, fresh(1, s.prompt_len), s.new_tokens),
        "long_prefill": _timed(llm, fresh(1, s.long_prompt_len), 1),
        "long": _timed(llm, fresh(1, s.long_prompt_len), s.new_tokens),
        "saturating": _timed(llm, fresh(s.batch, s.batch_prompt_len), s.new_tokens),
    }
    if concurrent:
        times["concurrent"] = _timed(llm, fresh(concurrent, s.long_prompt_len), s.new_tokens)
    return times


def _rate(tokens: int, seconds: float) -> float | None:
    """Tokens per second; None where noise left no time to divide by (decode is a difference of two requests)."""
    return tokens / seconds if seconds > 0 else None


def _summary(times: dict[str, list[float]], s: ServeSettings, capacity: dict[str, Any]) -> dict[str, Any]:
    med = {case: statistics.median(values) for case, values in times.items()}
    concurrent = capacity["concurrent_requests"]
    return {
        **capacity,
        "prefill_tok_s": s.prompt_len / med["prefill"],
        "decode_tok_s": _rate(s.new_tokens - 1, med["batch1"] - med["prefill"]),
        "long_decode_tok_s": _rate(s.new_tokens - 1, med["long"] - med["long_prefill"]),
        "throughput_tok_s": s.batch * s.new_tokens / med["saturating"],
        "concurrent_tok_s": concurrent * s.new_tokens / med["concurrent"] if "concurrent" in med else None,
        **{f"{case}_s": value for case, value in med.items()},
    }


def _greedy(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[tuple[int, float]]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [
        [(t, lp[t].logprob) for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)]
        for o in outputs
    ]


def _engine(folder: str, s: ServeSettings, max_len: int, share: float | None) -> Any:
    """One engine as every measured engine is made: the KV budget fixed, no prefix caching, statistics on."""
    from vllm import LLM

    tokenizer = any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    extra = {} if share is None else {"gpu_memory_utilization": share}
    return LLM(folder, dtype=s.dtype, enforce_eager=s.enforce_eager, max_model_len=max_len, seed=s.seed,
               max_num_seqs=max(s.batch, 256), kv_cache_memory_bytes=int(s.kv_cache_gib * 2**30),
               enable_prefix_caching=False, disable_log_stats=False, tensor_parallel_size=s.tensor_parallel_size,
               skip_tokenizer_init=not tokenizer, **extra)  # fmt: skip  (prompts are token ids)


def memory_share(s: ServeSettings, engines: int) -> float | None:
    """Each engine's ``gpu_memory_utilization`` (all live at once): the setting, else 0.9 of the memory free now,
    split evenly (vLLM refuses to start when its share of the total exceeds the free memory); None on a CPU."""
    if s.gpu_memory_utilization is not None:
        return s.gpu_memory_utilization
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return 0.9 * free / total / engines


def _capacity(llm: Any, s: ServeSettings) -> dict[str, Any]:
    """vLLM's own KV capacity: tokens, and requests of ``long_prompt_len`` + ``new_tokens`` held at once."""
    cache, max_len = llm.llm_engine.vllm_config.cache_config, llm.llm_engine.vllm_config.model_config.max_model_len
    tokens = getattr(cache, "kv_cache_size_tokens", None) or cache.num_gpu_blocks * cache.block_size
    concurrency = getattr(cache, "kv_cache_max_concurrency", None) or tokens / max_len
    return {"kv_cache_tokens": tokens, "max_concurrency": concurrency, "kv_blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size, "concurrent_requests": int(concurrency) if s.concurrency else 0,
            "kv_cache_bytes": cache.kv_cache_memory_bytes}  # fmt: skip  (the budget the engine took)


def _run(job: dict[str, Any]) -> dict[str, Any]:
    checkpoints, greedy, greedy_tokens = job.pop("checkpoints"), job.pop("greedy"), job.pop("greedy_tokens")
    s = ServeSettings(**job)
    # the longest request: the KV-bound case's requests are of this length, so vLLM's count of requests at
    # max_model_len is the number that fits without preemption
    max_len = max(s.prompt_len, s.long_prompt_len, s.batch_prompt_len) + s.new_tokens
    share = memory_share(s, len(checkpoints))
    engines = {name: _engine(str(folder), s, max_len, share) for name, folder in checkpoints.items()}
    capacity = {name: _capacity(llm, s) for name, llm in engines.items()}
    vocab = next(iter(engines.values())).llm_engine.vllm_config.model_config.hf_config.vocab_size
    times: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    preempted = dict.fromkeys(engines, 0.0)
    for r in range(s.warmup + s.repeats if s.repeats else 0):
        for name, llm in engines.items():  # alternating: drift hits every engine alike
            before = _counter(llm, "vllm:num_preemptions")
            for case, seconds in _round(llm, s, vocab, s.seed + r, capacity[name]["concurrent_requests"]).items():
                if r >= s.warmup:
                    times[name].setdefault(case, []).append(seconds)
            preempted[name] += _counter(llm, "vllm:num_preemptions") - before
    results = {name: _summary(times[name], s, capacity[name]) if s.repeats else dict(capacity[name])
               for name in engines}  # fmt: skip
    for name, llm in engines.items():
        results[name]["preemptions"] = int(preempted[name])
        if greedy:
            results[name]["greedy"] = _greedy(llm, greedy, greedy_tokens)
    hits = _counter(next(iter(engines.values())), "vllm:prefix_cache_hits")  # the process's counter: all engines
    for result in results.values():
        result["prefix_cache_hits"] = int(hits)
    return results


if __name__ == "__main__":
    job_main(_run, "one measurement job (see nbl.serve.bench.measure)")
