"""Does the CCA bound predict how well the linear map works? Per layer of the embedded SmolLM2:
the bound from calibration text against the relative error of the fitted map on held-out text.

    python scripts/bound_vs_reality.py [--calib 32] [--heldout 16] [--seq-len 512] [--out docs/bound_vs_reality]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nbl
from nbl.data import lambada_passages, token_sequences, wikipedia_passages
from nbl.measure.diagnostics import heldout_errors, spearman
from nbl.models import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=32, help="calibration sequences (LAMBADA passages)")
    parser.add_argument("--heldout", type=int, default=16, help="held-out sequences (Wikipedia passages)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ridge", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=Path("docs/bound_vs_reality"))
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    calib = token_sequences(tokenizer, lambada_passages(), args.calib, args.seq_len, seed=0)
    held = token_sequences(tokenizer, wikipedia_passages(), args.heldout, args.seq_len, seed=1)
    fit_stats = nbl.calibrate(model, list(calib.split(4)))
    held_stats = nbl.calibrate(model, list(held.split(4)))

    rows = []
    for i in fit_stats:
        w, b = nbl.fit_lmmse(fit_stats[i], ridge=args.ridge)
        errors = heldout_errors(held_stats[i], w, b)
        rows.append(
            {
                "layer": i,
                "cca_bound": nbl.cca_bound(fit_stats[i], "residual"),
                "cca_bound_attention": nbl.cca_bound(fit_stats[i], "attention"),
                "cosine": fit_stats.mean_cosine(i),
                "heldout_relative_error": errors["relative"],
                "heldout_drop_relative_error": errors["drop_relative"],
            }
        )
    err = [r["heldout_relative_error"] for r in rows]
    summary = {
        "calibration_tokens": fit_stats.num_tokens,
        "heldout_tokens": held_stats.num_tokens,
        "spearman_bound_vs_error": spearman([r["cca_bound"] for r in rows], err),
        "spearman_bound_attention_vs_error": spearman([r["cca_bound_attention"] for r in rows], err),
        "spearman_neg_cosine_vs_error": spearman([-r["cosine"] for r in rows], err),
        "layers": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bound_vs_reality.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "| layer | CCA bound (x, x+a) | CCA bound (x, a) | mean cos(x, x+a) | held-out rel. error, linear | same, drop |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['cca_bound']:.1f} | {r['cca_bound_attention']:.1f} | {r['cosine']:.4f} | "
            f"{r['heldout_relative_error']:.3f} | {r['heldout_drop_relative_error']:.3f} |"
        )
    (args.out / "bound_vs_reality.md").write_text("\n".join(lines) + "\n")
    _plot(rows, summary, args.out / "bound_vs_reality.png")
    print("\n".join(lines))
    print({k: v for k, v in summary.items() if k != "layers"})


def _plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = [r["cca_bound"] for r in rows]
    y = [r["heldout_relative_error"] for r in rows]
    ax.scatter(x, y)
    for r in rows:
        ax.annotate(str(r["layer"]), (r["cca_bound"], r["heldout_relative_error"]), fontsize=7)
    ax.set_xlabel("CCA bound on calibration text (lower = more linear)")
    ax.set_ylabel("held-out relative error of the linear map")
    ax.set_title(f"SmolLM2-135M, Spearman {summary['spearman_bound_vs_error']:.2f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
