"""`python -m nbl` / `nbl`: the Hydra entry point (configs in the repository's conf/ folder)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger("nbl")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from nbl.runner import RunContext, run_experiment

    hydra_cfg = HydraConfig.get()
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:  # one W&B group per sweep
        group = "sweep-" + Path(hydra_cfg.sweep.dir).name.replace(os.sep, "-")
    run_experiment(cfg, RunContext(Path(hydra_cfg.runtime.output_dir), wandb_group=group))


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
