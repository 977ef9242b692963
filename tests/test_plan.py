"""Keep / linear / drop plans: the target quantities, the greedy choice, and the plan in the app."""

import contextlib
import copy

import pytest
import torch

import nbl
from nbl.select.damage import Probe
from nbl.select.plan import greedy_plan, reachable, target_metric
from tests.conftest import make_tiny, token_batches
from tests.test_damage import _kl


def test_target_quantities_grow_with_what_is_replaced():
    config = make_tiny(num_layers=4).config
    for kind in ("prefill", "decode", "decode_bytes", "kv", "params"):
        metric = target_metric(config, kind, prompt_len=64, context=80)
        none, linear, drop = metric({}), metric({0: "linear"}), metric({0: "drop"})
        assert none == pytest.approx(1.0 if kind in ("prefill", "decode", "decode_bytes") else 0.0)
        assert none < linear <= drop or (kind == "kv" and none < linear == drop)
        assert reachable(config, metric) == metric(dict.fromkeys(range(4), "drop"))
    kv = target_metric(config, "kv", 64, 80)
    assert kv({0: "linear", 1: "drop"}) == pytest.approx(0.5)


def test_each_plan_step_is_the_least_damage_per_unit_of_progress():
    model = make_tiny(num_layers=4)
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    heldout = token_batches(n_batches=2, seed=9)
    metric = target_metric(model.config, "prefill", prompt_len=64, context=80)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = metric({0: "linear", 1: "linear"})  # reachable in two or three steps
    steps = greedy_plan(Probe(model, stats, heldout, measure="kl", progress=False), metric, target)
    assert steps[-1].value >= target and all(s.value < target for s in steps[:-1])
    partial, plan = copy.deepcopy(model), {}
    for step in steps:  # independently: every option in a copy, KL from the original model
        current, ratios = metric(plan), {}
        base = _kl(model, partial, heldout)
        for i in sorted(set(range(4)) - set(plan)):
            for mode in ("linear", "drop"):
                trial = copy.deepcopy(partial)
                nbl.linearize(trial, stats, [i], mode=mode)
                ratios[(i, mode)] = (_kl(model, trial, heldout) - base) / (metric({**plan, i: mode}) - current)
        assert (step.layer, step.mode) == min(ratios, key=ratios.get)
        nbl.linearize(partial, stats, [step.layer], mode=step.mode)
        plan[step.layer] = step.mode
    assert nbl.replaced_layers(model) == {} and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a lower target is a prefix of the same steps; an unreachable one is refused
    assert greedy_plan(Probe(model, stats, heldout, measure="kl"), metric, steps[0].value, start=steps) == steps[:1]
    with pytest.raises(ValueError, match="out of reach"):
        greedy_plan(Probe(model, stats, heldout, measure="kl", progress=False), metric, 10.0, start=steps)


@pytest.mark.slow
def test_plan_in_the_app_meets_its_target_and_records_each_layers_mode(tmp_path, monkeypatch, nbl_cache):
    from tests.test_damage import _run_app

    results = _run_app(tmp_path, monkeypatch, "selection=plan", "selection.target=kv", "selection.target_value=0.5")
    steps = results["greedy_steps"]
    assert steps[-1]["value"] >= 0.5 and results["replaced_modes"] == {str(s["layer"]): s["mode"] for s in steps}
    assert results["summary_row"]["method"] == "plan kv>=0.5"


def test_an_unreachable_plan_target_fails_before_loading_weights(monkeypatch):
    from hydra import compose, initialize_config_dir

    import nbl.recipe.prepare
    from nbl.__main__ import CONF_DIR
    from nbl.recipe.schema import ConfigError
    from nbl.recipe.validation import validate

    monkeypatch.setattr(nbl.recipe.prepare, "load_model", lambda *a, **k: pytest.fail("weights loaded before validation"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "selection=plan", "selection.target_value=5.0"])
        with pytest.raises(ConfigError, match="out of reach: dropping every attention layer"):
            validate(cfg)
        cfg = compose("config", overrides=["experiment=smoke", "selection=plan", "calibration.mode=propagated"])
        with pytest.raises(ConfigError, match=r"calibration\.mode=one_pass"):
            validate(cfg)


def test_an_option_that_lowers_the_damage_is_taken_for_its_progress(monkeypatch):
    """Two options lower the damage by as much; the one that gets further is taken (damage / gain alone would take
    the other: -0.01 / 0.001 < -0.01 / 0.01). Damaging options come after any that do no damage."""
    import nbl.select.plan

    gains = {(0, "linear"): 0.01, (1, "linear"): 0.001, (2, "linear"): 0.5}
    damages = {(0, "linear"): -0.01, (1, "linear"): -0.01, (2, "linear"): 0.001}

    def fake_damage(probe, candidates, desc, reference):
        return {i: damages[i, probe.mode] for i in candidates if (i, probe.mode) in damages}

    monkeypatch.setattr(nbl.select.plan, "single_layer_damage", fake_damage)
    monkeypatch.setattr(nbl.select.plan, "layers_restored", lambda model, layers: contextlib.nullcontext())
    probe = Probe(model=None, stats=dict.fromkeys(range(3)), heldout=[], measure="loss")
    monkeypatch.setattr(Probe, "replace", lambda self, layers, mode=None: None)
    metric = lambda plan: sum(gains[i, m] for i, m in plan.items())  # noqa: E731
    steps = greedy_plan(probe, metric, target=0.0105)
    assert [(s.layer, s.damage) for s in steps] == [(0, -0.01), (1, -0.01)]
    steps = greedy_plan(probe, metric, target=0.2)
    assert [s.layer for s in steps] == [0, 1, 2]  # the damaging option last, however much it gains
