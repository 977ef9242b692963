"""Equal budgets: the units each replacement needs to reach a predicted quantity, against direct sums of the FLOP
and weight models over every count; a joint rule's ordered steps cut where the budget is met; the budget and its
refusals from the config."""

import pytest
from omegaconf import OmegaConf

from nbl.core.accounting import BytesModel, FlopModel
from nbl.models import tiny_config
from nbl.recipe.schema import ConfigError
from nbl.recipe.validation import validate
from nbl.select.budget import budget_metric, budget_prefix, budget_value, joint_bound, unit_modes, units_for_budget


@pytest.fixture(scope="module")
def config():
    return tiny_config("llama", hidden_size=256, num_layers=12, vocab_size=1000)


def test_unit_modes_put_a_blocks_map_where_its_attention_was():
    assert unit_modes([(0, "attention"), (1, "mlp"), (2, "block")], "linear") == (
        {0: "linear", 2: "linear"},
        {1: "linear", 2: "drop"},
    )


@pytest.mark.parametrize(("part", "mode"), [("attention", "linear"), ("block", "drop"), ("mlp", "drop"), ("block", "linear")])
def test_units_for_a_prefill_budget_are_the_fewest_whose_flop_speedup_reaches_it(config, part, mode):
    flops = FlopModel(config)
    metric = budget_metric(config, "prefill", 128)
    for value in (1.02, 1.1, 1.3):
        speedups = [flops.prefill_speedup(_modes(part, mode, k)[0], 128, _modes(part, mode, k)[1]) for k in range(13)]
        reachable = [k for k, s in enumerate(speedups) if s >= value]
        if not reachable:
            with pytest.raises(ValueError, match="out of reach"):
                units_for_budget(metric, 12, part, mode, value)
            continue
        assert units_for_budget(metric, 12, part, mode, value) == reachable[0]


def _modes(part, mode, k):
    attention = {i: mode for i in range(k)} if part in ("attention", "block") else {}
    mlps = {i: (mode if part == "mlp" else "drop") for i in range(k)} if part in ("mlp", "block") else {}
    return attention, mlps


def test_a_params_budget_counts_the_weights_removed_and_the_maps_added(config):
    weights = BytesModel(config)
    base = 12 * weights.layer_weights(None)
    metric = budget_metric(config, "params", 128)
    k = units_for_budget(metric, 12, "attention", "linear", 0.05)
    removed = 1 - (k * weights.layer_weights("linear") + (12 - k) * weights.layer_weights(None)) / base
    fewer = 1 - ((k - 1) * weights.layer_weights("linear") + (13 - k) * weights.layer_weights(None)) / base
    assert removed >= 0.05 > fewer


def test_a_blocks_budget_is_the_speedup_of_that_many_blocks_removed(config):
    value = budget_value(config, "blocks", 3, 128)
    assert value == pytest.approx(FlopModel(config).prefill_speedup({0: "drop", 1: "drop", 2: "drop"}, 128,
                                                                     {0: "drop", 1: "drop", 2: "drop"}))  # fmt: skip
    assert units_for_budget(budget_metric(config, "blocks", 128), 12, "block", "drop", value) == 3
    with pytest.raises(ValueError, match="whole number of blocks"):
        budget_value(config, "blocks", 2.5, 128)


def test_a_joint_rules_steps_are_cut_at_the_first_that_reaches_the_budget(config):
    metric = budget_metric(config, "prefill", 128)
    value = metric(*unit_modes([(0, "mlp"), (1, "mlp")], "drop"))  # two MLPs reach it; attention saves less
    ordered = [(3, "attention"), (5, "mlp"), (1, "attention"), (7, "mlp"), (2, "mlp")]
    n = budget_prefix(metric, ordered, "drop", value)
    assert metric(*unit_modes(ordered[:n], "drop")) >= value > metric(*unit_modes(ordered[: n - 1], "drop"))
    bound = joint_bound(metric, 12, "drop", value)
    assert bound == max(units_for_budget(metric, 12, p, "drop", value) for p in ("attention", "mlp"))


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from nbl.__main__ import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base=None):
        return compose("config", overrides=["model=tiny-random-llama", "logger=disabled", *overrides])


def test_the_budget_sets_num_layers_before_anything_loads():
    cfg, arch = validate(_compose("method=shortgpt", "budget.target=prefill", "budget.value=1.2"))
    metric = budget_metric(arch, "prefill", cfg.speed.prompt_len)
    assert cfg.num_layers == units_for_budget(metric, arch.num_hidden_layers, "block", "drop", 1.2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["budget.target=prefill"], "budget.target and budget.value go together"),
        (["budget.target=prefill", "budget.value=0.5"], "must be a prefill speed-up > 1"),
        (["budget.target=params", "budget.value=1.5"], "a fraction in (0, 1)"),
        (["budget.target=prefill", "budget.value=1.1", "layers=[1]"], "explicit layers"),
        (["budget.target=prefill", "budget.value=1.1", "selection=plan"], "meets its own selection.target"),
        (["budget.target=prefill", "budget.value=1.1", "replacement.granularity=joint"], "needs a rule whose steps order"),
        (["budget.target=prefill", "budget.value=9.0"], "out of reach"),
    ],
)
def test_bad_budgets_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(_compose(*overrides))


def test_run_folders_name_the_budget_instead_of_k():
    from nbl.__main__ import _run_name

    assert _run_name("cca", "linear", 8, None, "prefill", 1.15) == "cca-linear-prefill1.15"
    assert _run_name("cca", "linear", 8, None) == "cca-linear-k8" and OmegaConf.has_resolver("nbl_run")


def test_a_budget_met_exactly_is_met_despite_rounding():
    """3 of 30 blocks remove exactly a tenth of the decoder weights: 1 - 27/30 is 0.1 less a rounding error."""
    config = tiny_config("llama", hidden_size=64, num_layers=30)
    metric = budget_metric(config, "params", 128)
    assert metric(*unit_modes([(i, "block") for i in range(3)], "drop")) < 0.1  # the rounding the tolerance absorbs
    assert units_for_budget(metric, 30, "block", "drop", 0.1) == 3
    assert budget_prefix(metric, [(i, "block") for i in range(5)], "drop", 0.1) == 3
