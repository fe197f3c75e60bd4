"""slt_callbacks: singular learning theory during training, as PyTorch Lightning callbacks."""

from .core import (
    HealthCriteria,
    LLCEstimationError,
    LLCResult,
    SGLDConfig,
    Status,
    attention_head_components,
    estimate_llc,
    fused_qkv_head_components,
    merge_results,
    resolve_components,
)

__version__ = "0.1.0"

__all__ = [
    "HealthCriteria",
    "LLCEstimationError",
    "LLCResult",
    "SGLDConfig",
    "Status",
    "__version__",
    "attention_head_components",
    "estimate_llc",
    "fused_qkv_head_components",
    "merge_results",
    "resolve_components",
]
