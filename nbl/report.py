"""Human-readable summaries of results.json files."""

from __future__ import annotations

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
