"""slt_callbacks: singular learning theory during training, as PyTorch Lightning callbacks.

Add monitors to a ``Trainer``::

    from slt_callbacks import LLCMonitor, HessianTraceMonitor, WeightNormMonitor
    trainer = Trainer(callbacks=[LLCMonitor(), HessianTraceMonitor(), WeightNormMonitor()])

or call the estimators directly (:func:`estimate_llc`, :func:`hessian_trace`,
:func:`fisher_trace`, :func:`weight_norms`, :func:`calibrate`). The estimation core
(:mod:`slt_callbacks.core`) depends on torch alone.

The names below are imported lazily, when first used (PEP 562 module ``__getattr__``), so
that ``import slt_callbacks.core`` needs torch only and the numpy analysis needs numpy only:
importing a subpackage runs this file, which therefore imports nothing itself.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it (relative to this package). One line per name,
# so that additions from parallel work merge without conflicts.
_EXPORTS: dict[str, str] = {
    "Calibration": ".core",
    "CalibrationError": ".core",
    "CalibrationPoint": ".core",
    "DetectorConfig": ".detect",
    "HealthCriteria": ".core",
    "HessianTraceMonitor": ".callbacks",
    "LLCEstimationError": ".core",
    "LLCMonitor": ".callbacks",
    "LLCRecord": ".records",
    "LLCResult": ".core",
    "SGLDConfig": ".core",
    "Schedule": ".schedule",
    "StageDetector": ".detect",
    "StageEvent": ".detect",
    "StageKind": ".detect",
    "StageTransitionMonitor": ".callbacks",
    "Status": ".core",
    "TraceEstimate": ".core",
    "TrainingStepLoss": ".callbacks",
    "WeightNormMonitor": ".callbacks",
    "attention_head_components": ".core",
    "calibrate": ".core",
    "estimate_llc": ".core",
    "fisher_trace": ".core",
    "fused_qkv_head_components": ".core",
    "head_components": ".core",
    "hessian_trace": ".core",
    "layer_components": ".core",
    "merge_results": ".core",
    "resolve_components": ".core",
    "sweep_snapshots": ".sweep",
    "weight_norms": ".core",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

