"""Developmental stages from a λ̂ curve: an online detector and a retrospective analysis.

Hoogland et al. 2024 ("The developmental landscape of in-context learning"; "Loss landscape
degeneracy and stagewise development in transformers") estimate the local learning
coefficient λ̂ on log-spaced checkpoints, smooth the curve in log(step), and call the critical
points of the smoothed curve (where dλ̂/dlog t changes sign or goes flat) stage boundaries.
Two kinds of stage stand out: the loss falls while λ̂ rises (the model *acquires* structure),
and the loss stays flat while λ̂ falls (the model *simplifies*). Wang et al. 2024 ("Differentiation
and specialization of attention heads via the refined local learning coefficient") see the
same shapes in the LLC of single components (heads first rise, then fall).

Their analysis looks at the whole curve after training. This module offers both:

- :class:`StageDetector`, an online detector fed one checkpoint at a time, which emits a
  :class:`StageEvent` when the trend of λ̂ in log(step) changes and the new trend has held for
  ``persistence`` checkpoints;
- :func:`retrospective_stages`, the offline analysis (kernel smoothing in log-step, critical
  points of the smoothed curve), and :func:`compare_events`, which scores the online events
  against it (or against known change points).

Why log(step): development happens early and checkpoints are log-spaced, so one decade of
steps holds about as many checkpoints at step 100 as at step 100,000; a linear fit in
log(step) weighs the decades equally, and slopes are reported "per decade" (per factor of 10
in steps), a unit that means the same thing early and late in training. Steps enter as
``log10(step + 1)`` so that step 0 is a valid checkpoint.

How noise enters: each λ̂ is a Monte Carlo estimate, and its noise (the chain std, 3-10% of
the level is typical) is as large as the changes of trend we look for over a few checkpoints.
Every slope therefore carries a standard error, from the chain std where it is given and from
the scatter of the curve itself (a robust, trend-free residual estimate) otherwise, taking the
larger of the two. A trend counts only when it exceeds ``sensitivity`` standard errors (raised
to the Student t quantile when the noise had to be estimated), and an event additionally
needs the slope to have *changed* by that much at the change point. Persistence, the change
test and the hysteresis between "flat" and "trend" are what keep trendless noise quiet: a
detector that reacts to every wiggle flags two checkpoints in three (see the baseline in
``benchmarks/detector.py``).

Everything here is plain numpy, with no torch, Lightning or W&B import, and the detector's state
is plain Python floats, ints, strings and lists so that it survives ``torch.save`` and
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from ._checks import check_int, check_number, check_state

__all__ = [
    "DetectorConfig",
    "Regime",
    "SmoothedCurve",
    "StageBoundary",
    "StageDetector",
    "StageEvent",
    "StageKind",
    "classify_kind",
    "classify_loss_trend",
    "classify_trend",
    "compare_events",
    "confirm_change",
    "retrospective_stages",
    "smooth_log_step",
    "trend_threshold",
]

# 1.4826 * median(|r|) estimates the standard deviation of Gaussian r; the median (rather
# than the root mean square) keeps one kink or one outlying estimate from inflating it.
_MAD_TO_STD = 1.4826
_STATE_VERSION = 1


class Regime(str, Enum):
    """The local trend of λ̂ (or of the loss) in log(step)."""

    RISING = "rising"
    FLAT = "flat"
    FALLING = "falling"
    UNCERTAIN = "uncertain"

    def __str__(self) -> str:
        return self.value


class StageKind(str, Enum):
    """What a stage boundary means (Hoogland et al. 2024)."""

    ACQUIRE = "acquire"
    """λ̂ starts rising while the loss falls: the model acquires structure."""
    SIMPLIFY = "simplify"
    """λ̂ starts falling while the loss stays flat: the model simplifies."""
    TURN = "turn"
    """Any other change of trend, e.g. rising -> flat."""

    def __str__(self) -> str:
        return self.value




@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """Thresholds of the stage detector; plain numbers, so it can live in a YAML config.

    Args:
        sensitivity: how many standard errors a slope, or a change of slope, must exceed
            to count: λ̂ is rising/falling when its windowed slope exceeds it, and an event
            needs the slope to have changed by that much at the change point. Slopes are
            tested at every checkpoint on overlapping windows, so 2 would fire on noise alone
            every few hundred checkpoints; 3 keeps trendless series quiet (see
            ``benchmarks/detector.py``). Raised automatically (Student t) when the noise is
            estimated from the curve rather than given.
        flat_threshold: λ̂ counts as flat when its slope is within this many standard errors
            of zero. Between ``flat_threshold`` and ``sensitivity`` the trend is "uncertain"
            and changes nothing: this hysteresis keeps a weak rise from flickering between
            rising and flat. Must not exceed ``sensitivity``.
        persistence: how many consecutive checkpoints the new trend must hold before an event
            is emitted. One noisy window can look like a trend; a change of regime persists. An
            event therefore comes at least ``persistence`` checkpoints after its change point
            (the event reports its delay, which is typically persistence + window / 2).
        cooldown: the minimum number of checkpoints between two events of one series. A change
            that persists during the cooldown is emitted when the cooldown ends, not dropped.
        window: how many of the latest checkpoints the local trend is fitted on. Longer
            windows see weaker trends through the noise but answer later; with ~20
            checkpoints per decade, 15 checkpoints span about 0.75 decade. At a chain std of
            10% of λ̂ this resolves relative slopes of about 0.4 per decade.
        flat_loss_tolerance: the loss counts as flat when it changes by less than this
            fraction of its level per decade of steps (0.1: less than 10% per decade).
        min_relative_slope: a λ̂ slope smaller than this fraction of the λ̂ level per decade
            counts as flat however precise it is: with very precise estimates, a creep of a
            few percent per decade would otherwise count as "rising", and a plateau shorter
            than a window would never look flat.

    Raises:
        ValueError: a field is out of range; the message names it and the value received.
    """

    sensitivity: float = 3.0
    flat_threshold: float = 1.0
    persistence: int = 3
    cooldown: int = 5
    window: int = 15
    flat_loss_tolerance: float = 0.1
    min_relative_slope: float = 0.1

    def __post_init__(self) -> None:
        checked: dict[str, float | int] = {
            "sensitivity": check_number("sensitivity", self.sensitivity, strict=True),
            "flat_threshold": check_number("flat_threshold", self.flat_threshold, strict=True),
            "persistence": check_int("persistence", self.persistence, minimum=1),
            "cooldown": check_int("cooldown", self.cooldown, minimum=0),
            # A line through w points leaves w - 2 residual degrees of freedom; fewer than 5
            # points leave too few to tell a trend from noise.
            "window": check_int("window", self.window, minimum=5),
            "flat_loss_tolerance": check_number("flat_loss_tolerance", self.flat_loss_tolerance),
            "min_relative_slope": check_number("min_relative_slope", self.min_relative_slope),
        }
        if checked["flat_threshold"] > checked["sensitivity"]:
            raise ValueError(
                f"Expected `flat_threshold` to be at most `sensitivity` ({self.sensitivity}) "
                f"but got {self.flat_threshold!r}."
            )
        # Store plain Python numbers (numpy scalars would leak into checkpoints and YAML).
        for name, value in checked.items():
            object.__setattr__(self, name, value)


# ----------------------------------------------------------------------------------------
# Pure decisions, each returning a reason.


def trend_threshold(sensitivity: float, dof: float = math.inf) -> float:
    """The t threshold that is as rare as ``sensitivity`` normal standard deviations when the
    noise was estimated with ``dof`` degrees of freedom (Student t quantile, Cornish-Fisher
    expansion to second order; within a few percent of the exact quantile for
    dof >= 10, a little low below that).

    With the noise estimated from a few dozen residuals, a 3-sigma test fires several times
    more often than its nominal rate; raising the threshold to the Student quantile keeps the
    false-alarm rate where ``sensitivity`` says it is.
    """
    if not math.isfinite(dof):
        return sensitivity
    dof = max(dof, 1.0)
    z = sensitivity
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def classify_trend(
    slope: float,
    stderr: float,
    config: DetectorConfig,
    *,
    level: float = 0.0,
    dof: float = math.inf,
) -> tuple[Regime, str]:
    """Classify a fitted slope of λ̂ against log10(step) as rising, flat, falling or uncertain.

    Args:
        slope: dλ̂/dlog10(step), in λ̂ units per decade of steps.
        stderr: its standard error (0 for noise-free data).
        config: the thresholds ``sensitivity``, ``flat_threshold`` and ``min_relative_slope``.
        level: the λ̂ level the slope was fitted at, for the relative floor.
        dof: degrees of freedom of the noise estimate behind ``stderr`` (``inf`` when the
            noise is known); the trend threshold becomes :func:`trend_threshold`.

    Returns:
        ``(regime, reason)``; ``reason`` is a sentence that says which threshold decided.
    """
    if not math.isfinite(slope):
        return Regime.UNCERTAIN, f"the slope {slope} is not finite"
    floor = config.min_relative_slope * abs(level)
    # The second term only matters for exactly flat, noise-free data, where rounding leaves
    # slopes of 1e-16 that must not count as trends.
    if abs(slope) < floor or abs(slope) <= 1e-12 * (1.0 + abs(level)):
        return Regime.FLAT, (
            f"|slope| {abs(slope):.3g}/decade is below the practical minimum {floor:.3g} "
            f"({config.min_relative_slope:g} of the level {level:.3g})"
        )
    # Zero standard error (noise-free data): any slope above the floor is a trend.
    precise = not (math.isfinite(stderr) and stderr > 0)
    t = math.copysign(math.inf, slope) if precise else slope / stderr
    threshold = trend_threshold(config.sensitivity, dof)
    if t >= threshold:
        return Regime.RISING, (
            f"slope {slope:+.3g}/decade is {t:.1f} standard errors above 0 "
            f"(threshold {threshold:.3g})"
        )
    if t <= -threshold:
        return Regime.FALLING, (
            f"slope {slope:+.3g}/decade is {-t:.1f} standard errors below 0 "
            f"(threshold {threshold:.3g})"
        )
    if abs(t) < config.flat_threshold:
        return Regime.FLAT, (
            f"slope {slope:+.3g}/decade is within {config.flat_threshold:g} standard errors "
            f"of 0 (t = {t:+.1f})"
        )
    return Regime.UNCERTAIN, (
        f"slope {slope:+.3g}/decade (t = {t:+.1f}) is neither flat (|t| < "
        f"{config.flat_threshold:g}) nor a trend (|t| >= {threshold:.3g})"
    )


def confirm_change(
    candidate: Regime,
    *,
    slope: float,
    stderr: float,
    slope_change: float,
    change_stderr: float,
    config: DetectorConfig,
    level: float = 0.0,
    dof: float = math.inf,
) -> tuple[bool, str]:
    """Is a change to ``candidate`` real? The test run before an event is emitted.

    Two conditions, both on the two-piece line fitted since the previous change:

    1. The slope must have *changed* by at least ``sensitivity`` standard errors at the
       change point. The windowed slope alone is a weak witness: in a rise that is only a
       few standard errors steep, noise pulls one window in twenty towards zero, and after a
       few hundred checkpoints one such dip lasts ``persistence`` checkpoints. The two-piece
       fit uses every point since the previous change, so it tells a dip from a turn.
    2. The points *after* the change point must agree with the candidate. While the window
       straddles a peak (rising -> falling) its slope passes through "flat", which must not
       become a rising -> flat event. For "flat" the segment must be flat by
       :func:`classify_trend`; for "rising"/"falling" it must have the right sign and lie at
       least ``flat_threshold`` standard errors from zero (the segment is short, so asking for
       the full ``sensitivity`` would only add delay).

    Args:
        candidate: the regime the windowed trend has shown for ``persistence`` checkpoints.
        slope: slope (per decade) of the points since the change point.
        stderr: its standard error.
        slope_change: the change of slope at the change point (new minus old, per decade).
        change_stderr: its standard error.
        config: thresholds.
        level: the λ̂ level after the change, for the relative floor.
        dof: degrees of freedom of the noise estimate (see :func:`trend_threshold`).

    Returns:
        ``(confirmed, reason)``.
    """
    if math.isfinite(change_stderr) and change_stderr > 0:
        t_change = slope_change / change_stderr
    else:
        t_change = math.copysign(math.inf, slope_change) if slope_change else 0.0
    threshold = trend_threshold(config.sensitivity, dof)
    if not abs(t_change) >= threshold:
        return False, (
            f"the slope changed by {slope_change:+.3g}/decade, only {abs(t_change):.1f} "
            f"standard errors (threshold {threshold:.3g})"
        )
    regime, why = classify_trend(slope, stderr, config, level=level, dof=dof)
    if candidate is Regime.FLAT:
        agrees = regime is Regime.FLAT
    else:
        sign = 1.0 if candidate is Regime.RISING else -1.0
        agrees = regime is candidate or (regime is Regime.UNCERTAIN and sign * slope > 0)
    verdict = "agrees with" if agrees else "contradicts"
    return agrees, (
        f"the slope changed by {slope_change:+.3g}/decade ({abs(t_change):.1f} standard "
        f"errors); since the change point {why}, which {verdict} {candidate.value}"
    )


def classify_loss_trend(
    relative_slope: float,
    tolerance: float,
    *,
    relative_stderr: float = 0.0,
    sensitivity: float = 3.0,
) -> tuple[Regime, str]:
    """Classify the loss as falling, flat or rising from its relative change per decade.

    The loss counts as moving only when its change exceeds ``tolerance`` *and* is
    ``sensitivity`` standard errors away from zero: a training loss read over a few
    checkpoints is noisy (minibatches), and a stage should not be called "acquire" rather
    than "simplify" on the strength of that noise.

    Args:
        relative_slope: d loss / dlog10(step) divided by the loss level; ``nan`` if unknown.
        tolerance: ``DetectorConfig.flat_loss_tolerance``.
        relative_stderr: standard error of ``relative_slope`` (0: take it as exact).
        sensitivity: ``DetectorConfig.sensitivity``.

    Returns:
        ``(regime, reason)``; :attr:`Regime.UNCERTAIN` when no loss is known.
    """
    if not math.isfinite(relative_slope):
        return Regime.UNCERTAIN, "no loss was given"
    change = f"{relative_slope:+.0%} per decade"
    if abs(relative_slope) <= tolerance:
        return Regime.FLAT, f"the loss stayed flat ({change})"
    if math.isfinite(relative_stderr) and abs(relative_slope) < sensitivity * relative_stderr:
        return Regime.FLAT, f"the loss stayed flat ({change}, within its noise)"
    if relative_slope < 0:
        return Regime.FALLING, f"the loss fell ({change})"
    return Regime.RISING, f"the loss rose ({change})"


def classify_kind(new_regime: Regime, loss_trend: Regime) -> tuple[StageKind, str]:
    """Name a change of λ̂ trend by what the loss did meanwhile (Hoogland et al. 2024).

    Returns:
        ``(kind, reason)``: "acquire" when λ̂ starts rising while the loss falls,
        "simplify" when λ̂ starts falling while the loss is flat, otherwise "turn". Without a
        loss the kind cannot be told, and the change is a "turn".
    """
    if new_regime is Regime.RISING and loss_trend is Regime.FALLING:
        return StageKind.ACQUIRE, "the model is acquiring structure"
    if new_regime is Regime.FALLING and loss_trend is Regime.FLAT:
        return StageKind.SIMPLIFY, "the model is simplifying"
    return StageKind.TURN, "a change of trend"


# ----------------------------------------------------------------------------------------
# Numerical helpers (arrays in, Python floats out).


def _log_step(step: int | np.ndarray) -> Any:
    # log10(step + 1): step 0 maps to 0 instead of -inf; from step ~10 on, the shift is
    # smaller than the spacing of log-spaced checkpoints.
    return np.log10(np.asarray(step, dtype=float) + 1.0)


def _interpolation_residuals(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each interior point minus the straight line through its two neighbours, scaled to
    unit variance under white noise. A linear trend cancels exactly, a change of slope
    affects one residual, so the median of these residuals measures the noise alone."""
    if x.size < 3:
        return np.empty(0)
    left = x[1:-1] - x[:-2]
    right = x[2:] - x[1:-1]
    w_left = right / (left + right)
    w_right = left / (left + right)
    residual = y[1:-1] - (w_left * y[:-2] + w_right * y[2:])
    return residual / np.sqrt(1.0 + w_left**2 + w_right**2)


def _residual_noise(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Noise std about the local trend and its degrees of freedom, ``(nan, 0)`` if unknown.

    A trimmed root mean square of :func:`_interpolation_residuals`: residuals beyond 3.5
    robust (MAD) standard deviations, i.e. kinks and wild estimates, are left out, and the
    rest is averaged in squares, which wastes less of a short series than the median does.
    Neighbouring residuals share points (correlation -2/3 for even spacing), which halves
    the effective number of them: hence ``dof = 0.45 * count``.
    """
    residual = _interpolation_residuals(x, y)
    if residual.size < 3:
        return math.nan, 0.0
    robust = _MAD_TO_STD * float(np.median(np.abs(residual)))
    kept = residual[np.abs(residual) <= 3.5 * robust]
    return float(np.sqrt(np.mean(kept**2))), 0.45 * kept.size


@dataclass(frozen=True)
class _Noise:
    var: np.ndarray  # per-point noise variance
    dof: float  # degrees of freedom of the estimate; inf when the chain std is known


def _noise_model(
    chain_var: np.ndarray, x: np.ndarray, y: np.ndarray, *, recent: int | None = None
) -> _Noise:
    """Per-point noise variance: the larger of the chain variance and the residual noise.

    The chain std can understate the checkpoint-to-checkpoint scatter (chains that share
    batches, biases that vary between checkpoints); the residual estimate is noisy over a
    short stretch. Taking the larger is the conservative choice: it costs a little power and
    buys fewer false alarms. Where the chain std is unknown for some point, the thresholds
    account for the residual estimate's own uncertainty (its degrees of freedom).
    ``recent``: estimate the residual noise from the last ``recent`` points only.
    """
    part = slice(None) if recent is None else slice(-recent, None)
    noise, dof = _residual_noise(x[part], y[part])
    known = np.isfinite(chain_var)
    floor = noise * noise if math.isfinite(noise) else 0.0
    var = np.maximum(np.where(known, chain_var, 0.0), floor)
    return _Noise(var=var, dof=math.inf if known.all() else dof)


def _fit_line(x: np.ndarray, y: np.ndarray, var: np.ndarray) -> tuple[float, float, float]:
    """Ordinary least-squares slope of y on x, its standard error under the per-point
    variances ``var`` (exact for heteroscedastic noise), and the mean of y."""
    xc = x - x.mean()
    sxx = float(xc @ xc)
    level = float(y.mean())
    if sxx <= 0.0:
        return math.nan, math.nan, level
    weights = xc / sxx
    return float(weights @ y), float(math.sqrt(float(weights**2 @ var))), level


def _loss_trend(
    x: np.ndarray, loss: np.ndarray, segment: slice, config: DetectorConfig
) -> tuple[Regime, str]:
    """The loss trend over ``segment``: relative slope per decade, with a standard error
    from the loss's own relative scatter over all of ``x`` (the segment alone is too short
    to estimate it), classified by :func:`classify_loss_trend`."""
    xs, values = x[segment], loss[segment]
    ok = np.isfinite(values)
    if ok.sum() < 3:
        return classify_loss_trend(math.nan, config.flat_loss_tolerance)
    xs, values = xs[ok], values[ok]
    xc = xs - xs.mean()
    level = abs(float(values.mean()))
    if level == 0.0 or float(xc @ xc) == 0.0:
        return classify_loss_trend(math.nan, config.flat_loss_tolerance)
    weights = xc / float(xc @ xc)
    everywhere = np.isfinite(loss)
    scatter = loss[everywhere]
    # Relative scatter: of log(loss) for a positive loss (minibatch noise scales with the
    # loss), else of the loss in units of its mean magnitude.
    scatter = np.log(scatter) if (scatter > 0).all() else scatter / np.abs(scatter).mean()
    noise, _ = _residual_noise(x[everywhere], scatter)
    stderr = noise * math.sqrt(float(weights @ weights)) if math.isfinite(noise) else 0.0
    return classify_loss_trend(
        float(weights @ values) / level,
        config.flat_loss_tolerance,
        relative_stderr=stderr,
        sensitivity=config.sensitivity,
    )


@dataclass(frozen=True)
class _Hinge:
    kink: int  # index of the change point within the fitted points
    value: float  # fitted λ̂ at the change point
    slope_change: float  # new slope minus old slope, per decade
    change_stderr: float


def _hinge_fit(x: np.ndarray, y: np.ndarray, var: np.ndarray) -> _Hinge | None:
    """Best continuous two-piece line through the points, by weighted least squares.

    The kink is placed at a data point with at least three points on each side. This
    estimates where the new regime started, which the windowed slope only reveals with a
    delay, and how much the slope changed there, with its standard error from the inverse
    of the weighted normal matrix (weights: inverse noise variances). Taking the best of all
    kinks makes the change look a little more significant than it is; the thresholds
    absorb that (see the false-alarm rates in ``benchmarks/detector.py``).
    """
    n = x.size
    if n < 6:
        return None
    kinks = np.arange(2, n - 2)
    positive = var[var > 0]
    # Noise-free data (all variances 0): unit weights, and a zero standard error below.
    weight = 1.0 / np.maximum(var, positive.min() if positive.size else 1.0)
    offset = x[None, :] - x[kinks][:, None]  # (kink, point)
    design = np.stack([np.ones_like(offset), offset, np.maximum(offset, 0.0)], axis=-1)
    weighted = design * weight[None, :, None]
    gram = np.einsum("kni,knj->kij", weighted, design)  # (kink, 3, 3)
    rhs = np.einsum("kni,n->ki", weighted, y)
    beta = np.linalg.solve(gram, rhs[..., None])[..., 0]  # (kink, 3)
    residual = y[None, :] - np.einsum("kni,ki->kn", design, beta)
    best = int(np.argmin((residual**2 * weight[None, :]).sum(axis=1)))
    covariance = np.linalg.inv(gram[best]) if positive.size else np.zeros((3, 3))
    return _Hinge(
        kink=int(kinks[best]),
        value=float(beta[best, 0]),
        slope_change=float(beta[best, 2]),
        change_stderr=float(math.sqrt(max(float(covariance[2, 2]), 0.0))),
    )


def _message(
    *,
    component: str | None,
    step: int,
    previous: Regime,
    new: Regime,
    slope: float,
    loss_reason: str,
    loss_known: bool,
    kind: StageKind,
    kind_reason: str,
) -> str:
    who = "λ̂" if component is None else f"λ̂[{component}]"
    if new is Regime.FLAT:
        change = f"{who} levelled off ({slope:+.3g} per decade)"
    else:
        change = f"{who} started {new.value} ({slope:+.3g} per decade)"
    loss = f" while {loss_reason}" if loss_known else f" ({loss_reason})"
    meaning = kind_reason
    if kind is StageKind.TURN:
        meaning = f"{kind_reason} ({previous.value} -> {new.value})"
    return f"step {step}: {change}{loss}: {meaning}"


def _optional_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------
# Online detection.


@dataclass(frozen=True)
class StageEvent:
    """A change of developmental stage, found online by :class:`StageDetector`.

    Attributes:
        step: the estimated change point: the checkpoint where the new regime started.
        detected_at: the step at which the event was emitted (``>= step``).
        component: the component whose λ̂ this is; ``None`` for the whole model.
        kind: "acquire", "simplify" or "turn" (see :class:`StageKind`).
        previous_regime: the regime before the change ("rising", "flat", "falling").
        new_regime: the regime after it.
        llc: the fitted λ̂ at the change point (less noisy than the raw estimate there).
        loss: the training loss at the change point, if one was given.
        stage: the index of the stage that starts here (the first event starts stage 1).
        message: a one-line explanation for humans.
        checkpoint: the index of the change point among the checkpoints the detector used.
        delay: checkpoints between the change point and the detection (``>= persistence``
            in practice, plus the time the window needs to see the new trend).
        slope: the λ̂ slope per decade of steps since the change point.
    """

    step: int
    detected_at: int
    component: str | None
    kind: StageKind
    previous_regime: Regime
    new_regime: Regime
    llc: float
    loss: float | None
    stage: int
    message: str
    checkpoint: int = 0
    delay: int = 0
    slope: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """The event as plain Python types (str for the enums), e.g. for a W&B table."""
        return {
            "step": int(self.step),
            "detected_at": int(self.detected_at),
            "component": self.component,
            "kind": StageKind(self.kind).value,
            "previous_regime": Regime(self.previous_regime).value,
            "new_regime": Regime(self.new_regime).value,
            "llc": float(self.llc),
            "loss": None if self.loss is None else float(self.loss),
            "stage": int(self.stage),
            "message": str(self.message),
            "checkpoint": int(self.checkpoint),
            "delay": int(self.delay),
            "slope": float(self.slope),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageEvent:
        """Inverse of :meth:`to_dict`."""
        return cls(
            **{
                **data,
                "kind": StageKind(data["kind"]),
                "previous_regime": Regime(data["previous_regime"]),
                "new_regime": Regime(data["new_regime"]),
            }
        )


def _as_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise ValueError(f"Expected `step` to be a non-negative integer but got {step!r}.")
    integral = isinstance(step, numbers.Integral) or (
        math.isfinite(step) and float(step).is_integer()
    )
    if not integral or step < 0:
        raise ValueError(f"Expected `step` to be a non-negative integer but got {step!r}.")
    return int(step)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class StageDetector:
    """Online detector of developmental stages from a λ̂ series over log-spaced checkpoints.

    At each checkpoint it fits a line to λ̂ against log10(step + 1) over the last ``window``
    checkpoints, with a standard error from the chain std (``llc_std``) and from the scatter
    of the curve (whichever is larger), and classifies the trend with
    :func:`classify_trend`. When a new regime (rising / flat / falling) has held for
    ``persistence`` consecutive checkpoints, it locates the change point by a two-piece
    linear fit since the previous change, checks with :func:`confirm_change` that the slope
    changed significantly there and that the points after it agree with the new regime,
    names the change with :func:`classify_kind` (acquire / simplify / turn, from the loss
    trend since the change point) and emits a :class:`StageEvent`, at most one per
    ``cooldown`` checkpoints. The first regime seen sets stage 0 and emits
    nothing.

    Hoogland et al. 2024 find stage boundaries retrospectively on the smoothed curve
    (:func:`retrospective_stages`); online, a change can only be confirmed once the new trend
    has been seen, so each event reports its delay.

    Args:
        config: thresholds; the defaults suit ~15-25 checkpoints per decade and a chain std
            of a few percent of λ̂.
        component: the component name to report in events (``None`` for the whole model).

    Example:
        >>> import numpy as np
        >>> steps = np.unique(np.geomspace(1, 1e5, 100).astype(int))
        >>> x = np.log10(steps + 1)
        >>> llc = np.interp(x, [0, 2.5, 5], [10, 10, 50])
        >>> loss = np.interp(x, [0, 2.5, 5], [1.0, 1.0, 0.2])
        >>> detector = StageDetector()
        >>> events = [e for s, l, f in zip(steps, llc, loss)
        ...           if (e := detector.update(int(s), float(l), 0.0, float(f)))]
        >>> [(e.kind.value, e.new_regime.value) for e in events]
        [('acquire', 'rising')]
    """

    def __init__(self, config: DetectorConfig | None = None, *, component: str | None = None):
        if config is None:
            config = DetectorConfig()
        if not isinstance(config, DetectorConfig):
            raise ValueError(
                f"Expected `config` to be a DetectorConfig but got {type(config).__name__}."
            )
        self.config = config
        self.component = component
        # Enough history for the noise estimate (3 windows) and the change-point search.
        self._history = 5 * config.window + config.persistence
        self._reset()

    def _reset(self) -> None:
        self._steps: list[int] = []
        self._llcs: list[float] = []
        self._variances: list[float] = []  # chain variance; nan when unknown
        self._losses: list[float] = []  # nan when unknown
        self._dropped = 0  # checkpoints trimmed from the front of the buffers
        self._regime: Regime | None = None
        self._candidate: Regime | None = None
        self._candidate_count = 0
        self._last_event_checkpoint: int | None = None
        self._last_change_checkpoint: int | None = None
        self._events: list[StageEvent] = []
        self.num_checkpoints = 0
        """Checkpoints used (finite λ̂, increasing step)."""
        self.num_ignored = 0
        """Checkpoints ignored because λ̂ was not finite."""
        self.num_out_of_order = 0
        """Checkpoints ignored because their step did not exceed the previous one."""
        self.last_trend: tuple[float, float, str] | None = None
        """``(slope, stderr, regime)`` of the latest windowed fit, for logging."""

    @property
    def events(self) -> list[StageEvent]:
        """The events emitted so far, in order."""
        return list(self._events)

    @property
    def stage(self) -> int:
        """The index of the current stage (0 until the first event)."""
        return len(self._events)

    @property
    def regime(self) -> Regime | None:
        """The current regime, ``None`` until one has persisted."""
        return self._regime

    def update(
        self, step: int, llc: float, llc_std: float = math.nan, loss: float | None = None
    ) -> StageEvent | None:
        """Feed one checkpoint; return the event it completes, if any.

        Args:
            step: the training step (integer >= 0), increasing from call to call. A step
                that does not exceed the previous one (e.g. a checkpoint replayed after a
                resume) is ignored and counted in :attr:`num_out_of_order`.
            llc: the λ̂ estimate. A non-finite value (diverged chains) is ignored and counted
                in :attr:`num_ignored`.
            llc_std: the noise of ``llc`` (the chain std; pass std/sqrt(chains) if you want
                the standard error of the mean instead). ``nan`` or 0 when unknown: the noise
                is then estimated from the curve's own scatter.
            loss: the training loss at this step, used only to name the kind of event.

        Returns:
            A :class:`StageEvent` when this checkpoint confirms a change of regime, else
            ``None``.

        Raises:
            ValueError: ``step`` is not a non-negative integer.
        """
        step = _as_step(step)
        value = _as_float(llc)
        if not math.isfinite(value):
            self.num_ignored += 1
            return None
        if self._steps and step <= self._steps[-1]:
            self.num_out_of_order += 1
            return None
        std = _as_float(llc_std)
        self._steps.append(step)
        self._llcs.append(value)
        self._variances.append(std * std if math.isfinite(std) and std > 0 else math.nan)
        self._losses.append(_as_float(loss) if loss is not None else math.nan)
        self.num_checkpoints += 1
        excess = len(self._steps) - self._history
        if excess > 0:
            for buffer in (self._steps, self._llcs, self._variances, self._losses):
                del buffer[:excess]
            self._dropped += excess
        return self._advance()

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, _Noise]:
        x = _log_step(np.asarray(self._steps, dtype=float))
        y = np.asarray(self._llcs, dtype=float)
        chain_var = np.asarray(self._variances, dtype=float)
        # Residual noise from the last three windows: long enough for a stable estimate,
        # short enough to follow a noise level that grows with λ̂.
        return x, y, _noise_model(chain_var, x, y, recent=3 * self.config.window)

    def _advance(self) -> StageEvent | None:
        cfg = self.config
        if len(self._steps) < cfg.window:
            return None
        x, y, noise = self._arrays()
        last = slice(-cfg.window, None)
        slope, stderr, level = _fit_line(x[last], y[last], noise.var[last])
        regime, _ = classify_trend(slope, stderr, cfg, level=level, dof=noise.dof)
        self.last_trend = (slope, stderr, regime.value)
        if regime is Regime.UNCERTAIN or regime is self._regime:
            # Persistence means *consecutive* checkpoints: anything else restarts the count.
            self._candidate, self._candidate_count = None, 0
            return None
        if regime is self._candidate:
            self._candidate_count += 1
        else:
            self._candidate, self._candidate_count = regime, 1
        if self._candidate_count < cfg.persistence:
            return None
        now = self.num_checkpoints - 1
        if self._regime is None:
            # The first regime defines stage 0; there is no change to report.
            self._regime = regime
            self._candidate, self._candidate_count = None, 0
            return None
        previous = self._last_event_checkpoint
        if previous is not None and now - previous < cfg.cooldown:
            return None  # keep the candidate: it is emitted when the cooldown ends
        event = self._build_event(regime, x, y, noise)
        if event is None:
            return None
        self._events.append(event)
        self._regime = regime
        self._candidate, self._candidate_count = None, 0
        self._last_event_checkpoint = now
        self._last_change_checkpoint = event.checkpoint
        return event

    def _build_event(
        self, regime: Regime, x: np.ndarray, y: np.ndarray, noise: _Noise
    ) -> StageEvent | None:
        cfg = self.config
        start = 0
        if self._last_change_checkpoint is not None:
            start = max(0, self._last_change_checkpoint - self._dropped)
        var = noise.var
        hinge = _hinge_fit(x[start:], y[start:], var[start:])
        if hinge is None:
            return None  # too few points since the last change to locate a new one yet
        kink = start + hinge.kink
        post = slice(kink, None)
        slope, stderr, level = _fit_line(x[post], y[post], var[post])
        confirmed, _ = confirm_change(
            regime,
            slope=slope,
            stderr=stderr,
            slope_change=hinge.slope_change,
            change_stderr=hinge.change_stderr,
            config=cfg,
            level=level,
            dof=noise.dof,
        )
        if not confirmed:
            return None
        losses = np.asarray(self._losses, dtype=float)
        # The loss trend of the new stage, from the later half of the points since the
        # change point (but at least 6): the change point is uncertain by a few checkpoints,
        # and the loss often moves fast just before it (the end of the previous stage).
        after = x.size - kink
        recent = slice(kink + max(0, min(after // 2, after - 6)), None)
        loss_trend, loss_reason = _loss_trend(x, losses, recent, cfg)
        kind, kind_reason = classify_kind(regime, loss_trend)
        assert self._regime is not None  # a first regime exists before any event
        step, detected_at = self._steps[kink], self._steps[-1]
        checkpoint = self._dropped + kink
        delay = self.num_checkpoints - 1 - checkpoint
        message = _message(
            component=self.component,
            step=step,
            previous=self._regime,
            new=regime,
            slope=slope,
            loss_reason=loss_reason,
            loss_known=loss_trend is not Regime.UNCERTAIN,
            kind=kind,
            kind_reason=kind_reason,
        )
        return StageEvent(
            step=step,
            detected_at=detected_at,
            component=self.component,
            kind=kind,
            previous_regime=self._regime,
            new_regime=regime,
            llc=hinge.value,
            loss=_optional_float(float(losses[kink])),
            stage=len(self._events) + 1,
            message=f"{message} [detected at step {detected_at}, {delay} checkpoints later]",
            checkpoint=checkpoint,
            delay=delay,
            slope=slope,
        )

    # ------------------------------------------------------------------------------------
    # Checkpointing.

    def state_dict(self) -> dict[str, Any]:
        """The detector's state as plain Python types (``weights_only``-loadable).

        Unknown chain stds and losses are stored as ``None``.
        """
        return {
            "version": _STATE_VERSION,
            "component": self.component,
            "steps": [int(s) for s in self._steps],
            "llcs": [float(v) for v in self._llcs],
            "variances": [_optional_float(v) for v in self._variances],
            "losses": [_optional_float(v) for v in self._losses],
            "dropped": int(self._dropped),
            "regime": None if self._regime is None else self._regime.value,
            "candidate": None if self._candidate is None else self._candidate.value,
            "candidate_count": int(self._candidate_count),
            "last_event_checkpoint": self._last_event_checkpoint,
            "last_change_checkpoint": self._last_change_checkpoint,
            "events": [event.to_dict() for event in self._events],
            "num_checkpoints": int(self.num_checkpoints),
            "num_ignored": int(self.num_ignored),
            "num_out_of_order": int(self.num_out_of_order),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the detector then continues exactly where it was.

        The configuration is the one this detector was built with (a resumed run may
        deliberately change thresholds); ``component`` is restored from the state.

        Raises:
            ValueError: keys are missing or unknown, or the version is not supported.
        """
        check_state("StageDetector", state, set(self.state_dict()), _STATE_VERSION)

        def nan_if_none(values: list[float | None]) -> list[float]:
            return [math.nan if v is None else float(v) for v in values]

        self._reset()
        self.component = state["component"]
        self._steps = [int(s) for s in state["steps"]]
        self._llcs = [float(v) for v in state["llcs"]]
        self._variances = nan_if_none(state["variances"])
        self._losses = nan_if_none(state["losses"])
        self._dropped = int(state["dropped"])
        self._regime = None if state["regime"] is None else Regime(state["regime"])
        self._candidate = None if state["candidate"] is None else Regime(state["candidate"])
        self._candidate_count = int(state["candidate_count"])
        self._last_event_checkpoint = state["last_event_checkpoint"]
        self._last_change_checkpoint = state["last_change_checkpoint"]
        self._events = [StageEvent.from_dict(dict(e)) for e in state["events"]]
        self.num_checkpoints = int(state["num_checkpoints"])
        self.num_ignored = int(state["num_ignored"])
        self.num_out_of_order = int(state["num_out_of_order"])


# ----------------------------------------------------------------------------------------
# Retrospective analysis.


@dataclass(frozen=True)
class SmoothedCurve:
    """λ̂ smoothed in log-step by local-linear Gaussian kernel regression.

    Attributes:
        steps: the checkpoints used (finite λ̂), shape (n,).
        index: their positions in the input sequence, shape (n,).
        log_steps: log10(step + 1), shape (n,).
        smoothed: smoothed λ̂ at each checkpoint, shape (n,).
        slope: dλ̂/dlog10(step) of the local fit, per decade, shape (n,).
        slope_stderr: standard error of ``slope`` under the noise model, shape (n,).
        noise: the typical noise std of one λ̂ (median over checkpoints of the larger of
            the chain std and the residual noise).
        bandwidth: the kernel's standard deviation, in decades.
        dof: degrees of freedom of the noise estimate (``inf`` when chain stds were given).
    """

    steps: np.ndarray
    index: np.ndarray
    log_steps: np.ndarray
    smoothed: np.ndarray
    slope: np.ndarray
    slope_stderr: np.ndarray
    noise: float
    bandwidth: float
    dof: float


def smooth_log_step(
    steps: Sequence[int] | np.ndarray,
    llcs: Sequence[float] | np.ndarray,
    *,
    llc_stds: Sequence[float] | np.ndarray | None = None,
    smoothing: float | None = None,
) -> SmoothedCurve:
    """Smooth λ̂ in log10(step + 1) with a Gaussian kernel (local-linear regression).

    Local-linear rather than a plain kernel average: it has no bias at the ends of the curve
    (a kernel average flattens the first and last bandwidth) and yields the derivative
    dλ̂/dlog t directly, with its standard error, which is what the stage boundaries of
    Hoogland et al. 2024 are defined by.

    Args:
        steps: training steps, strictly increasing once non-finite λ̂ are dropped.
        llcs: λ̂ at each step; non-finite values are dropped.
        llc_stds: the chain std at each step (optional; non-finite or 0 means unknown).
        smoothing: the kernel's standard deviation in decades of steps; default four times
            the median spacing of the checkpoints in log-step (0.2 decade at 20 checkpoints
            per decade): about as many points per slope as the online detector's window.

    Raises:
        ValueError: lengths differ, steps are not increasing, fewer than 5 finite points, or
            ``smoothing`` is not positive.
    """
    step_arr = np.asarray(steps, dtype=float)
    y_all = np.asarray(llcs, dtype=float)
    if step_arr.shape != y_all.shape or step_arr.ndim != 1:
        raise ValueError(
            f"Expected `steps` and `llcs` to be 1-D of equal length but got shapes "
            f"{step_arr.shape} and {y_all.shape}."
        )
    chain_std = np.full_like(y_all, math.nan) if llc_stds is None else np.asarray(llc_stds, float)
    if chain_std.shape != y_all.shape:
        raise ValueError(
            f"Expected `llc_stds` to have the shape of `llcs` {y_all.shape} but got "
            f"{chain_std.shape}."
        )
    keep = np.flatnonzero(np.isfinite(y_all))
    if keep.size < 5:
        raise ValueError(f"Expected at least 5 finite `llcs` but got {keep.size}.")
    if np.any(np.diff(step_arr[keep]) <= 0) or step_arr[keep][0] < 0:
        raise ValueError("Expected `steps` to be non-negative and strictly increasing.")
    x = _log_step(step_arr[keep])
    y = y_all[keep]
    if smoothing is None:
        smoothing = 4.0 * float(np.median(np.diff(x)))
    bandwidth = check_number("smoothing", smoothing, strict=True)

    std = chain_std[keep]
    noise = _noise_model(np.where(std > 0, std * std, math.nan), x, y)

    kernel = np.exp(-0.5 * ((x[None, :] - x[:, None]) / bandwidth) ** 2)  # (at, point)
    total = kernel.sum(axis=1)
    centre = kernel @ x / total
    offset = x[None, :] - centre[:, None]
    spread = (kernel * offset**2).sum(axis=1)
    slope_weights = kernel * offset / spread[:, None]
    value_weights = kernel / total[:, None] + slope_weights * (x - centre)[:, None]
    return SmoothedCurve(
        steps=step_arr[keep].astype(int),
        index=keep,
        log_steps=x,
        smoothed=value_weights @ y,
        slope=slope_weights @ y,
        slope_stderr=np.sqrt(slope_weights**2 @ noise.var),
        noise=math.sqrt(float(np.median(noise.var))),
        bandwidth=bandwidth,
        dof=noise.dof,
    )


@dataclass(frozen=True)
class StageBoundary:
    """A stage boundary found retrospectively by :func:`retrospective_stages`.

    Attributes:
        step: the checkpoint nearest the boundary.
        checkpoint: its index in the input sequence.
        log_step: the boundary's position in log10(step + 1), interpolated between
            checkpoints.
        kind: "acquire", "simplify" or "turn".
        previous_regime: regime of the smoothed curve before the boundary.
        new_regime: regime after it.
        llc: the smoothed λ̂ at the boundary.
        loss: the loss at ``step``, if losses were given.
        slope: the mean smoothed slope (per decade) of the new stage.
        stage: the index of the stage that starts here (the first boundary starts stage 1).
        message: a one-line explanation.
    """

    step: int
    checkpoint: int
    log_step: float
    kind: StageKind
    previous_regime: Regime
    new_regime: Regime
    llc: float
    loss: float | None
    slope: float
    stage: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        """The boundary as plain Python types."""
        return {
            "step": int(self.step),
            "checkpoint": int(self.checkpoint),
            "log_step": float(self.log_step),
            "kind": StageKind(self.kind).value,
            "previous_regime": Regime(self.previous_regime).value,
            "new_regime": Regime(self.new_regime).value,
            "llc": float(self.llc),
            "loss": None if self.loss is None else float(self.loss),
            "slope": float(self.slope),
            "stage": int(self.stage),
            "message": str(self.message),
        }


def _segments(
    regimes: list[Regime], x: np.ndarray, min_points: int, min_extent: float
) -> list[tuple[Regime, int, int]]:
    """Maximal runs ``(regime, first, last)`` of a decided regime; runs with fewer than
    ``min_points`` points or spanning less than ``min_extent`` in log-step are dropped (a
    blip of the smoothed slope is not a stage), then neighbouring runs of the same regime
    are merged across the gap the dropped ones left."""
    runs: list[tuple[Regime, int, int]] = []
    first = 0
    for i in range(1, len(regimes) + 1):
        if i == len(regimes) or regimes[i] is not regimes[first]:
            long_enough = i - first >= min_points and x[i - 1] - x[first] >= min_extent
            if regimes[first] is not Regime.UNCERTAIN and long_enough:
                runs.append((regimes[first], first, i - 1))
            first = i
    merged: list[tuple[Regime, int, int]] = []
    for run in runs:
        if merged and merged[-1][0] is run[0]:
            merged[-1] = (run[0], merged[-1][1], run[2])
        else:
            merged.append(run)
    return merged


def _crossing(
    x: np.ndarray, slope: np.ndarray, lo: int, hi: int, near: float, target: float
) -> float:
    """Where, between ``x[lo]`` and ``x[hi]``, the slope crosses ``target`` (linear
    interpolation), choosing the crossing nearest ``near``; ``near`` itself if none.

    The search spans both stages, not just the gap between them: with precise estimates the
    next regime is declared as soon as the kernel's tail feels the change, well before the
    change itself."""
    above = slope[lo : hi + 1] - target
    best, best_distance = near, math.inf
    for j in range(above.size - 1):
        a, b = above[j], above[j + 1]
        if a == 0.0 or a * b < 0.0:
            at = float(x[lo + j] + (x[lo + j + 1] - x[lo + j]) * a / (a - b))
            if abs(at - near) < best_distance:
                best, best_distance = at, abs(at - near)
    return best


def retrospective_stages(
    steps: Sequence[int] | np.ndarray,
    llcs: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray | None = None,
    *,
    llc_stds: Sequence[float] | np.ndarray | None = None,
    smoothing: float | None = None,
    config: DetectorConfig | None = None,
    min_points: int = 3,
    min_stage_decades: float | None = None,
    component: str | None = None,
) -> list[StageBoundary]:
    """Stage boundaries of a whole λ̂ curve, in the manner of Hoogland et al. 2024.

    The curve is smoothed in log-step (:func:`smooth_log_step`); each checkpoint's smoothed
    slope is classified with :func:`classify_trend` (the same thresholds as the online
    detector, with the slope's standard error); runs of one regime at least ``min_points``
    checkpoints and ``min_stage_decades`` long are stages, and a boundary lies where the
    slope crosses halfway between the mean
    slopes of the two stages. For a kink smoothed by a symmetric kernel that is the kink
    itself; for a peak it is where dλ̂/dlog t changes sign. The kind comes from the loss
    trend over the new stage (:func:`classify_kind`). Use :func:`smooth_log_step` with the
    same arguments for the smoothed curve itself (e.g. to plot it).

    Args:
        steps: training steps, strictly increasing.
        llcs: λ̂ at each step; non-finite values are skipped.
        losses: training loss at each step (optional), to tell "acquire"/"simplify".
        llc_stds: chain std at each step (optional).
        smoothing: kernel std in decades; default 4 median checkpoint spacings.
        config: thresholds (``sensitivity``, ``flat_threshold``, ``min_relative_slope``,
            ``flat_loss_tolerance``); the defaults of :class:`DetectorConfig` otherwise.
        min_points: shortest run of checkpoints that counts as a stage.
        min_stage_decades: shortest stage, in decades of steps; default the kernel
            bandwidth. The smoothing blurs every change over about a bandwidth, so a shorter
            "stage" is the blur itself, e.g. the moment the slope passes zero at a peak.
        component: the component name, for the messages.

    Returns:
        The boundaries in order of step; empty if the curve has a single regime.
    """
    cfg = DetectorConfig() if config is None else config
    min_points = check_int("min_points", min_points, minimum=1)
    curve = smooth_log_step(steps, llcs, llc_stds=llc_stds, smoothing=smoothing)
    x, slope = curve.log_steps, curve.slope
    loss_all = np.full(len(np.asarray(llcs)), math.nan)
    if losses is not None:
        loss_all = np.array([_as_float(v) for v in losses], dtype=float)
        if loss_all.shape != (len(np.asarray(llcs)),):
            raise ValueError(
                f"Expected `losses` to have the length of `llcs` ({len(np.asarray(llcs))}) "
                f"but got {loss_all.shape[0]}."
            )
    loss = loss_all[curve.index]
    regimes = [
        classify_trend(float(s), float(se), cfg, level=float(m), dof=curve.dof)[0]
        for s, se, m in zip(slope, curve.slope_stderr, curve.smoothed, strict=True)
    ]
    extent = curve.bandwidth if min_stage_decades is None else min_stage_decades
    extent = check_number("min_stage_decades", extent, strict=False)
    runs = _segments(regimes, x, min_points, extent)
    boundaries: list[StageBoundary] = []
    for (before, first_a, last_a), (after, first_b, last_b) in itertools.pairwise(runs):
        target = 0.5 * (slope[first_a : last_a + 1].mean() + slope[first_b : last_b + 1].mean())
        junction = 0.5 * float(x[last_a] + x[first_b])
        at = _crossing(x, slope, first_a, last_b, junction, float(target))
        i = int(np.argmin(np.abs(x - at)))
        stage_slope = float(slope[i : last_b + 1].mean())
        loss_trend, loss_reason = _loss_trend(x, loss, slice(i, last_b + 1), cfg)
        kind, kind_reason = classify_kind(after, loss_trend)
        step = int(curve.steps[i])
        boundaries.append(
            StageBoundary(
                step=step,
                checkpoint=int(curve.index[i]),
                log_step=at,
                kind=kind,
                previous_regime=before,
                new_regime=after,
                llc=float(np.interp(at, x, curve.smoothed)),
                loss=_optional_float(float(loss[i])),
                slope=stage_slope,
                stage=len(boundaries) + 1,
                message=_message(
                    component=component,
                    step=step,
                    previous=before,
                    new=after,
                    slope=stage_slope,
                    loss_reason=loss_reason,
                    loss_known=loss_trend is not Regime.UNCERTAIN,
                    kind=kind,
                    kind_reason=kind_reason,
                ),
            )
        )
    return boundaries


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
