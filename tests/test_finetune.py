"""LoRA healing: it trains, it merges back into a plain linearized model, the maps are frozen unless asked."""

import pytest
import torch

import nbl
from nbl.finetune import LoraSettings, lora_finetune, map_parameters
from tests.conftest import make_tiny, token_batches


def _linearized():
    model = make_tiny("llama")
    stats = nbl.calibrate_parts(model, token_batches(n_batches=2), ("attention", "mlp"), progress=False)
    nbl.linearize(model, stats["attention"], [1], part="attention")
    nbl.linearize(model, stats["mlp"], [2], part="mlp")
    return model


@pytest.mark.parametrize("train_maps", [False, True])
def test_healing_lowers_the_loss_and_merges_into_the_same_modules(train_maps, tmp_path):
    model = _linearized()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps = {id(p) for p in map_parameters(model)}
    assert len(maps) == 4  # weight and bias of the attention map and of the MLP map
    batch = token_batches(n_batches=1, seed=3)[0]
    merged, log = lora_finetune(model, [batch] * 15, LoraSettings(steps=15, lr=1e-2, train_maps=train_maps), False)
    assert merged is model and not any("lora" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(before)
    assert log.losses[-1] < log.losses[0] - 0.1  # the same batch 15 times: the adapters must fit it
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    map_keys = {"model.layers.1.attn_linear.weight", "model.layers.1.attn_linear.bias",
                "model.layers.2.mlp.linear.weight", "model.layers.2.mlp.linear.bias"}  # fmt: skip
    assert (map_keys <= changed) is train_maps and (map_keys & changed == set()) is not train_maps
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.layers.2.mlp.up_proj.weight" not in before
    assert not any(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        reference = merged(batch).logits
    reloaded = nbl.load_linearized(nbl.save_linearized(merged, tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, reference, rtol=0, atol=0)


def test_too_few_batches_and_absent_targets_are_refused():
    with pytest.raises(ValueError, match="60 fine-tuning steps need 60 batches"):
        lora_finetune(_linearized(), token_batches(2), LoraSettings())
    with pytest.raises(ValueError, match="none of the LoRA target modules"):
        lora_finetune(_linearized(), token_batches(2), LoraSettings(steps=1, target_modules=("c_attn",)))
