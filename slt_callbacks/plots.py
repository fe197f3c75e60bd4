"""Figures of the package's results. matplotlib is an optional extra, imported lazily:
``pip install slt_callbacks[plot]``.

Figures are built with :class:`matplotlib.figure.Figure` directly, not ``pyplot``: no global
figure state, no GUI backend, nothing to close. Pass the returned figure to ``wandb.Image``
or save it with ``fig.savefig``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

from .core.calibrate import Calibration, CalibrationPoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_calibration"]

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
