"""Layer-by-layer calibration against the one-pass hooks; the propagated refit against sequential refitting."""

import copy

import pytest
import torch

import nbl
from nbl.calib.layerwise import calibrate_layerwise, calibrate_layerwise_parts, refit_propagated
from nbl.calib.sequential import linearize_sequentially
from nbl.models import random_model, tiny_config
from tests.conftest import make_tiny, token_batches


def _assert_same_statistics(got, expected, rtol=1e-9, atol=1e-9):
    """The sums, and what is computed from them: the map (W, b) and the CCA bound (a 1 % error in W passes a
    1e-6 tolerance on covariances, so the maps are compared themselves)."""
    assert list(got) == list(expected) and got.num_tokens == expected.num_tokens
    for i in expected:
        for name, t in expected[i].state_dict().items():
            torch.testing.assert_close(got[i].state_dict()[name], t, rtol=rtol, atol=atol, msg=f"layer {i} {name}")
        assert got.mean_cosine(i) == pytest.approx(expected.mean_cosine(i), rel=1e-9)
        (w, b), (w_ref, b_ref) = nbl.fit_lmmse(got[i]), nbl.fit_lmmse(expected[i])
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-8, msg=f"layer {i} W")
        torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-8, msg=f"layer {i} b")
        assert nbl.cca_bound(got[i]) == pytest.approx(nbl.cca_bound(expected[i]), rel=1e-7)


def test_layerwise_statistics_equal_the_one_pass_hooks(family):
    model = make_tiny(family)
    batches = token_batches(n_batches=3)
    _assert_same_statistics(
        calibrate_layerwise(model, batches, progress=False), nbl.calibrate(model, batches, progress=False)
    )


def assert_layerwise_equals_hooks_on_a_mixed_model(model, attention: int, mlp: int) -> dict:
    """``model`` with the attention of layer ``attention`` and the MLP of layer ``mlp`` replaced: the layer-by-layer
    statistics of every part equal the one-pass hooks'; returns the layer-by-layer ones."""
    batches = token_batches(n_batches=2)
    stats = nbl.calibrate_parts(model, batches, ("attention", "mlp"), progress=False)
    nbl.linearize(model, stats["attention"], [attention], part="attention")
    nbl.linearize(model, stats["mlp"], [mlp], part="mlp")
    parts = ("attention", "mlp", "block")
    got = calibrate_layerwise_parts(model, batches, parts, progress=False)
    expected = nbl.calibrate_parts(model, batches, parts, progress=False)
    for p in parts:
        _assert_same_statistics(got[p], expected[p])
    return got


def test_layerwise_statistics_of_every_part_in_one_pass_equal_the_hooks_on_a_mixed_model(family):
    got = assert_layerwise_equals_hooks_on_a_mixed_model(make_tiny(family), attention=1, mlp=2)
    assert [list(got[p]) for p in ("attention", "mlp", "block")] == [[0, 2, 3], [0, 1, 3], [0, 3]]


def test_layerwise_counts_no_padding_and_skips_replaced_layers():
    model = make_tiny("llama", hidden_size=32)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, 25:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    stats = nbl.calibrate(model, batches, progress=False)
    nbl.linearize(model, stats, [1])
    _assert_same_statistics(
        calibrate_layerwise(model, batches, progress=False), nbl.calibrate(model, batches, progress=False)
    )
    assert list(calibrate_layerwise(model, batches, progress=False)) == [0, 2, 3]


def test_offloaded_layers_and_activations_return_home():
    model = make_tiny("qwen2")
    batches = token_batches(n_batches=2)
    stats = calibrate_layerwise(model, batches, device="cpu", store="cpu", progress=False)
    _assert_same_statistics(stats, nbl.calibrate(model, batches, progress=False))
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_propagated_refit_equals_sequential_refitting_in_one_pass(family):
    base = make_tiny(family)
    batches = token_batches(n_batches=3)
    order = [0, 2, 3]
    sequential = copy.deepcopy(base)
    linearize_sequentially(sequential, lambda m, done: nbl.calibrate(m, batches, progress=False), len(order), order=order)
    propagated = copy.deepcopy(base)
    refit_propagated(propagated, batches, order, progress=False)
    assert nbl.replaced_layers(propagated) == nbl.replaced_layers(sequential) == dict.fromkeys(order, "linear")
    for i in order:
        a, b = propagated.model.layers[i].attn_linear, sequential.model.layers[i].attn_linear
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-4, atol=1e-5)
    ids = torch.randint(3, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(propagated(ids).logits, sequential(ids).logits, rtol=1e-4, atol=1e-4)


def test_propagated_refit_puts_the_original_layers_back_on_failure():
    model = make_tiny("llama").to(torch.float16)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.fill_(6e4)  # overflows once layer 2 is calibrated
    before = list(model.model.layers)
    with pytest.raises(FloatingPointError, match="layer 2"):
        refit_propagated(model, token_batches(n_batches=1), [0, 2], progress=False)
    assert nbl.replaced_layers(model) == {} and list(model.model.layers) == before
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]


def mixed_attention_model(family: str = "qwen2", types: tuple[str, ...] = ("full", "sliding", "full", "sliding")):
    """Layers of type "sliding" see only the last 8 tokens, "full" ones all of them."""
    config = tiny_config(family)
    config.layer_types = [f"{t}_attention" for t in types]
    config.use_sliding_window, config.sliding_window = True, 8
    return random_model(config)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_layers_of_mixed_attention_types_each_get_their_own_mask(family):
    """Layer by layer, each layer is called with its own type's mask (window 8 < 32 tokens: the masks differ)."""
    model = mixed_attention_model(family)
    batches = token_batches(n_batches=2)
    _assert_same_statistics(
        calibrate_layerwise(model, batches, progress=False), nbl.calibrate(model, batches, progress=False)
    )


def test_float32_gram_products_stay_within_1e_6_of_float64_with_massive_activations():
    g = torch.Generator().manual_seed(0)
    acc64 = nbl.CovarianceAccumulator(128, 128)
    acc32 = nbl.CovarianceAccumulator(128, 128, gram_dtype="float32")
    mix = torch.randn(128, 128, generator=g) / 12
    for _ in range(4):
        x = torch.randn(1024, 128, generator=g)
        x[:, 7] += 1e4  # a channel with a huge mean
        hot = torch.rand(1024, generator=g) < 0.05
        x[hot, 5] = 1e4  # massive activations on a few tokens
        a = x @ mix + torch.randn(1024, 128, generator=g)
        x, a = x.to(torch.bfloat16), a.to(torch.bfloat16)
        acc64.update(x, a)
        acc32.update(x, a)
    rel = lambda p, q: float((p - q).norm() / q.norm())  # noqa: E731
    for name in ("sum_x", "sum_a", "sum_xx", "sum_ax", "sum_aa"):
        assert rel(getattr(acc32, name), getattr(acc64, name)) < 1e-6, name
    for name in ("cov_xx", "cov_ax", "cov_aa"):
        assert rel(getattr(acc32, name)(), getattr(acc64, name)()) < 1e-6, name


@pytest.mark.slow
def test_the_app_runs_layerwise_offloaded_and_propagated(tmp_path, nbl_cache):
    from hydra import compose, initialize_config_dir

    from nbl.__main__ import CONF_DIR
    from nbl.recipe.run import run_experiment
    from nbl.recipe.state import RunContext

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hooks = compose("config", overrides=["experiment=smoke", "speed=none"])
        layerwise = compose(
            "config",
            overrides=[
                "experiment=smoke",
                "speed=none",
                "calibration.method=layerwise",
                "calibration.offload=true",
                "calibration.mode=propagated",
                "calibration.gram_dtype=float32",
            ],
        )
    first = run_experiment(hooks, RunContext(tmp_path / "hooks"))
    prop = run_experiment(layerwise, RunContext(tmp_path / "prop"))
    assert prop["summary_row"]["method"] == "Attn NBL prop" and prop["calibration"]["mode"] == "propagated"
    assert not prop["calibration"]["cache_hit"]  # float32 Gram products are another cache entry
    assert prop["replaced_layers"] == first["replaced_layers"]  # same one-pass scores, to round-off


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_a_model_with_a_dropped_block_calibrates_layer_by_layer(part):
    """A dropped block has no parameters at all (it was a bare StopIteration)."""
    model = make_tiny("llama")
    batches = token_batches(n_batches=2)
    nbl.linearize(model, nbl.calibrate(model, batches, progress=False, part="block"), [1], mode="drop", part="block")
    assert not list(model.model.layers[1].parameters())
    _assert_same_statistics(
        calibrate_layerwise(model, batches, progress=False, part=part),
        nbl.calibrate(model, batches, progress=False, part=part),
    )
    refit_propagated(model, batches, [2], progress=False)  # the same pass, refitting after the dropped block
    assert nbl.replaced_layers(model) == {1: "drop", 2: "linear"}


def test_an_offloaded_model_goes_to_the_device_after_calibration_or_stays_and_says_so(caplog):
    """A CPU stand-in for a GPU too small for the model: the move raises CUDA's out-of-memory error."""
    import logging
    from types import SimpleNamespace

    from nbl.recipe.statistics import _onload

    moves = []

    class Model:
        def to(self, device):
            moves.append(str(device))
            if str(device) != "cpu":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return self

    with caplog.at_level(logging.WARNING, logger="nbl.recipe.statistics"):
        _onload(SimpleNamespace(device=torch.device("cuda"), model=Model()))
    assert moves == ["cuda", "cpu"] and "does not fit on cuda" in caplog.text
    fits = SimpleNamespace(device=torch.device("cuda"), model=SimpleNamespace(to=lambda device: moves.append("fits")))
    _onload(fits)
    assert moves[-1] == "fits"
