"""MLP- and block-level replacement against independent computations, and a model mixing all three granularities:
statistics, surgery, cached generation, KV cache, parameter / FLOP / bytes accounting, checkpoints."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import DynamicCache

import nbl
from nbl.core.accounting import BytesModel, FlopModel, kv_cache_bytes_per_token
from nbl.select.registry import SelectionInputs, get_strategy
from tests.conftest import make_tiny, token_batches
from tests.test_checkpoint import assert_reloads_the_same_in_a_fresh_process


def _sums(x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    return {"sum_x": x.sum(0), "sum_a": a.sum(0), "sum_xx": x.T @ x, "sum_ax": a.T @ x, "sum_aa": a.T @ a}


def test_every_part_sums_what_numpy_sums_on_the_layers_own_tensors(family):
    """x and y from output_hidden_states, a from a plain hook on the attention module: h = x + a, m = y - h."""
    model = make_tiny(family)
    batches = token_batches(n_batches=2)
    results = nbl.calibrate_parts(model, batches, ("attention", "mlp", "block"), progress=False)
    n = len(model.model.layers)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(n)}
    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in range(n)}
    ys: dict[int, list[torch.Tensor]] = {i: [] for i in range(n - 1)}
    with torch.no_grad():
        for batch in batches:
            hidden = model.model(batch, output_hidden_states=True).hidden_states
            for i in range(n - 1):  # the last entry is after the final norm: layers 0..n-2 only
                xs[i].append(hidden[i])
                ys[i].append(hidden[i + 1])
    for h in handles:
        h.remove()
    for i in range(n - 1):
        x = torch.cat(xs[i]).reshape(-1, 64).double().numpy()
        y = torch.cat(ys[i]).reshape(-1, 64).double().numpy()
        a = torch.cat(seen[i]).reshape(-1, 64).double().numpy()
        h = x + a
        expected = {"attention": _sums(x, a), "mlp": _sums(h, y - h), "block": _sums(x, y - x)}
        for part, sums in expected.items():
            acc = results[part][i]
            assert acc.count == x.shape[0]
            for name, value in sums.items():
                np.testing.assert_allclose(getattr(acc, name).numpy(), value, rtol=1e-4, atol=1e-3, err_msg=part)
        inp, out = x, y - x  # the block's cosine: cos(x, y), LLM-Drop's block score
        cos = (inp * (inp + out)).sum(1) / np.linalg.norm(inp, axis=1) / np.linalg.norm(inp + out, axis=1)
        assert results["block"].mean_cosine(i) == pytest.approx(cos.mean(), rel=1e-4)
        cos = (h * y).sum(1) / np.linalg.norm(h, axis=1) / np.linalg.norm(y, axis=1)  # the MLP's: cos(h, h + m)
        assert results["mlp"].mean_cosine(i) == pytest.approx(cos.mean(), rel=1e-4)


def _with_output(module: torch.nn.Module, fn, input_of: torch.nn.Module | None = None) -> list:
    """Hooks making ``module`` return fn(its input) (or fn(the input of ``input_of``))."""
    seen = {}
    source = input_of or module

    def grab(m, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def swap(m, args, output):
        if isinstance(output, tuple):
            return (fn(seen["x"]), *output[1:])
        return fn(seen["x"])

    return [source.register_forward_pre_hook(grab, with_kwargs=True), module.register_forward_hook(swap)]


@pytest.mark.parametrize("part", ["mlp", "block"])
@pytest.mark.parametrize("mode", ["linear", "drop"])
def test_replaced_part_is_the_original_with_that_part_computing_w_x_plus_b(family, part, mode):
    base = make_tiny(family)
    stats = nbl.calibrate(base, token_batches(), progress=False, part=part)
    w, b = nbl.fit_lmmse(stats[1])
    replaced = copy.deepcopy(base)
    nbl.linearize(replaced, stats, [1], mode=mode, part=part)
    w, b = (w.float(), b.float()) if mode == "linear" else (torch.zeros_like(w).float(), torch.zeros_like(b).float())
    layer = base.model.layers[1]
    if part == "mlp":  # LN2 + MLP -> W h + b, h = the stream entering LN2
        handles = _with_output(layer.mlp, lambda h: h @ w.T + b, input_of=layer.post_attention_layernorm)
    else:  # the whole layer -> x + W x + b
        handles = _with_output(layer, lambda x: x + x @ w.T + b)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = base(ids).logits
        for h in handles:
            h.remove()
        got = replaced(ids).logits
        untouched = base(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, untouched, atol=1e-3)  # the check can fail: the part did change
    if part == "block":
        assert nbl.replaced_layers(replaced) == {1: mode} and nbl.replaced_mlps(replaced) == {1: "drop"}
    else:
        assert nbl.replaced_layers(replaced) == {} and nbl.replaced_mlps(replaced) == {1: mode}


def _mixed(family: str = "llama"):
    """Layer 0: attention map; 1: MLP map; 2: block map; 3: attention and MLP dropped (Joint DROP of both)."""
    model = make_tiny(family)
    stats = nbl.calibrate_parts(model, token_batches(n_batches=2), ("attention", "mlp", "block"), progress=False)
    nbl.linearize(model, stats["attention"], [0], part="attention")
    nbl.linearize(model, stats["mlp"], [1], part="mlp")
    nbl.linearize(model, stats["block"], [2], part="block")
    nbl.linearize(model, stats["attention"], [3], mode="drop", part="attention")
    nbl.linearize(model, stats["mlp"], [3], mode="drop", part="mlp")
    return model


def test_a_replaced_part_cannot_be_replaced_again():
    model = _mixed()
    stats = nbl.calibrate(make_tiny(), token_batches(n_batches=1), progress=False, part="mlp")
    with pytest.raises(ValueError, match="already have a replaced mlp"):
        nbl.linearize(model, stats, [2], part="mlp")  # the block map dropped layer 2's MLP
    with pytest.raises(ValueError, match="already have a replaced sub-block"):
        nbl.linearize(model, stats, [1], part="block")
    with pytest.raises(ValueError, match="has no mlp left"):
        nbl.calibrate(model, token_batches(n_batches=1), layers=[1], progress=False, part="mlp")
    assert nbl.calibrate(model, token_batches(n_batches=1), progress=False, part="attention").accumulators.keys() == {1}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mixed_model_generates_the_same_with_and_without_the_cache_and_caches_one_layer(family):
    model = _mixed(family)
    prompt = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    stored = sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None
    )
    assert stored == nbl.model_kv_bytes_per_token(model) * prompt.numel()  # only layer 1 keeps attention
    assert nbl.model_kv_bytes_per_token(model) == kv_cache_bytes_per_token(model.config, {}, 4) // 4


def test_mixed_model_accounting_by_hand():
    model = _mixed()
    d, ff = 64, 128
    attention = 64 * 64 + 2 * 64 * 32 + 64 * 64 + d  # q, k, v, o and the input norm
    mlp = 3 * d * ff + d  # gate, up, down and the post-attention norm
    # removed: attention of 0, 2, 3 and MLPs of 1, 2, 3; added: maps in 0 (attention), 1 (MLP), 2 (block)
    assert nbl.parameter_report(model).removed == 3 * attention + 3 * mlp - 3 * (d * d + d)
    attn_modes, mlp_modes = nbl.replaced_layers(model), nbl.replaced_mlps(model)
    assert attn_modes == {0: "linear", 2: "linear", 3: "drop"} and mlp_modes == {1: "linear", 2: "drop", 3: "drop"}
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    assert BytesModel(model.config, 4).decode(attn_modes, 0, mlp_modes) == 4 * params
    flops = FlopModel(model.config)
    proj = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64)
    kept = 6 * d * ff + proj + 4 * 10 * 64
    expected = [2 * d * d + 6 * d * ff, proj + 4 * 10 * 64 + 2 * d * d, 2 * d * d, 0]
    assert [flops.layer(attn_modes.get(i), 10, mlp_modes.get(i)) for i in range(4)] == expected
    assert flops.token(attn_modes, 10, mlp_modes) == sum(expected) < 4 * kept


def test_mixed_model_round_trips_through_a_checkpoint_in_a_fresh_process(tmp_path):
    model = _mixed("qwen2")
    folder = nbl.save_linearized(model, tmp_path / "ckpt")
    meta = json.loads((folder / "nbl.json").read_text())
    assert meta["replaced_mlps"] == {"1": "linear", "2": "drop", "3": "drop"}
    printed = assert_reloads_the_same_in_a_fresh_process(model, folder, tmp_path)
    assert "[(0, 'linear'), (2, 'linear'), (3, 'drop')] [(1, 'linear'), (2, 'drop'), (3, 'drop')]" in printed


def test_joint_selection_ranks_attention_and_mlp_sub_blocks_together():
    cfg = OmegaConf.create({"layers": None, "num_layers": 3, "selection": {"strategy": "cosine", "seed": 0}})
    scores = {
        "attention": {"cosine": {0: 0.1, 1: 0.95, 2: 0.5}},
        "mlp": {"cosine": {0: 0.2, 1: 0.9, 2: 0.97}},
    }
    inputs = SelectionInputs(
        cfg=cfg, config=SimpleNamespace(num_hidden_layers=3), model=None, stats=dict.fromkeys(scores), heldout_stats={},
        ridges=dict.fromkeys(scores, 0.0), heldout=list, calibration=list, scores=scores, measured_key={},
        cache_dir=Path("."), probe_settings={"mode": "linear", "ridge": 0.0, "granularity": "joint"},
    )  # fmt: skip
    chosen = get_strategy("cosine").select(inputs)
    assert chosen.layers == {"attention": [1], "mlp": [1, 2]} and chosen.score_used == "cosine"
    drawn = get_strategy("random").select(inputs).layers
    assert sum(len(v) for v in drawn.values()) == 3 and drawn == get_strategy("random").select(inputs).layers
