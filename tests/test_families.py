"""The families beyond Llama's layout (Phi-3, Granite, OLMo 2, Gemma 2 / 3, mixture-of-experts models) on tiny
random-weight models of each family's config shape: statistics and surgery against the unmodified model, cached
against uncached generation across sliding windows, checkpoints in a fresh process, and the accounting by hand.

The sub-blocks are written out here from transformers' decoder layers, independently of the adapters."""

import copy
import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import nbl
from nbl.core.accounting import BytesModel, FlopModel, kv_cache_bytes
from nbl.core.adapters import UnsupportedModelError
from nbl.core.block_fits import replaceme_transforms
from nbl.models import random_model, tiny_config
from tests.conftest import greedy_cached_and_uncached, token_batches
from tests.test_checkpoint import reload_in_a_fresh_process
from tests.test_granularity import _with_output
from tests.test_layerwise import assert_layerwise_equals_hooks_on_a_mixed_model

NEW_FAMILIES = ("phi3", "granite", "olmo2", "gemma2", "gemma3_text", "mixtral", "qwen3_moe", "olmoe")
# (entry, exit) of each sub-block's path, as the family's decoder layer computes h + s * exit(..(entry(h)))
PRE_NORM = {"attention": ("input_layernorm", "self_attn"), "mlp": ("post_attention_layernorm", "mlp")}
GEMMA = {"attention": ("input_layernorm", "post_attention_layernorm"),
         "mlp": ("pre_feedforward_layernorm", "post_feedforward_layernorm")}  # fmt: skip
PATHS = {"olmo2": {"attention": ("self_attn", "post_attention_layernorm"), "mlp": ("mlp", "post_feedforward_layernorm")},
         "gemma2": GEMMA, "gemma3_text": GEMMA}  # fmt: skip


def _tiny(family: str, seed: int = 0):
    layers = 6 if family == "gemma3_text" else 4  # Gemma 3: five sliding layers, then a global one
    return random_model(tiny_config(family, num_layers=layers), seed=seed)


def _scale(model) -> float:
    return getattr(model.config, "residual_multiplier", 1.0)  # Granite's; the others add sub-blocks unscaled


def _entry_exit(model, family: str, part: str, i: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    entry, exit_ = PATHS.get(family, PRE_NORM)[part]
    layer = model.model.layers[i]
    return getattr(layer, entry), getattr(layer, exit_)


def _inputs_and_outputs(model, entry, exit_, batches) -> tuple[list, list]:
    """What ``entry`` takes in and ``exit_`` gives out over ``batches``, by plain hooks."""
    xs, outs = [], []
    handles = [
        entry.register_forward_pre_hook(lambda m, a, kw: xs.append(a[0] if a else kw["hidden_states"]), with_kwargs=True),
        exit_.register_forward_hook(lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out)),
    ]  # fmt: skip
    with torch.no_grad():
        for batch in batches:
            model.model(batch)
    for h in handles:
        h.remove()
    return xs, outs


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_statistics_are_the_paths_input_and_output_and_the_cosine_counts_the_residual_scale(family):
    model = _tiny(family)
    batches = token_batches(n_batches=2)
    results = nbl.calibrate_parts(model, batches, ("attention", "mlp"), layers=[1], progress=False)
    for part in ("attention", "mlp"):
        xs, outs = _inputs_and_outputs(model, *_entry_exit(model, family, part, 1), batches)
        x = torch.cat(xs).reshape(-1, 64).double().numpy()
        a = torch.cat(outs).reshape(-1, 64).double().numpy()
        acc = results[part][1]
        np.testing.assert_allclose(acc.sum_ax.numpy(), a.T @ x, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(acc.sum_aa.numpy(), a.T @ a, rtol=1e-4, atol=1e-3)
        y = x + _scale(model) * a  # the stream after the sub-block
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert results[part].mean_cosine(1) == pytest.approx(cos.mean(), rel=1e-4)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("part", ["attention", "mlp", "block"])
def test_replaced_part_is_the_original_with_its_path_computing_w_x_plus_b(family, part):
    base = _tiny(family)
    stats = nbl.calibrate(base, token_batches(), progress=False, part=part)
    w, b = (t.float() for t in nbl.fit_lmmse(stats[1]))
    replaced = copy.deepcopy(base)
    nbl.linearize(replaced, stats, [1], part=part)
    if part == "block":  # the whole layer -> x + s (W x + b)
        handles = _with_output(base.model.layers[1], lambda x: x + _scale(base) * (x @ w.T + b))
    else:  # the path's last module returns W x + b of the stream entering its first
        entry, exit_ = _entry_exit(base, family, part, 1)
        handles = _with_output(exit_, lambda x: x @ w.T + b, input_of=entry)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = base(ids).logits
        for h in handles:
            h.remove()
        got, untouched = replaced(ids).logits, base(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, untouched, atol=1e-4)  # the check can fail: the part did change


# replaced layers per family: a sliding and a global layer where the family has both
LAYERS = {"gemma2": [[0, 1], [1]], "gemma3_text": [[0, 2], [1, 5], [5]]}


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("prompt_len", [5, 12], ids=["prompt-within-window", "prompt-past-window"])
def test_cached_generation_equals_uncached_across_sliding_windows(family, prompt_len):
    """The tiny Gemma configs' windows are 8 tokens: prompts of 5 and 12 tokens, 12 new tokens each."""
    base = _tiny(family)
    stats = nbl.calibrate(base, token_batches(n_batches=2), progress=False)
    conv = nbl.calibrate(base, token_batches(n_batches=2), progress=False, width=2)
    prompt = torch.randint(3, 256, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    for layers in LAYERS.get(family, [[0, 1]]):
        for mode in ("linear", "conv"):
            model = copy.deepcopy(base)
            nbl.linearize(model, conv if mode == "conv" else stats, layers, mode=mode)
            cached, uncached = greedy_cached_and_uncached(model, prompt)
            assert cached.shape == (2, prompt_len + 12)
            assert torch.equal(cached, uncached), (layers, mode)


def test_kept_attentions_fill_their_own_types_slots_and_the_cache_holds_what_the_accounting_says():
    model = _tiny("gemma3_text")  # sliding 0-4, global 5
    nbl.linearize(model, nbl.calibrate(model, token_batches(n_batches=2), progress=False), [0, 2])
    slots = {i: layer.self_attn.layer_idx for i, layer in enumerate(model.model.layers) if i not in (0, 2)}
    assert slots == {1: 0, 3: 1, 4: 2, 5: 5}  # sliding layers in the first sliding slots, the global one in its own
    assert [model.model.layers[i].cache_slot for i in (0, 2)] == [3, 4]
    for context in (5, 20):  # within and past the 8-token window
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.randint(3, 256, (1, context)), past_key_values=cache, use_cache=True)
        held = sum(layer.keys.numel() * 4 * 2 for layer in cache.layers if getattr(layer, "keys", None) is not None)
        assert held == kv_cache_bytes(model.config, {0: "linear", 2: "linear"}, context, bytes_per_value=4)
    # by hand: 2 KV heads x 16 dims x 2 (K, V) x 4 bytes per token and layer; at 20 tokens sliding layers hold 7
    assert kv_cache_bytes(model.config, {0: "linear", 2: "linear"}, 20, 4) == (3 * 7 + 20) * 256
    assert kv_cache_bytes(model.config, {}, 20, 4) - kv_cache_bytes(model.config, {5: "linear"}, 20, 4) == 20 * 256


def test_replacing_every_layer_of_slot_zeros_type_while_others_keep_attention_is_refused_untouched():
    model = _tiny("gemma3_text")
    stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    with pytest.raises(NotImplementedError, match="every sliding_attention layer"):
        nbl.linearize(model, stats, [0, 1, 2, 3, 4])
    assert nbl.replaced_layers(model) == {}
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6))
    nbl.linearize(model, stats, range(6))  # all of them: nothing reads positions from the cache


def test_a_checkpoint_of_each_family_reloads_the_same_in_a_fresh_process(tmp_path):
    models = {}
    for family in NEW_FAMILIES:
        model = _tiny(family)
        stats = nbl.calibrate_parts(model, token_batches(n_batches=2), ("attention", "mlp"), progress=False)
        nbl.linearize(model, stats["attention"], [1])
        nbl.linearize(model, stats["mlp"], [2], part="mlp")
        folder = nbl.save_linearized(model, tmp_path / family)
        assert json.loads((folder / "config.json").read_text())["model_type"] == f"nbl_{family}"
        models[family] = (model, folder)
    # routed experts (transformers' grouped_mm on the CPU) round differently in another process: Qwen3-MoE's layer 0,
    # which nothing replaced, already differs there by 2e-9 (checked by hand); the dense families are exact
    atol = dict.fromkeys(("mixtral", "qwen3_moe", "olmoe"), 1e-6)
    printed = reload_in_a_fresh_process(models, tmp_path, atol)
    assert all(p == "[(1, 'linear')] [(2, 'linear')]" for p in printed.values()), printed


def test_routed_mlps_count_active_experts_in_flops_and_bytes_and_all_experts_as_parameters():
    config = tiny_config("qwen3_moe")  # 4 experts of 3 x 64 x 64, 2 active; layer 1 a dense 3 x 64 x 128 MLP
    d, expert, router = 64, 3 * 64 * 64, 64 * 4
    flops, weights = FlopModel(config), BytesModel(config, bytes_per_value=4)
    attention = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64)
    assert flops.layer(None, 10, None, index=0) == attention + 2 * 2 * 10 * 64 + 2 * (router + 2 * expert)
    assert flops.layer(None, 10, None, index=1) == attention + 2 * 2 * 10 * 64 + 2 * 3 * d * 128
    assert weights.layer_weights(None, "drop", 0) == weights.layer_weights(None, "drop", 0, stored=True)
    mlp_read = weights.layer_weights(None, None, 0) - weights.layer_weights(None, "drop", 0)
    mlp_stored = weights.layer_weights(None, None, 0, stored=True) - weights.layer_weights(None, "drop", 0, stored=True)
    assert (mlp_read, mlp_stored) == (router + 2 * expert + d, router + 4 * expert + d)
    model = random_model(config)
    stored_params = sum(p.numel() for p in model.model.layers[0].mlp.parameters()) + d  # + the post-attention norm
    assert mlp_stored == stored_params


def test_sliding_layers_attend_to_their_window_in_the_flop_model():
    config = tiny_config("gemma2")  # layer 0 sliding (8), layer 1 global
    flops = FlopModel(config)
    scores = 2 * 2 * 4 * 16  # per token attended: 4 heads of 16 dims, scores and values
    assert flops.layer(None, 100, "drop", index=1) - flops.layer(None, 100, "drop", index=0) == (100 - 8) * scores
    assert flops.layer(None, 5, "drop", index=1) == flops.layer(None, 5, "drop", index=0)


@pytest.mark.parametrize("family", ["olmo2", "gemma2", "mixtral"])
def test_replaceme_is_refused_before_any_pass_where_no_transform_folds(family):
    model = _tiny(family)
    with pytest.raises(UnsupportedModelError, match="ReplaceMe cannot run here"):
        replaceme_transforms(model, iter(()), [(2, 3)])  # an empty iterator: a pass would find no batch


@pytest.mark.parametrize("family", ["granite", "olmo2", "gemma3_text", "qwen3_moe"])
def test_layerwise_statistics_of_a_mixed_model_equal_the_one_pass_hooks(family):
    """The layer-by-layer carrier runs each layer with what the model's forward hands it (Gemma 3: a sliding or a
    global mask and rotary table per layer), so its sums are the hooks' on every family."""
    got = assert_layerwise_equals_hooks_on_a_mixed_model(_tiny(family), attention=0, mlp=2)
    assert 0 not in got["attention"] and 2 not in got["mlp"] and not {0, 2} & set(got["block"])
