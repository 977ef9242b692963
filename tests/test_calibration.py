"""Calibration hooks against the model's own hidden states; padding, hook cleanup, caching format."""

import pytest
import torch

import nbl
from nbl.cache import cached_calibration
from nbl.calib.result import CalibrationResult
from tests.conftest import make_tiny, token_batches


def test_statistics_match_hidden_states_and_attention_outputs(family):
    model = make_tiny(family)
    batches = token_batches(n_batches=2)
    stats = nbl.calibrate(model, batches, progress=False)
    assert sorted(stats) == [0, 1, 2, 3] and stats.num_tokens == 2 * 4 * 32
    with torch.no_grad():
        hidden = [model(b, output_hidden_states=True).hidden_states for b in batches]
    for i in range(4):
        x = torch.cat([h[i].reshape(-1, 64) for h in hidden]).double()
        torch.testing.assert_close(stats[i].sum_x, x.sum(0), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(stats[i].sum_xx, x.T @ x, rtol=1e-5, atol=1e-3)


def test_mean_cosine_matches_direct_computation():
    model = make_tiny("llama")
    batch = token_batches(n_batches=1)[0]
    captured = {}
    attn = model.model.layers[1].self_attn

    def grab(module, args, out) -> None:
        captured["a"] = out[0]

    handle = attn.register_forward_hook(grab)
    with torch.no_grad():
        hidden = model(batch, output_hidden_states=True).hidden_states
    handle.remove()
    x, a = hidden[1], captured["a"]
    expected = torch.nn.functional.cosine_similarity(x, x + a, dim=-1).mean().item()
    stats = nbl.calibrate(model, [batch], progress=False)
    assert stats.mean_cosine(1) == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(stats[1].sum_a, a.reshape(-1, 64).double().sum(0), rtol=1e-5, atol=1e-4)


def test_padding_is_not_counted():
    model = make_tiny("llama", hidden_size=32)  # 52 real tokens: more than d, as calibration requires
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(3, 256, (1, 20), generator=g), torch.randint(3, 256, (1, 32), generator=g)
    padded = torch.zeros(2, 32, dtype=torch.long)
    padded[0, :20], padded[1] = short[0], long[0]
    mask = torch.zeros(2, 32, dtype=torch.long)
    mask[0, :20], mask[1] = 1, 1
    with_padding = nbl.calibrate(model, [{"input_ids": padded, "attention_mask": mask}], progress=False)
    separate = nbl.calibrate(model, [short, long], progress=False)
    assert with_padding.num_tokens == separate.num_tokens == 52
    for i in range(4):
        torch.testing.assert_close(with_padding[i].sum_xx, separate[i].sum_xx, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(with_padding[i].sum_ax, separate[i].sum_ax, rtol=1e-5, atol=1e-3)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_even_when_the_pass_raises():
    model = make_tiny("llama")
    before = _hook_count(model)

    def broken():
        yield token_batches(n_batches=1)[0]
        yield "not a batch"

    with pytest.raises(TypeError):
        nbl.calibrate(model, broken(), progress=False)
    assert _hook_count(model) == before


def test_only_layers_with_attention_are_calibrated():
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=1), progress=False)
    nbl.linearize(model, stats, [0, 2])
    again = nbl.calibrate(model, token_batches(n_batches=1), progress=False)
    assert sorted(again) == [1, 3]
    with pytest.raises(ValueError, match="no attention"):
        nbl.calibrate(model, token_batches(n_batches=1), layers=[0], progress=False)


def test_result_round_trips_through_safetensors(tmp_path):
    model = make_tiny("qwen2")
    stats = nbl.calibrate(model, token_batches(n_batches=1), progress=False)
    stats.save(tmp_path / "stats.safetensors", metadata={"model": "tiny"})
    back = CalibrationResult.load(tmp_path / "stats.safetensors")
    assert sorted(back) == sorted(stats)
    for i in stats:
        assert back.mean_cosine(i) == pytest.approx(stats.mean_cosine(i))
        assert nbl.cca_bound(back[i]) == pytest.approx(nbl.cca_bound(stats[i]))


def test_overflowing_activations_stop_calibration_at_the_source(tmp_path):
    model = make_tiny("llama").to(torch.float16)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.fill_(6e4)  # fp16 tops out at 65504
    with pytest.raises(FloatingPointError, match=r"batch 0: the output of layer 1 holds NaN or inf in torch.float16"):
        nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    calls = []

    def compute():
        calls.append(1)
        return nbl.calibrate(model, token_batches(n_batches=2), progress=False)

    with pytest.raises(FloatingPointError):
        cached_calibration(tmp_path, {"k": 1}, compute)
    assert calls == [1] and not list(tmp_path.glob("*.safetensors"))  # nothing non-finite is cached


def test_too_few_tokens_for_the_hidden_size_is_refused():
    model = make_tiny("llama")  # hidden size 64
    with pytest.raises(ValueError, match="saw 60 real tokens for hidden size 64"):
        nbl.calibrate(model, [torch.randint(3, 256, (2, 30))], progress=False)


def test_lazy_statistics_read_each_layer_on_demand_and_equal_the_eager_ones(tmp_path):
    model = make_tiny("llama")
    stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    stats.save(tmp_path / "s.safetensors")
    eager = CalibrationResult.load(tmp_path / "s.safetensors")
    lazy = CalibrationResult.load(tmp_path / "s.safetensors", lazy=True).to("cpu")
    assert list(lazy) == list(eager) == [0, 1, 2, 3] and lazy.num_tokens == eager.num_tokens == 256
    assert lazy[2] is not lazy[2]  # read afresh each time, nothing kept
    for i in eager:
        assert lazy.mean_cosine(i) == eager.mean_cosine(i)
        for name, t in eager[i].state_dict().items():
            assert torch.equal(lazy[i].state_dict()[name], t)
    lazy.check()
    assert nbl.cca_bound(lazy[1]) == nbl.cca_bound(stats[1])
