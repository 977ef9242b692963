"""`python -m nbl` / `nbl`: the Hydra entry point (configs in the repository's conf/ folder)."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger("nbl")

# Import-time notices that say nothing about a run: torchao's optional CUDA kernels and Triton (absent on a CPU
# machine) and torch's deprecation note on the enums torchao registers. Errors still show.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

# ${nbl_uid:} in the output folder names: six random hex digits, drawn once per config like ${now:...}
# (Hydra copies resolver caches into every sweep job), so two runs started in the same second, which
# differ in a setting the folder name does not show, never share a folder.
OmegaConf.register_new_resolver("nbl_uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)
# ${nbl_run:} in the folder names: what the run chooses and how many, "explicit" and the count of its layers for
# layers=[...] (which num_layers and the strategy do not drive), or the budget it meets instead of a count
def _run_name(strategy: str, mode: str, k: int, layers: list | None, target: str | None = None,
              value: float | None = None) -> str:  # fmt: skip
    if layers is not None:
        return f"explicit-{mode}-k{len(layers)}"
    return f"{strategy}-{mode}-{target}{value}" if target is not None else f"{strategy}-{mode}-k{k}"


OmegaConf.register_new_resolver("nbl_run", _run_name, replace=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from nbl.recipe.run import run_experiment
    from nbl.recipe.state import RunContext

    hydra_cfg = HydraConfig.get()
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:  # one W&B group per sweep
        group = "sweep-" + Path(hydra_cfg.sweep.dir).name.replace(os.sep, "-")
    overrides = list(hydra_cfg.overrides.task)
    run_experiment(cfg, RunContext(Path(hydra_cfg.runtime.output_dir), wandb_group=group, overrides=overrides))


def main() -> None:
    if int(os.environ.get("RANK", "0")) > 0:
        # torchrun helper ranks: rank 0 owns the run folder; these write theirs to a scratch folder, removed at exit
        scratch = tempfile.mkdtemp(prefix=f"nbl-rank{os.environ['RANK']}-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        sys.argv += [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null"]
    _hydra_main()


if __name__ == "__main__":
    main()
