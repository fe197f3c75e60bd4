"""The estimation core: torch only (importing lightning or wandb here is a bug)."""

from .calibrate import (
    Calibration,
    CalibrationError,
    CalibrationPoint,
    Choice,
    calibrate,
    choose,
)
from .config import SGLDConfig
from .curvature import TraceEstimate, fisher_trace, hessian_trace, top_hessian_eigenvalue
from .diagnostics import HealthCriteria, Status
from .heads import head_components, layer_components
from .llc import LLCEstimationError, LLCResult, estimate_llc, merge_results
from .norms import weight_norms
from .restrict import attention_head_components, fused_qkv_head_components, resolve_components

__all__ = [
    "Calibration",
    "CalibrationError",
    "CalibrationPoint",
    "Choice",
    "HealthCriteria",
    "LLCEstimationError",
    "LLCResult",
    "SGLDConfig",
    "Status",
    "TraceEstimate",
    "attention_head_components",
    "calibrate",
    "choose",
    "estimate_llc",
    "fisher_trace",
    "fused_qkv_head_components",
    "head_components",
    "hessian_trace",
    "layer_components",
    "merge_results",
    "resolve_components",
    "top_hessian_eigenvalue",
    "weight_norms",
]
