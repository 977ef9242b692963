"""Parameter, KV-cache and FLOP accounting against hand counts and the paper's sparsity column."""

import pytest
import torch
from transformers import MistralConfig

import nbl
from nbl.core.accounting import BytesModel, FlopModel, kv_cache_bytes_per_token
from tests.conftest import make_tiny, token_batches

# Mistral-7B-v0.1's published architecture (no weights needed: accounting runs on the meta device).
MISTRAL_7B = MistralConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    tie_word_embeddings=False,
)


def _meta_model(config, replaced):
    from transformers import AutoModelForCausalLM

    from nbl.core.surgery import apply_replacements

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        apply_replacements(model, replaced)
    return model


@pytest.mark.parametrize(("mode", "expected_sparsity"), [("linear", 0.029), ("drop", 0.048)], ids=["NBL-8", "DROP-8"])
def test_sparsity_matches_the_paper_table(mode, expected_sparsity):
    report = nbl.parameter_report(_meta_model(MISTRAL_7B, {i: mode for i in range(8)}))
    assert report.sparsity == pytest.approx(expected_sparsity, abs=0.0006)  # the paper prints one decimal of %


def test_parameter_report_hand_count():
    model = make_tiny("llama")  # hidden 64, 4 heads of 16, 2 kv heads, untied head, vocab 256
    stats = nbl.calibrate(model, token_batches(n_batches=1), progress=False)
    nbl.linearize(model, stats, [1])
    attention = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 64  # q, k, v, o, input_layernorm
    report = nbl.parameter_report(model)
    assert report.removed == attention - (64 * 64 + 64)
    assert report.non_embedding_base == report.base_params - 2 * 256 * 64
    assert report.params == sum(p.numel() for p in model.parameters())


def test_kv_bytes_per_token():
    assert kv_cache_bytes_per_token(MISTRAL_7B) == 32 * 2 * 8 * 128 * 2  # 128 KiB per token in bf16
    assert kv_cache_bytes_per_token(MISTRAL_7B, {i: "linear" for i in range(12)}) == 20 * 2 * 8 * 128 * 2


def test_flop_model_hand_count():
    cfg = make_tiny("llama").config
    flops = FlopModel(cfg)
    d, ff, v = 64, 128, 256
    proj = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64)
    assert flops.layer(None, context=10) == 6 * d * ff + proj + 4 * 10 * 64
    assert flops.layer("linear", 10) == 6 * d * ff + 2 * d * d
    assert flops.layer("drop", 10) == 6 * d * ff
    n = 8
    per_token_attention = sum(4 * t * 64 for t in range(1, n + 1))  # causal: token t sees t tokens
    expected = 4 * n * (6 * d * ff + proj) + 4 * per_token_attention + 2 * d * v
    assert flops.prefill({}, n) == pytest.approx(expected)
    assert flops.prefill_speedup({0: "linear", 1: "linear"}, 512) > 1.0
    assert flops.decode_speedup({0: "drop"}, 512) > flops.decode_speedup({0: "linear"}, 512)


@pytest.mark.parametrize("replaced", [{}, dict.fromkeys(range(8), "linear"), {0: "drop", 5: "linear", 31: "drop"}])
def test_bytes_model_reads_every_weight_but_the_embedding_table_once(replaced):
    model = _meta_model(MISTRAL_7B, replaced)
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    bytes_model = BytesModel(MISTRAL_7B, bytes_per_value=2)
    assert bytes_model.decode(replaced, context=0) == 2 * params
    kv = kv_cache_bytes_per_token(MISTRAL_7B, replaced, 2)
    assert bytes_model.decode(replaced, 3000) - bytes_model.decode(replaced, 0) == 3000 * kv


def test_bytes_model_speedup_of_nbl_is_far_below_the_flop_and_launch_bound_ones():
    nbl12 = dict.fromkeys(range(12), "linear")
    # 12 maps replace 12 x (q, k, v, o) = 12 x 2.5 d^2 weights by 12 x d^2: about 4% fewer bytes per step
    assert BytesModel(MISTRAL_7B).decode_speedup(nbl12, 3072) == pytest.approx(1.05, abs=0.01)


@pytest.mark.parametrize("width", [2, 3])
@pytest.mark.parametrize("rank", [None, 1024])
def test_conv_maps_count_their_shape_in_flops_weights_and_state(width, rank):
    from transformers import AutoModelForCausalLM

    from nbl.core.surgery import apply_replacements

    tiny = FlopModel(make_tiny("llama").config, conv=(width, rank and 16))
    per_token = 2 * width * 64 * 64 if rank is None else 2 * 16 * (width + 1) * 64
    assert tiny.layer("conv", 10) == 6 * 64 * 128 + per_token
    replaced = {0: "conv", 5: "conv", 31: "linear"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(MISTRAL_7B)
        apply_replacements(model, replaced, conv={0: (width, rank), 5: (width, rank)})
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    state = 2 * (width - 1) * 4096  # the last width - 1 hidden vectors of two conv layers
    bytes_model = BytesModel(MISTRAL_7B, bytes_per_value=2, conv=(width, rank))
    assert bytes_model.decode(replaced, context=0) == 2 * (params + state)
