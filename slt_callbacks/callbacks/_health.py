"""Unhealthy estimates are never hidden: one warning per step, an alert when chains diverge."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from slt_callbacks.core.diagnostics import Status
from slt_callbacks.core.llc import LLCResult
from slt_callbacks.sinks import MetricSink

__all__ = ["report_health"]

_ALARMING = (Status.ALL_DIVERGED, Status.DIVERGED)
"""Statuses worth a W&B alert. NOT_A_MINIMUM is the normal case while a model trains."""


def report_health(
    sink: MetricSink,
    step: int,
    result: LLCResult,
    datasets: Mapping[str, LLCResult],
    *,
    key: Callable[[str], str],
    owner: str,
) -> None:
    """Warn (``rank_zero_warn``, once for the step) with the status and advice of every
    unhealthy estimate of ``step``; alert through W&B if chains diverged."""
    parts = [("", result)]
    parts += [(f"component {n!r}: ", r) for n, r in result.components.items()]
    parts += [(f"dataset {n!r}: ", r) for n, r in datasets.items()]
    unhealthy = [(tag, r) for tag, r in parts if not r.healthy]
    if not unhealthy:
        return
    lines = [f"{tag}{r.status.value}: {' '.join(r.reasons)}" for tag, r in unhealthy]
    text = f"{owner} at step {step}: " + "\n".join(lines)
    rank_zero_warn(text)
    if any(r.status in _ALARMING for _, r in unhealthy):
        sink.alert(f"{key('llc')}: chains diverged", text)
