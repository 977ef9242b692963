"""Saved checkpoints against reloaded ones in a fresh process."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nbl
from tests.conftest import FAMILIES, make_tiny, token_batches

RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    import nbl
    ids = load_file(sys.argv[1])["ids"]
    printed = {}
    for k, folder in enumerate(sys.argv[3:]):
        model = nbl.load_linearized(folder)
        with torch.no_grad():
            logits = model(ids).logits
        gen = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        save_file({"logits": logits.contiguous(), "gen": gen}, f"{sys.argv[2]}-{k}")
        printed[folder] = f"{sorted(nbl.replaced_layers(model).items())} {sorted(nbl.replaced_mlps(model).items())}"
    print(json.dumps(printed))
    """
)


def reload_in_a_fresh_process(models: dict[str, tuple[torch.nn.Module, Path]], tmp_path: Path,
                              atol: dict[str, float] | None = None) -> dict[str, str]:  # fmt: skip
    """Reload each checkpoint (name -> (model, folder)) in one new Python process (one start for all of them):
    logits (within ``atol[name]``, default exact) and cached generation must equal the model's; returns what the
    process printed per name (its attention and MLP replacements)."""
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    folders = [str(folder) for _, folder in models.values()]
    # cwd: nothing relative to the working directory may be needed
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "ids.safetensors"), str(tmp_path / "out"),
                           *folders], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    for k, (name, (model, _)) in enumerate(models.items()):
        out = load_file(str(tmp_path / f"out-{k}"))
        with torch.no_grad():
            torch.testing.assert_close(out["logits"], model(ids).logits, rtol=0, atol=(atol or {}).get(name, 0.0))
        expected = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        assert torch.equal(out["gen"], expected), name
    return {name: printed[str(folder)] for name, (_, folder) in models.items()}


def assert_reloads_the_same_in_a_fresh_process(model, folder, tmp_path, atol: float = 0.0) -> str:
    """:func:`reload_in_a_fresh_process` of one checkpoint."""
    return reload_in_a_fresh_process({"model": (model, Path(folder))}, tmp_path, {"model": atol})["model"]


def test_round_trip_in_a_fresh_process(tmp_path):
    models = {}
    for model_type in ("llama", "qwen2", "qwen3"):
        model = make_tiny(model_type)
        stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
        nbl.linearize(model, stats, [0, 2], mode="linear")
        nbl.linearize(model, stats, [3], mode="drop")
        folder = nbl.save_linearized(model, tmp_path / model_type)
        assert json.loads((folder / "nbl.json").read_text())["replaced_layers"] == {"0": "linear", "2": "linear",
                                                                                   "3": "drop"}  # fmt: skip
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pkl"))
        models[model_type] = (model, folder)
    printed = reload_in_a_fresh_process(models, tmp_path)
    assert set(printed.values()) == {"[(0, 'linear'), (2, 'linear'), (3, 'drop')] []"}


def test_loading_a_plain_folder_fails_clearly(tmp_path):
    with pytest.raises(nbl.CheckpointError, match=r"config.json not found: .* is not an NBL checkpoint"):
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


def _conv_and_linear(family: str):
    """A model of ``family`` with every kind of replacement: linear, conv (reduced rank), drop, an MLP map."""
    from nbl.calib.hooks import calibrate

    model = make_tiny(family)
    nbl.linearize(model, calibrate(model, token_batches(n_batches=3), [1], progress=False, width=2), [1], mode="conv",
                  rank=16)  # fmt: skip
    stats = nbl.calibrate(model, token_batches(n_batches=2), progress=False)
    nbl.linearize(model, stats, [0], mode="linear")
    nbl.linearize(model, stats, [3], mode="drop")
    nbl.linearize(model, nbl.calibrate(model, token_batches(n_batches=2), progress=False, part="mlp"), [2], part="mlp")
    return model


PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    ids, out, folders = torch.load(sys.argv[1]), sys.argv[2], sys.argv[3:]
    for folder in folders:
        try:
            AutoModelForCausalLM.from_pretrained(folder)
        except ValueError as err:
            print("refused:", str(err).splitlines()[0])
    import nbl
    nbl.register_auto_classes()
    for k, folder in enumerate(folders):
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            torch.save(model(ids).logits, f"{out}-{k}")
        print(type(model).__name__, sorted(nbl.replaced_layers(model).items()))
    """
)


def test_plain_transformers_refuses_a_checkpoint_and_loads_it_right_once_nbl_registers(tmp_path):
    """Without nbl, transformers meets an unknown model type (never the family's class with random attention);
    after nbl.register_auto_classes(), AutoModelForCausalLM builds the NBL model, equal to the saved one (every
    family in one fresh process)."""
    models = {family: _conv_and_linear(family) for family in FAMILIES}
    folders = [nbl.save_linearized(m, tmp_path / family, max_shard_size="40KB") for family, m in models.items()]
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(tmp_path / "ids.pt"), str(tmp_path / "out"),
                           *map(str, folders)], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    for k, (family, model) in enumerate(models.items()):
        assert json.loads((folders[k] / "config.json").read_text())["model_type"] == f"nbl_{family}"
        assert lines[k].startswith(f"refused: The checkpoint you are trying to load has model type `nbl_{family}`")
        assert lines[len(models) + k] == f"Nbl{names[family]}ForCausalLM [(0, 'linear'), (1, 'conv'), (3, 'drop')]"
        with torch.no_grad():
            torch.testing.assert_close(torch.load(tmp_path / f"out-{k}"), model(ids).logits, rtol=0, atol=0)


def test_sharded_checkpoints_index_their_shards_and_a_new_save_leaves_no_stale_one(tmp_path):
    model = _conv_and_linear("llama")
    folder = nbl.save_linearized(model, tmp_path / "ckpt", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert all(s.stat().st_size <= 20 * 1024 + 8192 or len(load_file(str(s))) == 1 for s in shards)  # header room
    stored = {k for s in shards for k in load_file(str(s))}
    assert stored == set(index["weight_map"]) and "lm_head.weight" in stored
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for s in shards for t in load_file(str(s)).values())
    assert_reloads_the_same_in_a_fresh_process(model, folder, tmp_path)
    nbl.save_linearized(model, folder)  # one shard now: the old ones and their index go
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not (folder / "model.safetensors.index.json").exists()
    assert_reloads_the_same_in_a_fresh_process(model, folder, tmp_path)


def test_a_checkpoint_carries_its_generation_config_and_tokenizer_with_its_chat_template(tmp_path, converted_models):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(converted_models / "smollm2-135m-instruct")
    assert tokenizer.chat_template
    model = _conv_and_linear("llama")
    model.generation_config.temperature, model.generation_config.do_sample = 0.3, True
    folder = nbl.save_linearized(model, tmp_path / "ckpt", tokenizer)
    assert GenerationConfig.from_pretrained(folder).temperature == 0.3
    assert AutoTokenizer.from_pretrained(folder).chat_template == tokenizer.chat_template
    assert nbl.load_linearized(folder).generation_config.temperature == 0.3


def test_save_pretrained_of_an_nbl_model_writes_an_nbl_checkpoint(tmp_path):
    model = _conv_and_linear("qwen3")
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "nbl_qwen3"
    assert_reloads_the_same_in_a_fresh_process(model, tmp_path / "ckpt", tmp_path)
    with pytest.raises(TypeError, match=r"nbl\.save_linearized"):
        model.save_pretrained(tmp_path / "other", push_to_hub=True)


def test_a_format_2_checkpoint_still_loads(tmp_path):
    """Format 2 declared the family's own model_type; its replacement is read from the same config entry."""
    model = _conv_and_linear("mistral")
    folder = nbl.save_linearized(model, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"], config["nbl"]["format_version"] = "mistral", 2
    (folder / "config.json").write_text(json.dumps(config))
    assert_reloads_the_same_in_a_fresh_process(model, folder, tmp_path)


def _damage(folder, name: str) -> str:
    """Damage ``folder`` the named way; returns the message its load must give."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if name == "config not json":
        config_file.write_text(config_file.read_text()[:40])
        return r"config\.json is not valid JSON"
    if name == "layer key":
        config["nbl"]["replaced_layers"] = {"one": "linear"}
    elif name == "other family":
        config["nbl"]["model_type"] = "qwen2"
    elif name == "future format":
        config["nbl"]["format_version"] = 9
    config_file.write_text(json.dumps(config))
    if name == "truncated weights":
        weights = folder / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 64)
        return r"model\.safetensors is truncated: its tensors end at byte"
    return {
        "layer key": r"'nbl\.replaced_layers' has layer keys \['one'\] that are not layer indices",
        "other family": r"made on a 'qwen2' model, but the config is of model_type 'nbl_llama' \(family 'llama'\)",
        "future format": r"NBL checkpoint format 9; this nbl reads \(1, 2, 3\)",
    }[name]


@pytest.mark.parametrize("damage", ["config not json", "layer key", "other family", "future format", "truncated weights"])
def test_a_damaged_checkpoint_is_refused_naming_the_file_before_any_weight_loads(tmp_path, damage):
    model = make_tiny("llama")
    nbl.linearize(model, nbl.calibrate(model, token_batches(n_batches=2), progress=False), [1])
    folder = nbl.save_linearized(model, tmp_path / "ckpt")
    message = _damage(folder, damage)
    with pytest.raises(nbl.CheckpointError, match=message) as err:
        nbl.load_linearized(folder)
    assert str(folder) in str(err.value)


@pytest.mark.slow
def test_save_and_load_of_a_1b_model_hold_one_shard_beyond_the_model(tmp_path):
    """A ~1B-parameter random-weight Llama (bf16, 2 GB) in 256 MB shards, each phase in a fresh process: saving adds
    at most a shard to what the process holds; loading holds the model once (plus a shard); saving a model whose
    decoder layers are offloaded to disk holds its resident weights plus a shard. Measured peaks: docs/results.md."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "checkpoint_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--json", "--folder", str(tmp_path / "ckpt")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    save, load, offloaded = json.loads(proc.stdout.splitlines()[-1])
    mb = 2**20
    assert save["model_bytes"] > 1800 * mb and save["largest_shard"] <= 256 * mb
    assert save["peak_above_start"] <= save["largest_shard"] + 64 * mb, save
    assert load["wrong_tensors"] == [] and load["model_bytes"] == save["model_bytes"]
    assert load["peak_above_start"] <= load["model_bytes"] + load["largest_shard"] + 128 * mb, load
    assert offloaded["peak_above_start"] <= offloaded["resident_bytes"] + offloaded["largest_shard"] + 64 * mb, offloaded


def test_lm_evals_hf_model_given_the_folder_evaluates_the_nbl_model(tmp_path, converted_models):
    """lm-eval's ``hf`` model loads through AutoModelForCausalLM: once nbl has registered its classes, the folder
    gives the replaced model, not the family's with random attention."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from nbl.models import random_model, tiny_config

    tokenizer = AutoTokenizer.from_pretrained(converted_models / "smollm2-135m-instruct")
    model = random_model(tiny_config("llama", vocab_size=len(tokenizer)))
    nbl.linearize(model, nbl.calibrate(model, token_batches(n_batches=2, vocab=len(tokenizer)), progress=False), [0, 2])
    folder = nbl.save_linearized(model, tmp_path / "ckpt", tokenizer)
    nbl.register_auto_classes()
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=1)
    assert type(lm.model).__name__ == "NblLlamaForCausalLM" and nbl.replaced_layers(lm.model) == {0: "linear", 2: "linear"}
    ids = torch.randint(3, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(lm._model_call(ids), model(ids).logits, rtol=0, atol=0)
