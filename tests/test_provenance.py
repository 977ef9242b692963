"""Results say where they came from: code, libraries and weights key the caches; run folders never collide;
explicit layers and the calibration mode are recorded as they ran."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nbl
import nbl.provenance as provenance
import nbl.recipe.keys
from nbl.__main__ import CONF_DIR
from nbl.recipe.keys import calibration_fields, model_fields
from nbl.recipe.launch import claim_output_dir
from nbl.recipe.prepare import load_model, load_tokenizer, model_config
from nbl.recipe.run import run_experiment
from nbl.recipe.state import RunContext
from nbl.recipe.validation import validate
from nbl.recipe.windows import calibration_batches

pytestmark = pytest.mark.slow


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_code_hash_follows_every_package_source(tmp_path, monkeypatch):
    package = tmp_path / "nbl"
    shutil.copytree(provenance.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)
    provenance.code_hash.cache_clear()
    try:
        before = provenance.code_hash()
        edited = package / "measure" / "evaluation.py"  # a module of a subpackage counts too
        edited.write_text(edited.read_text() + "\n# changed\n")
        provenance.code_hash.cache_clear()
        assert provenance.code_hash() != before
    finally:
        provenance.code_hash.cache_clear()


def test_results_record_their_provenance_and_a_code_change_misses_every_cache(tmp_path, monkeypatch, nbl_cache):
    overrides = [
        "experiment=smoke",
        "speed=none",
        "eval=quick",
        "eval.tasks=[]",
        "eval.perplexity.num_sequences=2",
        "eval.perplexity.seq_len=32",
    ]
    first = run_experiment(_compose(*overrides), RunContext(tmp_path / "a"))
    again = run_experiment(_compose(*overrides), RunContext(tmp_path / "b"))
    assert not first["calibration"]["cache_hit"] and again["calibration"]["cache_hit"]
    prov = first["provenance"]
    assert prov["code_hash"] == provenance.code_hash() and prov["libraries"]["torch"] == torch.__version__
    assert prov["libraries"]["lm_eval"] and "commit" in prov["git"] and prov["run_id"] == "a"
    assert first["config"]["replacement"]["ridge"] == 0.0
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["provenance"] == prov and saved["config"] == first["config"]

    identity = provenance.code_identity()
    monkeypatch.setattr(nbl.recipe.keys, "code_identity", lambda: {**identity, "code_hash": "edited"})
    changed = run_experiment(_compose(*overrides), RunContext(tmp_path / "c"))
    assert not changed["calibration"]["cache_hit"]
    assert len(list((tmp_path / "cache" / "base_eval").glob("*.json"))) == 2  # the base model was re-scored


def test_the_resolved_hub_commit_keys_the_statistics():
    cfg = _compose("model=llama3.1-8b")
    config = nbl.models.tiny_config("llama")
    config._commit_hash = "aaa"
    fields_a = calibration_fields(cfg, config)
    config._commit_hash = "bbb"
    assert model_fields(cfg, config)["resolved_revision"] == "bbb"
    assert fields_a != calibration_fields(cfg, config)


def test_every_run_gets_its_own_folder():
    dirs = {str(_compose(hydra=True).hydra.run.dir) for _ in range(2)}
    sweeps = {str(_compose(hydra=True).hydra.sweep.dir) for _ in range(2)}
    assert len(dirs) == 2 and len(sweeps) == 2
    assert all(re.search(r"_cca-linear-k8_[0-9a-f]{6}$", d) for d in dirs)


def test_an_output_folder_is_claimed_once(tmp_path):
    """Claimed at launch, the folder is this process's own when the run claims it again; another process's is
    refused."""
    run = claim_output_dir(tmp_path / "run")
    assert claim_output_dir(tmp_path / "run") == run
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "nbl-run.json").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(FileExistsError, match=r"already holds a run \(.*nbl-run\.json: process 1 on elsewhere\)"):
        claim_output_dir(tmp_path / "other")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds a run \(.*results\.json\)"):
        claim_output_dir(tmp_path / "done")


def test_two_runs_started_together_keep_their_own_results(tmp_path, nbl_cache):
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "nbl", "experiment=smoke", "speed=none"]
    procs = [
        subprocess.Popen(
            [*cmd, f"replacement.ridge={r}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for r in (0.0, 10.0)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "outputs").rglob("results.json"))]
    assert sorted(r["replacement"]["ridge"] for r in results) == [0.0, 10.0]
    assert len({r["provenance"]["run_id"] for r in results}) == 2


def test_explicit_layers_are_recorded_as_explicit_and_refitted_in_order_when_sequential(tmp_path, nbl_cache):
    cfg = _compose(
        "experiment=smoke", "speed=none", "layers=[2,0]", "calibration.mode=sequential", "save_checkpoint=true"
    )
    results = run_experiment(cfg, RunContext(tmp_path / "run"))
    assert results["selection"]["layers_from"] == "explicit" and results["score_used"] is None
    assert results["summary_row"]["method"] == "explicit+linear seq"
    assert [s["layer"] for s in results["calibration"]["sequential_steps"]] == [0, 2]
    assert results["calibration"]["mode"] == "sequential"

    # independently: layer 2's map is fitted on the model whose layer 0 is already linearized
    typed, _ = validate(cfg)
    model = load_model(typed.model, model_config(typed.model), torch.device("cpu"), typed.seed)
    batches, _ = calibration_batches(load_tokenizer(typed.model), typed.calibration)
    nbl.linearize(model, nbl.calibrate(model, batches, progress=False), [0])
    w, b = nbl.fit_lmmse(nbl.calibrate(model, batches, progress=False)[2])
    saved = nbl.load_linearized(tmp_path / "run" / "checkpoint")
    torch.testing.assert_close(saved.model.layers[2].attn_linear.weight, w.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(saved.model.layers[2].attn_linear.bias, b.float(), rtol=1e-4, atol=1e-5)

    one_pass = run_experiment(_compose("experiment=smoke", "speed=none", "layers=[2,0]"), RunContext(tmp_path / "one"))
    assert one_pass["summary_row"]["method"] == "explicit+linear" and one_pass["calibration"]["mode"] == "one_pass"
    assert OmegaConf.to_container(cfg.selection)["strategy"] == "cca"  # the config asked for cca; it did not run


def test_a_local_model_folder_is_keyed_by_what_it_holds(tmp_path):
    """Weights swapped in the same folder (same architecture, names, sizes) miss the cache; the same weights
    written again hit it."""
    from tests.conftest import make_tiny

    folder = tmp_path / "model"
    cfg = _compose("model=llama3.1-8b", f"model.path={folder}")
    make_tiny("llama", seed=0).save_pretrained(folder)
    config = nbl.models.tiny_config("llama")
    first = model_fields(cfg, config)
    make_tiny("llama", seed=0).save_pretrained(folder)  # the same weights again
    assert model_fields(cfg, config) == first
    make_tiny("llama", seed=1).save_pretrained(folder)  # a fine-tune, say: only the values differ
    assert model_fields(cfg, config)["weights"] != first["weights"]
    assert calibration_fields(cfg, config) != {**calibration_fields(cfg, config), "model": first}


def test_the_embedded_model_is_converted_under_the_configured_cache_dir(tmp_path, monkeypatch, nbl_cache):
    """cache_dir (not only $NBL_CACHE) says where the converted model lives."""
    from nbl.recipe.prepare import model_config
    from nbl.recipe.validation import read_architecture

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("NBL_CACHE", str(elsewhere))  # an empty cache: it must not be used (nor converted into)
    cfg = _compose("experiment=smoke", "model=smollm2-135m", f"cache_dir={nbl_cache}")
    assert read_architecture(cfg.model, nbl_cache).num_hidden_layers == 30
    assert model_config(cfg.model, nbl_cache).hidden_size == 576
    assert not list(elsewhere.iterdir())


def test_the_code_and_git_state_are_read_when_a_run_starts(monkeypatch, tmp_path):
    """A sweep that runs for an hour must not label its later runs with a commit made meanwhile."""
    from nbl import provenance as prov
    from nbl.recipe import run
    from nbl.recipe.state import RunContext

    prov.git_state.cache_clear()
    prov.code_hash.cache_clear()
    seen = {}

    def validate_later(cfg):
        seen.update(git=prov.git_state.cache_info().currsize, code=prov.code_hash.cache_info().currsize)
        raise RuntimeError("stop after the start")

    monkeypatch.setattr(run, "validate", validate_later)
    with pytest.raises(RuntimeError, match="stop after the start"):
        run.run_experiment(OmegaConf.create({}), RunContext(tmp_path))
    assert seen == {"git": 1, "code": 1}
