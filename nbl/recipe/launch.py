"""Run folders claimed at launch, before Hydra writes anything: a run folder is claimed with an exclusively created
marker before Hydra writes its .hydra/*.yaml, so a second launch into it (even a second later) is refused without
touching the first run's records; a sweep folder that holds an earlier sweep is refused likewise. Registered in
conf/config.yaml under ``hydra.callbacks``."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RUN_MARKER = "nbl-run.json"  # written by the run that owns a folder (claim_output_dir)
SWEEP_MARKER = "nbl-sweep.json"  # written by the sweep that owns a folder


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def claim_output_dir(folder: Path, marker: str = RUN_MARKER) -> dict[str, Any]:
    """Make ``folder`` this process's own: refuse one that holds another run's marker or results.

    The marker is created exclusively, so two processes given the same folder cannot both have it; a marker this
    process wrote (at launch, before Hydra wrote into the folder) is its own claim.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "results.json").exists():
        raise FileExistsError(f"{folder} already holds a run ({folder / 'results.json'}): choose another output folder")
    run = {"run_id": folder.name, "pid": os.getpid(), "host": platform.node(), "started": now()}
    try:
        with open(folder / marker, "x") as f:
            f.write(json.dumps(run, indent=2) + "\n")
    except FileExistsError:
        try:
            held = json.loads((folder / marker).read_text())
        except (OSError, ValueError):
            held = {}
        if (held.get("pid"), held.get("host")) == (run["pid"], run["host"]):
            return held
        owner = f"process {held.get('pid')} on {held.get('host')}" if held else "unreadable"
        raise FileExistsError(
            f"{folder} already holds a run ({folder / marker}: {owner}): choose another output folder"
        ) from None
    return run


class FolderInUse(SystemExit):
    """Stops the launch (Hydra turns a callback's ordinary exceptions into warnings and goes on)."""


class RefuseUsedFolders(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            claim_output_dir(Path(config.hydra.run.dir))
        except FileExistsError as err:
            raise FolderInUse(f"refused: {err}") from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        if (folder / "multirun.yaml").exists():
            raise FolderInUse(
                f"refused: {folder} already holds a sweep ({folder / 'multirun.yaml'}): choose another hydra.sweep.dir"
            )
        try:
            claim_output_dir(folder, SWEEP_MARKER)
        except FileExistsError as err:
            raise FolderInUse(f"refused: {err}") from None
