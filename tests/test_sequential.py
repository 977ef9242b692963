"""Sequential calibration on tiny models."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

import nbl
from nbl.calib.sequential import linearize_sequentially
from nbl.select.registry import get_strategy
from tests.conftest import make_tiny, token_batches


def test_statistics_change_only_after_a_replaced_layer():
    model = make_tiny("llama")
    batches = token_batches(n_batches=2)
    before = nbl.calibrate(model, batches, progress=False)
    nbl.linearize(model, before, [1])
    after = nbl.calibrate(model, batches, progress=False)
    assert sorted(after) == [0, 2, 3]
    torch.testing.assert_close(after[0].sum_xx, before[0].sum_xx, rtol=0, atol=0)  # upstream: identical
    for i in (2, 3):  # downstream of the replacement: the inputs moved
        assert not torch.allclose(after[i].sum_xx, before[i].sum_xx, rtol=1e-4, atol=1e-3)


def _calibrator(batches):
    calls = []

    def calibrate(model, replaced):
        calls.append(list(replaced))
        return nbl.calibrate(model, batches, progress=False)

    return calibrate, calls


@pytest.mark.parametrize("strategy", ["cca", "cosine", "magnitude"])
def test_sequential_replaces_k_layers_one_pass_each(strategy):
    model = make_tiny("qwen2")
    calibrate, calls = _calibrator(token_batches(n_batches=2))
    choose = get_strategy(strategy).choose_one(OmegaConf.create({"cca_target": "residual"}))
    steps = linearize_sequentially(model, calibrate, k=3, choose=choose)
    assert len(steps) == 3 and len(calls) == 3
    assert [len(c) for c in calls] == [0, 1, 2]  # each pass sees the layers replaced so far
    assert sorted(nbl.replaced_layers(model)) == sorted(s.layer for s in steps)


def test_first_step_matches_one_pass_choice_and_later_fits_differ():
    base = make_tiny("llama")
    batches = token_batches(n_batches=2)
    one_pass = nbl.calibrate(base, batches, progress=False)
    bounds = {i: nbl.cca_bound(one_pass[i]) for i in one_pass}
    seq_model = copy.deepcopy(base)
    calibrate, _ = _calibrator(batches)
    cca = get_strategy("cca").choose_one(OmegaConf.create({"cca_target": "residual"}))
    steps = linearize_sequentially(seq_model, calibrate, k=2, choose=cca)
    assert steps[0].layer == min(bounds, key=bounds.get)
    second = steps[1].layer
    w_one_pass, _ = nbl.fit_lmmse(one_pass[second])
    w_sequential = seq_model.model.layers[second].attn_linear.weight.double()
    if second > steps[0].layer:  # downstream of the first replacement: refitted on new inputs
        assert not torch.allclose(w_sequential, w_one_pass, atol=1e-4)
    else:  # upstream: its inputs did not change, so neither does its map
        torch.testing.assert_close(w_sequential, w_one_pass.float().double(), rtol=1e-5, atol=1e-5)
