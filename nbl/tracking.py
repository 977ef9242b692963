"""Weights & Biases logging that never kills an experiment for want of an API key."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_mode(mode: str) -> str:
    """auto -> online when an API key is configured, else offline (said once, clearly)."""
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"unknown wandb mode {mode!r}; use auto, online, offline or disabled")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    if not has_key:
        log.warning("W&B: no API key configured, logging offline (sync later with `wandb sync`)")
    return "online" if has_key else "offline"


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class Tracker:
    """Thin wrapper over one wandb run; every method is a no-op when disabled."""

    def __init__(
        self,
        mode: str,
        project: str,
        config: Mapping[str, Any],
        run_dir: Path,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.mode = resolve_mode(mode)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            mode=self.mode,
            project=project,
            entity=entity,
            group=group,
            tags=list(tags or []),
            name=name,
            config=dict(config),
            dir=str(run_dir),
            reinit="finish_previous",
        )

    @property
    def run_folder(self) -> str | None:
        return None if self.run is None else str(Path(self.run.dir).parent)

    def log_results(self, results: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        import wandb

        chosen = set(results["replaced_layers"])
        for name, scores in results["scores"].items():  # every score, also for random selection
            table = wandb.Table(columns=["layer", "score", "replaced"])
            for layer, score in scores.items():
                table.add_data(int(layer), score, int(layer) in chosen)
            self.run.log({f"scores/{name}": wandb.plot.bar(table, "layer", "score", title=f"per-layer {name} score")})
        flat = _flatten({k: results[k] for k in ("eval", "perplexity", "speed", "params") if results.get(k)})
        self.run.log(flat)
        summary = wandb.Table(columns=list(results["summary_row"]), data=[list(results["summary_row"].values())])
        self.run.log({"results": summary})
        self.run.summary["replaced_layers"] = results["replaced_layers"]
        for step, loss in enumerate((results.get("finetune") or {}).get("losses", []), start=1):
            self.run.log({"finetune/step": step, "finetune/loss": loss})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out
