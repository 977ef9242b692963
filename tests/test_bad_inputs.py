"""Inputs a new user gets wrong, each refused with a clear message before heavy work, or given the right outcome:
an NBL checkpoint as the input model, a local model folder edited in place, calibration files by their suffix, a
damage estimate that cannot fit, settings nothing reads."""

import json
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

import nbl
from nbl.__main__ import CONF_DIR
from nbl.recipe.keys import model_fields
from nbl.recipe.schema import ConfigError
from nbl.recipe.validation import validate
from tests.conftest import make_tiny, token_batches


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_an_nbl_checkpoint_given_as_the_input_model_is_refused(tmp_path):
    model = make_tiny("llama")
    nbl.linearize(model, nbl.calibrate(model, token_batches(n_batches=2), progress=False), [1])
    folder = nbl.save_linearized(model, tmp_path / "ckpt")
    cfg = _compose("experiment=smoke", "model=llama3.1-8b", f"model.path={folder}", "num_layers=2")
    with pytest.raises(ConfigError, match=r"is an NBL checkpoint .* load it with nbl\.load_linearized"):
        validate(cfg)


def test_a_local_model_folder_edited_in_place_is_keyed_anew_and_hashed_once(tmp_path, monkeypatch):
    """A norm scaled inside a weights file of the same size changes the key; an unchanged folder is not read again
    (its digests are remembered by path, size, times and inode)."""
    import nbl.provenance
    from nbl.models import random_model, tiny_config

    folder = tmp_path / "model"  # 70 MB of weights: a sample of each file would miss a norm's 1 KB
    random_model(tiny_config("llama", hidden_size=256, vocab_size=32000)).save_pretrained(folder)
    cfg = _compose("model=llama3.1-8b", f"model.path={folder}", f"cache_dir={tmp_path / 'cache'}")
    config = nbl.models.tiny_config("llama")
    first = model_fields(cfg, config)["weights"]
    reads = []
    monkeypatch.setattr(nbl.provenance, "file_digest", lambda p, real=nbl.provenance.file_digest: reads.append(p) or real(p))
    assert model_fields(cfg, config)["weights"] == first and reads == []  # remembered
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    size = weights.stat().st_size
    tensors["model.layers.1.input_layernorm.weight"] *= 5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == size
    assert model_fields(cfg, config)["weights"] != first
    assert [p.name for p in reads] == ["model.safetensors"]  # only the file that changed was read again


@pytest.mark.parametrize(
    ("name", "content", "texts"),
    [
        ("upper.JSONL", '{"text": "one document"}\n{"text": "another"}\n', ["one document", "another"]),
        ("list.json", '["first text", "second text"]', ["first text", "second text"]),
        ("objects.Json", '[{"text": "first text"}, {"text": "second"}]', ["first text", "second"]),
        ("notes.TXT", "plain text", ["plain text"]),
    ],
)
def test_calibration_files_are_read_by_their_suffix_in_any_case(tmp_path, name, content, texts):
    from nbl.data import local_text

    (tmp_path / name).write_text(content)
    assert local_text(tmp_path / name) == texts


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("table.csv", "a,b\n1,2\n", "a .csv file is not read"),
        ("corpus", "no suffix", "a suffix-less file is not read"),
        ("dict.json", '{"text": "an object, not a list"}', "holds a list of texts or of objects with 'text'"),
        ("bad.json", "[1, 2", "not valid JSON"),
        ("numbers.json", "[1, 2]", "item 0: expected an object with a string field 'text'"),
    ],
)
def test_a_calibration_file_nbl_cannot_read_is_refused_naming_it(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    cfg = _compose("experiment=smoke", "calibration=local", f"calibration.path={tmp_path / name}")
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(cfg)


def _write_config(folder, **values) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "max_position_embeddings": 131072, **values}))  # fmt: skip


LLAMA_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "vocab_size": 128256,
             "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128}  # fmt: skip


def test_a_damage_estimate_that_cannot_fit_is_refused_before_loading(tmp_path, monkeypatch):
    import nbl.select.estimate as estimate

    _write_config(tmp_path / "70b", **LLAMA_70B)
    monkeypatch.setattr(estimate, "device_memory", lambda name: (f"{name} (80 GiB)", 80 * 2**30))
    base = ["model=llama3.1-70b", f"model.path={tmp_path / '70b'}", "selection=loss", "selection.damage=estimated",
            "calibration=c4", "device=cpu"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"needs about 160\.3 GiB on cpu \(80 GiB\) \(the weights 131\.4 GiB"):
        validate(_compose(*base, "model.device_map=null"))
    with pytest.raises(ConfigError, match=r"the held-out states 80\.0 GiB\), more than its 80\.0 GiB"):
        validate(_compose(*base, "selection.holdout_sequences=32"))  # device_map=auto: the states go to the host
    validate(_compose(*base))  # device_map=auto, 8 held-out windows: 20 GiB of states on the host, 9 on the device


def test_the_estimate_peak_is_what_its_formula_says_at_8b():
    """The numbers the README states (Llama-3.1-8B, bf16, 8 held-out windows of 2048 tokens)."""
    from types import SimpleNamespace

    from nbl.select.estimate import estimate_peak_bytes

    config = SimpleNamespace(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                             vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, head_dim=128)  # fmt: skip
    peak = estimate_peak_bytes(config, 8 * 2048, 2048, 2)
    assert peak["held-out states"] == 32 * 8 * 2048 * 4096 * 2  # 4 GiB
    assert peak["layer boundaries and gradients"] == 2 * 33 * 2048 * 4096 * 2
    assert round(sum(peak.values()) / 2**30, 1) == 7.1


def test_a_measure_nothing_reads_is_refused():
    with pytest.raises(ConfigError, match=r"selection.measure=kl is read by selection=greedy, loss, plan, validated"):
        validate(_compose("experiment=smoke", "+selection.measure=kl"))


def _fake_conversion(calls: list):
    """Stands in for the GGUF conversion: writes what a converted folder holds, small."""
    from nbl.models import tiny_config

    def convert(folder, weights=True):
        calls.append(weights)
        tiny_config("llama").save_pretrained(folder)
        (folder / "tokenizer.json").write_text(json.dumps({"model": "stand-in"}))
        if weights:
            save_file({"w": torch.zeros(4)}, str(folder / "model.safetensors"))

    return convert


@pytest.mark.parametrize("damage", ["tokenizer.json", "model.safetensors"])
def test_a_damaged_converted_model_is_converted_again(tmp_path, monkeypatch, caplog, damage):
    import nbl.models

    calls: list[bool] = []
    monkeypatch.setattr(nbl.models, "_convert_smollm2", _fake_conversion(calls))
    folder = nbl.models.smollm2_folder(tmp_path)
    assert calls == [True] and nbl.models.smollm2_folder(tmp_path) == folder and calls == [True]
    with open(folder / damage, "r+b") as f:
        f.truncate(folder.joinpath(damage).stat().st_size - 3)
    assert nbl.models.smollm2_folder(tmp_path) == folder and calls == [True, True]
    assert nbl.models.converted_damage(folder, weights=True) is None
    assert f"{folder} cannot be used" in caplog.text and damage in caplog.text


def test_a_full_disk_while_converting_says_where_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import nbl.models

    def full(folder, weights=True):
        (folder / "config.json").write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nbl.models, "_convert_smollm2", full)
    with pytest.raises(OSError, match=r"could not write the converted model smollm2-135m-instruct into .* point cache_dir"):
        nbl.models.smollm2_folder(tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m-instruct.lock"]


def test_a_tiny_model_converts_the_tokenizer_alone(tmp_path, monkeypatch):
    import nbl.models

    calls: list[bool] = []
    monkeypatch.setattr(nbl.models, "_convert_smollm2", _fake_conversion(calls))
    cfg = _compose("experiment=smoke", f"cache_dir={tmp_path}")
    validate(cfg)
    assert calls == [False] and not list(tmp_path.rglob("*.safetensors"))


def test_a_run_waiting_on_a_lock_says_which_process_holds_it(tmp_path, caplog):
    import subprocess
    import sys

    from nbl.cache import file_lock

    lock = tmp_path / "stats.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom nbl.cache import file_lock\n"
                               f"with file_lock(__import__('pathlib').Path({str(lock)!r})):\n"
                               "    print('held', flush=True); time.sleep(2)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with file_lock(lock):
        pass
    holder.wait()
    assert f"waiting for {lock}: process {holder.pid} on " in caplog.text


def test_speed_vllm_on_a_model_vllm_cannot_run_is_refused_before_calibration():
    with pytest.raises(ConfigError, match=r"vLLM's CPU attention takes head sizes \[32, 64, .*tiny-random-llama has 16"):
        validate(_compose("experiment=smoke", "speed=vllm", "device=cpu"))


def test_an_engine_failure_keeps_its_root_cause():
    from nbl.serve.jobs import error_excerpt

    output = "INFO starting\n" * 500 + "Traceback (most recent call last):\n  ValueError: the root cause\n"
    output += "worker noise\n" * 2000 + "RuntimeError: Engine core initialization failed. See root cause above.\n"
    kept = error_excerpt(output)
    assert "ValueError: the root cause" in kept and kept.rstrip().endswith("See root cause above.")
    assert len(kept) < 8200
