"""Replacements by name: each registered class says what it needs, what it supports, how it is saved and served,
and replaces the chosen sub-blocks of a run.

The config schema reads this registry (the values ``replacement.mode`` accepts, and each replacement's checks), so
a new replacement is one class decorated with :func:`register` in a module of ``nbl/replace/`` and one YAML file in
``conf/replacement/``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, ClassVar

from nbl.select.registry import GRANULARITIES

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from nbl.recipe.state import RunState

# what a replacement reads: the part's covariance statistics, the calibration windows again (a pass of its own on the
# unmodified model), the held-out windows
NEEDS = ("statistics", "calibration_windows", "heldout_windows")
SAVED_AS = {
    "nbl": "an NBL checkpoint (nbl.load_linearized, or transformers after nbl.register_auto_classes())",
    "ordinary": "the family's own checkpoint with fewer layers (any engine loads it; no nbl needed)",
}


class Replacement:
    """What the chosen sub-blocks become. Subclasses set the class attributes and implement :meth:`apply`."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ("statistics",)
    granularities: ClassVar[tuple[str, ...]] = GRANULARITIES
    adds_parameters: ClassVar[bool]  # a d x d map (or more) per replaced unit
    saved_as: ClassVar[str] = "nbl"  # a key of SAVED_AS
    served_by: ClassVar[str]  # which engines serve its checkpoints
    probe_mode: ClassVar[str] = "drop"  # how measured selection rules replace a unit while choosing (linear or drop)
    counts_as: ClassVar[str] = "drop"  # what a unit counts as in a budget (nbl.select.budget): linear, conv or drop
    publication: ClassVar[str] = ""  # where the method comes from

    def refusal(self, cfg: DictConfig) -> str | None:
        """Why ``cfg`` cannot run with this replacement (checked before anything loads), or None."""
        granularity = cfg.replacement.granularity
        if granularity not in self.granularities:
            return (f"replacement.mode={self.name} replaces replacement.granularity={'/'.join(self.granularities)} "
                    f"units, not {granularity}")  # fmt: skip
        return None

    def apply(self, state: RunState) -> dict[str, Any] | None:
        """Replace the run's chosen units in ``state.model``; returns what results.json records of it (or None)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The declaration, as results.json records it."""
        return {
            "name": self.name, "needs": list(self.needs), "granularities": list(self.granularities),
            "adds_parameters": self.adds_parameters, "saved_as": self.saved_as, "served_by": self.served_by,
        }  # fmt: skip


REPLACEMENTS: dict[str, type[Replacement]] = {}
_discovered: list[bool] = []


def register(cls: type[Replacement]) -> type[Replacement]:
    """Class decorator: make ``cls`` available as ``replacement.mode=<cls.name>``."""
    if cls.name in REPLACEMENTS and REPLACEMENTS[cls.name] is not cls:
        raise ValueError(f"two replacements are named {cls.name!r}")
    if cls.saved_as not in SAVED_AS or not set(cls.needs) <= set(NEEDS):
        raise ValueError(f"replacement {cls.name!r}: saved_as one of {list(SAVED_AS)}, needs among {NEEDS}")
    REPLACEMENTS[cls.name] = cls
    return cls


def replacement_names() -> tuple[str, ...]:
    """Every registered replacement (the modules of ``nbl.replace`` are imported on first use)."""
    if not _discovered:
        import nbl.replace as package

        for module in pkgutil.iter_modules(package.__path__):
            if module.name != "registry":
                importlib.import_module(f"{package.__name__}.{module.name}")
        _discovered.append(True)
    return tuple(sorted(REPLACEMENTS))


def get_replacement(name: str) -> Replacement:
    if name not in replacement_names():
        raise ValueError(f"unknown replacement {name!r}; choose from {', '.join(replacement_names())}")
    return REPLACEMENTS[name]()
