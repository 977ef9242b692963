"""What a set of runs computes, with timings and provenance left out: to prove a refactor changed no result.

    python scripts/behaviour_snapshot.py --out /tmp/after                      # this checkout
    python scripts/behaviour_snapshot.py --repo /tmp/old --out /tmp/before     # another checkout (a git worktree)
    python scripts/behaviour_snapshot.py --compare /tmp/before /tmp/after      # every difference, or none

Each run goes through the command line (`python -m nbl`, the interface both checkouts share) on the tiny random
model with a fresh cache, so the first run of each kind computes everything. A run's results.json is kept
without what differs between two executions of the same computation: wall-clock seconds, measured speeds,
provenance, paths into the run folder and the cache (the code hash names every cache file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PPL = ["eval=quick", "eval.tasks=[]", "eval.perplexity.num_sequences=2", "eval.perplexity.seq_len=64"]
RUNS: dict[str, list[str]] = {
    "cca": [*PPL],
    "cca_attention_target": ["selection.cca_target=attention", *PPL],
    "cosine_drop": ["selection=cosine", "replacement=drop", *PPL],
    "random": ["selection=random", "selection.seed=3", *PPL],
    "lmmse_auto_ridge": ["selection=lmmse", "replacement.ridge=auto", *PPL],
    "loss": ["selection=loss", *PPL],
    "loss_kl": ["selection=loss", "selection.measure=kl"],
    "greedy": ["selection=greedy", *PPL],
    "plan": ["selection=plan", "selection.target_value=1.2", *PPL],
    "validated": ["selection=validated", *PPL],
    "recommended": ["selection=recommended", *PPL],
    "mlp": ["replacement.granularity=mlp", *PPL],
    "block_drop": ["selection=cosine", "replacement=drop", "replacement.granularity=block", *PPL],
    "joint": ["replacement.granularity=joint", "num_layers=3", "calibration.extra_parts=[block]", *PPL],
    "joint_lmmse": ["replacement.granularity=joint", "selection=lmmse", "num_layers=3"],
    "sequential": ["calibration.mode=sequential", *PPL],
    "propagated": ["calibration.mode=propagated", *PPL],
    "explicit_sequential": ["layers=[2,0]", "calibration.mode=sequential"],
    "layerwise_offload": ["calibration.method=layerwise", "calibration.offload=true", *PPL],
    "lora": ["finetune=lora", "finetune.steps=3", *PPL],
    "lora_maps": ["finetune=lora", "finetune.steps=2", "finetune.train_maps=true"],
    "int8_weight": ["quantize=int8_weight", *PPL],
    "piqa_checkpoint": [
        "eval=quick",
        "eval.tasks=[piqa]",
        "eval.limit=4",
        "eval.perplexity.num_sequences=2",
        "eval.perplexity.seq_len=64",
        "save_checkpoint=true",
    ],
    "speed": ["speed=cpu", "speed.prompt_len=16", "speed.new_tokens=2", "speed.repeats=1", "speed.warmup=0"],
}
COMMON = ["experiment=smoke", "speed=none", "logger=disabled"]

# what differs between two executions of the same computation
DROP_TOP = ("provenance", "selection_seconds", "wandb_run_folder", "checkpoint")
DROP_CALIBRATION = ("seconds", "replace_seconds", "cache_file")
KEEP_SPEED = ("device", "repeats", "settings", "prefill_speedup_predicted", "decode_speedup_predicted")


def normalised(results: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in results.items() if k not in DROP_TOP}
    out["calibration"] = {k: v for k, v in out["calibration"].items() if k not in DROP_CALIBRATION}
    if out.get("finetune"):
        out["finetune"] = {k: v for k, v in out["finetune"].items() if k not in ("seconds", "plot")}
    if out.get("speed"):
        out["speed"] = {k: v for k, v in out["speed"].items() if k in KEEP_SPEED or k.startswith("kv_cache_bytes")}
    out["summary_row"] = {k: v for k, v in out["summary_row"].items() if k not in ("prefill_x", "decode_x")}
    out["config"] = {k: v for k, v in out["config"].items() if k != "cache_dir"}
    return out


def snapshot(repo: Path, out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nbl-snapshot-"))
    shared_models = Path(os.environ.get("NBL_CACHE", Path.home() / ".cache" / "nbl")) / "models"
    for name in names:
        cache = work / name / "cache"
        cache.mkdir(parents=True)
        if shared_models.is_dir():  # the converted embedded model (tokenizer of the tiny model): convert once
            (cache / "models").symlink_to(shared_models)
        env = {**os.environ, "NBL_CACHE": str(cache), "PYTHONPATH": str(repo), "WANDB_MODE": "disabled"}
        run_dir = work / name / "run"
        cmd = [sys.executable, "-m", "nbl", *COMMON, *RUNS[name], f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results = json.loads((run_dir / "results.json").read_text())
        (out / f"{name}.json").write_text(json.dumps(normalised(results), indent=2, sort_keys=True) + "\n")
        print(f"{name}: ok", flush=True)


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in {'first' if k in a else 'second'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += _differences(a[k], b[k], f"{where}/{k}")
        return out
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(first: Path, second: Path) -> int:
    names = sorted({p.stem for p in first.glob("*.json")} | {p.stem for p in second.glob("*.json")})
    failed = 0
    for name in names:
        a, b = first / f"{name}.json", second / f"{name}.json"
        if not (a.is_file() and b.is_file()):
            print(f"{name}: only in {first if a.is_file() else second}")
            failed += 1
            continue
        diffs = _differences(json.loads(a.read_text()), json.loads(b.read_text()))
        print(f"{name}: {'identical' if not diffs else f'{len(diffs)} differences'}")
        for line in diffs[:20]:
            print(f"    {line}")
        failed += bool(diffs)
    print(f"{len(names) - failed} of {len(names)} runs identical")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*", default=None, help=f"a subset of {', '.join(RUNS)}")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("FIRST", "SECOND"))
    args = parser.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.compare))
    if args.out is None:
        parser.error("--out is required unless --compare is given")
    snapshot(args.repo.resolve(), args.out, args.only or list(RUNS))


if __name__ == "__main__":
    main()
