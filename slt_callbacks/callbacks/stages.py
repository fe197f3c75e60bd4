"""StageTransitionMonitor: developmental stages of λ̂, found while the model trains."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from slt_callbacks._checks import check_number, check_optional_int, check_state
from slt_callbacks.core.diagnostics import Status
from slt_callbacks.detect import (
    DetectorConfig,
    StageBoundary,
    StageDetector,
    StageEvent,
    StageKind,
    compare_events,
    retrospective_stages,
)
from slt_callbacks.records import LLCRecord
from slt_callbacks.relations import Relation, align_by_step, format_relations, relate
from slt_callbacks.sinks import AlertLevel, MetricSink

from .llc import LLCMonitor

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["BOUNDARY_COLUMNS", "EVENT_COLUMNS", "KIND_MEANING", "StageTransitionMonitor"]

_STATE_VERSION = 1
_ALERT_LEVELS = ("INFO", "WARN", "ERROR")

EVENT_COLUMNS = [
    "step",
    "detected_at",
    "component",
    "kind",
    "previous_regime",
    "new_regime",
    "llc",
    "loss",
    "stage",
    "delay",
    "message",
]
"""Columns of the ``<prefix>stage_events`` W&B table, one row per online event."""

BOUNDARY_COLUMNS = [
    "component",
    "step",
    "kind",
    "previous_regime",
    "new_regime",
    "llc",
    "loss",
    "slope",
    "stage",
    "matched_event_step",
    "message",
]
"""Columns of the ``<prefix>stage_boundaries`` W&B table, one row per retrospective boundary."""

KIND_MEANING = {
    StageKind.ACQUIRE: (
        "λ̂ rises while the loss falls: the model is acquiring structure, e.g. forming a new "
        "circuit (stage type A of Hoogland et al. 2024). Expect the loss to keep falling."
    ),
    StageKind.SIMPLIFY: (
        "λ̂ falls while the loss stays flat: the model is simplifying, reaching the same loss "
        "with a more degenerate solution (stage type B of Hoogland et al. 2024). The loss "
        "curve alone does not show this."
    ),
    StageKind.TURN: (
        "the trend of λ̂ changed in another way (e.g. its rise levelled off): a stage boundary "
        "whose type the loss does not settle. Look at the loss and λ̂ around this step."
    ),
}
"""What each kind of event means, in the words used in alerts and printed messages."""

# The quantities other monitors record in their `history`, with the key of their standard
# error: None for a value computed exactly (a weight norm has no sampling noise).
_RELATED: tuple[tuple[str, str | None], ...] = (
    ("weight_norm", None),
    ("hessian_trace", "hessian_trace_stderr"),
    ("fisher_trace", "fisher_trace_stderr"),
)

Series = dict[int, tuple[float, float]]
"""``{step: (value, standard error)}``; the error is nan when unknown."""


class StageTransitionMonitor(Callback):
    r"""Detect developmental stages in the λ̂ curve while training, and explain them at the end.

    Hoogland et al. 2024 ("The developmental landscape of in-context learning"; "Loss
    landscape degeneracy and stagewise development in transformers") found that transformers
    learn in stages whose boundaries are critical points of the local learning coefficient λ̂
    against log(step). Wang et al. 2024 ("Differentiation and specialization of attention
    heads via the refined local learning coefficient") see the same in the λ̂ of single heads.
    This callback runs the online :class:`~slt_callbacks.detect.StageDetector` on every
    estimate :class:`~slt_callbacks.LLCMonitor` makes (it receives them through
    ``on_llc_record``): on the global λ̂ and, with ``components``, on each component's λ̂.

    Each event has a kind:

    - **acquire**: λ̂ started rising while the loss falls. The model is acquiring structure:
      new capacity is put to use (in the paper's transformers: bigram statistics, then
      induction heads).
    - **simplify**: λ̂ started falling while the loss stays flat. The model reaches the same
      loss with a simpler, more degenerate solution. Nothing in the loss curve shows this.
    - **turn**: any other change of trend, e.g. a rise that levels off.

    The detector works in log10(step) and weighs every slope by the estimate's noise. λ̂ is
    a Monte Carlo estimate: the standard error of the chain mean, ``llc_std /
    sqrt(num_chains)``, is passed as its noise (the detector also measures the curve's own
    scatter and takes the larger). An estimate whose status is not in ``accept_statuses``
    (by default anything but healthy: diverged chains, or w* not a local minimum, which is
    common mid-training) is not a complexity and never reaches the detector.

    What happens at an event: it is appended to :attr:`events`, added as a row to the W&B
    table ``<prefix>stage_events`` (columns :data:`EVENT_COLUMNS`), sent as a W&B alert
    (throttled: at most one per ``alert_wait_s`` for the global λ̂ and one for all components
    together, so a noisy run cannot flood anyone), printed on rank zero, and passed to
    ``on_event(event)``.

    Metrics (keys with the default ``prefix="slt/"``), logged at every λ̂ estimate through
    every logger at ``trainer.global_step``:

    - ``slt/stage``: the index of the current stage of the global λ̂ (0 until the first
      event, +1 per event);
    - ``slt/stage/<component>``: the same for each monitored component.

    At the end of training (``on_train_end``), :meth:`analyze` runs the retrospective
    analysis of the whole curve (kernel smoothing in log-step, critical points of the smoothed
    curve: :func:`~slt_callbacks.detect.retrospective_stages`), scores the online events
    against it (:func:`~slt_callbacks.detect.compare_events`), and relates λ̂ to the weight
    norm, Hessian and Fisher traces and the loss (:mod:`slt_callbacks.relations`), using the
    ``history`` of the other monitors in the trainer at the steps they share with λ̂. With a
    ``WandbLogger`` the results go to the run summary:

    - ``slt/retrospective/{num_checkpoints, num_events, num_boundaries, boundary_steps,
      boundary_kinds, matched, missed, false_alarms, precision, recall,
      mean_delay_checkpoints, median_delay_checkpoints, kind_agreement}``, and the same under
      ``slt/retrospective/<component>/`` per component;
    - ``slt/relation/llc_vs_<quantity>/{num_points, pearson, spearman, num_moves,
      num_opposite, opposite_steps}`` for ``weight_norm``, ``hessian_trace``, ``fisher_trace``
      and ``loss`` where recorded, and ``slt/relation/<component>/llc_vs_weight_norm/...``
      when the weight-norm monitor has the same component;

    and to the table ``slt/stage_boundaries`` (columns :data:`BOUNDARY_COLUMNS`) and the chart
    ``slt/llc_by_component`` (λ̂ of every component in one multi-line panel; also every
    ``chart_every`` estimates if set). Everything is printed on rank zero as well, and kept
    in :attr:`summary`, :attr:`boundaries`, :attr:`comparisons` and :attr:`relations_found`.
    With other loggers (CSV, TensorBoard) or none, the metrics, events, prints and
    ``on_event`` work the same; the tables, alerts, chart and summary are W&B-only.

    The detector's state (every checkpoint it needs, every event so far) is saved in
    checkpoints, so a resumed run neither forgets earlier events nor repeats them.

    Args:
        config: the detector's thresholds (sensitivity, persistence, cooldown, window...);
            a plain frozen dataclass, so it can come from a LightningCLI YAML. Default
            :class:`~slt_callbacks.detect.DetectorConfig()`.
        components: also detect stages in the λ̂ of components: ``True`` for every component
            the LLC monitor estimates, or a list of their names.
        num_chains: SGLD chains behind each estimate, to turn the chain std into a standard
            error. ``None``: read from the :class:`~slt_callbacks.LLCMonitor` in the trainer
            (if there is none, the chain std itself is used, a conservative noise).
        on_event: called with each :class:`~slt_callbacks.detect.StageEvent`, on every
            process (the events are the same on all of them); guard side effects such as
            notifications with ``trainer.is_global_zero`` yourself.
        alert_level: level of the W&B alerts (``"INFO"``, ``"WARN"``, ``"ERROR"``); ``None``
            sends none.
        alert_wait_s: the minimum number of seconds between two alerts of one throttle key.
        retrospective: run the retrospective analysis at the end of training.
        relations: relate λ̂ to the other monitors' quantities at the end of training.
        relation_sensitivity: how many standard errors a change between consecutive
            checkpoints must exceed to count as a move (see
            :func:`~slt_callbacks.relations.opposite_moves`).
        chart_every: also log the per-component chart every this many estimates (each one is
            a table in W&B, so keep it sparse); ``None``: only at the end.
        accept_statuses: the statuses of an estimate that the detector accepts.
        prefix: start of every key; also makes :attr:`state_key` unique.
        verbose: print events and the end-of-training summary on rank zero.

    Raises:
        ValueError: an argument of the wrong type or value; in ``setup``, a component name
            the LLC monitor does not estimate. (Two monitors with one ``prefix`` share a
            ``state_key``, which the ``Trainer`` itself refuses.)

    Example:
        >>> from slt_callbacks.callbacks import LLCMonitor, WeightNormMonitor
        >>> from slt_callbacks.detect import DetectorConfig
        >>> stages = StageTransitionMonitor(config=DetectorConfig(persistence=4),
        ...                                 components=True, on_event=print)
        >>> heads = {"head0": "layers.0.*"}
        >>> callbacks = [LLCMonitor(components=heads), WeightNormMonitor(), stages]
    """

    def __init__(
        self,
        *,
        config: DetectorConfig | None = None,
        components: bool | Sequence[str] = False,
        num_chains: int | None = None,
        on_event: Callable[[StageEvent], Any] | None = None,
        alert_level: AlertLevel | None = "INFO",
        alert_wait_s: float = 600.0,
        retrospective: bool = True,
        relations: bool = True,
        relation_sensitivity: float = 2.0,
        chart_every: int | None = None,
        accept_statuses: Sequence[str] = ("healthy",),
        prefix: str = "slt/",
        verbose: bool = True,
    ) -> None:
        if config is not None and not isinstance(config, DetectorConfig):
            raise ValueError(
                "Expected argument `config` to be a DetectorConfig or None but got "
                f"{type(config).__name__}."
            )
        self.config = DetectorConfig() if config is None else config
        self.components = _check_components(components)
        self.num_chains = check_optional_int("num_chains", num_chains)
        if on_event is not None and not callable(on_event):
            raise ValueError(
                "Expected argument `on_event` to be None or a callable on_event(event) but got "
                f"{type(on_event).__name__}."
            )
        self.on_event = on_event
        if alert_level is not None and alert_level not in _ALERT_LEVELS:
            raise ValueError(
                f"Expected argument `alert_level` to be one of {_ALERT_LEVELS} or None but got "
                f"{alert_level!r}."
            )
        self.alert_level = alert_level
        self.alert_wait_s = check_number("alert_wait_s", alert_wait_s, strict=True)
        for name, flag in (
            ("retrospective", retrospective),
            ("relations", relations),
            ("verbose", verbose),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"Expected argument `{name}` to be a bool but got {flag!r}.")
        self.retrospective = retrospective
        self.relations = relations
        self.verbose = verbose
        self.relation_sensitivity = check_number(
            "relation_sensitivity", relation_sensitivity, strict=False
        )
        self.chart_every = check_optional_int("chart_every", chart_every)
        self.accept_statuses = _check_statuses(accept_statuses)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(
                f"Expected argument `prefix` to be a non-empty string but got {prefix!r}."
            )
        self.prefix = prefix
        self._sink: MetricSink | None = None
        self._logged_events = 0  # rows of the events table the current sink has
        self._warned_chains = False
        self._found_chains: int | None = None  # num_chains read from the LLCMonitor
        self._reset()

    def _reset(self) -> None:
        self._detectors: dict[str | None, StageDetector] = {}
        self._events: list[StageEvent] = []
        self._records: list[LLCRecord] = []
        self._rejected: dict[str | None, int] = {}
        self._last_step: int | None = None
        #: The flat summary of the latest :meth:`analyze` (the keys written to W&B).
        self.summary: dict[str, Any] = {}
        #: Retrospective boundaries of the latest :meth:`analyze`, by component (None: global).
        self.boundaries: dict[str | None, list[StageBoundary]] = {}
        #: :func:`~slt_callbacks.detect.compare_events` of each series, by component.
        self.comparisons: dict[str | None, dict[str, Any]] = {}
        #: :class:`~slt_callbacks.relations.Relation` objects, by component (None: global).
        self.relations_found: dict[str | None, list[Relation]] = {}

    # -- what users read ------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def events(self) -> list[StageEvent]:
        """Every event so far, in the order they were emitted; ``.component`` is None for
        the global λ̂."""
        return list(self._events)

    @property
    def stage(self) -> int:
        """The current stage of the global λ̂ (0 until its first event)."""
        detector = self._detectors.get(None)
        return 0 if detector is None else detector.stage

    @property
    def stages(self) -> dict[str | None, int]:
        """The current stage of every monitored series (None: the global λ̂)."""
        return {name: detector.stage for name, detector in self._detectors.items()}

    @property
    def records(self) -> list[LLCRecord]:
        """Every record received (healthy or not), one per step."""
        return list(self._records)

    @property
    def num_rejected(self) -> dict[str | None, int]:
        """Estimates kept from the detector because of their status, per series."""
        return dict(self._rejected)

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (``torch.load(weights_only=True)`` reads them)."""
        return {
            "version": _STATE_VERSION,
            "detectors": [[name, det.state_dict()] for name, det in self._detectors.items()],
            "events": [event.to_dict() for event in self._events],
            "records": [record.to_dict() for record in self._records],
            "rejected": [[name, int(count)] for name, count in self._rejected.items()],
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; detection continues exactly where it stopped.

        Raises:
            ValueError: keys are missing or unknown, or the version is not supported.
        """
        check_state(
            "StageTransitionMonitor",
            state_dict,
            {"version", "detectors", "events", "records", "rejected", "last_step"},
            _STATE_VERSION,
        )
        self._reset()
        for name, state in state_dict["detectors"]:
            # The thresholds are this monitor's (a resumed run may change them on purpose).
            detector = StageDetector(self.config, component=name)
            detector.load_state_dict(state)
            self._detectors[name] = detector
        self._events = [StageEvent.from_dict(dict(event)) for event in state_dict["events"]]
        self._records = [LLCRecord.from_dict(dict(record)) for record in state_dict["records"]]
        self._rejected = {name: int(count) for name, count in state_dict["rejected"]}
        self._last_step = state_dict["last_step"]

    # -- Lightning hooks ------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.global_step == 0:
            # A fresh fit. (A resumed one loads its state after setup.)
            self._reset()
        llc_monitors = [cb for cb in trainer.callbacks if isinstance(cb, LLCMonitor)]
        if len(llc_monitors) > 1:
            rank_zero_warn(
                f"StageTransitionMonitor: {len(llc_monitors)} LLCMonitors hand their estimates "
                "to this monitor, which cannot tell them apart; only the first estimate of "
                "each step is used. Run one LLCMonitor per StageTransitionMonitor."
            )
        if isinstance(self.components, list) and llc_monitors:
            known = sorted(llc_monitors[0].components or {})
            missing = [name for name in self.components if name not in known]
            if missing:
                raise ValueError(
                    f"Expected argument `components` to name components of the LLCMonitor "
                    f"({known}) but got unknown {missing}."
                )
        if llc_monitors and trainer.max_steps > 0:
            self._warn_if_sparse(llc_monitors[0].schedule.steps_until(trainer.max_steps),
                                 trainer.max_steps)
        self._sink = MetricSink.from_trainer(trainer)
        self._sink.define_metrics(self.prefix)
        self._logged_events = 0

    def _warn_if_sparse(self, steps: list[int], max_step: int) -> None:
        """The detector fits trends over ``config.window`` estimates: a schedule with fewer
        estimates than that per decade confirms a stage only decades after it began."""
        per_decade = sum(1 for s in steps if s > max_step / 10)
        if max_step >= 100 and per_decade < self.config.window:
            rank_zero_warn(
                f"StageTransitionMonitor: the LLCMonitor's schedule has {per_decade} estimates "
                f"in the last decade of training, but the detector fits trends over "
                f"window={self.config.window} estimates, so a stage would be confirmed about "
                f"{self.config.window / max(per_decade, 1):.1f} decades after it began. Use a "
                "denser schedule, e.g. LLCMonitor(schedule=Schedule(log_per_decade=16)), or a "
                "smaller DetectorConfig(window=...)."
            )

    def on_llc_record(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: LLCRecord
    ) -> None:
        """Feed one estimate to the detectors; log the stages and announce any event.

        Called by :class:`~slt_callbacks.LLCMonitor` after each estimate, on every process.
        A record whose step does not exceed the previous one (replayed after a resume) is
        ignored.
        """
        if self._last_step is not None and record.step <= self._last_step:
            return
        self._last_step = record.step
        self._records.append(record)
        chains = self.num_chains or record.num_chains or self._num_chains(trainer)
        scale = 1.0 / math.sqrt(chains)
        new_events = []
        for name, (llc, llc_std, status) in self._series_of(record).items():
            detector = self._detectors.get(name)
            if detector is None:
                detector = self._detectors[name] = StageDetector(self.config, component=name)
            if status not in self.accept_statuses:
                self._rejected[name] = self._rejected.get(name, 0) + 1
                continue
            event = detector.update(record.step, llc, llc_std * scale, record.loss)
            if event is not None:
                new_events.append(event)
        sink = self._sink_for(trainer)
        sink.log(
            {self._stage_key(name): det.stage for name, det in self._detectors.items()},
            step=record.step,
        )
        for event in new_events:
            self._announce(sink, event, record.step)
        if self.chart_every and len(self._records) % self.chart_every == 0:
            self._log_chart(sink, record.step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._records:
            return
        sink = self._sink_for(trainer)
        step = trainer.global_step
        if self.retrospective or self.relations:
            sink.summary_update(self.analyze(trainer))
            rows = [
                self._boundary_row(name, boundary)
                for name, boundaries in self.boundaries.items()
                for boundary in boundaries
            ]
            if rows:
                sink.log_table(self._key("stage_boundaries"), BOUNDARY_COLUMNS, rows, step=step)
        self._log_chart(sink, step)
        if self.verbose:
            rank_zero_info(self.report())

    # -- the end-of-training analysis -----------------------------------------------------

    def analyze(self, trainer: pl.Trainer | None = None) -> dict[str, Any]:
        """The retrospective analysis and the relations, from everything recorded so far.

        Callable at any time (e.g. from a notebook mid-run); ``on_train_end`` calls it and
        publishes the result.

        Args:
            trainer: where to find the other monitors' ``history`` for the relations; without
                it only λ̂ and the loss are related.

        Returns:
            The flat summary (also kept in :attr:`summary`): the ``<prefix>retrospective/...``
            and ``<prefix>relation/...`` keys documented on the class, plain Python values.
        """
        self.boundaries, self.comparisons, self.relations_found = {}, {}, {}
        summary: dict[str, Any] = {}
        histories = _histories(trainer, self.prefix) if trainer is not None else []
        for name in self._detectors:
            series = self._accepted(name)
            if self.retrospective:
                summary.update(self._retrospective(name, series))
            if self.relations:
                summary.update(self._relations(name, series, histories))
        self.summary = summary
        return summary

    def _retrospective(self, name: str | None, series: Series) -> dict[str, Any]:
        steps = sorted(series)
        base = self._key("retrospective/" if name is None else f"retrospective/{name}/")
        events = [event for event in self._events if event.component == name]
        out: dict[str, Any] = {
            f"{base}num_checkpoints": len(steps),
            f"{base}num_events": len(events),
        }
        losses = self._losses()
        try:
            boundaries = retrospective_stages(
                steps,
                [series[s][0] for s in steps],
                [losses.get(s) for s in steps],
                llc_stds=[series[s][1] for s in steps],
                config=self.config,
                component=name,
            )
        except ValueError:
            return out  # too few healthy checkpoints for a smoothed curve: nothing to say
        comparison = compare_events(events, boundaries, steps=steps)
        self.boundaries[name], self.comparisons[name] = boundaries, comparison
        out[f"{base}num_boundaries"] = len(boundaries)
        out[f"{base}boundary_steps"] = [b.step for b in boundaries]
        out[f"{base}boundary_kinds"] = [StageKind(b.kind).value for b in boundaries]
        for key in (
            "matched",
            "missed",
            "false_alarms",
            "precision",
            "recall",
            "mean_delay_checkpoints",
            "median_delay_checkpoints",
            "kind_agreement",
        ):
            out[f"{base}{key}"] = comparison[key]
        return out

    def _relations(
        self, name: str | None, llc: Series, histories: list[list[dict[str, Any]]]
    ) -> dict[str, Any]:
        others: dict[str, Series] = {}
        suffix = "" if name is None else f"/{name}"
        for quantity, error_key in _RELATED:
            found = _history_series(histories, quantity + suffix, error_key and error_key + suffix)
            if found:
                others[quantity] = found
        if name is None:
            losses = self._losses()
            others["loss"] = {s: (v, math.nan) for s, v in losses.items() if v is not None}
        base = self._key("relation/" if name is None else f"relation/{name}/")
        found_relations, out = [], {}
        for quantity, other in others.items():
            steps, (a, b) = align_by_step(llc, other)
            if steps.size == 0:
                # No shared checkpoint (other schedules, or no healthy λ̂): say so, with 0.
                relation = Relation("llc", quantity, 0, math.nan, math.nan)
                found_relations.append(relation)
                out.update({f"{base}{relation.name}/{k}": v for k, v in relation.to_dict().items()})
                continue
            # A weight norm is computed exactly (noise 0); the loss has no error of its own,
            # so its noise is read from its scatter (None).
            y_noise = None if quantity == "loss" else b[:, 1]
            relation = relate(
                steps,
                a[:, 0],
                b[:, 0],
                x_name="llc",
                y_name=quantity,
                x_noise=a[:, 1],
                y_noise=y_noise,
                sensitivity=self.relation_sensitivity,
            )
            found_relations.append(relation)
            out.update({f"{base}{relation.name}/{k}": v for k, v in relation.to_dict().items()})
        if found_relations:
            self.relations_found[name] = found_relations
        return out

    def report(self) -> str:
        """The events, the retrospective comparison and the relations, as printable text."""
        lines = [f"StageTransitionMonitor: {len(self._events)} stage events"]
        lines += [f"  {event.message}" for event in self._events]
        for name, comparison in self.comparisons.items():
            boundaries = self.boundaries.get(name, [])
            label = _label(name)
            steps = ", ".join(f"{b.step} ({StageKind(b.kind).value})" for b in boundaries)
            lines.append(
                f"Retrospective {label}: {len(boundaries)} boundaries"
                + (f" at steps {steps}" if steps else "")
                + f"; online events matched {comparison['matched']}, missed "
                f"{comparison['missed']}, false alarms {comparison['false_alarms']}"
                + (
                    f", median delay {comparison['median_delay_checkpoints']:g} checkpoints"
                    if comparison["median_delay_checkpoints"] is not None
                    else ""
                )
            )
        rejected = {name: n for name, n in self._rejected.items() if n}
        if rejected:
            parts = ", ".join(f"{_label(name)}: {n}" for name, n in rejected.items())
            lines.append(f"Estimates kept from the detector for their status: {parts}")
        for name, relations in self.relations_found.items():
            lines.append(f"How {_label(name)} related to the other quantities over the run:")
            lines.append(format_relations(relations))
            lines += [f"  {relation.message}" for relation in relations]
        return "\n".join(lines)

    # -- helpers --------------------------------------------------------------------------

    def _series_of(self, record: LLCRecord) -> dict[str | None, tuple[float, float, str]]:
        """The (llc, std, status) of every monitored series in ``record``."""
        out: dict[str | None, tuple[float, float, str]] = {
            None: (record.llc, record.llc_std, record.status)
        }
        if self.components is True:
            out.update(record.components)
        elif isinstance(self.components, list):
            missing = [name for name in self.components if name not in record.components]
            if missing:
                raise ValueError(
                    f"StageTransitionMonitor: expected argument `components` to name components "
                    f"of the LLC estimates ({sorted(record.components)}) but got unknown "
                    f"{missing} (at step {record.step})."
                )
            out.update({name: record.components[name] for name in self.components})
        return out

    def _accepted(self, name: str | None) -> Series:
        """``{step: (llc, standard error)}`` of the estimates the detector of ``name`` got."""
        scale = 1.0 / math.sqrt(self.num_chains or self._found_chains or 1)
        out: Series = {}
        for record in self._records:
            value = self._series_of(record).get(name)
            if value is None or value[2] not in self.accept_statuses:
                continue
            llc, std = float(value[0]), float(value[1])
            if math.isfinite(llc):
                out[record.step] = (llc, std * scale if math.isfinite(std) else math.nan)
        return out

    def _losses(self) -> dict[int, float | None]:
        return {record.step: record.loss for record in self._records}

    def _num_chains(self, trainer: pl.Trainer) -> int:
        if self.num_chains is not None:
            return self.num_chains
        for cb in trainer.callbacks:
            if isinstance(cb, LLCMonitor) and cb.active_config is not None:
                self._found_chains = cb.active_config.num_chains
                return self._found_chains
        if not self._warned_chains:
            self._warned_chains = True
            rank_zero_warn(
                "StageTransitionMonitor: no LLCMonitor in the trainer tells how many chains "
                "each estimate has, so the chain std itself is taken as the noise of λ̂ (a "
                "conservative choice: fewer, later events). Pass `num_chains=`."
            )
        return 1

    def _announce(self, sink: MetricSink, event: StageEvent, step: int) -> None:
        self._events.append(event)
        # The table is re-logged whole (a W&B table is an immutable snapshot); after a resume
        # the new sink starts empty, so the rows of earlier events go in again.
        rows = [_event_row(e) for e in self._events[self._logged_events :]]
        self._logged_events = len(self._events)
        sink.log_table(self._key("stage_events"), EVENT_COLUMNS, rows, step=step)
        if self.alert_level is not None:
            scope = "llc" if event.component is None else "components"
            sink.alert(
                f"Stage transition ({self._key(scope)})",
                f"{event.message}\n{StageKind(event.kind).value}: "
                f"{KIND_MEANING[StageKind(event.kind)]}\nAll events: the "
                f"{self._key('stage_events')} table.",
                level=self.alert_level,
                wait_duration_s=self.alert_wait_s,
            )
        if self.verbose:
            rank_zero_info(f"StageTransitionMonitor: {event.message}")
        if self.on_event is not None:
            self.on_event(event)

    def _log_chart(self, sink: MetricSink, step: int) -> None:
        """λ̂ of every component in one multi-line W&B chart."""
        names: list[str] = []
        for record in self._records:
            names += [name for name in record.components if name not in names]
        if not names:
            return
        records = [record for record in self._records if record.components]
        lines = {
            name: [
                _accepted_value(record.components.get(name), self.accept_statuses)
                for record in records
            ]
            for name in names
        }
        sink.log_line_series(
            self._key("llc_by_component"),
            [record.step for record in records],
            lines,
            title="λ̂ per component",
            step=step,
        )

    def _sink_for(self, trainer: pl.Trainer) -> MetricSink:
        if self._sink is None:  # a hook called without `setup` (e.g. by hand)
            self._sink = MetricSink.from_trainer(trainer)
            self._sink.define_metrics(self.prefix)
        return self._sink

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _stage_key(self, name: str | None) -> str:
        return self._key("stage" if name is None else f"stage/{name}")

    def _boundary_row(self, name: str | None, boundary: StageBoundary) -> list[Any]:
        pairs = self.comparisons.get(name, {}).get("pairs", [])
        matched = next(
            (p["event_step"] for p in pairs if p["boundary_step"] == boundary.step), None
        )
        values = boundary.to_dict()
        values["component"] = name
        values["matched_event_step"] = matched
        return [values[column] for column in BOUNDARY_COLUMNS]


# ----------------------------------------------------------------------------------------
# Module helpers.


def _event_row(event: StageEvent) -> list[Any]:
    values = event.to_dict()
    return [values[column] for column in EVENT_COLUMNS]


def _label(name: str | None) -> str:
    return "λ̂" if name is None else f"λ̂[{name}]"


def _accepted_value(
    value: tuple[float, float, str] | None, accept: tuple[str, ...]
) -> float | None:
    """The λ̂ of a component for a chart, or None where it is missing or not trusted."""
    if value is None or value[2] not in accept or not math.isfinite(value[0]):
        return None
    return float(value[0])


def _histories(trainer: pl.Trainer, prefix: str) -> list[list[dict[str, Any]]]:
    """The ``history`` of every other monitor in the trainer, those with our prefix first."""
    found = [
        cb
        for cb in trainer.callbacks
        if not isinstance(cb, (LLCMonitor, StageTransitionMonitor))
        and isinstance(getattr(cb, "history", None), list)
    ]
    found.sort(key=lambda cb: getattr(cb, "prefix", None) != prefix)
    return [cb.history for cb in found]


def _history_series(
    histories: list[list[dict[str, Any]]], key: str, error_key: str | None
) -> Series:
    """``{step: (value, stderr)}`` of ``key`` from the first history that has it; the error
    is 0 when ``error_key`` is None (an exactly computed value)."""
    for history in histories:
        entries = [e for e in history if isinstance(e, Mapping) and key in e and "step" in e]
        if not entries:
            continue
        out: Series = {}
        for entry in entries:
            value = _as_float(entry[key])
            error = 0.0 if error_key is None else _as_float(entry.get(error_key))
            if math.isfinite(value):
                out[int(entry["step"])] = (value, error)
        return out
    return {}


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _check_components(components: Any) -> bool | list[str]:
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


def _check_statuses(statuses: Any) -> tuple[str, ...]:
    known = [status.value for status in Status]
    if isinstance(statuses, str) or not isinstance(statuses, Sequence) or not statuses:
        raise ValueError(
            "Expected argument `accept_statuses` to be a non-empty list of statuses from "
            f"{known} but got {statuses!r}."
        )
    values = [Status(s).value if isinstance(s, Status) else s for s in statuses]
    unknown = [s for s in values if s not in known]
    if unknown:
        raise ValueError(
            f"Expected argument `accept_statuses` to hold statuses from {known} but got "
            f"unknown {unknown}."
        )
    return tuple(values)
