"""What a run carries from stage to stage, and the run folder it owns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from nbl.calib.distributed import Calibrator, Shards
from nbl.select.registry import GRANULARITY_PARTS, Selection, Strategy, get_strategy

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from nbl.calib.result import CalibrationResult
    from nbl.core.linalg import Ridge
    from nbl.core.surgery import Part
    from nbl.recipe.windows import Windows
    from nbl.select.registry import Scores


@dataclass
class RunContext:
    output_dir: Path
    wandb_group: str | None = None
    overrides: list[str] | None = None  # the command-line overrides of this job (Hydra's job overrides)


@dataclass
class RunState:
    """One run: its config, then what each stage adds. ``results`` holds the sections of results.json as the
    stages write them; ``stopped`` ends the run early (a torchrun helper rank after calibration)."""

    cfg: DictConfig
    ctx: RunContext
    results: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False
    run: dict[str, Any] = field(default_factory=dict)  # the run folder's marker: id, host, pid, start
    # set up
    config: PretrainedConfig | None = None
    shards: Shards = field(default_factory=Shards)
    device: torch.device | None = None
    calibrator: Calibrator | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    windows: Windows | None = None
    train: list[torch.Tensor] | None = None  # fine-tuning windows
    model: PreTrainedModel | None = None
    # statistics and selection
    stats: dict[Part, CalibrationResult] = field(default_factory=dict)
    heldout_stats: dict[Part, CalibrationResult] = field(default_factory=dict)
    ridges: dict[Part, Ridge] = field(default_factory=dict)
    scores: dict[Part, Scores] = field(default_factory=dict)
    selection: Selection | None = None
    selection_start: float = 0.0
    # the unmodified model beside the replaced one (speed test, quantized base evaluation), and evaluations
    base: PreTrainedModel | None = None
    eval_base: dict[str, Any] | None = None
    eval_nbl: dict[str, Any] | None = None

    @property
    def parts(self) -> tuple[Part, ...]:
        return GRANULARITY_PARTS[self.cfg.replacement.granularity]

    @property
    def strategy(self) -> Strategy | None:
        """The selection strategy that chooses the layers (None when they are given explicitly)."""
        return None if self.cfg.layers is not None else get_strategy(self.cfg.selection.strategy)

    @property
    def needs_heldout_statistics(self) -> bool:
        strategy = self.strategy
        return self.cfg.replacement.ridge == "auto" or (strategy is not None and strategy.heldout_statistics)

    @property
    def needs_heldout_windows(self) -> bool:
        strategy = self.strategy
        return (
            self.needs_heldout_statistics
            or (strategy is not None and strategy.heldout_windows)
            or self.cfg.replacement.validate
        )

    @property
    def wants_eval(self) -> bool:
        return bool(self.cfg.eval.tasks or self.cfg.eval.perplexity)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.cache_dir)


