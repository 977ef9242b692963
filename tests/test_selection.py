"""Selection strategies on crafted scores."""

import math

import numpy as np
import pytest

from nbl.linalg import fit_lmmse, heldout_error
from nbl.selection import auto_ridge, lmmse_scores, select_layers
from tests.test_stats_linalg import _acc


def test_cca_takes_lowest_bounds_and_cosine_highest_similarity():
    bounds = {0: 5.0, 1: 1.0, 2: 3.0, 3: 0.5}
    assert select_layers(bounds, 2, "cca") == [1, 3]
    cosines = {0: 0.6, 1: 0.99, 2: 0.95, 3: 0.7}
    assert select_layers(cosines, 2, "cosine") == [1, 2]
    assert select_layers(bounds, 0, "cca") == []
    assert select_layers(bounds, 4, "cca") == [0, 1, 2, 3]


def test_ties_break_towards_lower_index():
    assert select_layers({0: 1.0, 1: 1.0, 2: 1.0, 3: 2.0}, 2, "cca") == [0, 1]
    assert select_layers({0: 0.9, 1: 0.9, 2: 0.9}, 1, "cosine") == [0]


def test_random_is_seeded_and_seeds_differ():
    scores = {i: math.nan for i in range(30)}
    first = select_layers(scores, 8, "random", seed=3)
    assert first == select_layers(scores, 8, "random", seed=3)
    assert len(set(first)) == 8 and all(0 <= i < 30 for i in first)
    assert any(select_layers(scores, 8, "random", seed=s) != first for s in range(4, 8))


def test_bad_input_rejected():
    with pytest.raises(ValueError, match="non-finite"):
        select_layers({0: 1.0, 1: math.nan}, 1, "cca")
    with pytest.raises(ValueError, match="k=3"):
        select_layers({0: 1.0, 1: 2.0}, 3, "cca")
    with pytest.raises(ValueError, match="k=-1"):
        select_layers({0: 1.0}, -1, "cosine")
    with pytest.raises(ValueError, match="unknown"):
        select_layers({0: 1.0}, 1, "magnitude")


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
    assert select_layers({0: 0.5, 1: 0.01, 2: 0.2}, 1, "lmmse") == [1]  # least error first


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
    for layer, data in ((0, few), (1, many)):
        fit = _acc(*data)
        errors = {r: heldout_error(*fit_lmmse(fit, ridge=r), held_acc) for r in grid}
        assert chosen[layer] == min(errors, key=errors.get)
    assert chosen[0] > 0 and chosen[1] < chosen[0]
