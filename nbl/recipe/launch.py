"""Checks Hydra runs at launch, before it writes anything: a run folder that already holds a run, or a sweep folder
that holds an earlier sweep, is refused (Hydra would overwrite its .hydra/*.yaml or its multirun.yaml and mix two
runs' records). Registered in conf/config.yaml under ``hydra.callbacks``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RUN_MARKER = "nbl-run.json"  # written by the run that owns a folder (nbl.recipe.state.claim_output_dir)


def used_run_folder(folder: Path) -> str | None:
    """Why ``folder`` cannot take a new run (it holds one), or None."""
    for name in ("results.json", RUN_MARKER):
        if (folder / name).exists():
            return f"{folder} already holds a run ({folder / name}): choose another output folder"
    return None


class FolderInUse(SystemExit):
    """Stops the launch (Hydra turns a callback's ordinary exceptions into warnings and goes on)."""


class RefuseUsedFolders(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        reason = used_run_folder(Path(config.hydra.run.dir))
        if reason is not None:
            raise FolderInUse(f"refused: {reason}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        if (folder / "multirun.yaml").exists():
            raise FolderInUse(
                f"refused: {folder} already holds a sweep ({folder / 'multirun.yaml'}): choose another hydra.sweep.dir"
            )
