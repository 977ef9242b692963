"""Human-readable summaries of results.json files."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from nbl.evaluation import headline


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_markdown(results: dict[str, Any]) -> str:
    """Base vs replaced model of one run: per-task headline accuracy, average, perplexity, speed."""
    method = results["summary_row"]["method"]
    tasks = sorted(set(results["eval"]) | set(results["eval_base"]))
    speed = results.get("speed") or {}
    head = ["model", *tasks, "avg acc", "perplexity", "prefill tok/s", "decode tok/s", "prefill x", "decode x"]
    rows = []
    for label, ev, ppl, suffix in (
        ("base", results["eval_base"], results["perplexity"]["base"], "base"),
        (f"{method} k={results['num_layers']}", results["eval"], results["perplexity"]["nbl"], "nbl"),
    ):
        accs = [_fmt(headline(t, ev[t])) if t in ev else "-" for t in tasks]
        avg = results["average_base"] if suffix == "base" else results["average"]
        x = (1.0, 1.0) if suffix == "base" else (speed.get("prefill_speedup"), speed.get("decode_speedup"))
        rows.append(
            [
                label,
                *accs,
                _fmt(avg),
                _fmt(ppl, 2),
                _fmt(speed.get(f"prefill_tok_s_{suffix}"), 1),
                _fmt(speed.get(f"decode_tok_s_{suffix}"), 1),
                _fmt(x[0], 2) if speed else "-",
                _fmt(x[1], 2) if speed else "-",
            ]
        )
    lines = [
        f"# {results['model']}: {method}, {results['num_layers']} layers replaced",
        "",
        f"Replaced layers: {results['replaced_layers']}  ",
        f"Sparsity (removed / non-embedding params): {results['params']['sparsity']:.2%}  ",
        f"KV cache per token: {results['params']['kv_bytes_per_token_base']} -> {results['params']['kv_bytes_per_token']} bytes  ",
    ]
    if speed:
        lines.append(
            f"FLOP-model prediction: prefill x{speed['prefill_speedup_predicted']:.2f}, "
            f"decode x{speed['decode_speedup_predicted']:.2f}  "
        )
    if results["perplexity"]["text"]:
        lines.append(f"Perplexity text: {results['perplexity']['text']}  ")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# -- sweep reports -------------------------------------------------------------------------------------
PAPER_NAMES = {("cca", "linear"): "Attn NBL", ("cosine", "drop"): "Attn DROP"}


def method_name(results: dict[str, Any]) -> str:
    key = (results["selection"]["strategy"], results["replacement"]["mode"])
    name = PAPER_NAMES.get(key, f"{key[0]}+{key[1]}")
    if results.get("calibration", {}).get("mode") == "sequential":
        name += " seq"
    return name


def collect(paths: list[Path]) -> list[dict[str, Any]]:
    """Every results.json below the given files or folders."""
    found: list[Path] = []
    for p in paths:
        found += [p] if p.is_file() else sorted(p.rglob("results.json"))
    if not found:
        raise FileNotFoundError(f"no results.json under {[str(p) for p in paths]}")
    return [json.loads(f.read_text()) for f in found]


def table_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, k), seeds averaged (spread kept), plus the base model's row."""
    tasks = sorted({t for r in runs for t in r["eval"]})
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((method_name(r), r["num_layers"]), []).append(r)
    rows = []
    base = next((r for r in runs if r.get("eval_base")), None)
    if base is not None:
        rows.append(
            {
                "method": "baseline",
                "k": 0,
                "n": 1,
                "sparsity": 0.0,
                **{t: headline(t, base["eval_base"][t]) for t in tasks if t in base["eval_base"]},
                "avg": base["average_base"],
                "avg_std": None,
                "perplexity": base["perplexity"]["base"],
                "prefill_x": 1.0,
                "decode_x": 1.0,
            }
        )
    for (method, k), members in sorted(groups.items()):
        avgs = [m["average"] for m in members if m.get("average") is not None]
        speed = [m["speed"] for m in members if m.get("speed")]
        row = {
            "method": f"{method}-{k}" if method.startswith("Attn") else method,
            "k": k,
            "n": len(members),
            "sparsity": _mean([m["params"]["sparsity"] for m in members]),
            **{t: _mean([headline(t, m["eval"][t]) for m in members if t in m["eval"]]) for t in tasks},
            "avg": _mean(avgs),
            "avg_std": statistics.stdev(avgs) if len(avgs) > 1 else None,
            "perplexity": _mean([m["perplexity"]["nbl"] for m in members if m["perplexity"]["nbl"] is not None]),
            "prefill_x": _mean([s["prefill_speedup"] for s in speed]),
            "decode_x": _mean([s["decode_speedup"] for s in speed]),
        }
        rows.append(row)
    return rows


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def rows_markdown(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            if c == "sparsity" and v is not None:
                cells.append(f"{v:.1%}")
            elif c in ("prefill_x", "decode_x") and v is not None:
                cells.append(f"{v:.2f}")
            elif c == "perplexity" and v is not None:
                cells.append(f"{v:.2f}")
            else:
                cells.append(_fmt(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_report(runs: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """report.md, report.csv and two plots (accuracy vs k, accuracy vs prefill speed-up) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv"}
    sections, all_rows = [], []
    for model in sorted({r["model"] for r in runs}):
        rows = table_rows([r for r in runs if r["model"] == model])
        sections.append(f"## {model}\n\n" + rows_markdown(rows))
        all_rows += [{"model": model, **row} for row in rows]
        files.update(_plots(rows, out, prefix=f"{model}_"))
    files["markdown"].write_text("\n".join(sections))
    with files["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in all_rows for k in row)))
        writer.writeheader()
        writer.writerows(all_rows)
    return files


def _plots(rows: list[dict[str, Any]], out: Path, prefix: str = "") -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods: dict[str, list[dict[str, Any]]] = {}
    base = next((r for r in rows if r["method"] == "baseline"), None)
    for r in rows:
        if r["method"] != "baseline":
            methods.setdefault(
                r["method"].rsplit("-", 1)[0] if r["method"].startswith("Attn") else r["method"], []
            ).append(r)
    files = {}
    panels = (
        ("acc_vs_k", "k", "replaced attention layers k", "avg", "average accuracy"),
        ("acc_vs_speedup", "prefill_x", "prefill speed-up", "avg", "average accuracy"),
        ("ppl_vs_k", "k", "replaced attention layers k", "perplexity", "perplexity (log scale)"),
    )
    for name, x_key, xlabel, y_key, ylabel in panels:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method, members in sorted(methods.items()):
            pts = sorted((m[x_key], m[y_key]) for m in members if m[x_key] is not None and m[y_key] is not None)
            if base is not None and base[y_key] is not None:
                pts = [(base[x_key], base[y_key]), *pts]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        if y_key == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(prefix.rstrip("_"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files[prefix + name] = out / f"{prefix}{name}.png"
        fig.savefig(files[prefix + name], dpi=120)
        plt.close(fig)
    return files
