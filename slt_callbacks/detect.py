"""Moved to :mod:`slt_callbacks.analysis` (``online``, ``retrospective``, ``scoring``); this
path re-exports the public names."""

from .analysis.online import (
    DetectorConfig,
    Regime,
    StageDetector,
    StageEvent,
    StageKind,
    classify_kind,
    classify_loss_trend,
    classify_trend,
    trend_threshold,
)
from .analysis.retrospective import (
    SmoothedCurve,
    StageBoundary,
    retrospective_stages,
    smooth_log_step,
)
from .analysis.scoring import compare_events

__all__ = [
    "DetectorConfig",
    "Regime",
    "SmoothedCurve",
    "StageBoundary",
    "StageDetector",
    "StageEvent",
    "StageKind",
    "classify_kind",
    "classify_loss_trend",
    "classify_trend",
    "compare_events",
    "retrospective_stages",
    "smooth_log_step",
    "trend_threshold",
]
