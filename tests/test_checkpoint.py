"""Saved checkpoints against reloaded ones in a fresh process."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import nbl
from tests.conftest import make_tiny, token_batches

RELOAD = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file, save_file
    import nbl
    model = nbl.load_linearized(sys.argv[1])
    ids = load_file(sys.argv[2])["ids"]
    with torch.no_grad():
        logits = model(ids).logits
    gen = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    save_file({"logits": logits.contiguous(), "gen": gen}, sys.argv[3])
    print(sorted(nbl.replaced_layers(model).items()), sorted(nbl.replaced_mlps(model).items()))
    """
)


def assert_reloads_the_same_in_a_fresh_process(model, folder, tmp_path) -> str:
    """Reload the checkpoint ``folder`` in a new Python process: logits and cached generation must equal
    ``model``'s exactly; returns what it printed (its attention and MLP replacements)."""
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(folder), str(tmp_path / "ids.safetensors"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # nothing relative to the working directory may be needed
    )
    assert proc.returncode == 0, proc.stderr
    out = load_file(str(tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(ids).logits, rtol=0, atol=0)
    expected = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(out["gen"], expected)
    return proc.stdout


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_round_trip_in_a_fresh_process(tmp_path, model_type):
    model = make_tiny(model_type)
    stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    nbl.linearize(model, stats, [0, 2], mode="linear")
    nbl.linearize(model, stats, [3], mode="drop")
    folder = nbl.save_linearized(model, tmp_path / "ckpt")
    assert json.loads((folder / "nbl.json").read_text())["replaced_layers"] == {
        "0": "linear",
        "2": "linear",
        "3": "drop",
    }
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pkl"))
    printed = assert_reloads_the_same_in_a_fresh_process(model, folder, tmp_path)
    assert "[(0, 'linear'), (2, 'linear'), (3, 'drop')] []" in printed


def test_loading_a_plain_folder_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an NBL checkpoint"):
        nbl.load_linearized(tmp_path)


def test_a_tied_head_round_trips(tmp_path):
    """The head shares the embedding (SmolLM2): stored once, tied again on load (without initialisation)."""
    from nbl.models import random_model, tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    model = random_model(config)
    nbl.linearize(model, nbl.calibrate(model, token_batches(n_batches=2), progress=False), [1])
    reloaded = nbl.load_linearized(nbl.save_linearized(model, tmp_path / "ckpt"))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    config_json = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config_json["architectures"] == ["NblLlamaForCausalLM"] and config_json["nbl"]["replaced_layers"] == {
        "1": "linear"
    }
