"""Scale benchmark: what scoring, fitting and the statistics cache cost at d = 4096, and what layer-by-layer
calibration costs against the one-pass hooks on the real SmolLM2. Ratios from one process, interleaved, medians.

    python scripts/bench_scale.py [--d 4096] [--layers 2] [--out docs/results/scale]

Part 1 builds the five sums of a jointly Gaussian (x, a) per layer directly (x ~ N(m, C), a = W x + noise, the
covariances of a real residual stream are replaced by a random well-conditioned one), saves them in the cache
format, and times: loading (eager and lazy), the CCA bound of each target, the LMMSE fit. It extrapolates the
per-layer numbers to 32 and 80 layers (Llama-3.1-8B: d = 4096; Llama-3.1-70B: d = 8192, where dense d^3 linear
algebra costs 8x and the files 4x per layer).

Part 2 times, on the same calibration tokens: a plain no-grad forward, the hooks pass, the layer-by-layer pass,
and the layer-by-layer pass with float32 Gram products.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import nbl
from nbl.calib.layerwise import calibrate_layerwise
from nbl.calib.result import CalibrationResult
from nbl.data import lambada_passages, token_sequences
from nbl.measure.speed import interleaved, timed
from nbl.models import load_smollm2


def synthetic_accumulator(d: int, tokens: int, seed: int) -> nbl.CovarianceAccumulator:
    """Sums of `tokens` draws of x ~ N(m, C), a = W x + e, written directly from the moments (exact in expectation)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(d, d + 64, generator=g) / (d + 64) ** 0.5
    scale = torch.ones(d)
    scale[:4] = 30.0  # a few high-variance "massive" channels, as in real residual streams
    c_xx = ((z * scale[:, None]) @ (z * scale[:, None]).T).double()
    w = (torch.randn(d, d, generator=g) / d**0.5).double()
    m_x = torch.randn(d, generator=g).double()
    c_ax = w @ c_xx
    c_aa = w @ c_xx @ w.T + 0.5 * torch.eye(d, dtype=torch.float64)
    m_a = w @ m_x
    acc = nbl.CovarianceAccumulator(d, d)
    acc.count = tokens
    acc.sum_x, acc.sum_a = tokens * m_x, tokens * m_a
    acc.sum_xx = tokens * (c_xx + torch.outer(m_x, m_x))
    acc.sum_ax = tokens * (c_ax + torch.outer(m_a, m_x))
    acc.sum_aa = tokens * (c_aa + torch.outer(m_a, m_a))
    return acc


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def statistics_part(d: int, n_layers: int, tokens: int) -> dict:
    stats = CalibrationResult(
        {i: synthetic_accumulator(d, tokens, i) for i in range(n_layers)}, dict.fromkeys(range(n_layers), 0.0)
    )
    out: dict = {"d": d, "layers": n_layers, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stats.safetensors"
        out["save_s"] = _seconds(lambda: stats.save(path))
        out["file_bytes"] = path.stat().st_size
        out["file_bytes_per_layer"] = out["file_bytes"] / n_layers
        out["load_eager_s"] = _seconds(lambda: CalibrationResult.load(path))
        lazy = CalibrationResult.load(path, lazy=True)
        per_layer = {"read_s": [], "cca_residual_s": [], "cca_attention_s": [], "fit_s": []}
        for i in lazy:
            start = time.perf_counter()
            acc = lazy[i]
            per_layer["read_s"].append(time.perf_counter() - start)
            per_layer["cca_residual_s"].append(_seconds(lambda acc=acc: nbl.cca_bound(acc, "residual")))
            per_layer["cca_attention_s"].append(_seconds(lambda acc=acc: nbl.cca_bound(acc, "attention")))
            per_layer["fit_s"].append(_seconds(lambda acc=acc: nbl.fit_lmmse(acc)))
    out["per_layer_median_s"] = {k: statistics.median(v) for k, v in per_layer.items()}
    med = out["per_layer_median_s"]
    job = med["read_s"] + med["cca_residual_s"]  # a cache hit of the paper's rule: read, score every layer
    out["extrapolated"] = {
        "llama3.1-8b (32 layers, d=4096)": {
            "file_gb": 32 * (3 * 4096**2 + 2 * 4096 + 2) * 8 / 1e9,
            "score_every_layer_s": 32 * job * (4096 / d) ** 3,
            "fit_12_layers_s": 12 * med["fit_s"] * (4096 / d) ** 3,
        },
        "llama3.1-70b (80 layers, d=8192)": {
            "file_gb": 80 * (3 * 8192**2 + 2 * 8192 + 2) * 8 / 1e9,
            "score_every_layer_s": 80 * job * (8192 / d) ** 3,
            "fit_12_layers_s": 12 * med["fit_s"] * (8192 / d) ** 3,
        },
        "arithmetic": "per-layer CPU seconds x layers x (d_target / d)^3 (dense factorizations); file = L (3 d^2 + 2 d + 2) x 8 B",
    }
    return out


def calibration_part(tokens: int, seq_len: int, repeats: int) -> dict:
    model, tokenizer = load_smollm2()
    ids = token_sequences(tokenizer, lambada_passages(), tokens // seq_len, seq_len, seed=0)
    batches = list(ids.split(1))

    @torch.no_grad()
    def forward() -> None:
        for b in batches:
            model(b, use_cache=False)

    phases = {
        "forward": forward,
        "hooks": lambda: nbl.calibrate(model, batches, progress=False),
        "layerwise": lambda: calibrate_layerwise(model, batches, progress=False),
        "layerwise_fp32_gram": lambda: calibrate_layerwise(model, batches, progress=False, gram_dtype="float32"),
    }
    t = interleaved({name: timed(fn) for name, fn in phases.items()}, repeats=repeats, warmup=1)
    base = t["forward"].median_s
    return {
        "model": "SmolLM2-135M-Instruct fp32",
        "tokens": len(batches) * seq_len,
        "median_s": {name: timing.median_s for name, timing in t.items()},
        "over_forward": {name: timing.median_s / base for name, timing in t.items() if name != "forward"},
    }


def markdown(results: dict) -> str:
    s = results["statistics"]
    med = s["per_layer_median_s"]
    lines = [
        f"# Scale benchmark (CPU, {s['threads']} threads)",
        "",
        f"## Statistics at d = {s['d']} ({s['layers']} synthetic layers)",
        "",
        "| per layer | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in med.items()],
        "",
        f"File: {s['file_bytes_per_layer'] / 1e6:.0f} MB per layer; save {s['save_s']:.1f} s, eager load "
        f"{s['load_eager_s']:.1f} s for {s['layers']} layers.",
        "",
        "| model | statistics file | score every layer (read + CCA residual) | fit 12 maps |",
        "|---|---|---|---|",
    ]
    for name, e in s["extrapolated"].items():
        if isinstance(e, dict):
            lines.append(
                f"| {name} | {e['file_gb']:.1f} GB | {e['score_every_layer_s']:.0f} s | {e['fit_12_layers_s']:.0f} s |"
            )
    lines += ["", f"Extrapolation: {s['extrapolated']['arithmetic']}.", ""]
    if "calibration" in results:
        c = results["calibration"]
        lines += [
            f"## Calibration on {c['model']}, {c['tokens']} tokens",
            "",
            "| pass | seconds (median) | / plain forward |",
            "|---|---|---|",
            f"| plain forward | {c['median_s']['forward']:.2f} | 1.00 |",
            *[f"| {k} | {c['median_s'][k]:.2f} | {v:.2f} |" for k, v in c["over_forward"].items()],
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--stat-tokens", type=int, default=256 * 2048)
    parser.add_argument("--tokens", type=int, default=4096, help="SmolLM2 calibration tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_scale"))
    args = parser.parse_args()
    results = {"statistics": statistics_part(args.d, args.layers, args.stat_tokens)}
    if not args.skip_calibration:
        results["calibration"] = calibration_part(args.tokens, args.seq_len, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "bench_scale.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
