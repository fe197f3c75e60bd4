"""Scoring stage events against boundaries: the one matching rule of the benchmark, the
tests and the end-of-training summary. Plain numpy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._checks import check_int
from .online import StageEvent, StageKind
from .retrospective import StageBoundary

__all__ = ["compare_events"]


def compare_events(
    online_events: Sequence[StageEvent],
    boundaries: Sequence[StageBoundary],
    tolerance_checkpoints: int = 5,
    *,
    steps: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Match online events to retrospective (or true) boundaries, one to one.

    An event matches a boundary when its change point lies within ``tolerance_checkpoints``
    checkpoints of it; pairs are taken closest first. Positions are counted in checkpoints
    because the detector itself thinks in checkpoints (window, persistence, cooldown).

    Args:
        online_events: events of :class:`StageDetector`.
        boundaries: the reference, e.g. from :func:`retrospective_stages`.
        tolerance_checkpoints: how far (in checkpoints) a change point may miss a boundary.
        steps: the checkpoint steps. When given, positions are looked up by step; without
            it the events' and boundaries' own ``checkpoint`` indices are used, which agree
            only if the detector and the analysis saw the same checkpoints.

    Returns:
        Plain types: ``matched``, ``missed`` (boundaries without an event), ``false_alarms``
        (events without a boundary), ``precision`` and ``recall`` (``None`` when undefined),
        ``mean_delay_checkpoints`` / ``median_delay_checkpoints`` (detection minus
        boundary, over matched pairs), ``mean_location_error_checkpoints``,
        ``kind_agreement`` (fraction of matched pairs of the same kind) and ``pairs``.
    """
    tolerance = check_int("tolerance_checkpoints", tolerance_checkpoints, minimum=0)
    grid = None if steps is None else np.asarray(steps)

    def position(step: int, own: int) -> int:
        return own if grid is None else int(np.searchsorted(grid, step))

    event_at = [position(e.step, e.checkpoint) for e in online_events]
    detected = [position(e.detected_at, e.checkpoint + e.delay) for e in online_events]
    bound_at = [position(b.step, b.checkpoint) for b in boundaries]
    candidates = sorted(
        (abs(e - b), i, j)
        for i, e in enumerate(event_at)
        for j, b in enumerate(bound_at)
        if abs(e - b) <= tolerance
    )
    used_events: set[int] = set()
    used_bounds: set[int] = set()
    pairs: list[dict[str, Any]] = []
    for distance, i, j in candidates:
        if i in used_events or j in used_bounds:
            continue
        used_events.add(i)
        used_bounds.add(j)
        pairs.append(
            {
                "event_step": int(online_events[i].step),
                "boundary_step": int(boundaries[j].step),
                "delay_checkpoints": int(detected[i] - bound_at[j]),
                "location_error_checkpoints": int(distance),
                "same_kind": StageKind(online_events[i].kind) is StageKind(boundaries[j].kind),
            }
        )
    pairs.sort(key=lambda p: p["boundary_step"])
    matched = len(pairs)
    delays = [p["delay_checkpoints"] for p in pairs]
    return {
        "matched": matched,
        "missed": len(boundaries) - matched,
        "false_alarms": len(online_events) - matched,
        "precision": matched / len(online_events) if online_events else None,
        "recall": matched / len(boundaries) if boundaries else None,
        "mean_delay_checkpoints": float(np.mean(delays)) if delays else None,
        "median_delay_checkpoints": float(np.median(delays)) if delays else None,
        "mean_location_error_checkpoints": (
            float(np.mean([p["location_error_checkpoints"] for p in pairs])) if pairs else None
        ),
        "kind_agreement": (float(np.mean([p["same_kind"] for p in pairs])) if pairs else None),
        "pairs": pairs,
    }

