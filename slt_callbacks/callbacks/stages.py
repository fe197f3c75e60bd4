"""StageTransitionMonitor: developmental stages of λ̂, found while the model trains.

A thin adapter: records arrive through the ``on_llc_record`` hook that
:class:`~slt_callbacks.LLCMonitor` calls; :class:`~slt_callbacks.analysis.StageTracker`
(framework-free) finds the stages; :mod:`._stage_views` and :mod:`slt_callbacks.wandb_views`
present them. At the end of training, :func:`related_histories` is the one reader of other
monitors: their public, documented ``history`` lists, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from slt_callbacks._checks import check_number, check_optional_int, check_state
from slt_callbacks.analysis.online import DetectorConfig, StageEvent
from slt_callbacks.analysis.tracker import Series, StageTracker
from slt_callbacks.records import LLCRecord
from slt_callbacks.sinks import AlertLevel, MetricSink
from slt_callbacks.wandb_views import (
    BOUNDARY_COLUMNS,
    EVENT_COLUMNS,
    KIND_MEANING,
    log_boundaries,
    log_component_chart,
)

from ._stage_views import estimate_metrics, publish_events
from .llc import LLCMonitor

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["BOUNDARY_COLUMNS", "EVENT_COLUMNS", "KIND_MEANING", "StageTransitionMonitor"]

_STATE_VERSION = 2
# What other monitors keep in their public `history`, with the key of its standard error
# (None: computed exactly, as a weight norm is).
_RELATED = (("weight_norm", None), ("hessian_trace", "hessian_trace_stderr"),
            ("fisher_trace", "fisher_trace_stderr"))


class StageTransitionMonitor(Callback):
    """Detect developmental stages in the λ̂ curve while training; explain them at the end.

    Every estimate of :class:`~slt_callbacks.LLCMonitor` that is not diverged (at saddles
    too: their jumps are the transitions) goes to :class:`~slt_callbacks.analysis.StageTracker`
    (see :mod:`slt_callbacks.analysis.online` for the test). Each event is printed on rank
    zero, passed to ``on_event``, added to the W&B table ``<prefix>stage_events`` and sent as
    one W&B alert (at most one per ``alert_wait_s`` for the global λ̂ and one for the
    components). Logged at each estimate through every logger (CSV, TensorBoard, W&B):
    ``<prefix>stage`` (and ``stage/<component>``), ``<prefix>num_stage_events``,
    ``<prefix>num_sampler_changes`` (how often the estimates' sampler changed, e.g. when
    ``config="auto"`` froze its calibration; an event near a change says so),
    ``<prefix>stage_signal`` (the signed-log λ̂ the detector sees) and
    ``<prefix>llc_is_complexity`` (0 where λ̂ is no complexity, e.g. at a saddle). At the end
    of training the retrospective stages, their comparison with the events and the relations
    of healthy λ̂ to the other monitors' ``history`` (weight norm, Hessian and Fisher traces)
    and the loss go to the W&B summary, the table ``<prefix>stage_boundaries`` and the log.

    Args:
        config: the detector's thresholds (:class:`~slt_callbacks.DetectorConfig`).
        components: also track components: ``True`` for all, or a list of names.
        num_chains: chains per estimate for records that do not say (LLCMonitor's do).
        on_event: called with each :class:`~slt_callbacks.StageEvent` on every process.
        alert_level: ``"INFO"``, ``"WARN"``, ``"ERROR"``, or None for no alerts.
        alert_wait_s: minimum seconds between two alerts of one scope.
        retrospective, relations: run these analyses at the end of training;
            relation_sensitivity: standard errors a change must exceed to count as a move.
        chart_every: also log the per-component chart every this many estimates.
        reorder_window: records that may wait to be put in step order (``k`` workers: k − 1).
        prefix: start of every key (and of :attr:`state_key`); verbose: print on rank zero.
    """

    def __init__(
        self, *, config: DetectorConfig | None = None, components: bool | list[str] = False,
        num_chains: int | None = None, on_event: Callable[[StageEvent], Any] | None = None,
        alert_level: AlertLevel | None = "INFO", alert_wait_s: float = 600.0,
        retrospective: bool = True, relations: bool = True, relation_sensitivity: float = 2.0,
        chart_every: int | None = None, reorder_window: int = 0, prefix: str = "slt/",
        verbose: bool = True,
    ) -> None:
        self.tracker = StageTracker(config, components=components, num_chains=num_chains,
                                    reorder_window=reorder_window)
        self.config, self.components = self.tracker.config, self.tracker.components
        _check_arguments(on_event, alert_level, prefix, retrospective=retrospective,
                         relations=relations, verbose=verbose)
        self.on_event, self.alert_level, self.verbose = on_event, alert_level, verbose
        self.alert_wait_s = check_number("alert_wait_s", alert_wait_s, strict=True)
        self.retrospective, self.relations, self.prefix = retrospective, relations, prefix
        self.relation_sensitivity = check_number("relation_sensitivity", relation_sensitivity)
        self.chart_every = check_optional_int("chart_every", chart_every)
        self._sink: MetricSink | None = None
        self._logged = 0  # events in the current sink's table
        self.summary, self.boundaries, self.comparisons, self.relations_found = {}, {}, {}, {}

    events = property(lambda self: self.tracker.events, doc="Every event so far, in order.")
    stages = property(lambda self: self.tracker.stages, doc="Current stage of every series.")
    records = property(lambda self: self.tracker.records, doc="Every record processed.")
    num_rejected = property(lambda self: self.tracker.num_rejected, doc="Diverged, per series.")
    stage = property(lambda self: self.tracker.stages.get(None, 0), doc="Global λ̂'s stage.")

    state_key = property(lambda self: self._generate_state_key(prefix=self.prefix))

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state("StageTransitionMonitor", state_dict, {"version", "tracker"}, _STATE_VERSION)
        self.tracker.load_state_dict(state_dict["tracker"])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.global_step == 0:  # a fresh fit (a resumed one loads its state later)
            self.tracker.reset()
        _check_producers(trainer, self.components)
        self._sink = None  # a new sink (and table count) for this fit
        self._sink_for(trainer)

    def on_llc_record(self, trainer: pl.Trainer, pl_module: Any, record: LLCRecord) -> None:
        """Feed one estimate (called by LLCMonitor, on every process); publish the result."""
        changes = len(self.tracker.sampler_changes)
        events, sink, step = self.tracker.add(record), self._sink_for(trainer), record.step
        if self.verbose and len(self.tracker.sampler_changes) > changes:
            rank_zero_info(f"StageTransitionMonitor: step {self.tracker.sampler_changes[-1]}: "
                           "the LLC sampler changed; λ̂ before and after is not comparable.")
        sink.log(estimate_metrics(self.prefix, self.tracker), step=step)
        self._publish(sink, events, step)
        num_records = len(self.tracker.records)
        if self.chart_every and num_records and num_records % self.chart_every == 0:
            log_component_chart(sink, self.prefix, self.tracker.records, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sink, step = self._sink_for(trainer), trainer.global_step
        self._publish(sink, self.tracker.flush(), step)
        if not self.tracker.records:
            return
        if self.retrospective or self.relations:
            sink.summary_update(self.analyze(trainer))
            log_boundaries(sink, self.prefix, self.boundaries, self.comparisons, step)
        log_component_chart(sink, self.prefix, self.tracker.records, step)
        if self.verbose:
            rank_zero_info(f"StageTransitionMonitor: {self.report()}")

    def analyze(self, trainer: pl.Trainer | None = None) -> dict[str, Any]:
        """The retrospective analysis and the relations of everything recorded so far; the
        flat summary (``<prefix>retrospective/...``, ``<prefix>relation/...``)."""
        related = related_histories(trainer, self.prefix, self.tracker.stages) if trainer else None
        summary, self.boundaries, self.comparisons, self.relations_found = self.tracker.analyze(
            related, retrospective=self.retrospective, relations=self.relations,
            relation_sensitivity=self.relation_sensitivity)
        self.summary = {f"{self.prefix}{key}": value for key, value in summary.items()}
        return self.summary

    def report(self) -> str:  # the events, the retrospective comparison and the relations
        return self.tracker.report(self.comparisons, self.boundaries, self.relations_found)

    def _publish(self, sink: MetricSink, events: list[StageEvent], step: int) -> None:
        if events:  # (until then, events restored by a resume wait for the new sink's table)
            publish_events(sink, self.prefix, events, unlogged=self.tracker.events[self._logged:],
                           step=step, alert_level=self.alert_level, alert_wait_s=self.alert_wait_s,
                           say=rank_zero_info if self.verbose else None, on_event=self.on_event)
            self._logged = len(self.tracker.events)

    def _sink_for(self, trainer: pl.Trainer) -> MetricSink:
        if self._sink is None:  # set up in `setup`, or here for a hook called by hand
            self._sink, self._logged = MetricSink.from_trainer(trainer), 0
            self._sink.define_metrics(self.prefix)
        return self._sink


def _check_arguments(on_event: Any, alert_level: Any, prefix: Any, **flags: Any) -> None:
    if on_event is not None and not callable(on_event):
        raise ValueError(f"Expected argument `on_event` to be None or a callable but got "
                         f"{type(on_event).__name__}.")
    if alert_level not in (None, "INFO", "WARN", "ERROR"):
        raise ValueError(f"Expected argument `alert_level` to be one of ('INFO', 'WARN', "
                         f"'ERROR') or None but got {alert_level!r}.")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"Expected argument `{name}` to be a bool but got {flag!r}.")
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"Expected argument `prefix` to be a non-empty string but got "
                         f"{prefix!r}.")


def _check_producers(trainer: pl.Trainer, components: bool | list[str]) -> None:
    """Warn unless exactly one LLCMonitor feeds the monitor; raise if ``components`` names
    one that LLCMonitor does not estimate."""
    producers = [cb for cb in trainer.callbacks if isinstance(cb, LLCMonitor)]
    if not producers:
        rank_zero_warn("StageTransitionMonitor: the trainer has no LLCMonitor, so no λ̂ "
                       "estimates will arrive and no stage can be detected. Add "
                       "LLCMonitor() to the trainer's callbacks.")
    elif len(producers) > 1:
        rank_zero_warn(f"StageTransitionMonitor: {len(producers)} LLCMonitors hand their "
                       "estimates to this monitor, which cannot tell them apart; run one "
                       "LLCMonitor per StageTransitionMonitor.")
    if isinstance(components, list) and producers:
        known = sorted(producers[0].components or {})
        if missing := [name for name in components if name not in known]:
            raise ValueError(f"Expected argument `components` to name components of the "
                             f"LLCMonitor ({known}) but got unknown {missing}.")


def related_histories(
    trainer: pl.Trainer, prefix: str, names: Mapping[str | None, int]
) -> dict[str | None, dict[str, Series]]:
    """``{series: {quantity: {step: (value, stderr)}}}`` for the series in ``names``.

    The one place the stage monitor reads other callbacks: the public, documented
    ``history`` list of every monitor but LLCMonitor (those with ``prefix`` first), each
    entry a mapping with ``step`` and the quantities of ``_RELATED`` (``weight_norm``,
    ``hessian_trace``, ``fisher_trace``, with ``/<component>`` for a component). The first
    monitor whose history has a quantity supplies it.
    """
    histories = sorted((cb for cb in trainer.callbacks if isinstance(getattr(cb, "history", None),
                        list) and not isinstance(cb, LLCMonitor)),
                       key=lambda cb: getattr(cb, "prefix", None) != prefix)
    out: dict[str | None, dict[str, Series]] = {}
    for name in names:
        suffix = "" if name is None else f"/{name}"
        for quantity, error in _RELATED:
            key = quantity + suffix
            for cb in histories:
                entries = [e for e in cb.history if isinstance(e, Mapping) and key in e]
                series = {int(e["step"]): (float(e[key]), 0.0 if error is None else
                          float(e.get(error + suffix, float("nan")))) for e in entries}
                if series:
                    out.setdefault(name, {})[quantity] = series
                    break
    return out
