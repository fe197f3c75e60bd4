"""StageTracker: the stage detectors of one training run, fed typed LLC records.

The framework-free core of :class:`~slt_callbacks.StageTransitionMonitor` (which only hands
records over and publishes what comes back). One :class:`~.online.StageDetector` per series:
the global λ̂ and, if asked, each component's λ̂.

What reaches a detector: every estimate that is not diverged. Estimates at saddles
(``not_a_minimum``, λ̂ hugely negative) are the signal of development: the jump of λ̂ when a
mode is learned is the transition. They are counted in :attr:`StageTracker.num_saddle` and
are never related to other quantities as complexities (:meth:`StageTracker.analyze` relates
healthy estimates only). Diverged estimates are not λ̂ at all; they are kept out and counted
in :attr:`StageTracker.num_rejected`.

The noise of each estimate is its standard error,
:func:`~.noise.standard_error`\\ ``(record.llc_std, record.num_chains)``, in the detector, the
retrospective analysis and the relations alike.

Order: records are processed in step order. Each record waits in a buffer sorted by step; the
buffer releases its earliest records while it holds more than ``reorder_window`` (0 by
default: every record is processed on arrival), and :meth:`StageTracker.flush` releases
the rest (at the end of training). So estimates that finish out of order (background
estimation with ``k`` workers) are put back in order with ``reorder_window = k − 1``. A
record whose step is not after the last processed one (a replay after a resume, or later than
the window allowed) is ignored and counted in :attr:`StageTracker.num_late`.

Samplers: a record's ``sampler`` names the settings behind its λ̂ (step size, nβ,
localization, chain length). Where it changes between two records (``config="auto"``
freezing its calibration, or a new config on resume), λ̂ moves by the change of SGLD's bias
as well as by development: the steps are listed in :attr:`StageTracker.sampler_changes`,
and an event whose change point lies within ``persistence`` checkpoints of one says so in
its message. Such events are not suppressed: ``config="auto"`` freezes at the first healthy
estimate, which comes right after a transition to a minimum (the quickstart's last loss
drop), so a detector that restarted there would miss that transition. Records without a
sampler (None) never change it.

Plain numpy; the state is plain Python values.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .._checks import check_int, check_optional_int, check_state
from ..records import LLCRecord
from .noise import standard_error
from .online import DetectorConfig, StageDetector, StageEvent, StageKind
from .relations import Relation, align_by_step, format_relations, relate
from .retrospective import StageBoundary, retrospective_stages
from .scoring import compare_events

__all__ = ["REJECTED_STATUSES", "Series", "StageTracker"]

REJECTED_STATUSES = ("diverged", "all_diverged")
"""Statuses whose estimates never reach a detector: diverged chains do not estimate λ̂."""

Series = dict[int, tuple[float, float]]
"""``{step: (value, standard error)}``; the error is nan when unknown."""

_STATE_VERSION = 1
_SUMMARY_KEYS = (
    "matched",
    "missed",
    "false_alarms",
    "precision",
    "recall",
    "mean_delay_checkpoints",
    "median_delay_checkpoints",
    "kind_agreement",
)


class StageTracker:
    """Stage detectors over the λ̂ records of one run.

    Args:
        config: the detectors' thresholds.
        components: also track components: ``True`` for every component in the records, or
            a list of names (a record without one of them raises ``ValueError``).
        num_chains: chains behind each estimate, for records that do not say
            (``record.num_chains`` wins); ``None``: the chain std itself is the noise.
        reorder_window: how many records may wait to be put in step order (see above).

    Example:
        >>> from slt_callbacks.records import LLCRecord
        >>> tracker = StageTracker()
        >>> for step, llc, loss in [(s, -600.0 if s < 300 else 12.0, 1.0 if s < 300 else 0.2)
        ...                         for s in range(10, 500, 20)]:
        ...     events = tracker.add(LLCRecord(step, llc, 0.0, "healthy", loss=loss))
        >>> [(e.step, e.kind.value) for e in tracker.events]
        [(310, 'acquire')]
    """

    def __init__(
        self,
        config: DetectorConfig | None = None,
        *,
        components: bool | Sequence[str] = False,
        num_chains: int | None = None,
        reorder_window: int = 0,
    ) -> None:
        if config is not None and not isinstance(config, DetectorConfig):
            raise ValueError(
                "Expected argument `config` to be a DetectorConfig or None but got "
                f"{type(config).__name__}."
            )
        self.config = DetectorConfig() if config is None else config
        self.components = check_components(components)
        self.num_chains = check_optional_int("num_chains", num_chains)
        self.reorder_window = check_int("reorder_window", reorder_window, minimum=0)
        self._reset()

    def reset(self) -> None:
        """Forget everything (a fresh run)."""
        self._reset()

    def _reset(self) -> None:
        self._detectors: dict[str | None, StageDetector] = {}
        self._events: list[StageEvent] = []
        self._records: list[LLCRecord] = []
        self._pending: list[LLCRecord] = []
        self._rejected: dict[str | None, int] = {}
        self._saddle: dict[str | None, int] = {}
        self.num_late = 0
        """Records ignored because their step was not after the last processed one."""

    # -- what users read ----------------------------------------------------------------

    @property
    def events(self) -> list[StageEvent]:
        """Every event so far, in the order emitted (``component`` None: the global λ̂)."""
        return list(self._events)

    @property
    def stages(self) -> dict[str | None, int]:
        """The current stage of every tracked series (None: the global λ̂)."""
        return {name: detector.stage for name, detector in self._detectors.items()}

    @property
    def sampler_changes(self) -> list[int]:
        """Steps of the first record after each change of ``record.sampler``: λ̂ before and
        after is on different scales (events near one say so)."""
        changes, previous = [], None
        for record in self._records:
            if record.sampler is None:
                continue
            if previous is not None and record.sampler != previous:
                changes.append(record.step)
            previous = record.sampler
        return changes

    @property
    def records(self) -> list[LLCRecord]:
        """Every record processed, in step order."""
        return list(self._records)

    @property
    def num_rejected(self) -> dict[str | None, int]:
        """Diverged estimates kept from the detector, per series."""
        return dict(self._rejected)

    @property
    def num_saddle(self) -> dict[str | None, int]:
        """Estimates fed to the detector that are not complexities (status not healthy,
        e.g. ``not_a_minimum`` at a saddle), per series."""
        return dict(self._saddle)

    # -- feeding ------------------------------------------------------------------------

    def add(self, record: LLCRecord) -> list[StageEvent]:
        """Buffer one record and process those the reorder window releases.

        Returns:
            The events the released records completed, in order.

        Raises:
            ValueError: ``record`` is not an :class:`LLCRecord`, or lacks a component this
                tracker was told to follow.
        """
        if not isinstance(record, LLCRecord):
            raise ValueError(
                f"Expected argument `record` to be an LLCRecord but got {type(record).__name__}."
            )
        steps = [r.step for r in self._pending]
        self._pending.insert(bisect.bisect_right(steps, record.step), record)
        events: list[StageEvent] = []
        while len(self._pending) > self.reorder_window:
            events += self._process(self._pending.pop(0))
        return events

    def flush(self) -> list[StageEvent]:
        """Process every buffered record (end of training)."""
        events: list[StageEvent] = []
        while self._pending:
            events += self._process(self._pending.pop(0))
        return events

    def _process(self, record: LLCRecord) -> list[StageEvent]:
        if self._records and record.step <= self._records[-1].step:
            self.num_late += 1
            return []
        self._records.append(record)
        chains = record.num_chains or self.num_chains
        events = []
        for name, (llc, llc_std, status) in self._series_of(record).items():
            detector = self._detectors.get(name)
            if detector is None:
                detector = self._detectors[name] = StageDetector(self.config, component=name)
            if status in REJECTED_STATUSES:
                self._rejected[name] = self._rejected.get(name, 0) + 1
                continue
            if status != "healthy":
                self._saddle[name] = self._saddle.get(name, 0) + 1
            event = detector.update(record.step, llc, standard_error(llc_std, chains), record.loss)
            if event is not None:
                events.append(self._flagged(event))
        self._events += events
        return events

    def _flagged(self, event: StageEvent) -> StageEvent:
        """``event``, its message saying so if its change point lies within ``persistence``
        checkpoints of a change of the sampler."""
        steps = [r.step for r in self._records]
        at = bisect.bisect_left(steps, event.step)
        for change in self.sampler_changes:
            if abs(bisect.bisect_left(steps, change) - at) <= self.config.persistence:
                return replace(event, message=(
                    f"{event.message} (the LLC sampler changed at step {change}: part of "
                    "this change may be the sampler's, not the model's)"))
        return event

    def _series_of(self, record: LLCRecord) -> dict[str | None, tuple[float, float, str]]:
        out: dict[str | None, tuple[float, float, str]] = {
            None: (record.llc, record.llc_std, record.status)
        }
        if self.components is True:
            out.update(record.components)
        elif isinstance(self.components, list):
            missing = [name for name in self.components if name not in record.components]
            if missing:
                raise ValueError(
                    f"Expected argument `components` to name components of the LLC estimates "
                    f"({sorted(record.components)}) but got unknown {missing} (at step "
                    f"{record.step})."
                )
            out.update({name: record.components[name] for name in self.components})
        return out

    def series(self, name: str | None = None, *, healthy_only: bool = False) -> Series:
        """``{step: (λ̂, standard error)}`` of one series: what its detector was fed, or with
        ``healthy_only`` the estimates that are complexities."""
        out: Series = {}
        for record in self._records:
            value = self._series_of(record).get(name)
            if value is None or value[2] in REJECTED_STATUSES:
                continue
            if healthy_only and value[2] != "healthy":
                continue
            llc = float(value[0])
            if math.isfinite(llc):
                out[record.step] = (llc, standard_error(value[1], record.num_chains
                                                        or self.num_chains))
        return out

    # -- the end-of-run analysis --------------------------------------------------------

    def analyze(
        self,
        related: Mapping[str | None, Mapping[str, Series]] | None = None,
        *,
        retrospective: bool = True,
        relations: bool = True,
        relation_sensitivity: float = 2.0,
    ) -> tuple[dict[str, Any], dict[str | None, list[StageBoundary]],
               dict[str | None, dict[str, Any]], dict[str | None, list[Relation]]]:
        """The retrospective stages of every series, scored against the online events, and
        the relations of healthy λ̂ to ``related[name]`` (e.g. ``{"weight_norm": series}``)
        and to the loss.

        Returns:
            ``(summary, boundaries, comparisons, relations)``: the flat summary with keys
            ``retrospective/[<component>/]...`` and ``relation/[<component>/]llc_vs_...``
            (no prefix), and per series the boundaries, :func:`compare_events` and
            :class:`Relation` objects.
        """
        summary: dict[str, Any] = {}
        boundaries: dict[str | None, list[StageBoundary]] = {}
        comparisons: dict[str | None, dict[str, Any]] = {}
        found: dict[str | None, list[Relation]] = {}
        for name in self._detectors:
            if retrospective:
                summary.update(self._retrospective(name, boundaries, comparisons))
            if relations:
                others = dict((related or {}).get(name, {}))
                if name is None:
                    others["loss"] = {
                        r.step: (float(r.loss), math.nan) for r in self._records
                        if r.loss is not None and math.isfinite(r.loss)
                    }
                summary.update(self._relations(name, others, relation_sensitivity, found))
        return summary, boundaries, comparisons, found

    def _retrospective(self, name, boundaries, comparisons) -> dict[str, Any]:
        series = self.series(name)
        steps = sorted(series)
        base = "retrospective/" if name is None else f"retrospective/{name}/"
        events = [event for event in self._events if event.component == name]
        out: dict[str, Any] = {f"{base}num_checkpoints": len(steps),
                               f"{base}num_events": len(events)}
        losses = {r.step: r.loss for r in self._records}
        try:
            found = retrospective_stages(
                steps,
                [series[s][0] for s in steps],
                [losses.get(s) for s in steps],
                stderrs=[series[s][1] for s in steps],
                scale=self.config.scale,
                config=self.config,
                component=name,
            )
        except ValueError:
            return out  # too few checkpoints for a smoothed curve: nothing to say
        comparison = compare_events(events, found, steps=steps)
        boundaries[name], comparisons[name] = found, comparison
        out[f"{base}num_boundaries"] = len(found)
        out[f"{base}boundary_steps"] = [b.step for b in found]
        out[f"{base}boundary_kinds"] = [StageKind(b.kind).value for b in found]
        out.update({f"{base}{key}": comparison[key] for key in _SUMMARY_KEYS})
        return out

    def _relations(self, name, others, sensitivity, found) -> dict[str, Any]:
        llc = self.series(name, healthy_only=True)
        base = "relation/" if name is None else f"relation/{name}/"
        relations, out = [], {}
        for quantity, other in others.items():
            steps, (a, b) = align_by_step(llc, other)
            if steps.size == 0:
                relation = Relation("llc", quantity, 0, math.nan, math.nan)
            else:
                # The loss has no error of its own: its noise is read from its scatter.
                y_noise = None if quantity == "loss" else b[:, 1]
                relation = relate(steps, a[:, 0], b[:, 0], x_name="llc", y_name=quantity,
                                  x_noise=a[:, 1], y_noise=y_noise, sensitivity=sensitivity)
            relations.append(relation)
            out.update({f"{base}{relation.name}/{k}": v for k, v in relation.to_dict().items()})
        if relations:
            found[name] = relations
        return out

    def report(self, comparisons, boundaries, relations) -> str:
        """The events, the retrospective comparison and the relations, as printable text."""
        lines = [f"{len(self._events)} stage events"]
        lines += [f"  {event.message}" for event in self._events]
        for name, comparison in comparisons.items():
            found = boundaries.get(name, [])
            at = ", ".join(f"{b.step} ({StageKind(b.kind).value})" for b in found)
            median = comparison["median_delay_checkpoints"]
            lines.append(
                f"Retrospective {label(name)}: {len(found)} boundaries"
                + (f" at steps {at}" if at else "")
                + f"; online events matched {comparison['matched']}, missed "
                f"{comparison['missed']}, false alarms {comparison['false_alarms']}"
                + (f", median delay {median:g} checkpoints" if median is not None else "")
            )
        for what, counts in (("diverged, kept from the detector", self._rejected),
                             ("not at a minimum (not complexities)", self._saddle)):
            parts = ", ".join(f"{label(name)}: {n}" for name, n in counts.items() if n)
            if parts:
                lines.append(f"Estimates {what}: {parts}")
        for name, found in relations.items():
            lines.append(f"How {label(name)} related to the other quantities over the run:")
            lines.append(format_relations(found))
            lines += [f"  {relation.message}" for relation in found]
        return "\n".join(lines)

    # -- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (``torch.load(weights_only=True)`` reads them)."""
        return {
            "version": _STATE_VERSION,
            "detectors": [[name, det.state_dict()] for name, det in self._detectors.items()],
            "events": [event.to_dict() for event in self._events],
            "records": [record.to_dict() for record in self._records],
            "pending": [record.to_dict() for record in self._pending],
            "rejected": [[name, int(n)] for name, n in self._rejected.items()],
            "saddle": [[name, int(n)] for name, n in self._saddle.items()],
            "num_late": int(self.num_late),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (thresholds stay this tracker's own).

        Raises:
            ValueError: keys are missing or unknown, or the version is not supported.
        """
        check_state("StageTracker", state, set(self.state_dict()), _STATE_VERSION)
        self._reset()
        for name, detector_state in state["detectors"]:
            detector = StageDetector(self.config, component=name)
            detector.load_state_dict(detector_state)
            self._detectors[name] = detector
        self._events = [StageEvent.from_dict(dict(e)) for e in state["events"]]
        self._records = [LLCRecord.from_dict(dict(r)) for r in state["records"]]
        self._pending = [LLCRecord.from_dict(dict(r)) for r in state["pending"]]
        self._rejected = {name: int(n) for name, n in state["rejected"]}
        self._saddle = {name: int(n) for name, n in state["saddle"]}
        self.num_late = int(state["num_late"])


def label(name: str | None) -> str:
    """``λ̂`` for the global series, ``λ̂[name]`` for a component."""
    return "λ̂" if name is None else f"λ̂[{name}]"


def check_components(components: Any) -> bool | list[str]:
    """``components`` as ``True``/``False`` or a non-empty list of names."""
    if isinstance(components, bool):
        return components
    if isinstance(components, str) or not isinstance(components, Sequence):
        raise ValueError(
            "Expected argument `components` to be a bool or a list of component names but got "
            f"{components!r}."
        )
    names = list(components)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            "Expected argument `components` to be a non-empty list of non-empty names but got "
            f"{components!r}."
        )
    return names


def finite_or_none(value: Any) -> float | None:
    """A finite float, else None (for charts that skip missing points)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None
