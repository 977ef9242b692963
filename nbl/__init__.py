"""Neural Block Linearization: replace the most linear attention (or MLP, or whole-block) sub-blocks of an LLM
by LMMSE maps."""

from nbl.accounting import FlopModel, kv_cache_bytes_per_token, model_kv_bytes_per_token, parameter_report
from nbl.adapters import SUPPORTED_MODEL_TYPES, UnsupportedModelError, get_adapter
from nbl.calibration import CalibrationResult, calibrate, calibrate_parts
from nbl.checkpoint import load_linearized, save_linearized
from nbl.layerwise import calibrate_layerwise, refit_propagated
from nbl.linalg import canonical_correlations, cca_bound, fit_lmmse
from nbl.stats import CovarianceAccumulator
from nbl.surgery import PARTS, LinearizedDecoderLayer, MlpMap, linearize, replaced_layers, replaced_mlps

__version__ = "0.1.0"

__all__ = [
    "PARTS",
    "SUPPORTED_MODEL_TYPES",
    "CalibrationResult",
    "CovarianceAccumulator",
    "FlopModel",
    "LinearizedDecoderLayer",
    "MlpMap",
    "UnsupportedModelError",
    "calibrate",
    "calibrate_layerwise",
    "calibrate_parts",
    "canonical_correlations",
    "cca_bound",
    "fit_lmmse",
    "get_adapter",
    "kv_cache_bytes_per_token",
    "linearize",
    "load_linearized",
    "model_kv_bytes_per_token",
    "parameter_report",
    "refit_propagated",
    "replaced_layers",
    "replaced_mlps",
    "save_linearized",
]
