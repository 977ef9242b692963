"""Checkpoints served by vLLM, measured alike: KV capacity from vLLM's own numbers, and speed in three cases.

Every checkpoint gets its own engine, all of them alive in one process, and the measurement rounds alternate
between them (base, NBL, base, NBL, ... after a warm-up round), so drift on a noisy machine hits all alike;
medians over the rounds. Cases (prompts of random token ids, ``ignore_eos``: every request runs to its length):

- batch 1: one prompt of ``prompt_len`` tokens; prefill = the time of a 1-token request, decode tokens/s = the
  further ``new_tokens - 1`` tokens over the extra time of a ``new_tokens`` request;
- saturating: ``batch`` prompts of ``batch_prompt_len`` tokens at once, generated tokens per second;
- long context: one prompt of ``long_prompt_len`` tokens, decode tokens/s as for batch 1.

The engines run in a fresh process (``python -m nbl.serve.bench``): vLLM spawns its own processes, and the caller
(the app, a test) keeps none of its state. :func:`measure` starts it and reads its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ServeSettings:
    prompt_len: int = 512
    new_tokens: int = 64
    batch: int = 64
    batch_prompt_len: int = 128
    long_prompt_len: int = 2048
    repeats: int = 3
    warmup: int = 1
    kv_cache_gib: int = 2  # the KV budget every engine gets, whole GiB (CPU: VLLM_CPU_KVCACHE_SPACE)
    dtype: str = "float32"
    enforce_eager: bool = False  # true: no torch.compile (starts faster, decodes slower)
    gpu_memory_utilization: float | None = None  # GPU: each engine's share (all engines live at once); CPU: unused
    seed: int = 0


def measure(checkpoints: dict[str, str | Path], settings: ServeSettings, greedy: list[list[int]] | None = None,
            greedy_tokens: int = 32, timeout_s: float = 3600) -> dict[str, Any]:  # fmt: skip
    """Speed and KV capacity of each checkpoint (name -> folder) in vLLM: ``{name: {...}}``. ``greedy``: prompts
    (token ids) whose greedy continuations of ``greedy_tokens`` tokens, and the log-probability of each, are also
    returned (``"greedy"``, a list per prompt of (token, logprob) pairs); ``settings.repeats=0``: those alone."""
    with tempfile.TemporaryDirectory(prefix="nbl-vllm-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        spec = {"checkpoints": {k: str(v) for k, v in checkpoints.items()}, "greedy": greedy,
                "greedy_tokens": greedy_tokens, **asdict(settings)}  # fmt: skip
        job.write_text(json.dumps(spec))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib)}
        proc = subprocess.run([sys.executable, "-m", "nbl.serve.bench", str(job), str(out)], env=env,
                              capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM measurement failed:\n{error_excerpt(proc.stderr)}")
        return json.loads(out.read_text())


def error_excerpt(output: str, head: int = 6000, tail: int = 2000) -> str:
    """What a failed engine's output says, kept short: from its first traceback (the root cause: vLLM's last lines
    only say that its engine core failed) and its last lines."""
    start = max(output.find("Traceback (most recent call last)"), 0)
    if len(output) - start <= head + tail:
        return output[start:]
    return f"{output[start : start + head]}\n[... {len(output) - start - head - tail} characters ...]\n{output[-tail:]}"


def ratio(value: float | None, base: float | None) -> float | None:
    """A speed-up over the base; None where either rate could not be measured (see :func:`_rate`)."""
    return value / base if value is not None and base is not None else None


def ratio_table(served: dict[str, dict[str, Any]], predicted: dict[str, dict[str, float]],
                extra: tuple[str, dict[str, str]] | None = None) -> list[str]:  # fmt: skip
    """Markdown rows: each served model against ``served["base"]`` (KV capacity, the speed cases) beside the FLOP
    and bytes models' ``predicted`` speed-ups; ``extra``: (header, model -> cell), one more column."""
    base, one = served["base"], {"prefill_speedup": 1.0, "decode_speedup": 1.0, "decode_bytes_speedup": 1.0}
    header = ["model", "KV capacity (tokens)", "capacity x", "prefill x", "decode x (batch 1)", "decode x (long)",
              "throughput x (batch)", "predicted prefill / decode (FLOPs)", "predicted decode (bytes)"]  # fmt: skip
    header += [extra[0]] if extra else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in served.items():
        p = predicted.get(name, one)
        cells = [name, f"{r['kv_cache_tokens']:,}", f"{r['kv_cache_tokens'] / base['kv_cache_tokens']:.2f}"]
        for case in ("prefill", "decode", "long_decode", "throughput"):
            x = ratio(r[f"{case}_tok_s"], base[f"{case}_tok_s"])
            cells.append("-" if x is None else f"{x:.2f}")
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


def _round(llm: Any, s: ServeSettings, vocab: int) -> dict[str, float]:
    """One round of every case on one engine: seconds per request kind."""
    one = _random_prompts(1, s.prompt_len, vocab, s.seed)
    long = _random_prompts(1, s.long_prompt_len, vocab, s.seed + 1)
    many = _random_prompts(s.batch, s.batch_prompt_len, vocab, s.seed + 2)
    return {
        "prefill": _timed(llm, one, 1),
        "batch1": _timed(llm, one, s.new_tokens),
        "long_prefill": _timed(llm, long, 1),
        "long": _timed(llm, long, s.new_tokens),
        "saturating": _timed(llm, many, s.new_tokens),
    }


def _rate(tokens: int, seconds: float) -> float | None:
    """Tokens per second; None where noise left no time to divide by (decode is a difference of two requests)."""
    return tokens / seconds if seconds > 0 else None


def _summary(times: dict[str, list[float]], s: ServeSettings, kv_tokens: int) -> dict[str, float | None]:
    med = {case: statistics.median(values) for case, values in times.items()}
    return {
        "kv_cache_tokens": kv_tokens,
        "prefill_tok_s": s.prompt_len / med["prefill"],
        "decode_tok_s": _rate(s.new_tokens - 1, med["batch1"] - med["prefill"]),
        "long_decode_tok_s": _rate(s.new_tokens - 1, med["long"] - med["long_prefill"]),
        "throughput_tok_s": s.batch * s.new_tokens / med["saturating"],
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


def _run(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM

    checkpoints, greedy, greedy_tokens = job.pop("checkpoints"), job.pop("greedy"), job.pop("greedy_tokens")
    s = ServeSettings(**job)
    max_len = max(s.prompt_len, s.long_prompt_len, s.batch_prompt_len) + s.new_tokens
    engines, kv = {}, {}
    for name, folder in checkpoints.items():
        share = {} if s.gpu_memory_utilization is None else {"gpu_memory_utilization": s.gpu_memory_utilization}
        tokenizer = any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        llm = LLM(folder, dtype=s.dtype, enforce_eager=s.enforce_eager, max_model_len=max_len, seed=s.seed,
                  max_num_seqs=max(s.batch, 1), kv_cache_memory_bytes=int(s.kv_cache_gib * 2**30),
                  skip_tokenizer_init=not tokenizer, **share)  # fmt: skip  (prompts are token ids)
        cache = llm.llm_engine.vllm_config.cache_config
        engines[name], kv[name] = llm, cache.num_gpu_blocks * cache.block_size
    vocab = next(iter(engines.values())).llm_engine.vllm_config.model_config.hf_config.vocab_size
    times: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    for r in range(s.warmup + s.repeats if s.repeats else 0):
        for name, llm in engines.items():  # alternating: drift hits every engine alike
            for case, seconds in _round(llm, s, vocab).items():
                if r >= s.warmup:
                    times[name].setdefault(case, []).append(seconds)
    results = {name: _summary(times[name], s, kv[name]) if s.repeats else {"kv_cache_tokens": kv[name]}
               for name in engines}  # fmt: skip
    for name, llm in engines.items():
        if greedy:
            results[name]["greedy"] = _greedy(llm, greedy, greedy_tokens)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one measurement job (see nbl.serve.bench.measure)")
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.write_text(json.dumps(_run(json.loads(args.job.read_text())), indent=2))
