"""What an LLC estimate becomes once it exists, inline or delivered by an executor.

A history entry (:meth:`~slt_callbacks.records.LLCRecord.to_dict`, plain values for
checkpoints), the metrics to log, and, after logging, the health report (a warning per
unhealthy step, a W&B alert when chains diverged, :mod:`._health`) and the
:class:`~slt_callbacks.records.LLCRecord` handed to every callback with ``on_llc_record``
(a stage detector). A failed estimate keeps the same shape (λ̂ NaN, status ``"failed"``), so
the history, the hand-off and the checkpoint stay uniform.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from slt_callbacks.core.llc import LLCResult
from slt_callbacks.executors import Estimates
from slt_callbacks.records import LLCRecord
from slt_callbacks.sinks import MetricSink

from ._guard import FAILED_STATUS, FAILED_STATUS_CODE
from ._health import report_health

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["callbacks_with", "failed_entry", "hand_off", "llc_entry"]

Entry = tuple[dict[str, Any], dict[str, float]]
"""``(history entry without "step", metrics to log)``."""


def llc_entry(estimates: Estimates, *, loss: float | None, prefix: str) -> Entry:
    """The entry and metrics of a finished estimate (``loss``: the training loss around its
    step)."""
    entry = estimates.record(loss=loss, source=prefix).to_dict()
    del entry["step"]
    return entry, estimates.metrics(prefix)


def failed_entry(*, loss: float | None, prefix: str) -> Entry:
    """The entry and metrics of an estimate that could not be made."""
    nan = float("nan")
    record = LLCRecord(step=0, llc=nan, llc_std=nan, status=FAILED_STATUS, loss=loss,
                       source=prefix)  # fmt: skip
    entry = record.to_dict()
    del entry["step"]
    metrics = {f"{prefix}llc": nan, f"{prefix}llc_std": nan,
               f"{prefix}diag/status_code": float(FAILED_STATUS_CODE)}  # fmt: skip
    return entry, metrics


def hand_off(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    entry: Mapping[str, Any],
    *,
    result: LLCResult | None,
    datasets: Mapping[str, LLCResult],
    sink: MetricSink,
    key: Callable[[str], str],
    owner: str,
) -> None:
    """After logging ``entry``: report the health of ``result`` (None: the estimate failed,
    the failure guard reported it) and give the record to every ``on_llc_record``."""
    if result is not None:
        report_health(sink, entry["step"], result, datasets, key=key, owner=owner)
    record = LLCRecord.from_dict(dict(entry))
    for receive in callbacks_with(trainer, "on_llc_record"):
        receive(trainer, pl_module, record)


def callbacks_with(trainer: pl.Trainer, method: str) -> list[Callable[..., Any]]:
    """The bound ``method`` of every callback of ``trainer`` that defines it."""
    return [getattr(cb, method) for cb in trainer.callbacks if callable(getattr(cb, method, None))]
