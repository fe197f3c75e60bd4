"""What :class:`~slt_callbacks.StageTransitionMonitor` publishes, kept out of its hooks.

The monitor decides *when* (after each estimate, at each event, at the end of training);
these functions decide *what* and hand it to a :class:`~slt_callbacks.sinks.MetricSink`
(every logger; W&B tables and alerts where a WandbLogger is attached). They read only the
:class:`~slt_callbacks.analysis.StageTracker` and the events it returned, never the monitor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from slt_callbacks.analysis.noise import signed_log
from slt_callbacks.analysis.online import StageEvent
from slt_callbacks.analysis.tracker import StageTracker, finite_or_none
from slt_callbacks.sinks import AlertLevel, MetricSink
from slt_callbacks.wandb_views import alert_stage_event, log_stage_events

__all__ = ["estimate_metrics", "publish_events"]


def estimate_metrics(prefix: str, tracker: StageTracker) -> dict[str, float | int]:
    """The scalars logged after each estimate, from the latest record ``tracker`` processed.

    ``<prefix>stage`` (and ``<prefix>stage/<component>``): the current stage of each series;
    ``<prefix>num_stage_events``; ``<prefix>num_sampler_changes`` (changes of the estimates'
    sampler, see :class:`~slt_callbacks.analysis.tracker.StageTracker`);
    ``<prefix>stage_signal``: the signed-log λ̂ the detector
    sees (left out where λ̂ is not finite); ``<prefix>llc_is_complexity``: 1 where the
    estimate is healthy, 0 where λ̂ is no complexity (e.g. at a saddle). Empty while no
    record has been processed (all of them still wait in the reorder window).
    """
    records = tracker.records
    if not records:
        return {}
    metrics: dict[str, Any] = {
        f"{prefix}stage" + ("" if name is None else f"/{name}"): stage
        for name, stage in tracker.stages.items()
    }
    metrics[f"{prefix}num_stage_events"] = len(tracker.events)
    metrics[f"{prefix}num_sampler_changes"] = len(tracker.sampler_changes)
    metrics[f"{prefix}stage_signal"] = finite_or_none(
        signed_log(records[-1].llc, tracker.config.scale)
    )
    metrics[f"{prefix}llc_is_complexity"] = int(records[-1].status == "healthy")
    return {key: value for key, value in metrics.items() if value is not None}


def publish_events(
    sink: MetricSink,
    prefix: str,
    events: Sequence[StageEvent],
    *,
    unlogged: Sequence[StageEvent],
    step: int,
    alert_level: AlertLevel | None,
    alert_wait_s: float,
    say: Callable[[str], Any] | None,
    on_event: Callable[[StageEvent], Any] | None,
) -> None:
    """Fan new ``events`` out, in this order: the rows of the ``<prefix>stage_events``
    table, then for each event one throttled alert (none if ``alert_level`` is None), the
    printed line (``say``, None for silence) and the user's ``on_event``.

    Args:
        events: the events just emitted.
        unlogged: every event the sink's table does not have yet (``events`` among them:
            after a resume, also those restored from the checkpoint).
    """
    if not events:
        return
    log_stage_events(sink, prefix, unlogged, step)
    for event in events:
        if alert_level is not None:
            alert_stage_event(sink, prefix, event, alert_level, alert_wait_s)
        if say is not None:
            say(f"StageTransitionMonitor: {event.message}")
        if on_event is not None:
            on_event(event)
