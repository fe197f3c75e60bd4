"""Framework-free analysis of λ̂ curves: numpy only, no torch, Lightning or W&B.

- :mod:`.noise`: the one noise model (standard error of a chain mean, signed-log scale);
- :mod:`.online`: :class:`StageDetector`, stages found one checkpoint at a time;
- :mod:`.retrospective`: stage boundaries of a whole curve (Hoogland et al. 2024);
- :mod:`.scoring`: events against known or retrospective boundaries;
- :mod:`.relations`: λ̂ against the weight norm, the Hessian trace, the loss;
- :mod:`.tracker`: :class:`StageTracker`, the detectors of one run, fed typed records;
- :mod:`.synthetic`: curves with known stages, for tests and benchmarks.
"""

from .noise import signed_log, standard_error
from .online import DetectorConfig, Regime, StageDetector, StageEvent, StageKind
from .retrospective import StageBoundary, retrospective_stages, smooth_log_step
from .scoring import compare_events
from .tracker import StageTracker

__all__ = [
    "DetectorConfig",
    "Regime",
    "StageBoundary",
    "StageDetector",
    "StageEvent",
    "StageKind",
    "StageTracker",
    "compare_events",
    "retrospective_stages",
    "signed_log",
    "smooth_log_step",
    "standard_error",
]
