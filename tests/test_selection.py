"""Selection strategies on crafted scores."""

import math

import numpy as np
import pytest

from nbl.core.linalg import fit_lmmse, heldout_error
from nbl.select.ranking import auto_ridge, lmmse_scores, random_layers, select_layers
from nbl.select.registry import get_strategy, strategy_names
from tests.test_stats_linalg import _acc


def test_lowest_or_highest_scores_first():
    bounds = {0: 5.0, 1: 1.0, 2: 3.0, 3: 0.5}
    assert select_layers(bounds, 2, lowest_first=True) == [1, 3]
    cosines = {0: 0.6, 1: 0.99, 2: 0.95, 3: 0.7}
    assert select_layers(cosines, 2, lowest_first=False) == [1, 2]
    assert select_layers(bounds, 0, lowest_first=True) == []
    assert select_layers(bounds, 4, lowest_first=True) == [0, 1, 2, 3]


def test_ties_break_towards_lower_index():
    assert select_layers({0: 1.0, 1: 1.0, 2: 1.0, 3: 2.0}, 2, lowest_first=True) == [0, 1]
    assert select_layers({0: 0.9, 1: 0.9, 2: 0.9}, 1, lowest_first=False) == [0]


def test_random_is_seeded_and_seeds_differ():
    first = random_layers(range(30), 8, seed=3)
    assert first == random_layers(range(30), 8, seed=3)
    assert len(set(first)) == 8 and all(0 <= i < 30 for i in first)
    assert any(random_layers(range(30), 8, seed=s) != first for s in range(4, 8))


def test_bad_input_rejected():
    with pytest.raises(ValueError, match="non-finite"):
        select_layers({0: 1.0, 1: math.nan}, 1, lowest_first=True)
    with pytest.raises(ValueError, match="k=3"):
        select_layers({0: 1.0, 1: 2.0}, 3, lowest_first=True)
    with pytest.raises(ValueError, match="k=-1"):
        random_layers([0], -1)
    with pytest.raises(ValueError, match="unknown selection strategy 'bogus'; choose from cca, cosine"):
        get_strategy("bogus")


def test_the_registry_orders_each_ranking_as_its_rule_says():
    """The damage-like scores choose their lowest layers, the cosine its highest."""
    order = {name: getattr(get_strategy(name), "lowest_first", None) for name in strategy_names()}
    assert order["cca"] and order["lmmse"] and order["magnitude"] and order["cosine"] is False
    assert {"cca", "cosine", "random", "lmmse", "loss", "greedy", "plan", "validated", "magnitude"} <= set(order)


def _pairs(n: int, d: int, seed: int, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (seeded by ``seed``) of one fixed layer: x ~ correlated Gaussian with a mean, a = x M^T + c +
    noise (a linear part plus what no linear map can fit)."""
    layer = np.random.default_rng(1234)
    mix, m = layer.normal(size=(d, d)), layer.normal(size=(d, d)) / d
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ mix + 2.0
    a = x @ m.T + 0.5 + noise * rng.normal(size=(n, d))
    return x, a


def test_heldout_error_equals_the_mean_squared_error_on_the_heldout_tokens():
    x_fit, a_fit = _pairs(400, 6, seed=0)
    x_new, a_new = _pairs(300, 6, seed=1)
    x_new = x_new * 1.1  # held-out tokens of a shifted distribution: the formula holds for any tokens
    w, b = fit_lmmse(_acc(x_fit, a_fit))
    direct = np.mean(np.sum((a_new - x_new @ w.numpy().T - b.numpy()) ** 2, axis=1))
    assert heldout_error(w, b, _acc(x_new, a_new)) == pytest.approx(direct, rel=1e-9)


def test_lmmse_score_is_heldout_error_relative_to_the_residual_stream():
    fit, new = _acc(*_pairs(400, 6, seed=0)), _pairs(300, 6, seed=1)
    other = _pairs(300, 6, seed=5)
    x_new, a_new = np.concatenate([new[0], other[0]]), np.concatenate([new[1], other[1]])
    scores = lmmse_scores({3: fit}, {3: _acc(x_new, a_new)})
    w, b = fit_lmmse(fit)
    err = np.mean(np.sum((a_new - x_new @ w.numpy().T - b.numpy()) ** 2, axis=1))
    energy = np.mean(np.sum((x_new + a_new) ** 2, axis=1))
    assert scores[3] == pytest.approx(err / energy, rel=1e-9)
    assert get_strategy("lmmse").lowest_first  # least error first


def test_auto_ridge_takes_the_grid_value_with_least_heldout_error():
    # few tokens for d = 24: the exact fit overfits and a ridge helps; with many tokens it does not
    few, many, held = (
        _pairs(40, 24, seed=0, noise=1.0),
        _pairs(20000, 24, seed=0, noise=1.0),
        _pairs(2000, 24, seed=1, noise=1.0),
    )
    held_acc = _acc(*held)
    grid = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
    chosen = auto_ridge({0: _acc(*few), 1: _acc(*many)}, {0: held_acc, 1: held_acc}, grid)
    x_new, a_new = held
    for layer, (x, a) in ((0, few), (1, many)):
        # independently, in numpy: the ridge regression on centred data, scored on the held-out tokens themselves
        xc, ac = x - x.mean(0), a - a.mean(0)
        c_xx, c_xa = xc.T @ xc / len(x), xc.T @ ac / len(x)
        errors = {}
        for r in grid:
            w_t = np.linalg.solve(c_xx + r * np.trace(c_xx) / x.shape[1] * np.eye(x.shape[1]), c_xa)
            b = a.mean(0) - x.mean(0) @ w_t
            errors[r] = np.mean(np.sum((a_new - x_new @ w_t - b) ** 2, axis=1))
        assert chosen[layer] == min(errors, key=errors.get)
    assert chosen[0] > 0 and chosen[1] < chosen[0]
