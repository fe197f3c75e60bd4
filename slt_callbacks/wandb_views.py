"""A W&B workspace view of the panels the SLT monitors log.

W&B builds one panel per metric on its own; this helper arranges them for reading a run's
development: λ̂ next to its stage index, the λ̂ of every component in one chart, λ̂ next to
the weight norm and the Hessian trace (which it is often mistaken for), and the chain
health, all against ``trainer/global_step`` on a log axis (stages are read in log-step,
Hoogland et al. 2024, "The developmental landscape of in-context learning"). The runs table
pins the end-of-training summary: the relations of λ̂ to the other quantities and how the
online stage events compared with the retrospective analysis.

It needs the optional package ``wandb-workspaces`` and network access to the W&B server,
and is meant to be called once per project, by hand, not from a training run::

    from slt_callbacks.wandb_views import stage_workspace
    view = stage_workspace("my-team", "my-project", components=["L1.head0", "L1.head1"])
    print(view.url)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .analysis.online import StageEvent, StageKind
from .analysis.retrospective import StageBoundary
from .sinks import STEP_METRIC, AlertLevel, MetricSink

__all__ = [
    "BOUNDARY_COLUMNS",
    "EVENT_COLUMNS",
    "KIND_MEANING",
    "alert_stage_event",
    "log_boundaries",
    "log_component_chart",
    "log_stage_events",
    "stage_workspace",
]

# -- how stage events and boundaries are shown (through a MetricSink: W&B tables, alerts and
# charts where a WandbLogger is attached, nothing otherwise) -------------------------------

EVENT_COLUMNS = [
    "step", "detected_at", "component", "kind", "shape", "previous_regime", "new_regime",
    "llc_before", "llc", "loss", "stage", "delay", "message",
]
"""Columns of the ``<prefix>stage_events`` W&B table, one row per online event."""

BOUNDARY_COLUMNS = [
    "component", "step", "kind", "previous_regime", "new_regime", "llc", "loss", "slope",
    "stage", "matched_event_step", "message",
]
"""Columns of the ``<prefix>stage_boundaries`` W&B table, one row per retrospective boundary."""

KIND_MEANING = {
    StageKind.ACQUIRE: (
        "λ̂ goes up while the loss falls: the model is acquiring structure, e.g. learning the "
        "next mode or forming a circuit (stage type A of Hoogland et al. 2024). Estimates "
        "before it at a saddle (λ̂ < 0) are not complexities; their jump is the transition."
    ),
    StageKind.SIMPLIFY: (
        "λ̂ falls while the loss stays flat: the model is simplifying, reaching the same loss "
        "with a more degenerate solution (stage type B of Hoogland et al. 2024). The loss "
        "curve alone does not show this."
    ),
    StageKind.TURN: (
        "λ̂ changed in another way (e.g. its rise levelled off): a stage boundary whose type "
        "the loss does not settle. Look at the loss and λ̂ around this step."
    ),
}
"""What each kind of event means, in the words used in alerts."""


def log_stage_events(
    sink: MetricSink, prefix: str, events: Sequence[StageEvent], step: int
) -> None:
    """Add ``events`` as rows of the ``<prefix>stage_events`` table."""
    rows = [[event.to_dict()[c] for c in EVENT_COLUMNS] for event in events]
    sink.log_table(f"{prefix}stage_events", EVENT_COLUMNS, rows, step=step)


def alert_stage_event(
    sink: MetricSink, prefix: str, event: StageEvent, level: AlertLevel, wait_s: float
) -> None:
    """One W&B alert for ``event``, throttled per scope (the global λ̂, or all components
    together) to one per ``wait_s`` seconds, so a noisy run cannot flood anyone."""
    scope = "llc" if event.component is None else "components"
    kind = StageKind(event.kind)
    sink.alert(
        f"Stage transition ({prefix}{scope})",
        f"{event.message}\n{kind.value}: {KIND_MEANING[kind]}\nAll events: the "
        f"{prefix}stage_events table.",
        level=level,
        wait_duration_s=wait_s,
    )


def log_boundaries(
    sink: MetricSink,
    prefix: str,
    boundaries: Mapping[str | None, Sequence[StageBoundary]],
    comparisons: Mapping[str | None, Mapping[str, Any]],
    step: int,
) -> None:
    """The ``<prefix>stage_boundaries`` table: every retrospective boundary, with the step
    of the online event matched to it."""
    rows = []
    for name, found in boundaries.items():
        pairs = comparisons.get(name, {}).get("pairs", [])
        for boundary in found:
            values = boundary.to_dict()
            values["component"] = name
            values["matched_event_step"] = next(
                (p["event_step"] for p in pairs if p["boundary_step"] == boundary.step), None
            )
            rows.append([values[c] for c in BOUNDARY_COLUMNS])
    if rows:
        sink.log_table(f"{prefix}stage_boundaries", BOUNDARY_COLUMNS, rows, step=step)


def log_component_chart(
    sink: MetricSink, prefix: str, records: Sequence[Any], step: int
) -> None:
    """λ̂ of every component in one multi-line chart (``<prefix>llc_by_component``); points
    where the estimate is not a complexity (not healthy) are left out."""
    names: list[str] = []
    for record in records:
        names += [name for name in record.components if name not in names]
    with_parts = [record for record in records if record.components]
    if not names:
        return
    lines = {
        name: [_complexity(record.components.get(name)) for record in with_parts]
        for name in names
    }
    sink.log_line_series(
        f"{prefix}llc_by_component", [r.step for r in with_parts], lines,
        title="λ̂ per component", step=step,
    )


def _complexity(value: tuple[float, float, str] | None) -> float | None:
    if value is None or value[2] != "healthy" or value[0] != value[0]:
        return None
    return float(value[0])


_INSTALL = (
    "slt_callbacks.wandb_views needs the optional package `wandb-workspaces` "
    "(pip install wandb-workspaces); it also needs network access to the W&B server."
)


def _import_workspaces() -> tuple[Any, Any]:
    try:
        import wandb_workspaces.reports.v2 as reports
        import wandb_workspaces.workspaces as workspaces
    except ImportError as error:
        raise ImportError(_INSTALL) from error
    return workspaces, reports


def stage_workspace(
    entity: str,
    project: str,
    *,
    components: Sequence[str] = (),
    prefix: str = "slt/",
    name: str = "SLT stages and LLC",
    save: bool = True,
) -> Any:
    """Build (and by default save) a W&B workspace view for the SLT monitors' metrics.

    Sections:

    - **λ̂ and stages**: ``<prefix>llc`` with ``<prefix>llc_std``, ``<prefix>stage``;
    - **components** (if any are named): ``<prefix>llc/<component>`` of all of them in one
      chart, and their ``<prefix>stage/<component>``;
    - **λ̂ is not the weight norm**: ``<prefix>llc``, ``<prefix>weight_norm``,
      ``<prefix>hessian_trace`` and ``<prefix>fisher_trace`` side by side;
    - **chain health**: ``<prefix>diag/*`` (acceptance, drift, divergences, status code).

    Args:
        entity: the W&B entity (user or team) that owns the project.
        project: the W&B project.
        components: component names as given to ``LLCMonitor(components=...)``.
        prefix: the monitors' key prefix.
        name: the name of the saved view.
        save: save the view to the W&B server (needs network access and a login).

    Returns:
        The ``wandb_workspaces.workspaces.Workspace``; after saving, its ``url`` opens it.

    Raises:
        ImportError: ``wandb-workspaces`` is not installed (the message says how to install
            it).
        ValueError: ``entity``, ``project`` or a component name is empty.
    """
    for argument, value in (("entity", entity), ("project", project), ("prefix", prefix)):
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"Expected argument `{argument}` to be a non-empty string but got {value!r}."
            )
    names = list(components)
    if isinstance(components, str) or not all(isinstance(c, str) and c for c in names):
        raise ValueError(
            "Expected argument `components` to be a list of non-empty component names but got "
            f"{components!r}."
        )
    ws, wr = _import_workspaces()

    def line(title: str, keys: list[str], *, log_y: bool = False) -> Any:
        # log_x: development is front-loaded and stages are defined in log-step.
        options = {"log_y": True} if log_y else {}
        return wr.LinePlot(title=title, x=STEP_METRIC, y=keys, log_x=True, **options)

    def key(suffix: str) -> str:
        return f"{prefix}{suffix}"

    sections = [
        ws.Section(
            name="λ̂ and stages",
            is_open=True,
            panels=[
                line("λ̂ (whole model)", [key("llc")]),
                line("chain std of λ̂", [key("llc_std")]),
                line("stage index (online detector)", [key("stage")]),
            ],
        )
    ]
    if names:
        sections.append(
            ws.Section(
                name="λ̂ per component",
                is_open=True,
                panels=[
                    line("λ̂ per component", [key(f"llc/{c}") for c in names]),
                    line("stage index per component", [key(f"stage/{c}") for c in names]),
                    line("weight norm per component", [key(f"weight_norm/{c}") for c in names]),
                ],
            )
        )
    sections += [
        ws.Section(
            name="λ̂ is not the weight norm",
            is_open=True,
            panels=[
                line("λ̂", [key("llc")]),
                line("weight norm", [key("weight_norm")]),
                line("Hessian trace", [key("hessian_trace")], log_y=True),
                line("Fisher trace", [key("fisher_trace")], log_y=True),
            ],
        ),
        ws.Section(
            name="chain health",
            panels=[
                line("MALA acceptance (≈0.9 healthy)", [key("diag/acceptance")]),
                line("drift (second half − first half)", [key("diag/drift")]),
                line("draws below the loss at w*", [key("diag/frac_below_init")]),
                line("status code (0 healthy)", [key("diag/status_code")]),
            ],
        ),
    ]
    pinned = [
        f"summary:{key(f'relation/llc_vs_{quantity}/{stat}')}"
        for quantity in ("weight_norm", "hessian_trace", "loss")
        for stat in ("spearman", "num_opposite")
    ] + [
        f"summary:{key(f'retrospective/{stat}')}"
        for stat in ("num_boundaries", "matched", "false_alarms")
    ]
    view = ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=sections,
        runset_settings=ws.RunsetSettings(pinned_columns=pinned),
    )
    if save:
        view.save()
    return view
