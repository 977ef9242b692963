"""Peak host memory of saving and loading an NBL checkpoint, each in a fresh process (Linux: VmHWM after a reset).

A random-weight Llama of the given shape (bf16 by default; every tensor filled with a value of its own, so the load
can be checked), a quarter of its attention layers replaced by linear maps and one MLP dropped, is written in
shards of --shard-mb and read back with nbl.load_linearized; then read with its decoder layers offloaded to disk and
written again. Printed per phase: what the process held before (the
libraries), the model's bytes, the largest shard, and the peak above the starting point (for the load: once the
load returns, and once every loaded tensor has been read and checked; transformers maps the shards, so a weight
becomes resident when it is first read).

    python scripts/checkpoint_memory.py                       # ~1.0 B parameters (2 GB in bf16), 256 MB shards
    python scripts/checkpoint_memory.py --hidden 64 --layers 4 --shard-mb 1   # tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import nbl
from nbl.measure.speed import current_rss_bytes, peak_rss_bytes


def reset_peak() -> None:
    """Start VmHWM again from the current resident size (Linux: /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def config(hidden: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 256, 1), vocab_size=32000,
        tie_word_embeddings=False,
    )  # fmt: skip


def fill_value(name: str) -> float:
    return (sum(map(ord, name)) % 97 + 1) / 1000


def build(hidden: int, layers: int, dtype: torch.dtype):
    """The model, without random initialisation (minutes at this size): every tensor a constant of its own."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from nbl.core.surgery import apply_replacements

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config(hidden, layers), dtype=dtype)
    apply_replacements(model, {i: "linear" for i in range(0, layers, 4)})
    apply_replacements(model, {layers - 1: "drop"}, part="mlp")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(fill_value(name))
    return model


def save_phase(folder: Path, hidden: int, layers: int, shard_mb: int, dtype: torch.dtype) -> dict:
    model = build(hidden, layers, dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    start = current_rss_bytes()
    reset_peak()
    nbl.save_linearized(model, folder, max_shard_size=shard_mb * 2**20)
    return {"phase": "save", "start": start, "peak_above_start": peak_rss_bytes() - start, "model_bytes": model_bytes,
            "largest_shard": max(f.stat().st_size for f in folder.glob("*.safetensors"))}  # fmt: skip


def load_phase(folder: Path, dtype: torch.dtype) -> dict:
    from nbl.core.causal_lm import register_auto_classes

    register_auto_classes()  # the libraries and model classes a load imports, before the baseline
    start = current_rss_bytes()
    reset_peak()
    model = nbl.load_linearized(folder, dtype=dtype)
    loaded = peak_rss_bytes() - start
    wrong = [n for n, p in model.named_parameters() if not bool((p == fill_value(n)).all())]  # every byte read
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"phase": "load", "start": start, "peak_above_start": peak_rss_bytes() - start, "after_load": loaded,
            "model_bytes": model_bytes, "wrong_tensors": wrong,
            "largest_shard": max(f.stat().st_size for f in folder.glob("*.safetensors"))}  # fmt: skip


def offloaded_save_phase(folder: Path, shard_mb: int, dtype: torch.dtype) -> dict:
    """The checkpoint loaded with its decoder layers offloaded to disk (accelerate), then saved again: the save reads
    each shard's weights from the offload store, and holds one shard at a time."""
    from nbl.core.causal_lm import register_auto_classes

    register_auto_classes()
    layers = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "cpu",
              "lm_head": "cpu"}  # fmt: skip
    model = nbl.load_linearized(folder, dtype=dtype, device_map=layers, offload_folder=folder.parent / "offload")
    assert model.model.layers[1].mlp.gate_proj.weight.device.type == "meta"  # really offloaded
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    start = current_rss_bytes()
    reset_peak()
    nbl.save_linearized(model, folder.parent / "resaved", max_shard_size=shard_mb * 2**20)
    resaved = sorted((folder.parent / "resaved").glob("*.safetensors"))
    return {"phase": "offloaded save", "start": start, "peak_above_start": peak_rss_bytes() - start,
            "resident_bytes": resident,
            "model_bytes": sum(f.stat().st_size for f in resaved), "largest_shard": max(f.stat().st_size for f in resaved)}  # fmt: skip


def run(hidden: int, layers: int, shard_mb: int, dtype: str, folder: Path) -> list[dict]:
    """Both phases, each in a fresh process."""
    common = ["--hidden", str(hidden), "--layers", str(layers), "--shard-mb", str(shard_mb), "--dtype", dtype,
              "--folder", str(folder)]  # fmt: skip
    results = []
    for phase in ("save", "load", "offloaded"):
        out = subprocess.run([sys.executable, __file__, "--phase", phase, *common], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{phase} phase failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--phase", choices=["save", "load", "offloaded"])
    parser.add_argument("--json", action="store_true", help="print the phases' measurements as one JSON list")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.phase == "save":
        print(json.dumps(save_phase(args.folder, args.hidden, args.layers, args.shard_mb, dtype)))
        return
    if args.phase == "load":
        print(json.dumps(load_phase(args.folder, dtype)))
        return
    if args.phase == "offloaded":
        print(json.dumps(offloaded_save_phase(args.folder, args.shard_mb, dtype)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "ckpt"
        results = run(args.hidden, args.layers, args.shard_mb, args.dtype, folder)
        if args.json:
            print(json.dumps(results))
            return
        for r in results:
            mb = {k: round(v / 2**20) for k, v in r.items() if isinstance(v, int)}
            after = f" ({mb['after_load']} MB when the load returned)" if "after_load" in mb else ""
            after += f" ({mb['resident_bytes']} MB of weights not offloaded)" if "resident_bytes" in mb else ""
            print(f"{r['phase']}: model {mb['model_bytes']} MB, largest shard {mb['largest_shard']} MB, "
                  f"peak above start {mb['peak_above_start']} MB{after}; the process held {mb['start']} MB before"
                  + (f"; WRONG tensors: {r['wrong_tensors']}" if r.get("wrong_tensors") else ""))  # fmt: skip


if __name__ == "__main__":
    main()
