"""Sweep reports: rows are distinct computations (config + code), seeds averaged, reruns and gaps named."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from nbl.report import collect, method_name, missing_jobs, table_rows, write_report


def _run(strategy, mode, k, avg, seed=0, ridge=0.0, finished="2026-11-30T00:00:00+00:00", code="c0", **extra):
    config = {
        "model": {"name": "m", "source": "tiny"},
        "calibration": {"source": "lambada", "num_sequences": 4, "seed": 0, "mode": "one_pass"},
        "selection": {"strategy": strategy, "cca_target": "residual", "seed": seed},
        "replacement": {"mode": mode, "ridge": ridge},
        "eval": {"tasks": ["piqa", "boolq"], "limit": 10},
        "speed": {"enabled": True},
        "logger": {"mode": "disabled"},
        "num_layers": k,
        "layers": None,
        "seed": 0,
        "cache_dir": "/somewhere",
    }
    run = {
        "model": "m",
        "selection": {"strategy": strategy, "seed": seed, "layers_from": "strategy"},
        "replacement": {"mode": mode, "ridge": ridge},
        "calibration": {"mode": "one_pass"},
        "num_layers": k,
        "eval": {"piqa": {"acc": avg, "acc_norm": avg + 0.01}, "boolq": {"acc": avg}},
        "eval_base": {"piqa": {"acc": 0.7, "acc_norm": 0.72}, "boolq": {"acc": 0.6}},
        "average": avg + 0.005,
        "average_base": 0.66,
        "perplexity": {"nbl": 20.0 + k, "base": 18.0},
        "speed": {"prefill_speedup": 1 + k / 100, "decode_speedup": 1 + k / 90},
        "params": {"sparsity": k / 100},
        "config": config,
        "overrides": [f"selection={strategy}", f"replacement={mode}", f"num_layers={k}"],
        "provenance": {
            "code_hash": code,
            "libraries": {"torch": "2.13.0"},
            "model_revision": None,
            "finished": finished,
        },
        "_path": f"/runs/{strategy}-{mode}-{k}-{seed}-{ridge}-{finished}",
    }
    for key, value in extra.items():  # dotted config keys
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return run


def _by_method(rows):
    return {r["method"]: r for r in rows}


def test_report_writes_paper_shaped_table(tmp_path):
    runs = [
        _run("cca", "linear", 4, 0.65),
        _run("cca", "linear", 8, 0.62),
        _run("cosine", "drop", 8, 0.60),
        _run("random", "drop", 8, 0.50, seed=0),
        _run("random", "drop", 8, 0.40, seed=1),
    ]
    by_method = _by_method(table_rows(runs))
    assert set(by_method) == {"baseline", "Attn NBL-4", "Attn NBL-8", "Attn DROP-8", "random+drop"}
    assert by_method["baseline"]["piqa"] == 0.72  # headline metric for piqa is acc_norm
    assert by_method["random+drop"]["n"] == 2 and by_method["random+drop"]["avg"] == pytest.approx(0.455)
    assert by_method["random+drop"]["avg_std"] == pytest.approx(0.0707, abs=1e-3)
    files = write_report(runs, tmp_path)
    text = files["markdown"].read_text()
    assert "| Attn NBL-8 | 8 | 1 | 8.0% |" in text
    assert "_series" not in text and "Notes" not in text
    assert files["csv"].read_text().count("\n") == 6
    assert files["m_acc_vs_k"].stat().st_size > 1000 and files["m_acc_vs_speedup"].is_file()
    assert files["m_ppl_vs_k"].is_file() and files["m_ppl_vs_predicted_speedup"].is_file()


def test_second_domains_predicted_speedups_cost_and_layers_are_columns(tmp_path):
    runs = [_run("cca", "linear", 4, 0.65), _run("greedy", "linear", 4, 0.66)]
    for r, sciq in zip(runs, (30.0, 28.0), strict=True):
        r["perplexity"]["domains"] = {"sciq": {"nbl": sciq, "base": 25.0}}
        r["predicted"] = {"prefill_speedup": 1.04}
        r["config"]["speed"]["prompt_len"] = 512
        r["selection_seconds"] = 12.0
        r["replaced_layers"] = [3, 5, 7, 9]
    by_method = _by_method(table_rows(runs))
    assert by_method["baseline"]["ppl/sciq"] == 25.0 and by_method["greedy+linear"]["ppl/sciq"] == 28.0
    assert by_method["Attn NBL-4"]["pred_prefill_x"] == 1.04 and by_method["Attn NBL-4"]["layers"] == "3 5 7 9"
    runs[0]["config"]["speed"]["prompt_len"] = 0  # a prediction for an empty prompt says nothing
    assert _by_method(table_rows(runs))["Attn NBL-4"]["pred_prefill_x"] is None
    text = write_report(runs, tmp_path)["markdown"].read_text()
    assert "| ppl/sciq |" in text.splitlines()[2]  # the header row
    assert "| greedy+linear | 4 | 1 |" in text and "| 28.00 |" in text and "| 12 | 3 5 7 9 |" in text


def test_runs_differing_beyond_the_seed_get_their_own_labelled_rows():
    rows = table_rows([_run("cca", "linear", 8, 0.62, ridge=0.0), _run("cca", "linear", 8, 0.30, ridge=10.0)])
    by_method = _by_method(rows)
    assert by_method["Attn NBL [replacement.ridge=0.0]-8"]["avg"] == pytest.approx(0.625)
    assert by_method["Attn NBL [replacement.ridge=10.0]-8"]["avg"] == pytest.approx(0.305)
    assert all(r["n"] == 1 for r in rows)


@pytest.mark.parametrize(
    "change",
    [
        {"selection.cca_target": "attention"},
        {"calibration.num_sequences": 64},
        {"calibration.source": "c4"},
        {"eval.limit": 100},
        {"code": "c1"},
    ],
    ids=["cca_target", "calibration_size", "calibration_data", "eval_limit", "code"],
)
def test_no_setting_other_than_the_seed_is_averaged(change):
    code = change.pop("code", "c0")
    rows = table_rows([_run("cca", "linear", 8, 0.62), _run("cca", "linear", 8, 0.30, code=code, **change)])
    nbl_rows = [r for r in rows if r["k"] == 8]
    assert len(nbl_rows) == 2 and all(r["n"] == 1 and r["avg_std"] is None for r in nbl_rows)
    assert len({r["method"] for r in nbl_rows}) == 2


def test_a_rerun_replaces_the_older_run_and_is_noted():
    old = _run("random", "drop", 8, 0.40, seed=0, finished="2026-11-30T00:00:00+00:00")
    new = _run("random", "drop", 8, 0.40, seed=0, finished="2026-11-30T01:00:00+00:00")
    new["_path"] = "rerun/results.json"
    notes: list[str] = []
    (row,) = [r for r in table_rows([new, old], notes) if r["k"] == 8]
    assert row["n"] == 1 and row["avg"] == pytest.approx(0.405) and row["avg_std"] is None
    assert len(notes) == 1 and old["_path"] in notes[0] and "superseded" in notes[0]


def test_identical_configs_whose_results_disagree_are_flagged():
    """Same config, code, libraries and seeds: the results must agree; when they do not, the report says so."""
    old = _run("random", "drop", 8, 0.50, seed=0, finished="2026-11-30T00:00:00+00:00")
    new = _run("random", "drop", 8, 0.40, seed=0, finished="2026-11-30T01:00:00+00:00")
    new["_path"] = "rerun/results.json"
    notes: list[str] = []
    table_rows([new, old], notes)
    (flag,) = [n for n in notes if "IDENTICAL CONFIGS DISAGREE" in n]
    assert old["_path"] in flag and "rerun/results.json" in flag


def test_explicit_layers_and_sequential_mode_are_named_for_what_ran():
    explicit = _run("cca", "linear", 2, 0.6)
    explicit["selection"]["layers_from"] = "explicit"
    assert method_name(explicit) == "explicit+linear"
    sequential = copy.deepcopy(explicit)
    sequential["calibration"]["mode"] = "sequential"
    assert method_name(sequential) == "explicit+linear seq"
    assert method_name(_run("cca", "linear", 2, 0.6)) == "Attn NBL"
    estimated = _run("validated", "linear", 2, 0.6)
    assert method_name(estimated) == "validated+linear"
    estimated["selection"]["damage"] = "estimated"
    assert method_name(estimated) == "validated (estimated)+linear"
    explicit["selection"]["damage"] = "estimated"  # explicit layers: nothing was estimated
    assert method_name(explicit) == "explicit+linear"


def test_missing_sweep_jobs_are_listed(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    spec = {"hydra": {"sweeper": {"params": {"num_layers": "4,8"}}, "overrides": {"task": ["selection=cca,cosine"]}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(spec))
    done = _run("cca", "linear", 4, 0.6)
    done["overrides"] = ["selection=cca", "num_layers=4"]
    (sweep / "0").mkdir()
    (sweep / "0" / "results.json").write_text(json.dumps(done))
    runs = collect([sweep])
    missing = missing_jobs([sweep], runs)
    assert sorted(missing) == [
        "num_layers=4 selection=cosine",
        "num_layers=8 selection=cca",
        "num_layers=8 selection=cosine",
    ]
    text = write_report(runs, tmp_path / "report", missing)["markdown"].read_text()
    assert "3 sweep job(s) left no results.json" in text


def test_results_without_provenance_are_refused(tmp_path):
    legacy = _run("cca", "linear", 4, 0.6)
    del legacy["config"]
    path = Path(tmp_path / "results.json")
    path.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="records no config or provenance"):
        collect([tmp_path])


def test_a_truncated_results_file_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"model": "m", "eval": {')
    with pytest.raises(ValueError, match=r"run/results\.json is not valid JSON"):
        collect([tmp_path])


def test_a_perplexity_only_sweep_still_has_its_baseline_row():
    runs = [_run("cosine", "linear", 4, 0.6), _run("cca", "linear", 4, 0.6)]
    for r in runs:
        r["eval"], r["eval_base"], r["average"], r["average_base"] = {}, {}, None, None
    by_method = _by_method(table_rows(runs))
    assert by_method["baseline"]["perplexity"] == 18.0 and by_method["Attn NBL-4"]["perplexity"] == 24.0


def test_granularity_healing_and_quantization_get_their_own_names_and_rows():
    runs = []
    for granularity, strategy, mode in [
        ("block", "cca", "linear"),
        ("mlp", "cosine", "drop"),
        ("joint", "cosine", "drop"),
    ]:
        run = _run(strategy, mode, 4, 0.5)
        run["replacement"]["granularity"] = run["config"]["replacement"]["granularity"] = granularity
        run["_path"] += granularity
        runs.append(run)
    runs[2]["replaced_parts"] = {"attention": [1, 2], "mlp": [3, 9]}
    healed = _run("cca", "linear", 4, 0.55, **{"finetune": {"method": "lora"}})
    maps = _run("cca", "linear", 4, 0.56, **{"finetune": {"method": "lora", "train_maps": True}})
    quantized = _run("cca", "linear", 4, 0.5, **{"quantize": {"scheme": "int8_weight"}})
    rows = _by_method(table_rows([*runs, healed, maps, quantized], []))
    assert {"Block NBL-4", "MLP DROP-4", "Joint DROP-4", "Attn NBL + int8_weight-4"} <= set(rows)
    assert {"Attn NBL + LoRA-4", "Attn NBL + LoRA (maps trained)-4"} <= set(rows)
    assert {"baseline", "baseline + int8_weight"} <= set(rows)  # a quantized run's base is another model
    assert rows["Joint DROP-4"]["layers"] == "attention: 1 2 | mlp: 3 9"


def test_the_pareto_front_keeps_the_points_nothing_beats_on_speed_and_quality():
    from nbl.report import pareto_front

    points = [(1.0, 50.0), (1.05, 51.0), (1.1, 49.0), (1.1, 45.0), (1.15, 41.0), (1.2, 40.0)]
    assert pareto_front(points, higher_is_better=True) == [(1.05, 51.0), (1.1, 49.0), (1.15, 41.0), (1.2, 40.0)]
    assert pareto_front([(1.0, 20.0), (1.1, 25.0), (1.2, 24.0)], higher_is_better=False) == [(1.0, 20.0), (1.2, 24.0)]
