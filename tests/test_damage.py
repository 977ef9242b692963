"""Measured single-layer damage against replacing each layer in a copy of the model and computing its loss."""

import copy
import os

import pytest
import torch

import nbl
from nbl.select.damage import Probe, greedy_selection, single_layer_damage, validate_sets
from nbl.select.ranking import RIDGE_GRID
from nbl.select.strategies import greedy as greedy_strategy
from tests.conftest import make_tiny, token_batches


def _loss(model, batches) -> float:
    with torch.no_grad():
        losses = [(float(model(b, labels=b).loss), b[:, 1:].numel()) for b in batches]
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def _untouched(model, before: dict) -> bool:
    state = model.state_dict()
    return (
        nbl.replaced_layers(model) == {} == nbl.replaced_mlps(model)
        and state.keys() == before.keys()
        and all(torch.equal(before[k], v) for k, v in state.items())
    )


@pytest.mark.parametrize("part", ["attention", "mlp", "block"])
@pytest.mark.parametrize("mode", ["linear", "drop"])
def test_single_layer_damage_equals_replacing_each_layer_in_a_copy(family, mode, part):
    model = make_tiny(family)
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False, part=part)
    heldout = token_batches(n_batches=2, seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    damage = single_layer_damage(Probe(model, stats, heldout, mode=mode, part=part, progress=False))
    base = _loss(model, heldout)
    for i in range(4):
        replaced = copy.deepcopy(model)
        nbl.linearize(replaced, stats, [i], mode=mode, part=part)
        assert damage[i] == pytest.approx(_loss(replaced, heldout) - base, abs=1e-5)
    assert _untouched(model, before)


def test_damage_on_mixed_attention_types_equals_replacing_in_a_copy():
    """Every layer is measured with its own attention type's mask (it was layer 0's for all: wrong damages)."""
    from tests.test_layerwise import mixed_attention_model

    model = mixed_attention_model(types=("full", "sliding", "sliding", "sliding"))
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    heldout = token_batches(n_batches=2, seed=9)
    # layer 0 cannot go: a sliding layer would take its (full) cache slot
    damage = single_layer_damage(Probe(model, stats, heldout, progress=False), candidates=[1, 2, 3])
    base = _loss(model, heldout)
    for i in (1, 2, 3):
        replaced = copy.deepcopy(model)
        nbl.linearize(replaced, stats, [i])
        assert damage[i] == pytest.approx(_loss(replaced, heldout) - base, abs=1e-6)


@pytest.mark.slow
def test_loss_selection_runs_in_the_app_and_picks_the_least_damaging_layers(tmp_path, monkeypatch, nbl_cache):
    results = _run_app(tmp_path, monkeypatch, "selection=loss", "num_layers=2")
    damage = {int(i): v for i, v in results["scores"]["loss"].items()}
    assert sorted(damage) == [0, 1, 2, 3] and results["summary_row"]["method"] == "loss+linear"
    # independently: the run's model and windows, each layer replaced in a copy, the loss on the held-out windows
    model, calibration, heldout = _app_model_and_windows(results)
    stats = nbl.calibrate(model, calibration, progress=False)
    base = _loss(model, heldout)
    for i in range(4):
        replaced = copy.deepcopy(model)
        nbl.linearize(replaced, stats, [i])
        assert damage[i] == pytest.approx(_loss(replaced, heldout) - base, abs=1e-5)
    assert results["replaced_layers"] == sorted(sorted(damage, key=damage.get)[:2])
    assert results["selection_seconds"] > 0
    # the damages do not depend on k: another k reads them from the cache instead of measuring again
    monkeypatch.setattr("nbl.select.strategies.loss.single_layer_damage", lambda *a, **k: pytest.fail("measured again"))
    again = _run_app(tmp_path, monkeypatch, "selection=loss", "num_layers=3", folder="run3")
    assert again["scores"]["loss"] == results["scores"]["loss"]
    assert again["replaced_layers"] == sorted(sorted(damage, key=damage.get)[:3])
    assert len(list((tmp_path / "cache" / "damage").glob("*.json"))) == 1


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_greedy_steps_are_the_least_damaging_layer_given_the_earlier_choices(family, part):
    model = make_tiny(family)
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False, part=part)
    heldout = token_batches(n_batches=2, seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = greedy_selection(Probe(model, stats, heldout, part=part, progress=False), 3)
    # independently: at each step, replace every remaining layer in a copy of the partly replaced model
    partial, total = copy.deepcopy(model), 0.0
    replaced = nbl.replaced_layers if part == "attention" else nbl.replaced_mlps
    for step in steps:
        base = _loss(partial, heldout)
        losses = {}
        for i in sorted(set(range(4)) - set(replaced(partial))):
            trial = copy.deepcopy(partial)
            nbl.linearize(trial, stats, [i], part=part)
            losses[i] = _loss(trial, heldout) - base
        assert step.layer == min(losses, key=losses.get)
        assert step.damage == pytest.approx(losses[step.layer], abs=1e-5)
        total += losses[step.layer]
        assert step.total == pytest.approx(total, abs=1e-5)
        nbl.linearize(partial, stats, [step.layer], part=part)
    assert _untouched(model, before)


def test_greedy_restricted_to_candidates_and_k_checked():
    model = make_tiny()
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    heldout = token_batches(n_batches=1, seed=9)
    steps = greedy_selection(Probe(model, stats, heldout, progress=False), 2, candidates=[1, 3])
    assert sorted(s.layer for s in steps) == [1, 3]
    with pytest.raises(ValueError, match="cannot choose k=3 layers out of 2 candidates"):
        greedy_selection(Probe(model, stats, heldout, progress=False), 3, candidates=[1, 3])


def _app_model_and_windows(results):
    """The model and the calibration and held-out windows of a run, rebuilt from its recorded config."""
    from omegaconf import OmegaConf

    from nbl.recipe.prepare import load_model, load_tokenizer, model_config
    from nbl.recipe.windows import calibration_batches

    cfg = OmegaConf.create(results["config"])
    model = load_model(cfg.model, model_config(cfg.model), torch.device("cpu"), cfg.seed)
    calibration, heldout = calibration_batches(
        load_tokenizer(cfg.model), cfg.calibration, cfg.selection.holdout_sequences, cfg.selection.heldout_source
    )
    return model, calibration, heldout


def _run_app(tmp_path, monkeypatch, *overrides, folder="run"):
    from hydra import compose, initialize_config_dir

    from nbl.__main__ import CONF_DIR
    from nbl.recipe.run import run_experiment
    from nbl.recipe.state import RunContext

    assert os.environ["NBL_CACHE"] == str(tmp_path / "cache"), "use the nbl_cache fixture"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "speed=none", *overrides])
    return run_experiment(cfg, RunContext(tmp_path / folder))


@pytest.mark.slow
def test_greedy_selection_runs_in_the_app_and_records_its_steps(tmp_path, monkeypatch, nbl_cache):
    results = _run_app(tmp_path, monkeypatch, "selection=greedy", "num_layers=2")
    steps = results["greedy_steps"]
    assert [s["layer"] for s in steps] == list(map(int, results["scores"]["greedy"]))
    assert results["replaced_layers"] == sorted(s["layer"] for s in steps)
    assert results["summary_row"]["method"] == "greedy+linear"
    # a larger k continues the cached steps; a smaller k replays them without running the model
    starts = []
    real = greedy_strategy.greedy_selection
    monkeypatch.setattr(greedy_strategy, "greedy_selection", lambda *a, **kw: starts.append(len(kw["start"])) or real(*a, **kw))
    (tmp_path / "run").rename(tmp_path / "run2")
    longer = _run_app(tmp_path, monkeypatch, "selection=greedy", "num_layers=3")
    assert starts == [2] and [s["layer"] for s in longer["greedy_steps"]][:2] == [s["layer"] for s in steps]
    (tmp_path / "run").rename(tmp_path / "run3")
    shorter = _run_app(tmp_path, monkeypatch, "selection=greedy", "num_layers=1")
    assert starts == [2] and shorter["greedy_steps"] == steps[:1]


@pytest.mark.slow
def test_lmmse_selection_with_auto_ridge_in_the_app(tmp_path, monkeypatch, nbl_cache):
    results = _run_app(tmp_path, monkeypatch, "selection=lmmse", "replacement.ridge=auto", "num_layers=2")
    lmmse = {int(i): v for i, v in results["scores"]["lmmse"].items()}
    assert sorted(lmmse) == [0, 1, 2, 3] and all(v >= 0 for v in lmmse.values())
    assert results["replaced_layers"] == sorted(sorted(lmmse, key=lmmse.get)[:2])
    assert sorted(results["ridge"]) == ["0", "1", "2", "3"]
    assert all(r in RIDGE_GRID for r in results["ridge"].values())


def _kl(reference, model, batches) -> float:
    """Mean KL(reference || model) of next-token distributions over every position but the last."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            log_p = torch.log_softmax(reference(b).logits[:, :-1].double(), -1)
            log_q = torch.log_softmax(model(b).logits[:, :-1].double(), -1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += log_p.shape[0] * log_p.shape[1]
    return total / count


def test_kl_damage_is_the_divergence_from_the_unmodified_model(family):
    model = make_tiny(family)
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    heldout = token_batches(n_batches=2, seed=9)
    damage = single_layer_damage(Probe(model, stats, heldout, measure="kl", progress=False))
    for i in range(4):
        replaced = copy.deepcopy(model)
        nbl.linearize(replaced, stats, [i])
        assert damage[i] == pytest.approx(_kl(model, replaced, heldout), abs=1e-5) and damage[i] > 0
    steps = greedy_selection(Probe(model, stats, heldout, measure="kl", progress=False), 2)
    both = copy.deepcopy(model)
    nbl.linearize(both, stats, [s.layer for s in steps])
    assert steps[0].damage == pytest.approx(damage[steps[0].layer], abs=1e-6)
    assert steps[1].total == pytest.approx(_kl(model, both, heldout), abs=1e-5)  # KL from the original model


@pytest.mark.parametrize("part", ["attention", "block"])
def test_each_proposed_set_is_measured_replaced_together_as_in_a_copy(family, part):
    model = make_tiny(family)
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False, part=part)
    heldout = token_batches(n_batches=2, seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    proposals = {"a": [3, 1], "b": [0, 2], "c": [1, 3]}  # c proposes a's set: measured once, named for both
    found = validate_sets(Probe(model, stats, heldout, part=part), proposals)
    assert [(c.rules, c.layers) for c in found] == [(["a", "c"], [1, 3]), (["b"], [0, 2])]
    base = _loss(model, heldout)
    for c in found:
        replaced = copy.deepcopy(model)
        nbl.linearize(replaced, stats, c.layers, part=part)
        assert c.damage == pytest.approx(_loss(replaced, heldout) - base, abs=1e-5)
    assert _untouched(model, before)


@pytest.mark.slow
def test_validated_selection_keeps_the_least_damaging_of_the_three_rankings_sets(tmp_path, monkeypatch, nbl_cache):
    results = _run_app(tmp_path, monkeypatch, "selection=validated", "num_layers=2")
    scores, found = results["scores"], results["validation"]
    assert sorted(rule for c in found for rule in c["rules"]) == ["cca", "cosine", "loss"]
    first = {
        "loss": sorted(sorted(scores["loss"], key=lambda i: (scores["loss"][i], int(i)))[:2], key=int),
        "cosine": sorted(sorted(scores["cosine"], key=lambda i: (-scores["cosine"][i], int(i)))[:2], key=int),
        "cca": sorted(sorted(scores["cca"], key=lambda i: (scores["cca"][i], int(i)))[:2], key=int),
    }
    for c in found:  # each candidate is the top 2 of the rankings that proposed it
        assert all([int(i) for i in first[rule]] == c["layers"] for rule in c["rules"])
    assert results["replaced_layers"] == min(found, key=lambda c: c["damage"])["layers"]
    assert results["summary_row"]["method"] == "validated+linear"


def test_a_probe_fits_each_layer_once_however_often_it_replaces_it(monkeypatch):
    import nbl.select.damage

    calls = []
    real = nbl.select.damage.fit_lmmse
    monkeypatch.setattr(nbl.select.damage, "fit_lmmse", lambda acc, ridge: calls.append(1) or real(acc, ridge))
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    steps = greedy_selection(Probe(model, stats, token_batches(n_batches=2, seed=9), progress=False), 3)
    assert len(steps) == 3 and len(calls) == 4  # 4 layers; without the cache 4 + 3 + 2 sweeps + 2 choices


@pytest.mark.slow
def test_heldout_statistics_of_no_more_than_d_tokens_serve_lmmse(tmp_path, monkeypatch, nbl_cache):
    """One held-out window of 64 tokens for d = 64: enough for held-out errors (no inverse), which the
    calibration's d-token rule refused after the calibration pass."""
    results = _run_app(tmp_path, monkeypatch, "selection=lmmse", "selection.holdout_sequences=1", "num_layers=2")
    lmmse = {int(i): v for i, v in results["scores"]["lmmse"].items()}
    assert sorted(lmmse) == [0, 1, 2, 3] and results["replaced_layers"] == sorted(sorted(lmmse, key=lmmse.get)[:2])
