"""Human-readable summaries of results.json files."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbl.measure.evaluation import headline


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
        ("base" + quant_suffix(results), results["eval_base"], results["perplexity"]["base"], "base"),
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
    if speed.get("engine") == "vllm":
        lines.append(
            f"Served by vLLM: KV capacity x{speed['kv_capacity_ratio']:.2f} for the same budget, saturating-batch "
            f"throughput x{_fmt(speed['throughput_speedup'], 2)}, long-context decode "
            f"x{_fmt(speed['long_decode_speedup'], 2)}  "
        )
    if results.get("speed_error"):
        lines.append(f"Speed test failed ({results['speed_error']['engine']}): see speed_error in results.json  ")
    if results["perplexity"]["text"]:
        lines.append(f"Perplexity text: {results['perplexity']['text']}  ")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# -- sweep reports -------------------------------------------------------------------------------------
# (strategy, mode, granularity) -> the name the paper (NBL; LLM-Drop for the drops) gives that method
PAPER_NAMES = {
    ("cca", "linear", "attention"): "Attn NBL",
    ("cca", "linear", "block"): "Block NBL",
    ("cca", "linear", "mlp"): "MLP NBL",
    ("cca", "linear", "joint"): "Joint NBL",
    ("cosine", "drop", "attention"): "Attn DROP",
    ("cosine", "drop", "mlp"): "MLP DROP",
    ("cosine", "drop", "block"): "Block DROP",
    ("cosine", "drop", "joint"): "Joint DROP",
    # the field's training-free methods, as published (conf/method)
    ("shortgpt", "drop", "block"): "ShortGPT",
    ("sleb", "drop", "block"): "SLEB",
    ("replaceme", "replaceme", "block"): "ReplaceMe",
    ("replaceme", "linearpatch", "block"): "LinearPatch",
    ("shortgpt", "linearpatch", "block"): "ShortGPT + LinearPatch",
    ("sleb", "linearpatch", "block"): "SLEB + LinearPatch",
    ("finercut", "drop", "joint"): "FinerCut",
}
# config keys that vary a random draw: runs differing only in these are seeds of one row
SEED_KEYS = ("seed", "selection.seed", "calibration.seed")
# config sections that change no reported number
NEUTRAL_SECTIONS = ("logger", "cache_dir", "save_checkpoint", "checkpoint_shard_size")
# what the baseline row depends on (it is the same unmodified model whatever is selected or replaced)
BASELINE_SECTIONS = ("model", "eval", "speed", "device", "seed", "quantize")


def method_name(results: dict[str, Any]) -> str:
    """How the layers were chosen and replaced: the paper's name where there is one."""
    sel = results["selection"]
    if sel.get("layers_from") != "explicit" and sel["strategy"] == "plan":  # modes chosen per layer
        return f"plan {sel.get('target')}>={sel.get('target_value')}"
    chosen_by = "explicit" if sel.get("layers_from") == "explicit" else sel["strategy"]
    if chosen_by != "explicit" and sel.get("damage") == "estimated":  # the damages estimated, not measured
        chosen_by += " (estimated)"
    granularity = results["replacement"].get("granularity", "attention")
    replacement = results["replacement"]
    key = (chosen_by, replacement["mode"], granularity)
    shown = key[1]
    if key[1] == "conv":  # a conv map's width is its kind; validated conv maps may have lost to the one-token maps
        kept = results.get("calibration", {}).get("conv_pass", {}).get("kept", "conv")
        rank = "" if replacement.get("rank") is None else f" rank {replacement['rank']}"
        shown = f"conv{replacement.get('width', 2)}{rank}" if kept == "conv" else "linear (conv lost on held-out)"
    name = PAPER_NAMES.get(key, f"{key[0]}+{shown}" + ("" if granularity == "attention" else f" ({granularity})"))
    mode = results.get("calibration", {}).get("mode")
    finetune = results.get("config", {}).get("finetune", {})
    healed = ""
    if finetune.get("method", "none") != "none":
        healed = " + LoRA" + (" (maps trained)" if finetune.get("train_maps") else "")
    return name + {"sequential": " seq", "propagated": " prop"}.get(mode, "") + healed + quant_suffix(results)


def quant_suffix(results: dict[str, Any]) -> str:
    """The suffix " + <scheme>" for a run whose models were quantized (base and replaced alike), else ""."""
    scheme = results.get("config", {}).get("quantize", {}).get("scheme", "none")
    return "" if scheme == "none" else f" + {scheme}"


PAPER_FAMILIES = ("Attn", "MLP", "Block", "Joint")  # rows of these methods are named "<method>-<k>" as in the paper


def collect(paths: list[Path]) -> list[dict[str, Any]]:
    """Every results.json below the given files or folders (each run remembers its file as ``_path``)."""
    found: list[Path] = []
    for p in paths:
        found += [p] if p.is_file() else sorted(p.rglob("results.json"))
    if not found:
        raise FileNotFoundError(f"no results.json under {[str(p) for p in paths]}")
    runs = []
    for f in found:
        try:
            run = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{f} is not valid JSON ({err.msg}): a run killed while writing it?") from None
        if "config" not in run or "provenance" not in run:
            raise ValueError(f"{f} records no config or provenance (written by an older nbl): rerun it")
        runs.append({**run, "_path": str(f)})
    return runs


def missing_jobs(paths: list[Path], runs: list[dict[str, Any]]) -> list[str]:
    """Jobs of the Hydra sweeps under ``paths`` (their multirun.yaml) that left no results.json."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    done = {tuple(sorted(r["overrides"])) for r in runs if r.get("overrides") is not None}
    missing = []
    for p in paths:
        for spec in sorted(p.rglob("multirun.yaml")) if p.is_dir() else []:
            hydra_cfg = OmegaConf.load(spec).hydra
            params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
            parsed = OverridesParser.create().parse_overrides([*params, *hydra_cfg.overrides.task])
            for batch in BasicSweeper.split_arguments(parsed, None):
                missing += [" ".join(job) for job in batch if tuple(sorted(job)) not in done]
    return missing


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
    return out


def _identity(run: dict[str, Any], sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """What a run computed, seeds left out: its resolved config, the code and library versions, the weights."""
    flat = {
        k: v
        for k, v in _flat(run["config"]).items()
        if k not in SEED_KEYS
        and k.split(".")[0] not in NEUTRAL_SECTIONS
        and (sections is None or k.split(".")[0] in sections)
    }
    prov = run["provenance"]
    flat["code_hash"] = prov.get("code_hash")
    flat["model_revision"] = prov.get("model_revision")
    flat.update({f"library.{k}": v for k, v in (prov.get("libraries") or {}).items()})
    return flat


@dataclass
class _Group:
    method: str
    k: int
    identity: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    disagree: list[str] = field(default_factory=list)  # identical computations whose results differ


def _outcome(run: dict[str, Any]) -> dict[str, Any]:
    """What two runs of one computation must agree on (measured speeds excepted: they vary by nature)."""
    return {
        "replaced_layers": run.get("replaced_layers"),
        "eval": run.get("eval"),
        "perplexity": run["perplexity"].get("nbl"),
        "domains": {d: v.get("nbl") for d, v in (run["perplexity"].get("domains") or {}).items()},
    }


def _groups(entries: list[tuple[str, int, dict[str, Any], dict[str, Any]]]) -> list[_Group]:
    """Group (method, k, identity, run) entries by all three; a rerun with the same seeds replaces the older one.

    Groups that share a method and k but differ elsewhere get the differing keys in their name.
    """
    groups: dict[str, _Group] = {}
    for method, k, identity, run in entries:
        key = json.dumps([method, k, identity], sort_keys=True, default=str)
        groups.setdefault(key, _Group(method, k, identity)).runs.append(run)
    for g in groups.values():
        newest: dict[str, dict[str, Any]] = {}
        for run in sorted(g.runs, key=lambda r: r["provenance"].get("finished") or ""):
            seeds = json.dumps([_flat(run["config"]).get(s) for s in SEED_KEYS])
            if seeds in newest:
                older = newest[seeds]
                g.superseded.append(older["_path"])
                if _outcome(older) != _outcome(run):
                    g.disagree.append(f"{older['_path']} {_outcome(older)} vs {run['_path']} {_outcome(run)}")
            newest[seeds] = run
        g.runs = list(newest.values())
    by_label: dict[tuple[str, int], list[_Group]] = {}
    for g in groups.values():
        by_label.setdefault((g.method, g.k), []).append(g)
    for same in by_label.values():
        if len(same) > 1:
            keys = sorted({k for g in same for k in g.identity})
            differ = [k for k in keys if len({json.dumps(g.identity.get(k), default=str) for g in same}) > 1]
            for g in same:
                g.method += " [" + ", ".join(f"{k}={g.identity.get(k)}" for k in differ) + "]"
    return list(groups.values())


def table_rows(runs: list[dict[str, Any]], notes: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per distinct computation (method, k, config, code), seeds averaged with their spread.

    ``notes`` collects what a reader must know: reruns that were superseded by a newer identical run.
    """
    tasks = sorted({t for r in runs for t in r["eval"]})
    domains = sorted({d for r in runs for d in r["perplexity"].get("domains", {})})
    base_entries = [
        ("baseline" + quant_suffix(r), 0, _identity(r, BASELINE_SECTIONS), r)
        for r in runs
        if r.get("eval_base") or r["perplexity"]["base"]
    ]
    rows = [_baseline_row(g, tasks, domains) for g in sorted(_groups(base_entries), key=lambda g: g.method)]
    entries = [(method_name(r), r["num_layers"], _identity(r), r) for r in runs]
    for g in sorted(_groups(entries), key=lambda g: (g.method, g.k)):
        if notes is not None and g.superseded:
            notes.append(f"{g.method} k={g.k}: superseded by a newer identical run: {', '.join(g.superseded)}")
        if notes is not None and g.disagree:
            notes += [f"{g.method} k={g.k}: IDENTICAL CONFIGS DISAGREE (same code, libraries, seeds): {d}" for d in g.disagree]
        rows.append(_method_row(g, tasks, domains))
    return rows


def _baseline_row(g: _Group, tasks: list[str], domains: list[str]) -> dict[str, Any]:
    base = g.runs[-1]
    return {
        "method": g.method,
        "k": 0,
        "n": 1,
        "sparsity": 0.0,
        **{t: headline(t, base["eval_base"][t]) for t in tasks if t in base["eval_base"]},
        "avg": base["average_base"],
        "avg_std": None,
        "perplexity": base["perplexity"]["base"],
        **{f"ppl/{d}": _domain(base, d, "base") for d in domains},
        "prefill_x": 1.0,
        "decode_x": 1.0,
        "pred_prefill_x": 1.0,
        "_series": g.method,
        "_baseline": True,
    }


def _method_row(g: _Group, tasks: list[str], domains: list[str]) -> dict[str, Any]:
    """A method at one k: its runs (seeds) averaged."""
    members = g.runs
    avgs = [m["average"] for m in members if m.get("average") is not None]
    speed = [m["speed"] for m in members if m.get("speed")]
    return {
        "method": f"{g.method}-{g.k}" if g.method.startswith(PAPER_FAMILIES) else g.method,
        "k": g.k,
        "n": len(members),
        "sparsity": _mean([m["params"]["sparsity"] for m in members]),
        **{t: _mean([headline(t, m["eval"][t]) for m in members if t in m["eval"]]) for t in tasks},
        "avg": _mean(avgs),
        "avg_std": statistics.stdev(avgs) if len(avgs) > 1 else None,
        "perplexity": _mean([m["perplexity"]["nbl"] for m in members if m["perplexity"]["nbl"] is not None]),
        **{f"ppl/{d}": _mean([v for m in members if (v := _domain(m, d, "nbl")) is not None]) for d in domains},
        "prefill_x": _mean([s["prefill_speedup"] for s in speed]),
        "decode_x": _mean([s["decode_speedup"] for s in speed if s["decode_speedup"] is not None]),
        **served_columns(speed),
        "pred_prefill_x": _mean([v for m in members if (v := _predicted_prefill(m)) is not None]),
        "kv_saved": _mean([v for m in members if (v := _kv_saved(m)) is not None]),
        "selection_s": _mean([m["selection_seconds"] for m in members if m.get("selection_seconds") is not None]),
        "layers": _layers(members[0]) if len(members) == 1 else "(seeds)",
        "_series": g.method,
    }


def _layers(run: dict[str, Any]) -> str:
    """The replaced layers; per part where a run chose among several kinds ("attention: 3 5 | mlp: -")."""
    parts = run.get("replaced_parts") or {}
    if len(parts) > 1:
        return " | ".join(f"{p}: " + (" ".join(map(str, layers)) or "-") for p, layers in parts.items())
    return " ".join(map(str, run.get("replaced_layers", [])))


def _kv_saved(run: dict[str, Any]) -> float | None:
    """The fraction of the KV cache per token the replacement removed."""
    params = run["params"]
    base = params.get("kv_bytes_per_token_base")
    return 1 - params["kv_bytes_per_token"] / base if base else None


def _predicted_prefill(run: dict[str, Any]) -> float | None:
    """The FLOP model's prefill speed-up of a run; None where it was not recorded or was computed for an empty
    prompt (runs with speed=none before it kept its lengths)."""
    if not run.get("predicted") or not run["config"].get("speed", {}).get("prompt_len"):
        return None
    return run["predicted"]["prefill_speedup"]


def served_columns(speed: list[dict[str, Any]]) -> dict[str, float | None]:
    """Runs measured in vLLM (speed=vllm) add a saturating batch's throughput and the KV capacity, as ratios."""
    served = [s for s in speed if s.get("engine") == "vllm"]
    if not served:
        return {}
    return {
        "throughput_x": _mean([s["throughput_speedup"] for s in served]),
        "kv_capacity_x": _mean([s["kv_capacity_ratio"] for s in served]),
    }


def _domain(run: dict[str, Any], domain: str, which: str) -> float | None:
    return run["perplexity"].get("domains", {}).get(domain, {}).get(which)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of the rows in first-seen order; keys starting with "_" are internal."""
    return [c for c in dict.fromkeys(k for row in rows for k in row) if not c.startswith("_")]


def rows_markdown(rows: list[dict[str, Any]]) -> str:
    columns = _columns(rows)
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            if c == "sparsity" and v is not None:
                cells.append(f"{v:.1%}")
            elif c.endswith("_x") and v is not None:
                cells.append(f"{v:.2f}")
            elif (c == "perplexity" or c.startswith("ppl/")) and v is not None:
                cells.append(f"{v:.2f}")
            elif c == "selection_s" and v is not None:
                cells.append(f"{v:.0f}")
            else:
                cells.append(_fmt(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_report(runs: list[dict[str, Any]], out: Path, missing: list[str] | None = None) -> dict[str, Path]:
    """report.md, report.csv and plots (accuracy vs k, accuracy vs prefill speed-up, perplexity vs k) in ``out``.

    ``missing`` (sweep jobs without results, see :func:`missing_jobs`) is listed under the tables.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv"}
    sections, all_rows, notes = [], [], []
    for model in sorted({r["model"] for r in runs}):
        rows = table_rows([r for r in runs if r["model"] == model], notes)
        sections.append(f"## {model}\n\n" + rows_markdown(rows))
        all_rows += [{"model": model, **row} for row in rows]
        files.update(_plots(rows, out, prefix=f"{model}_"))
    if missing:
        notes.append(f"{len(missing)} sweep job(s) left no results.json: " + "; ".join(missing))
    if notes:
        sections.append("## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    files["markdown"].write_text("\n".join(sections))
    with files["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(all_rows), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(all_rows)
    return files


def _plots(rows: list[dict[str, Any]], out: Path, prefix: str = "") -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods: dict[str, list[dict[str, Any]]] = {}
    base = next((r for r in rows if r.get("_baseline")), None)
    for r in rows:
        if not r.get("_baseline"):
            methods.setdefault(r["_series"], []).append(r)
    files = {}
    panels = (
        ("acc_vs_k", "k", "replaced units k (layers; joint: sub-blocks)", "avg", "average accuracy"),
        ("acc_vs_speedup", "prefill_x", "prefill speed-up", "avg", "average accuracy"),
        ("ppl_vs_k", "k", "replaced units k (layers; joint: sub-blocks)", "perplexity", "perplexity (log scale)"),
        ("ppl_vs_predicted_speedup", "pred_prefill_x", "predicted prefill speed-up (FLOP model)", "perplexity",
         "perplexity (log scale)"),
        ("acc_vs_predicted_speedup", "pred_prefill_x", "predicted prefill speed-up (FLOP model)", "avg",
         "average accuracy"),
    )  # fmt: skip
    for name, x_key, xlabel, y_key, ylabel in panels:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method, members in sorted(methods.items()):
            pts = sorted((m[x_key], m[y_key]) for m in members if m.get(x_key) is not None and m[y_key] is not None)
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
        front = pareto_front([(m[x_key], m[y_key]) for ms in methods.values() for m in ms
                              if m.get(x_key) is not None and m[y_key] is not None], y_key != "perplexity")  # fmt: skip
        if x_key == "pred_prefill_x" and len(methods) > 1 and front:  # the best any method reaches, per speed-up
            ax.step(*zip(*front, strict=True), where="post", color="black", alpha=0.35, lw=3, label="Pareto front")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files[prefix + name] = out / f"{prefix}{name}.png"
        fig.savefig(files[prefix + name], dpi=120)
        plt.close(fig)
    return files


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (faster, and better quality), by speed-up."""
    sign = 1 if higher_is_better else -1
    front = [
        (x, y) for x, y in points
        if not any(x2 >= x and sign * y2 >= sign * y and (x2, y2) != (x, y) for x2, y2 in points)
    ]  # fmt: skip
    return sorted(set(front))


def plot_loss_curve(losses: list[float], path: Path, title: str) -> Path:
    """Training loss per step (and its running mean over 10 steps) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.4, label="loss")
    window = min(10, len(losses))
    smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), smooth, label=f"mean of last {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (training text)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
