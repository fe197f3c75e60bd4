"""Lightning callbacks: thin adapters that decide *when* to measure and delegate to the core.

- :class:`LLCMonitor`: local learning coefficient λ̂, global, per component, per dataset;
- :class:`HessianTraceMonitor`: Hutchinson Hessian trace and empirical Fisher trace;
- :class:`WeightNormMonitor`: L2 norm of the weights, total and per component;
- :class:`StageTransitionMonitor`: developmental stages detected online on the λ̂ curve.
"""

from ._base import TrainingStepLoss
from .hessian import HessianTraceMonitor
from .llc import LLCMonitor
from .norms import WeightNormMonitor
from .stages import StageTransitionMonitor

__all__ = [
    "HessianTraceMonitor",
    "LLCMonitor",
    "StageTransitionMonitor",
    "TrainingStepLoss",
    "WeightNormMonitor",
]
