"""Neural Block Linearization: replace the most linear attention (or MLP, or whole-block) sub-blocks of an LLM
by LMMSE maps.

The public API below is imported on first use (PEP 562): ``import nbl`` loads neither torch nor transformers and
prints nothing; ``nbl.calibrate`` and the rest import their modules when first touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API: dict[str, str] = {
    "FlopModel": "nbl.core.accounting",
    "kv_cache_bytes_per_token": "nbl.core.accounting",
    "model_kv_bytes_per_token": "nbl.core.accounting",
    "parameter_report": "nbl.core.accounting",
    "SUPPORTED_MODEL_TYPES": "nbl.core.adapters",
    "UnsupportedModelError": "nbl.core.adapters",
    "get_adapter": "nbl.core.adapters",
    "CalibrationResult": "nbl.calib.result",
    "calibrate": "nbl.calib.hooks",
    "calibrate_parts": "nbl.calib.hooks",
    "CheckpointError": "nbl.core.checkpoint",
    "load_linearized": "nbl.core.checkpoint",
    "register_auto_classes": "nbl.core.causal_lm",
    "save_linearized": "nbl.core.checkpoint",
    "calibrate_layerwise": "nbl.calib.layerwise",
    "refit_propagated": "nbl.calib.layerwise",
    "canonical_correlations": "nbl.core.linalg",
    "cca_bound": "nbl.core.linalg",
    "fit_lmmse": "nbl.core.linalg",
    "CovarianceAccumulator": "nbl.core.stats",
    "PARTS": "nbl.core.surgery",
    "LinearizedDecoderLayer": "nbl.core.surgery",
    "MlpMap": "nbl.core.surgery",
    "linearize": "nbl.core.surgery",
    "replaced_layers": "nbl.core.surgery",
    "replaced_mlps": "nbl.core.surgery",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'nbl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


if TYPE_CHECKING:  # what type checkers and IDEs see (re-exported names)
    from nbl.calib.hooks import calibrate, calibrate_parts  # noqa: F401
    from nbl.calib.layerwise import calibrate_layerwise, refit_propagated  # noqa: F401
    from nbl.calib.result import CalibrationResult  # noqa: F401
    from nbl.core.accounting import FlopModel, kv_cache_bytes_per_token, model_kv_bytes_per_token, parameter_report  # noqa: F401
    from nbl.core.adapters import SUPPORTED_MODEL_TYPES, UnsupportedModelError, get_adapter  # noqa: F401
    from nbl.core.causal_lm import register_auto_classes  # noqa: F401
    from nbl.core.checkpoint import CheckpointError, load_linearized, save_linearized  # noqa: F401
    from nbl.core.linalg import canonical_correlations, cca_bound, fit_lmmse  # noqa: F401
    from nbl.core.stats import CovarianceAccumulator  # noqa: F401
    from nbl.core.surgery import PARTS, LinearizedDecoderLayer, MlpMap, linearize, replaced_layers, replaced_mlps  # noqa: F401
