"""Convolution maps (replacement.mode=conv): the fit against numpy, the surgery against the unmodified model,
cached generation against uncached, left padding, checkpoints in a fresh process, and the vLLM refusal."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

import nbl
from nbl.calib.hooks import calibrate, shifted_statistics_bytes
from nbl.core.decode_state import ConvSlot
from nbl.core.surgery import ConvMap, shifted_features
from tests.conftest import greedy_cached_and_uncached, make_tiny, token_batches


def _attention_pairs(model, layer: int, batches) -> tuple[np.ndarray, np.ndarray]:
    """(x, Attn(LN1(x))) of ``layer`` for every token, (B*S, d) float64, collected independently of nbl."""
    xs, outs = [], []
    block = model.model.layers[layer]
    h1 = block.input_layernorm.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    h2 = block.self_attn.register_forward_hook(lambda m, a, o: outs.append(o[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    h1.remove()
    h2.remove()
    return xs, outs


def _numpy_features(x: np.ndarray, width: int) -> np.ndarray:
    """(B, S, d) -> (B, S, width d) by explicit loops: x_t, x_(t-1), ... with zeros before the start."""
    b, s, d = x.shape
    out = np.zeros((b, s, width * d))
    for t in range(s):
        for j in range(width):
            if t - j >= 0:
                out[:, t, j * d : (j + 1) * d] = x[:, t - j]
    return out


@pytest.mark.parametrize("width", [2, 3])
def test_conv_map_is_the_least_squares_fit_of_the_shifted_inputs(width):
    model = make_tiny("llama")
    batches = token_batches(n_batches=6)
    stats = calibrate(model, batches, [2], progress=False, width=width)
    w, b = nbl.fit_lmmse(stats[2])
    xs, outs = _attention_pairs(model, 2, batches)
    f = np.concatenate([_numpy_features(x.double().numpy(), width) for x in xs]).reshape(-1, width * 64)
    a = np.concatenate([o.double().numpy() for o in outs]).reshape(-1, 64)
    design = np.hstack([f, np.ones((len(f), 1))])
    coef, *_ = np.linalg.lstsq(design, a, rcond=None)
    np.testing.assert_allclose(w.numpy(), coef[:-1].T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.numpy(), coef[-1], rtol=1e-6, atol=1e-6)
    assert stats[2].d_in == width * 64 and shifted_statistics_bytes(64, width) == 8 * sum(
        t.numel() for name, t in stats[2].state_dict().items() if name.startswith("sum")
    )


def test_replaced_layer_is_the_original_with_the_convolution_as_attention_output():
    base = make_tiny("llama")
    stats = calibrate(base, token_batches(), [1], progress=False, width=2)
    replaced = copy.deepcopy(base)
    nbl.linearize(replaced, stats, [1], mode="conv")
    conv = replaced.model.layers[1].attn_linear
    assert isinstance(conv, ConvMap) and conv.width == 2 and nbl.replaced_layers(replaced) == {1: "conv"}
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    seen = {}
    block = base.model.layers[1]

    def run_with(fn):
        h1 = block.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", a[0] if a else k["hidden_states"]),
                                             with_kwargs=True)  # fmt: skip
        h2 = block.self_attn.register_forward_hook(lambda m, a, o: (fn(seen["x"]), *o[1:]))
        with torch.no_grad():
            logits = base(ids).logits
        h1.remove()
        h2.remove()
        return logits

    with torch.no_grad():
        expected = replaced(ids).logits
    conv_out = run_with(lambda x: torch.nn.functional.linear(shifted_features(x, 2), conv.weight, conv.bias))
    # mutation check: the map without its previous-token half is a clearly different model
    one_token = run_with(lambda x: torch.nn.functional.linear(x, conv.weight[:, :64], conv.bias))
    torch.testing.assert_close(conv_out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(one_token, expected, rtol=0.0, atol=1e-3)


@pytest.mark.parametrize("layers", [[0], [3], [0, 1, 2, 3]], ids=["first", "last", "all"])
@pytest.mark.parametrize("width", [2, 3])
def test_cached_generation_equals_uncached(family, layers, width):
    model = make_tiny(family)
    stats = calibrate(model, token_batches(n_batches=3), layers, progress=False, width=width)
    nbl.linearize(model, stats, layers, mode="conv")
    prompt = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    cached, uncached = greedy_cached_and_uncached(model, prompt)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, uncached)
    # the decode state is what makes it exact: a cache whose state is wiped before each step differs
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = out.past_key_values
        step = out.logits[:, -1:].argmax(-1)
        exact = model(step, past_key_values=copy.deepcopy(cache), use_cache=True).logits
        for slot in cache.layers:
            if isinstance(slot, ConvSlot):
                slot.window = None  # forget the inputs before this step
        stateless = model(step, past_key_values=cache, use_cache=True).logits
    assert not torch.allclose(exact, stateless, atol=1e-4)


def test_left_padded_row_sees_zeros_before_its_start():
    model = make_tiny("llama")
    stats = calibrate(model, token_batches(n_batches=3), [0, 2], progress=False, width=2)
    nbl.linearize(model, stats, [0, 2], mode="conv")
    short = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    long = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    padded = model.generate(ids, attention_mask=mask, **kwargs)
    alone = model.generate(short, **kwargs)
    assert torch.equal(padded[0, 4:], alone[0])


def test_checkpoint_reloads_in_a_fresh_process(tmp_path):
    model = make_tiny("qwen2")
    stats = calibrate(model, token_batches(n_batches=3), [1, 2], progress=False, width=3)
    nbl.linearize(model, stats, [1, 2], mode="conv")
    folder = nbl.save_linearized(model, tmp_path / "ckpt")
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import torch, nbl, sys\n"
        f"m = nbl.load_linearized({str(folder)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "assert nbl.replaced_layers(m) == {1: 'conv', 2: 'conv'}, nbl.replaced_layers(m)\n"
        "assert m.model.layers[1].attn_linear.width == 3\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


def test_a_conv_checkpoint_declares_the_hybrid_architecture_vllm_serves(tmp_path):
    """vLLM decides from the class whether a model holds state: a conv checkpoint names the NblConv class; maps of
    two widths (vLLM sizes one state page for every state layer) and a stale architecture are refused."""
    from transformers import AutoConfig

    from nbl.serve.vllm_plugin import CheckpointError, check_checkpoint

    model = make_tiny("llama")
    stats = calibrate(model, token_batches(n_batches=3), [1], progress=False, width=2)
    nbl.linearize(model, stats, [1], mode="conv")
    folder = nbl.save_linearized(model, tmp_path / "ckpt")
    nbl.register_auto_classes()  # AutoConfig reads nbl_llama (the test passed only after another test had done this)
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == ["NblConvLlamaForCausalLM"]
    assert check_checkpoint(config, folder)["conv"] == {1: (2, None)}
    config.architectures = ["NblLlamaForCausalLM"]
    with pytest.raises(CheckpointError, match="served as NblConvLlamaForCausalLM: save it again"):
        check_checkpoint(config, folder)
    config.architectures = ["NblConvLlamaForCausalLM"]
    config.nbl = {**config.nbl, "replaced_layers": {"1": "conv", "2": "conv"},
                  "conv_maps": {"1": {"width": 2, "rank": None}, "2": {"width": 3, "rank": None}}}  # fmt: skip
    with pytest.raises(CheckpointError, match=r"widths \[2, 3\]: vLLM gives every state layer"):
        check_checkpoint(config)


def test_linear_statistics_cannot_make_a_conv_map():
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=3), progress=False)
    with pytest.raises(ValueError, match="another map"):
        nbl.linearize(model, stats, [1], mode="conv")
    assert nbl.replaced_layers(model) == {}


@pytest.mark.parametrize("width", [2, 3])
def test_reduced_rank_conv_map_holds_the_factors_of_the_reduced_rank_fit(width):
    from nbl.core.linalg import reduce_rank

    model = make_tiny("mistral")
    stats = calibrate(model, token_batches(n_batches=4), [1, 3], progress=False, width=width)
    nbl.linearize(model, stats, [1, 3], mode="conv", rank=16)
    conv = model.model.layers[3].attn_linear
    assert conv.shape == (width, 16) and not hasattr(conv, "weight")
    u, v, b = reduce_rank(nbl.fit_lmmse(stats[3])[0], stats[3], 16)
    torch.testing.assert_close(conv.up @ conv.down, (u @ v).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.bias, b.float())
    prompt = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(*greedy_cached_and_uncached(model, prompt, new_tokens=10))


def test_reduced_rank_checkpoint_reloads(tmp_path):
    model = make_tiny("llama")
    stats = calibrate(model, token_batches(n_batches=3), [2], progress=False, width=2)
    nbl.linearize(model, stats, [2], mode="conv", rank=8)
    folder = nbl.save_linearized(model, tmp_path / "ckpt")
    loaded = nbl.load_linearized(folder)
    assert loaded.model.layers[2].attn_linear.shape == (2, 8)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_shifted_statistics_count_left_padding_as_zeros():
    """A left-padded row gives the statistics of the same tokens alone: before a sequence starts the shifted
    inputs are zeros, as the conv map sees them at inference (rotary attention depends on relative positions
    only, so the real tokens' x and outputs agree up to rounding)."""
    from nbl.calib.hooks import calibrate_parts

    model = make_tiny("llama")
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    padded = {"input_ids": torch.cat([torch.full((1, 5), 7), ids], 1),  # not the embedding's zero padding row
              "attention_mask": torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], 1)}  # fmt: skip
    alone, shifted = (calibrate_parts(model, [batch], ("attention",), [1], progress=False, check_tokens=False, width=2)
                      ["attention"][1] for batch in (ids, padded))  # fmt: skip
    assert shifted.count == alone.count == 40
    for name, value in alone.state_dict().items():
        torch.testing.assert_close(shifted.state_dict()[name], value, rtol=1e-4, atol=1e-4, msg=name)


def test_shifted_statistics_refuse_too_few_tokens_and_other_parts():
    from nbl.calib.hooks import calibrate_parts

    model = make_tiny("llama")  # d = 64: a width-2 map has 128 inputs
    with pytest.raises(ValueError, match="120 real tokens for a width-2 map of 128 inputs"):
        calibrate(model, token_batches(n_batches=1, batch=4, seq=30), [1], progress=False, width=2)
    with pytest.raises(ValueError, match="attention part only"):
        calibrate_parts(model, token_batches(n_batches=1), ("mlp",), [1], progress=False, width=2)
