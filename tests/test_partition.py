"""Pipeline stages for NBL checkpoints (nbl.serve.partition): the cut that keeps the KV saving, against brute force
over every cut, and vLLM's own default cut."""

import itertools
import json

import pytest

from nbl.serve.partition import balanced_partition, capacity_gain, checkpoint_kept, report, vllm_default_partition


def _kept_per_stage(kept, counts):
    bounds = list(itertools.accumulate(counts, initial=0))
    return [sum(kept[a:b]) for a, b in itertools.pairwise(bounds)]


def _brute_force(kept, stages):
    """Every cut into non-empty contiguous stages, ranked by (most kept attention, most layers) on any stage."""
    n = len(kept)
    cuts = []
    for inner in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *inner, n]
        counts = [b - a for a, b in itertools.pairwise(bounds)]
        cuts.append((max(_kept_per_stage(kept, counts)), max(counts)))
    return min(cuts)


@pytest.mark.parametrize("seed", range(20))
def test_the_cut_is_the_best_by_brute_force(seed):
    import random

    rng = random.Random(seed)
    n = rng.randint(4, 14)
    kept = [rng.random() < rng.choice((0.3, 0.6, 0.9)) for _ in range(n)]
    stages = rng.randint(1, min(4, n))
    counts = balanced_partition(kept, stages)
    assert sum(counts) == n and len(counts) == stages and min(counts) >= 1
    assert (max(_kept_per_stage(kept, counts)), max(counts)) == _brute_force(kept, stages)


def test_vllms_default_cut_is_what_vllm_computes():
    vllm_utils = pytest.importorskip("vllm.distributed.utils")
    for layers, stages in ((32, 2), (32, 3), (80, 3), (30, 4), (7, 4), (28, 8)):
        bounds = [vllm_utils.get_pp_indices(layers, rank, stages) for rank in range(stages)]
        assert vllm_default_partition(layers, stages) == [end - start for start, end in bounds]


def test_llama_8b_with_its_last_12_attention_layers_replaced_keeps_its_capacity_gain_at_pp2():
    kept = [i < 20 for i in range(32)]
    assert vllm_default_partition(32, 2) == [16, 16] and capacity_gain(kept, [16, 16]) == 1.0
    assert balanced_partition(kept, 2) == [10, 22] and capacity_gain(kept, [10, 22]) == 1.6
    assert report(kept, 2)["setting"] == "VLLM_PP_LAYER_PARTITION=10,22"
    assert balanced_partition([True] * 32, 2) == [16, 16]  # nothing replaced: the even cut


def test_a_checkpoints_kept_layers_come_from_its_config(tmp_path):
    config = {"num_hidden_layers": 5, "nbl": {"replaced_layers": {"1": "linear", "4": "conv"}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_kept(tmp_path) == [True, False, True, True, False]
    with pytest.raises(ValueError, match="3 pipeline stages for 2 layers"):
        balanced_partition([True, False], 3)
