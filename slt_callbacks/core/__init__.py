"""The estimation core: torch only (importing lightning or wandb here is a bug)."""

from .config import SGLDConfig
from .diagnostics import HealthCriteria, Status
from .llc import LLCEstimationError, LLCResult, estimate_llc, merge_results
from .restrict import attention_head_components, fused_qkv_head_components, resolve_components

__all__ = [
    "HealthCriteria",
    "LLCEstimationError",
    "LLCResult",
    "SGLDConfig",
    "Status",
    "attention_head_components",
    "estimate_llc",
    "fused_qkv_head_components",
    "merge_results",
    "resolve_components",
]
