"""Figures of the package's results. matplotlib is an optional extra, imported lazily:
``pip install slt_callbacks[plot]``.

Figures are built with :class:`matplotlib.figure.Figure` directly, not ``pyplot``: no global
figure state, no GUI backend, nothing to close. Pass the returned figure to ``wandb.Image``
or save it with ``fig.savefig``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

from .core.calibrate import Calibration, CalibrationPoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_calibration", "plot_run", "read_metrics_csv"]

_UNHEALTHY = "tab:red"


def _figure_class() -> Any:
    try:
        # wandb.Image(fig) compares its argument with the attribute matplotlib.pyplot, so
        # import it too (this creates no figure and opens no window).
        import matplotlib.pyplot  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "plot_calibration needs matplotlib, an optional extra: "
            "pip install slt_callbacks[plot]"
        ) from err
    return Figure


def plot_calibration(
    calibration: Calibration, path: str | PathLike[str] | None = None
) -> Figure:
    """λ̂ against step size for every grid point of a calibration, and the choice.

    Top panel: λ̂ ± its chain-to-chain standard deviation against ε on a log axis, one line
    per (nβ, γ) series through its healthy points. Unhealthy points are red crosses labelled
    with their status (diverged points, which have no λ̂, sit on the bottom edge). The
    recommended point is ringed. Bottom panel: MALA acceptance, with the threshold the
    health check used. Read it as: the chosen ε should sit at the right end of a flat
    stretch of the curve, left of where it bends upward or turns red.

    Args:
        calibration: the result of :func:`~slt_callbacks.core.calibrate.calibrate`.
        path: if given, the figure is also written there as a PNG.

    Returns:
        A :class:`matplotlib.figure.Figure` (e.g. ``wandb.log({"calibration":
        wandb.Image(fig)})``).

    Raises:
        ImportError: matplotlib is not installed (``pip install slt_callbacks[plot]``).
        ValueError: ``calibration`` is not a :class:`Calibration`.
    """
    if not isinstance(calibration, Calibration):
        raise ValueError(
            "Expected argument `calibration` to be a Calibration (from calibrate()) but got "
            f"{type(calibration).__name__}."
        )
    figure_cls = _figure_class()
    fig = figure_cls(figsize=(7.0, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    table = calibration.table
    for k, (key, rows) in enumerate(_series(table).items()):
        colour = f"C{k % 10}"  # one colour per (γ, nβ) series in both panels
        healthy = [p for p in rows if p.healthy]
        if healthy:
            top.errorbar(
                [p.step_size for p in healthy],
                [p.llc_mean for p in healthy],
                yerr=[_finite_or_zero(p.llc_std) for p in healthy],
                marker="o", capsize=3, color=colour,
                label=f"nβ = {key[1]:.4g}, γ = {key[0]:g}",
            )
        bottom.plot([p.step_size for p in rows], [p.acceptance for p in rows],
                    marker=".", color=colour)
    _mark_unhealthy(top, table)
    chosen = calibration.chosen
    if chosen is not None:
        top.plot([chosen.step_size], [chosen.llc_mean], marker="o", markersize=16,
                 markerfacecolor="none", markeredgecolor="black", markeredgewidth=2,
                 linestyle="none", gid="chosen",
                 label=f"chosen ε = {chosen.step_size:.2g}"
                       + ("" if calibration.verified else " (not verified)"))
        for ax in (top, bottom):
            ax.axvline(chosen.step_size, color="black", linewidth=0.8, linestyle=":")
    bottom.axhline(calibration.criteria.min_acceptance, color=_UNHEALTHY, linestyle="--",
                   linewidth=1, label=f"threshold {calibration.criteria.min_acceptance:g}")
    top.set_xscale("log")
    top.set_ylabel("λ̂ (± chain std)")
    top.set_title("SGLD step-size calibration")
    top.legend(fontsize="small")
    bottom.set_xlabel("step size ε")
    bottom.set_ylabel("acceptance")
    bottom.set_ylim(0, 1.05)
    bottom.legend(fontsize="small", loc="lower left")
    if path is not None:
        fig.savefig(path, format="png", dpi=100)
    return fig


def _series(
    table: Sequence[CalibrationPoint],
) -> dict[tuple[float, float], list[CalibrationPoint]]:
    out: dict[tuple[float, float], list[CalibrationPoint]] = {}
    for p in table:
        out.setdefault((p.localization, p.n_beta), []).append(p)
    return {k: sorted(v, key=lambda p: p.step_size) for k, v in out.items()}


def _mark_unhealthy(ax: Any, table: Sequence[CalibrationPoint]) -> None:
    """Red crosses at unhealthy points; points without a finite λ̂ go on the bottom edge."""
    bad = [p for p in table if not p.healthy]
    finite = [p for p in bad if math.isfinite(p.llc_mean)]
    missing = [p for p in bad if not math.isfinite(p.llc_mean)]
    if finite:
        ax.plot([p.step_size for p in finite], [p.llc_mean for p in finite], "x",
                color=_UNHEALTHY, markersize=9, markeredgewidth=2, linestyle="none",
                gid="unhealthy", label="unhealthy")
        for p in finite:
            ax.annotate(p.status.value, (p.step_size, p.llc_mean), textcoords="offset points",
                        xytext=(5, 5), fontsize="x-small", color=_UNHEALTHY)
    if missing:
        edge = ax.get_xaxis_transform()  # x in data, y in axes coordinates
        ax.plot([p.step_size for p in missing], [0.03] * len(missing), "x",
                color=_UNHEALTHY, markersize=9, markeredgewidth=2, linestyle="none",
                transform=edge, gid="unhealthy-nonfinite",
                label=None if finite else "unhealthy")
        for p in missing:
            ax.annotate(p.status.value, (p.step_size, 0.03), xycoords=edge,
                        textcoords="offset points", xytext=(0, 8), fontsize="x-small",
                        color=_UNHEALTHY, rotation=90, ha="center")


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


# -- a whole run: loss, λ̂, weight norm and Hessian trace against log(step) -------------------

_STATUS_BY_CODE = {
    0: "healthy", 1: "not_converged", 2: "low_acceptance", 3: "not_a_minimum", 4: "diverged",
    5: "all_diverged",
}  # fmt: skip
"""``Status.code`` -> status value, as logged in ``<prefix>diag/status_code``."""

_KIND_COLOURS = {"acquire": "tab:green", "simplify": "tab:purple", "turn": "tab:gray"}


def read_metrics_csv(path: str | PathLike[str]) -> list[dict[str, float]]:
    """The rows of a Lightning ``CSVLogger``'s ``metrics.csv`` as ``{column: float}`` dicts,
    empty cells left out (each logger call writes a row with only its own columns)."""
    rows: list[dict[str, float]] = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, float] = {}
            for key, value in raw.items():
                if value in ("", None):
                    continue
                try:
                    row[key] = float(value)
                except ValueError:
                    continue  # a text column (none of ours): not plottable
            if row:
                rows.append(row)
    return rows


def plot_run(
    rows: Iterable[Mapping[str, Any]] | str | PathLike[str],
    events: Iterable[Any] = (),
    path: str | PathLike[str] | None = None,
    *,
    prefix: str = "slt/",
    loss_key: str = "train_loss",
    title: str | None = None,
    true_lambda: float | None = None,
    reference_steps: Sequence[float] = (),
    reference_label: str = "loss drop",
) -> Figure:
    """Loss, λ̂, weight norm and Hessian trace of one run against log(step), stages marked.

    Made for the rows a run logged (``read_metrics_csv("…/metrics.csv")`` of a
    ``CSVLogger``, or any list of ``{"step": …, key: value}`` dicts): whatever of
    ``loss_key``, ``<prefix>llc`` (± ``<prefix>llc_std``), ``<prefix>weight_norm`` and
    ``<prefix>hessian_trace`` (± ``<prefix>hessian_trace_stderr``) is present gets a panel.

    The loss is drawn on a log axis (at most six decades below its maximum). λ̂ is drawn on a
    symmetric-log axis (linear within ±1, logarithmic beyond), because on a plateau of the
    loss the weights sit near a saddle and λ̂ reads large and negative (hundreds to
    thousands) before it jumps up by orders of magnitude when the next feature is learned. A
    thin line joins every estimate, so the staircase shows; only healthy estimates are
    complexities: they are filled dots, ``not_a_minimum`` estimates (w* is not a local
    minimum) hollow circles, other unhealthy ones crosses. The status comes from
    ``<prefix>diag/status_code`` (or a ``"status"`` entry of the row); error bars are the
    chain-to-chain std.

    Args:
        rows: the logged rows (a row needs ``"step"``), or the path of a ``CSVLogger``'s
            ``metrics.csv`` (read with :func:`read_metrics_csv`).
        events: stage events, drawn as vertical lines through every panel at their change
            point, coloured and labelled by kind (green acquire, purple simplify, grey turn).
            :class:`~slt_callbacks.detect.StageEvent` objects or mappings with ``"step"`` and
            ``"kind"``; events of components (``component`` not None) are left out.
        path: if given, the figure is also written there as a PNG.
        prefix: the monitors' metric prefix.
        loss_key: the column of the training loss.
        title: a title for the figure.
        true_lambda: a known learning coefficient at the end of the run (a reference problem),
            drawn as a dashed line in the λ̂ panel.
        reference_steps: steps known independently (e.g. where the loss drops), drawn as
            dotted black lines through every panel, to compare the events with.
        reference_label: their name in the legend of the first panel.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Raises:
        ImportError: matplotlib is not installed (``pip install slt_callbacks[plot]``).
        ValueError: a row without ``"step"``, or no plottable column at all.
    """
    if isinstance(rows, (str, PathLike)):
        rows = read_metrics_csv(rows)
    if isinstance(events, (str, PathLike)):
        raise ValueError(
            "Expected argument `events` to be stage events (StageEvent objects or mappings) "
            f"but got the path {str(events)!r}; pass the output file as `path=`."
        )
    series = _run_series(rows, prefix=prefix, loss_key=loss_key)
    panels = [key for key in ("loss", "llc", "weight_norm", "hessian_trace") if series[key]]
    if not panels:
        raise ValueError(
            f"Expected rows with at least one of {loss_key!r}, '{prefix}llc', "
            f"'{prefix}weight_norm', '{prefix}hessian_trace' but found none."
        )
    figure_cls = _figure_class()
    # λ̂ gets the most room: its symlog axis spans many decades of both signs.
    heights = {"loss": 1.0, "llc": 1.5, "weight_norm": 0.8, "hessian_trace": 0.8}
    ratios = [heights[p] for p in panels]
    fig = figure_cls(figsize=(8.0, 1.9 * sum(ratios) + 0.9), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False, height_ratios=ratios)[:, 0]
    by_panel = dict(zip(panels, axes, strict=True))
    if "loss" in by_panel:
        ax = by_panel["loss"]
        steps, values = _positive_steps(series["loss"])
        ax.plot(steps, values, color="black", linewidth=1.2)
        if values and min(values) > 0:
            ax.set_yscale("log")
            if min(values) < 1e-6 * max(values):
                # Six decades are enough to read the plateaus; a loss that converges to
                # round-off would squeeze them into the top of the panel.
                ax.set_ylim(bottom=1e-6 * max(values))
        ax.set_ylabel("training loss")
    if "llc" in by_panel:
        _draw_llc(by_panel["llc"], series["llc"], true_lambda)
    if "weight_norm" in by_panel:
        ax = by_panel["weight_norm"]
        steps, values = _positive_steps(series["weight_norm"])
        ax.plot(steps, values, marker=".", color="tab:orange")
        ax.set_ylabel("weight norm ‖w‖")
    if "hessian_trace" in by_panel:
        ax = by_panel["hessian_trace"]
        points = [p for p in series["hessian_trace"] if p[0] > 0]
        ax.errorbar([p[0] for p in points], [p[1] for p in points],
                    yerr=[_finite_or_zero(p[2]) for p in points], marker=".", capsize=2,
                    color="tab:brown")  # fmt: skip
        ax.set_ylabel("Hessian trace tr H")
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(True, which="major", alpha=0.3)
    for i, step in enumerate(reference_steps):
        for ax in axes:
            ax.axvline(float(step), color="black", linestyle=":", linewidth=1.2,
                       gid="reference", label=reference_label if (i == 0 and ax is axes[0])
                       else None)  # fmt: skip
    if reference_steps:
        axes[0].legend(fontsize="x-small", loc="lower left")
    _draw_events(axes, events)
    axes[-1].set_xlabel("training step (log scale)")
    if title:
        fig.suptitle(title, fontsize="medium")
    if path is not None:
        fig.savefig(path, format="png", dpi=100)
    return fig


def _run_series(
    rows: Iterable[Mapping[str, Any]], *, prefix: str, loss_key: str
) -> dict[str, list[tuple[float, ...]]]:
    """Per quantity, ``(step, value[, spread[, status]])`` tuples sorted by step."""
    out: dict[str, list[tuple[Any, ...]]] = {
        "loss": [], "llc": [], "weight_norm": [], "hessian_trace": [],
    }  # fmt: skip
    llc: dict[float, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        if "step" not in row:
            raise ValueError(f"Expected every row to have a 'step' but row {i} has {sorted(row)}.")
        step = float(row["step"])
        if loss_key in row:
            out["loss"].append((step, float(row[loss_key])))
        if f"{prefix}weight_norm" in row:
            out["weight_norm"].append((step, float(row[f"{prefix}weight_norm"])))
        if f"{prefix}hessian_trace" in row:
            stderr = row.get(f"{prefix}hessian_trace_stderr", math.nan)
            out["hessian_trace"].append((step, float(row[f"{prefix}hessian_trace"]),
                                         float(stderr)))  # fmt: skip
        # λ̂, its std and its status may arrive in separate rows of the same step.
        entry = llc.setdefault(step, {})
        if f"{prefix}llc" in row:
            entry["llc"] = float(row[f"{prefix}llc"])
        if f"{prefix}llc_std" in row:
            entry["std"] = float(row[f"{prefix}llc_std"])
        if f"{prefix}diag/status_code" in row:
            entry["status"] = _STATUS_BY_CODE.get(int(row[f"{prefix}diag/status_code"]), "?")
        if "status" in row:
            entry["status"] = str(row["status"])
    for step, entry in llc.items():
        if "llc" in entry:
            out["llc"].append((step, entry["llc"], entry.get("std", math.nan),
                               entry.get("status", "healthy")))  # fmt: skip
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


def _positive_steps(points: Sequence[tuple[float, ...]]) -> tuple[list[float], list[float]]:
    """Steps > 0 only: a log axis has no room for step 0."""
    kept = [p for p in points if p[0] > 0]
    return [p[0] for p in kept], [p[1] for p in kept]


def _draw_llc(ax: Any, points: Sequence[tuple[Any, ...]], true_lambda: float | None) -> None:
    points = [p for p in points if p[0] > 0]
    healthy = [p for p in points if p[3] == "healthy"]
    saddle = [p for p in points if p[3] == "not_a_minimum"]
    other = [p for p in points if p[3] not in ("healthy", "not_a_minimum")]
    # A thin line through every estimate shows the staircase; the markers say which to trust.
    ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:blue", linewidth=0.8,
            alpha=0.5)  # fmt: skip
    if healthy:
        ax.errorbar([p[0] for p in healthy], [p[1] for p in healthy],
                    yerr=[_finite_or_zero(p[2]) for p in healthy], fmt="o", markersize=4,
                    capsize=2, color="tab:blue", gid="llc-healthy",
                    label="λ̂, healthy (a complexity)")  # fmt: skip
    if saddle:
        ax.plot([p[0] for p in saddle], [p[1] for p in saddle], "o", markersize=5,
                markerfacecolor="none", markeredgecolor="tab:blue", linestyle="none",
                gid="llc-saddle",
                label="λ̂ at a saddle (not_a_minimum: not a complexity)")  # fmt: skip
    if other:
        ax.plot([p[0] for p in other], [p[1] for p in other], "x", color=_UNHEALTHY,
                linestyle="none", gid="llc-unhealthy",
                label="λ̂, other unhealthy status")  # fmt: skip
    if true_lambda is not None:
        ax.axhline(true_lambda, color="black", linestyle="--", linewidth=1,
                   label=f"true λ at the final minimum = {true_lambda:g}")  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("λ̂ (symlog)")
    ax.legend(fontsize="x-small", loc="upper left")


def _draw_events(axes: Sequence[Any], events: Iterable[Any]) -> None:
    for event in events:
        get = event.get if isinstance(event, Mapping) else lambda k, e=event: getattr(e, k, None)
        if get("component") is not None:
            continue
        step = float(get("step"))
        kind = str(getattr(get("kind"), "value", get("kind")))
        colour = _KIND_COLOURS.get(kind, "tab:gray")
        for ax in axes:
            ax.axvline(step, color=colour, linewidth=1.5, alpha=0.8, gid=f"event-{kind}")
        axes[0].annotate(kind, (step, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(2, -2), textcoords="offset points", va="top", ha="left",
                         fontsize="small", color=colour, rotation=90)  # fmt: skip
