"""The literal names of every kind of cache entry, pinned: a refactor must not orphan users' cache entries.

The code's identity (its hash and the library versions) is part of every key by design, so it is fixed here;
everything else that goes into a key comes from the key builders as the app calls them.
"""

import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import nbl.provenance
from nbl.__main__ import CONF_DIR
from nbl.cache import atomic_write_text
from nbl.recipe.run import run_experiment
from nbl.recipe.state import RunContext

pytestmark = pytest.mark.slow

PPL = ["eval=quick", "eval.tasks=[]", "eval.perplexity.num_sequences=2", "eval.perplexity.seq_len=64"]
RUNS = {
    "cca_with_base_eval": PPL,
    "lmmse_joint_quantized": [
        "selection=lmmse",
        "replacement.ridge=auto",
        "replacement.granularity=joint",
        "num_layers=3",
        "calibration.extra_parts=[block]",
        "quantize=int8_weight",
        *PPL,
    ],
    "validated_kl_mixed": ["selection=validated", "selection.measure=kl", "selection.heldout_source=mixed"],
    "greedy": ["selection=greedy"],
    "plan": ["selection=plan", "selection.target_value=1.2"],
    "sequential": ["calibration.mode=sequential"],
    "local_text": ["calibration=local"],
}
STATS = "stats/b61e04e4f9c6122da7a37ea5.safetensors"  # the attention statistics of experiment=smoke
PINNED: dict[str, list[str]] = {
    "cca_with_base_eval": ["base_eval/7d6975d05161a81a554bc328.json", STATS],
    "lmmse_joint_quantized": [
        "base_eval/9f5f575f009175af7c075bef.json",  # of the quantized base model
        "stats/811326cd47883326de6d6bc9.safetensors",
        STATS,
        "stats/c977c256d60d1ad1bddbfb63.safetensors",
        "stats/db4223c417ab0cea7194fa33.safetensors",
        "stats/e48a594f7fe3f82cca9f2d8c.safetensors",
    ],  # mlp and block (extra) statistics, held-out attention and mlp statistics
    "validated_kl_mixed": ["damage/32e3dcfddd9d31cd1c77cb21.json", STATS],
    "greedy": ["greedy/e6b2858aaccf288922863944.json", STATS],
    "plan": ["plan/f70de8eb39107cc21fcb63ea.json", STATS],
    "sequential": [
        "sequential/00c108876e3c60313a6a9834.safetensors",
        "sequential/51b5005ded583e019c5df41c.json",
        "sequential/8e3c0dc398cfc3d0e4f28797.json",
        "sequential/e229899d5e9c0dbeb3610f48.safetensors",
        STATS,
    ],  # per step: the choice and the chosen layer's statistics
    "local_text": ["stats/1d7c5a7e4485dc37c9fb1455.safetensors"],
}


def _entries(cache: Path) -> list[str]:
    """Every cache entry below ``cache``: not locks, key listings, the converted model, lm-eval's task files or the
    memo of local files' digests."""
    found = [p.relative_to(cache) for p in cache.rglob("*") if p.suffix in (".json", ".safetensors")]
    found = [p for p in found if p.as_posix() != "digests.json"]
    kept = [p for p in found if p.parts[0] not in ("models", "lm_eval_tasks") and not p.name.endswith(".fields.json")]
    return sorted(p.as_posix() for p in kept)


@pytest.mark.parametrize("name", list(RUNS))
def test_every_cache_entry_keeps_its_key(name, tmp_path, monkeypatch, nbl_cache):
    monkeypatch.setattr(nbl.provenance, "code_hash", lambda: "0123456789abcdef")
    monkeypatch.setattr(nbl.provenance, "library_versions", lambda: {"torch": "x", "transformers": "y"})
    overrides = list(RUNS[name])
    if name == "local_text":
        text = Path(tempfile.gettempdir()) / "nbl-key-pin" / "text.txt"  # the path is part of the key
        text.parent.mkdir(exist_ok=True)
        atomic_write_text(text, "A fixed text for the key of a local calibration file. " * 400)
        overrides.append(f"calibration.path={text}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "speed=none", *overrides])
    run_experiment(cfg, RunContext(tmp_path / "run"))
    assert _entries(nbl_cache) == PINNED[name]
