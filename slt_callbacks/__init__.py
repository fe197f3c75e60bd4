"""slt_callbacks: singular learning theory during training, as PyTorch Lightning callbacks.

Add monitors to a ``Trainer``::

    from slt_callbacks import LLCMonitor, HessianTraceMonitor, WeightNormMonitor
    trainer = Trainer(callbacks=[LLCMonitor(), HessianTraceMonitor(), WeightNormMonitor()])

or call the estimators directly (:func:`estimate_llc`, :func:`hessian_trace`,
:func:`fisher_trace`, :func:`weight_norms`, :func:`calibrate`). The estimation core
(:mod:`slt_callbacks.core`) depends on torch alone.
"""

from .callbacks import (
    HessianTraceMonitor,
    LLCMonitor,
    StageTransitionMonitor,
    TrainingStepLoss,
    WeightNormMonitor,
)
from .core import (
    Calibration,
    CalibrationError,
    CalibrationPoint,
    HealthCriteria,
    LLCEstimationError,
    LLCResult,
    SGLDConfig,
    Status,
    TraceEstimate,
    attention_head_components,
    calibrate,
    estimate_llc,
    fisher_trace,
    fused_qkv_head_components,
    head_components,
    hessian_trace,
    layer_components,
    merge_results,
    resolve_components,
    weight_norms,
)
from .detect import DetectorConfig, StageDetector, StageEvent, StageKind
from .records import LLCRecord
from .schedule import Schedule

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "CalibrationError",
    "CalibrationPoint",
    "DetectorConfig",
    "HealthCriteria",
    "HessianTraceMonitor",
    "LLCEstimationError",
    "LLCMonitor",
    "LLCRecord",
    "LLCResult",
    "SGLDConfig",
    "Schedule",
    "StageDetector",
    "StageEvent",
    "StageKind",
    "StageTransitionMonitor",
    "Status",
    "TraceEstimate",
    "TrainingStepLoss",
    "WeightNormMonitor",
    "__version__",
    "attention_head_components",
    "calibrate",
    "estimate_llc",
    "fisher_trace",
    "fused_qkv_head_components",
    "head_components",
    "hessian_trace",
    "layer_components",
    "merge_results",
    "resolve_components",
    "weight_norms",
]
