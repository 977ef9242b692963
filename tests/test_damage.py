"""Measured single-layer damage against replacing each layer in a copy of the model and computing its loss."""

import copy

import pytest
import torch

import nbl
from nbl.damage import single_layer_damage
from tests.conftest import make_tiny, token_batches


def _loss(model, batches) -> float:
    with torch.no_grad():
        losses = [(float(model(b, labels=b).loss), b[:, 1:].numel()) for b in batches]
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


@pytest.mark.parametrize("mode", ["linear", "drop"])
def test_single_layer_damage_equals_replacing_each_layer_in_a_copy(family, mode):
    model = make_tiny(family)
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    heldout = token_batches(n_batches=2, seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    damage = single_layer_damage(model, stats, heldout, mode=mode, progress=False)
    base = _loss(model, heldout)
    for i in range(4):
        replaced = copy.deepcopy(model)
        nbl.linearize(replaced, stats, [i], mode=mode)
        assert damage[i] == pytest.approx(_loss(replaced, heldout) - base, abs=1e-5)
    assert nbl.replaced_layers(model) == {} and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_loss_selection_runs_in_the_app_and_picks_the_least_damaging_layers(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from nbl.__main__ import CONF_DIR
    from nbl.runner import RunContext, run_experiment

    monkeypatch.setenv("NBL_CACHE", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "speed=none", "selection=loss", "num_layers=2"])
    results = run_experiment(cfg, RunContext(tmp_path / "run"))
    damage = {int(i): v for i, v in results["scores"]["loss"].items()}
    assert sorted(damage) == [0, 1, 2, 3] and results["summary_row"]["method"] == "loss+linear"
    assert results["replaced_layers"] == sorted(sorted(damage, key=damage.get)[:2])
    assert results["selection_seconds"] > 0
