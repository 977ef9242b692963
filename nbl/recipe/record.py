"""The last stages: results.json and summary.md in the run folder, then the W&B run."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import OmegaConf

from nbl.cache import atomic_write_text
from nbl.core.accounting import kv_cache_bytes_per_token, model_kv_bytes_per_token, parameter_report, predicted_speedups
from nbl.core.surgery import first_conv_shape, replaced_layers, replaced_mlps
from nbl.measure.evaluation import headline
from nbl.provenance import model_revision, provenance
from nbl.recipe.launch import now
from nbl.recipe.state import RunState
from nbl.report import method_name, served_columns, summary_markdown

# the order of results.json's sections (a reader finds what was done first, the evidence after)
SECTIONS = (
    "model", "selection", "replacement", "num_layers", "replaced_layers", "replaced_parts", "replaced_modes",
    "replaced_mlp_modes", "scores", "score_used", "selection_seconds", "greedy_steps", "validation", "ridge",
    "calibration", "eval", "eval_base", "average", "average_base", "perplexity", "eval_engine", "predicted", "finetune",
    "quantized_modules", "speed", "speed_error", "params", "config", "overrides", "provenance", "retention", "summary_row",
    "checkpoint", "checkpoint_kind", "replacement_method", "budget",
)  # fmt: skip


def record(state: RunState) -> None:
    """Assemble results.json from the stages' sections and what is known at the end; write it and summary.md."""
    cfg, model, results = state.cfg, state.model, state.results
    ev, base = state.eval_nbl or {}, state.eval_base or {}
    replaced, mlps = replaced_layers(model), replaced_mlps(model)
    params = parameter_report(model).as_dict()
    params["kv_bytes_per_token_base"] = kv_cache_bytes_per_token(state.config, {}, next(model.parameters()).element_size())
    params["kv_bytes_per_token"] = model_kv_bytes_per_token(model)
    results.setdefault("speed", None)
    results.update(
        model=cfg.model.name,
        replacement=OmegaConf.to_container(cfg.replacement, resolve=True),
        eval=ev.get("tasks", {}),
        eval_base=base.get("tasks", {}),
        average=ev.get("average"),
        average_base=base.get("average"),
        perplexity={
            "nbl": ev.get("perplexity"),
            "base": base.get("perplexity"),
            "text": ev.get("perplexity_text"),
            "domains": {
                d: {"nbl": ev.get("domains", {}).get(d), "base": base.get("domains", {}).get(d)} for d in cfg.eval.domains
            },
        },
        # which engine evaluated each model and its wall time (the base's from the run that cached it)
        eval_engine={
            name: {"backend": e.get("backend", "hf"), "seconds": e.get("seconds")}
            for name, e in (("nbl", ev), ("base", base))
            if e
        },
        predicted=predicted_speedups(
            state.config, replaced, cfg.speed.prompt_len, cfg.speed.new_tokens, mlps, first_conv_shape(model)
        ),
        params=params,
        config=OmegaConf.to_container(cfg, resolve=True),
        overrides=state.ctx.overrides,
        provenance={**provenance(), "model_revision": model_revision(state.config), **state.run, "finished": now()},
    )
    if results["average"] is not None and results["average_base"]:
        results["retention"] = results["average"] / results["average_base"]
    results["summary_row"] = summary_row(results)
    state.results = {key: results[key] for key in SECTIONS if key in results}
    atomic_write_text(state.ctx.output_dir / "results.json", json.dumps(state.results, indent=2) + "\n")
    summary = summary_markdown(state.results)
    (state.ctx.output_dir / "summary.md").write_text(summary)
    print(summary)


def track(state: RunState) -> None:
    """The results to W&B (online with an API key, else offline; logger=disabled: nothing)."""
    from nbl.tracking import Tracker

    cfg, results = state.cfg, state.results
    tracker = Tracker(
        cfg.logger.mode,
        cfg.logger.project,
        {**results["config"], "provenance": results["provenance"]},
        state.ctx.output_dir,
        entity=cfg.logger.entity,
        group=cfg.logger.group or state.ctx.wandb_group,
        tags=list(cfg.logger.tags),
        name=state.ctx.output_dir.name,
    )
    try:
        tracker.log_results(results)
    finally:
        tracker.finish()
    results["wandb_run_folder"] = tracker.run_folder


def summary_row(results: dict[str, Any]) -> dict[str, Any]:
    """The run's row of a paper-shaped table."""
    speed = results.get("speed") or {}
    return {
        "method": method_name(results),
        "k": results["num_layers"],
        "sparsity": results["params"]["sparsity"],
        "avg_acc": results.get("average"),
        "avg_acc_base": results.get("average_base"),
        "perplexity": results["perplexity"]["nbl"],
        "perplexity_base": results["perplexity"]["base"],
        "prefill_x": speed.get("prefill_speedup"),
        "decode_x": speed.get("decode_speedup"),
        **served_columns([speed]),
        **{f"acc/{t}": headline(t, m) for t, m in results["eval"].items()},
    }
