"""How λ̂ relates to the weight norm, the Hessian trace and the loss over one training run.

Users regularly read the local learning coefficient λ̂ as "roughly the weight norm" or
"roughly the curvature". Singular learning theory says otherwise: λ̂ measures the degeneracy
of the loss landscape around the weights (Lau et al. 2023, "The Local Learning Coefficient: A
Singularity-Aware Complexity Measure"), and a model can move to a lower-λ̂, more degenerate
solution while its L2 norm grows, or while its Hessian trace rises. Hoogland et al. 2024 ("The
developmental landscape of in-context learning") find stages where the loss is flat while λ̂
falls. This module puts numbers on that for one run, from the series the monitors recorded
at the same checkpoints:

- :func:`pearson` and :func:`spearman`: does λ̂ go up and down with the other quantity over
  the run (linearly, or at least monotonically)?
- :func:`opposite_moves`: the checkpoint intervals where both quantities changed by more than
  their noise, in opposite directions: the places to look at when the correlation is high
  but the two do not tell the same story.

Read the correlations with care: two quantities that both trend with training time correlate
strongly whatever their relation (a shared trend is not co-movement). The count of opposite
moves is the more direct evidence that λ̂ is *not* a proxy for the other quantity.

Everything here is plain numpy; no torch, Lightning or W&B.

Example:
    >>> steps = [10, 20, 40, 80, 160]
    >>> rel = relate(steps, [5.0, 6.0, 8.0, 7.0, 6.5], [1.0, 1.1, 1.2, 1.3, 1.4],
    ...              x_name="llc", y_name="weight_norm", x_noise=[0.1] * 5, y_noise=[0.0] * 5)
    >>> round(rel.spearman, 2), rel.num_moves, [(m.step_from, m.step_to) for m in rel.opposite]
    (0.6, 4, [(40, 80), (80, 160)])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Move",
    "Relation",
    "align_by_step",
    "estimate_noise",
    "format_relations",
    "opposite_moves",
    "pearson",
    "rank",
    "relate",
    "spearman",
]

# 1.4826 * median(|r|) estimates the standard deviation of Gaussian r, robust to a few kinks.
_MAD_TO_STD = 1.4826
ArrayLike = Sequence[float] | np.ndarray


def _vector(name: str, values: ArrayLike, length: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"Expected `{name}` to be one-dimensional but got shape {array.shape}.")
    if length is not None and array.size != length:
        raise ValueError(
            f"Expected `{name}` to have {length} values (one per step) but got {array.size}."
        )
    return array


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    xs = _vector("x", x)
    ys = _vector("y", y, xs.size)
    keep = np.isfinite(xs) & np.isfinite(ys)
    return xs[keep], ys[keep]


def rank(values: ArrayLike) -> np.ndarray:
    """Ranks 1..n of ``values``; tied values share the mean of the ranks they span.

    Mean ranks for ties are what makes Spearman's coefficient the Pearson coefficient of the
    ranks even when values repeat (a plateau of identical λ̂ estimates, a norm that did not
    change).

    Example:
        >>> rank([3.0, 1.0, 3.0, 2.0]).tolist()
        [3.5, 1.0, 3.5, 2.0]
    """
    array = _vector("values", values)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(array.size, dtype=float)
    sorted_values = array[order]
    start = 0
    for end in range(1, array.size + 1):
        if end == array.size or sorted_values[end] != sorted_values[start]:
            # Positions start..end-1 hold one value: each gets the mean rank (1-based).
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return ranks


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    r"""Pearson's correlation of ``x`` and ``y`` over the pairs where both are finite.

    .. math:: r = \frac{\sum_i (x_i - \bar x)(y_i - \bar y)}
                       {\sqrt{\sum_i (x_i - \bar x)^2 \sum_i (y_i - \bar y)^2}}

    Returns:
        ``r`` in [-1, 1]; ``nan`` with fewer than 3 pairs or when either is constant (the
        correlation is undefined, and 0 would wrongly read "unrelated").

    Raises:
        ValueError: the lengths differ or an input is not one-dimensional.
    """
    xs, ys = _pair(x, y)
    if xs.size < 3:
        return math.nan
    xc, yc = xs - xs.mean(), ys - ys.mean()
    denominator = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if denominator == 0.0:
        return math.nan
    return float(np.clip(float(xc @ yc) / denominator, -1.0, 1.0))


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's rank correlation: :func:`pearson` of the :func:`rank` of each series.

    It asks whether ``y`` rises whenever ``x`` does, whatever the shape of the relation, and a
    single wild estimate moves it by at most one rank.

    Returns:
        ``rho`` in [-1, 1]; ``nan`` with fewer than 3 finite pairs or a constant series.
    """
    xs, ys = _pair(x, y)
    return pearson(rank(xs), rank(ys)) if xs.size >= 3 else math.nan


def estimate_noise(steps: ArrayLike, values: ArrayLike) -> float:
    """Noise std of a series about its local trend, from its own scatter (``nan`` if < 5 points).

    Each interior point is compared with the straight line (in log10(step + 1)) through its
    two neighbours; a smooth trend cancels, so the robust spread (MAD) of these residuals is
    the checkpoint-to-checkpoint noise. Used for series that come without a standard error,
    such as a training loss averaged over a few minibatches.
    """
    x = np.log10(_vector("steps", steps) + 1.0)
    y = _vector("values", values, x.size)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 5:
        return math.nan
    left, right = x[1:-1] - x[:-2], x[2:] - x[1:-1]
    w_left, w_right = right / (left + right), left / (left + right)
    residual = (y[1:-1] - w_left * y[:-2] - w_right * y[2:]) / np.sqrt(1.0 + w_left**2 + w_right**2)
    return _MAD_TO_STD * float(np.median(np.abs(residual)))


@dataclass(frozen=True)
class Move:
    """One checkpoint interval where two quantities changed beyond their noise.

    Attributes:
        step_from: the earlier checkpoint.
        step_to: the next checkpoint.
        change_x: the change of the first quantity over the interval.
        change_y: the change of the second.
    """

    step_from: int
    step_to: int
    change_x: float
    change_y: float

    @property
    def opposite(self) -> bool:
        """Whether the two changed in opposite directions."""
        return self.change_x * self.change_y < 0

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types."""
        return {
            "step_from": int(self.step_from),
            "step_to": int(self.step_to),
            "change_x": float(self.change_x),
            "change_y": float(self.change_y),
        }


def _noise(name: str, steps: np.ndarray, values: np.ndarray, noise: ArrayLike | None) -> np.ndarray:
    """Per-point noise std: as given where finite, else estimated from the series' scatter."""
    estimated = estimate_noise(steps, values)
    fallback = estimated if math.isfinite(estimated) else 0.0
    if noise is None:
        return np.full(values.size, fallback)
    given = _vector(name, noise, values.size)
    if np.any(given[np.isfinite(given)] < 0):
        raise ValueError(f"Expected `{name}` to hold non-negative standard errors.")
    return np.where(np.isfinite(given), given, fallback)


def _moved(change: np.ndarray, stderr: np.ndarray, level: np.ndarray, sensitivity: float):
    # The second term only matters for noise-free series (stderr 0), where rounding of an
    # unchanged value must not count as a move.
    return (np.abs(change) > sensitivity * stderr) & (
        np.abs(change) > 1e-12 * (1.0 + np.abs(level))
    )


def opposite_moves(
    steps: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    *,
    x_noise: ArrayLike | None = None,
    y_noise: ArrayLike | None = None,
    sensitivity: float = 2.0,
) -> tuple[list[Move], list[Move]]:
    r"""The consecutive checkpoints where ``x`` and ``y`` both moved beyond their noise.

    Over each interval between consecutive checkpoints (finite in both series) the change of
    each quantity counts as a move when it exceeds ``sensitivity`` standard errors of the
    difference, :math:`\sqrt{\sigma_i^2 + \sigma_{i+1}^2}`. A quantity given without noise
    (``x_noise=None``) gets the noise :func:`estimate_noise` reads from its own scatter; a
    noise of exactly 0 (a weight norm, which is computed, not estimated) makes every change
    a move.

    Args:
        steps: the checkpoints, increasing.
        x, y: the two quantities at those checkpoints (non-finite values are skipped).
        x_noise, y_noise: standard error of each value (e.g. the chain std over
            sqrt(num_chains) for λ̂, the probe standard error for a Hessian trace).
        sensitivity: how many standard errors a change must exceed.

    Returns:
        ``(moves, opposite)``: every interval where both moved, and those of them where they
        moved in opposite directions.

    Raises:
        ValueError: lengths differ, steps do not increase, noise is negative, or
            ``sensitivity`` is negative.
    """
    if not (isinstance(sensitivity, (int, float)) and math.isfinite(sensitivity)) or (
        sensitivity < 0
    ):
        raise ValueError(
            f"Expected `sensitivity` to be a non-negative number but got {sensitivity!r}."
        )
    step_arr = _vector("steps", steps)
    xs = _vector("x", x, step_arr.size)
    ys = _vector("y", y, step_arr.size)
    if np.any(np.diff(step_arr) <= 0):
        raise ValueError("Expected `steps` to be strictly increasing.")
    x_sd = _noise("x_noise", step_arr, xs, x_noise)
    y_sd = _noise("y_noise", step_arr, ys, y_noise)
    keep = np.isfinite(xs) & np.isfinite(ys)
    step_arr, xs, ys, x_sd, y_sd = (a[keep] for a in (step_arr, xs, ys, x_sd, y_sd))
    dx, dy = np.diff(xs), np.diff(ys)
    x_moved = _moved(dx, np.hypot(x_sd[1:], x_sd[:-1]), xs[1:], sensitivity)
    y_moved = _moved(dy, np.hypot(y_sd[1:], y_sd[:-1]), ys[1:], sensitivity)
    moves = [
        Move(int(step_arr[i]), int(step_arr[i + 1]), float(dx[i]), float(dy[i]))
        for i in np.flatnonzero(x_moved & y_moved)
    ]
    return moves, [move for move in moves if move.opposite]


def _optional(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Relation:
    """How two quantities moved together over one run (see :func:`relate`).

    Attributes:
        x_name, y_name: what was compared, e.g. ``"llc"`` and ``"weight_norm"``.
        num_points: checkpoints where both were known.
        pearson: :func:`pearson` of the two series (``nan`` if undefined).
        spearman: :func:`spearman` of the two series.
        moves: intervals where both moved beyond noise (:func:`opposite_moves`).
        opposite: those of ``moves`` in opposite directions.
    """

    x_name: str
    y_name: str
    num_points: int
    pearson: float
    spearman: float
    moves: list[Move] = field(default_factory=list)
    opposite: list[Move] = field(default_factory=list)

    @property
    def name(self) -> str:
        """``"<x>_vs_<y>"``, the key of this relation in a summary."""
        return f"{self.x_name}_vs_{self.y_name}"

    @property
    def num_moves(self) -> int:
        return len(self.moves)

    @property
    def num_opposite(self) -> int:
        return len(self.opposite)

    @property
    def message(self) -> str:
        """One line for humans: the correlations and where the two disagree."""
        if self.num_points < 3:
            return (
                f"{self.x_name} vs {self.y_name}: only {self.num_points} common checkpoints, "
                "too few to relate."
            )
        text = (
            f"{self.x_name} vs {self.y_name}: Pearson {_fmt(self.pearson)}, Spearman "
            f"{_fmt(self.spearman)} over {self.num_points} checkpoints; both moved beyond "
            f"noise in {self.num_moves} intervals, in opposite directions in "
            f"{self.num_opposite}"
        )
        if self.opposite:
            shown = ", ".join(f"{m.step_from}->{m.step_to}" for m in self.opposite[:5])
            more = f" and {self.num_opposite - 5} more" if self.num_opposite > 5 else ""
            text += f" (steps {shown}{more})"
        return text + "."

    def to_dict(self) -> dict[str, Any]:
        """The numbers as plain Python types, ``None`` where undefined: the keys a callback
        writes to a run summary under ``<prefix>relation/<name>/``."""
        return {
            "num_points": int(self.num_points),
            "pearson": _optional(self.pearson),
            "spearman": _optional(self.spearman),
            "num_moves": self.num_moves,
            "num_opposite": self.num_opposite,
            "opposite_steps": [[m.step_from, m.step_to] for m in self.opposite],
        }


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.2f}"


def relate(
    steps: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    *,
    x_name: str,
    y_name: str,
    x_noise: ArrayLike | None = None,
    y_noise: ArrayLike | None = None,
    sensitivity: float = 2.0,
) -> Relation:
    """Correlations and opposite moves of two series measured at the same checkpoints.

    Args:
        steps: the checkpoints, strictly increasing.
        x, y: the two quantities (non-finite values are skipped, pairwise).
        x_name, y_name: their names, for the summary keys and messages.
        x_noise, y_noise: standard errors (see :func:`opposite_moves`).
        sensitivity: standard errors a change must exceed to count as a move.

    Returns:
        A :class:`Relation`.

    Raises:
        ValueError: see :func:`opposite_moves`.
    """
    moves, opposite = opposite_moves(
        steps, x, y, x_noise=x_noise, y_noise=y_noise, sensitivity=sensitivity
    )
    xs, _ = _pair(x, y)
    return Relation(
        x_name=x_name,
        y_name=y_name,
        num_points=int(xs.size),
        pearson=pearson(x, y),
        spearman=spearman(x, y),
        moves=moves,
        opposite=opposite,
    )


def align_by_step(
    *series: Mapping[int, float] | Mapping[int, tuple[float, float]],
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The steps every series has a value at, and each series' values there.

    Monitors on different schedules measure at different steps; only checkpoints they share
    can be compared (no interpolation: λ̂ can change within one interval, which is the point).

    Args:
        series: ``{step: value}`` or ``{step: (value, stderr)}`` mappings.

    Returns:
        ``(steps, arrays)``: the shared steps, sorted, and per series an array of shape
        ``(n,)`` (plain values) or ``(n, 2)`` (value, stderr).

    Example:
        >>> steps, (a, b) = align_by_step({1: 1.0, 2: 2.0, 4: 4.0}, {2: 20.0, 4: 40.0, 8: 8.0})
        >>> steps.tolist(), a.tolist(), b.tolist()
        ([2, 4], [2.0, 4.0], [20.0, 40.0])
    """
    if not series:
        return np.empty(0, dtype=int), []
    shared = set(series[0])
    for other in series[1:]:
        shared &= set(other)
    steps = np.array(sorted(int(s) for s in shared), dtype=int)
    arrays = [np.array([values[int(s)] for s in steps], dtype=float) for values in series]
    return steps, arrays


def format_relations(relations: Sequence[Relation]) -> str:
    """A small fixed-width table of relations, for printing at the end of a run."""
    header = (
        f"{'relation':<44} {'points':>6} {'pearson':>8} {'spearman':>8} {'moves':>6} {'opp.':>5}"
    )
    lines = [header, "-" * len(header)]
    for rel in relations:
        lines.append(
            f"{rel.name:<44} {rel.num_points:>6} {_fmt(rel.pearson):>8} "
            f"{_fmt(rel.spearman):>8} {rel.num_moves:>6} {rel.num_opposite:>5}"
        )
    return "\n".join(lines)
