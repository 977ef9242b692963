"""Selection strategies on crafted scores."""

import math

import pytest

from nbl.selection import select_layers


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
