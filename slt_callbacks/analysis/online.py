"""Developmental stages found online, one checkpoint at a time, on the whole λ̂ curve.

What a stage transition looks like depends on where training is:

- **at saddles** (a loss plateau; LLC status ``not_a_minimum``), λ̂ reads large and negative,
  and when the model learns the next feature the loss drops and λ̂ *jumps* up by orders of
  magnitude (saddle-to-saddle dynamics of deep linear networks: ≈ −5,800 → −600 → −30 → +12
  over three drops). These estimates are not complexities, but their change is the signal;
- **near minima** (Hoogland et al. 2024, "The developmental landscape of in-context
  learning"), the smoothed λ̂ against log(step) changes *trend*: it starts rising while the
  loss falls (the model acquires structure), or falls while the loss is flat (it simplifies).

:class:`StageDetector` looks for both on one scale. Every estimate is mapped to
``z = sign(λ̂)·log1p(|λ̂|/s)`` (:func:`~slt_callbacks.analysis.noise.signed_log`, scale ``s`` =
:attr:`DetectorConfig.scale`), on which a relative noise of 10% is a constant noise of ~0.1
and a jump from −5,800 to −600 is as visible as one from 60 to 6. Against log10(step + 1),
the current stage is a line. At each checkpoint the detector asks, for every candidate change
point ``k`` among the last ``window`` checkpoints, whether the points from ``k`` on leave
that line, either by a **jump** (a step of the level, the slope unchanged) or by a **kink**
(a change of slope, the level continuous). Both are one-parameter extensions of the line,
fitted by weighted least squares (jumps on the signed-log scale, kinks on λ̂ itself); the
coefficient's t is the generalized likelihood ratio test of one added parameter. A jump may
take up to 3 checkpoints (a *ramp*): the points in transit are free in its fit (any path
between the levels), each one must lie between them, and each costs Akaike's 2 in the
comparison of candidates; the change point is where λ̂ itself is past half-way.

- A **jump** counts when its t exceeds ``sensitivity``, it is of a practical size
  (``min_jump``), every one of the ``persistence`` points after ``k`` deviates from the old
  line in its direction, it is a jump on λ̂ itself as well (a trend straight in λ̂ bends on
  the log scale, and a bend is no jump), and it explains λ̂ better than the best kink.
- A **kink** is tested only at its best change point (the maximum of the likelihood over
  ``k``), only once that point is *localized* (change points 5 or more checkpoints away fit
  worse by a likelihood ratio of e or more), and counts when its t exceeds
  ``kink_sensitivity``. A kink announced anywhere along a gentle bend would be a false alarm
  and a miss at once. It is announced once it has passed at two checkpoints in a row (or
  passed, and at the next checkpoint a change still holds, such as a jump in progress): the
  first checkpoint at which a kink passes is often one whose newest estimates happen to lie
  off the line, and they also drag its change point late.

The best surviving candidate (least squares) is the change point; the event reports its
delay in checkpoints.

A jump of a few noise stds is confirmed ``persistence − 1`` checkpoints after it happened (2
by default). A kink needs the new trend to build up, so its delay is longer, and no test can
do much better: after ``j`` checkpoints a slope change of ``Δ`` per checkpoint has moved the
curve by ``Δ·j``, so with the old line known exactly the best single test reaches
``Δ·sqrt(Σ i²)/σ`` standard errors (``i = 1..j``). On the benchmark's trend scenarios at 10%
noise that bound is 0.5-2.5 standard errors after 3 checkpoints, and the measured median
delay is ~11 checkpoints (``benchmarks/results/detector.md``).

Each event has a kind (:class:`StageKind`): *acquire* when λ̂ goes up (jumps or starts rising)
while the loss falls or has not yet moved, *simplify* when λ̂ goes down while the loss does not
rise, otherwise *turn* (λ̂ levels off, or the loss rose).

Everything here is plain numpy; the detector's state is plain Python values so that it
survives ``torch.save`` and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from .._checks import check_int, check_number, check_state
from .noise import residual_noise, signed_log, signed_log_inverse, signed_log_stderr

__all__ = [
    "DetectorConfig",
    "Regime",
    "StageDetector",
    "StageEvent",
    "StageKind",
    "classify_kind",
    "classify_loss_change",
    "classify_loss_trend",
    "classify_trend",
    "judge_change",
    "log_step",
    "trend_threshold",
]

_STATE_VERSION = 2
# Noise-free data (a test, or estimates far more precise than any change): every variance is
# floored here so that the weights stay finite; the practical minimums then decide.
_VARIANCE_FLOOR = 1e-12
# The most a change's model may leave unexplained after the change point (RMS, in noise stds).
_MAX_MISFIT = 5.0
# A kink is searched only this many checkpoints into a stage: the old trend must be known
# before a change of it means anything.
_KINK_MIN_STAGE = 10
# A kink is announced only once it is localized: every change point at least
# _LOCALIZED_WITHIN checkpoints from the best one explains the points worse by at least
# _LOCALIZED_BY (residual sum of squares, in noise variances; 2 is a likelihood ratio of e).
# Before that, a weak kink would be announced anywhere along a gentle bend.
_LOCALIZED_WITHIN = 5
_LOCALIZED_BY = 2.0
# The new trend of a kink is rising or falling when its slope is this many standard errors
# from 0 (a naming decision, not a detection: the change itself passed `kink_sensitivity`).
_KIND_T = 1.5
# Standard errors are pooled over this many checkpoints (a trailing median; see _arrays).
_POOLED = 9
# A jump this many times its threshold is not compared with kinks (see StageDetector._real).
_CLEAR_JUMP = 2.0
# ... where a point's own standard error is within this factor of the pooled one (a 4-chain
# std is, 98% of the time). Beyond it the noise itself changes (a saddle's chains agree to
# 0.1%, near λ̂ = 0 they do not) and the point keeps its own.
_ALIKE = 3.0
# A kink's noise on λ̂ is the signed-log noise times the level of the curve (the delta
# method). The level is the trailing median of |λ̂| over _POOLED checkpoints of the stage,
# where a point lies within this many noise stds of it (signed-log scale); beyond, the curve
# has moved (a jump in progress) and the point keeps its own.
_LEVEL_WITHIN = 3.0


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
    """λ̂ goes up (jumps or starts rising) while the loss falls, or has not risen: the model
    acquires structure (see :func:`classify_kind`)."""
    SIMPLIFY = "simplify"
    """λ̂ goes down while the loss stays flat (or falls): the model simplifies."""
    TURN = "turn"
    """Any other change: λ̂ levels off (rising -> flat), or moves while the loss rises, or no
    loss is known."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """Thresholds of the stage detector; plain numbers, so it can live in a YAML config.

    Args:
        scale: ``s`` of the signed-log scale ``sign(λ̂)·log1p(|λ̂|/s)`` the detector works on.
            Below ``s`` the scale is linear, above it logarithmic; 1 suits λ̂ of a few units
            and more (every model worth monitoring). For models whose λ̂ stays well below 1,
            pass a scale of about their λ̂.
        sensitivity: how many standard errors a jump must exceed. Every checkpoint tests
            ~``4 × window`` candidate jumps, so the threshold sits above the textbook 3 (see
            the false-alarm rates in ``benchmarks/detector.py``). Raised automatically
            (Student t) when the noise is estimated from the curve.
        kink_sensitivity: the same for a change of slope, tested only at the best-fitting
            change point and only once it is localized. A separate knob because the trade-off
            differs: a kink builds up slowly (after ``j`` checkpoints its deviation from the
            old line is ``Δ·j``), so every standard error of threshold costs several
            checkpoints of delay, where for a jump it costs none or one. On the benchmark
            4.0 answers a checkpoint sooner on trends; on 40 seeds outside the tuning set
            its precision and recall were within 0.02 of 4.5's.
        flat_threshold: a trend counts as flat when its slope is within this many standard
            errors of zero, and every point after a change must deviate from the old line by
            at least this many standard errors in the change's direction. At most
            ``sensitivity``.
        persistence: checkpoints from the change point on (itself included) that must agree
            with a change before it is announced. 1 would let a single wild estimate through;
            the delay of a jump is ``persistence − 1`` checkpoints.
        cooldown: checkpoints a stage must last before the next change point: its line is
            fitted on them. Also the shortest stage that can be resolved (stages 8-10
            checkpoints apart are resolved with the default).
        window: how far back change points are searched, and how many checkpoints before
            the first candidate the old stage's line is fitted on. 30 (1.5 decades at 20
            checkpoints per decade): a gentle kink needs that much of its old trend.
        min_jump: the smallest jump that counts, in signed-log units (0.1: about 10% of
            |λ̂| when |λ̂| ≫ ``scale``). Very precise estimates would otherwise turn every
            wiggle of a real curve into a "jump".
        min_relative_slope: the smallest slope, and change of slope, that counts, in
            signed-log units per decade of steps (0.1: about 10% per decade).
        flat_loss_tolerance: the loss counts as flat when it changes by less than this
            fraction of its level across a jump, or per decade along a trend.
        min_noise: the noise of one estimate is taken as at least this, in signed-log units
            (0.03: 3% of |λ̂|). Chains that agree to 0.1% (at a saddle, with a small step
            size) still differ from checkpoint to checkpoint by several percent: SGLD's bias
            moves with the weights. Without a floor every drift of a plateau is "significant".

    Raises:
        ValueError: a field is out of range; the message names it and the value received.
    """

    scale: float = 1.0
    sensitivity: float = 4.5
    kink_sensitivity: float = 4.5
    flat_threshold: float = 1.0
    persistence: int = 3
    cooldown: int = 4
    window: int = 30
    min_jump: float = 0.1
    min_relative_slope: float = 0.1
    flat_loss_tolerance: float = 0.1
    min_noise: float = 0.03

    def __post_init__(self) -> None:
        checked: dict[str, float | int] = {
            "scale": check_number("scale", self.scale, strict=True),
            "sensitivity": check_number("sensitivity", self.sensitivity, strict=True),
            "kink_sensitivity": check_number(
                "kink_sensitivity", self.kink_sensitivity, strict=True
            ),
            "flat_threshold": check_number("flat_threshold", self.flat_threshold, strict=True),
            "persistence": check_int("persistence", self.persistence, minimum=1),
            # A line needs 3 points to leave a residual degree of freedom.
            "cooldown": check_int("cooldown", self.cooldown, minimum=3),
            "window": check_int("window", self.window, minimum=5),
            "min_jump": check_number("min_jump", self.min_jump),
            "min_relative_slope": check_number("min_relative_slope", self.min_relative_slope),
            "flat_loss_tolerance": check_number("flat_loss_tolerance", self.flat_loss_tolerance),
            "min_noise": check_number("min_noise", self.min_noise),
        }
        for name in ("sensitivity", "kink_sensitivity"):
            if checked["flat_threshold"] > checked[name]:
                raise ValueError(
                    f"Expected `flat_threshold` to be at most `{name}` ({checked[name]}) "
                    f"but got {self.flat_threshold!r}."
                )
        if checked["cooldown"] > checked["window"]:
            raise ValueError(
                f"Expected `cooldown` to be at most `window` ({self.window}) but got "
                f"{self.cooldown!r}."
            )
        # Plain Python numbers (numpy scalars would leak into checkpoints and YAML).
        for name, value in checked.items():
            object.__setattr__(self, name, value)


# ----------------------------------------------------------------------------------------
# Pure decisions, each returning a reason.


def log_step(step: Any) -> Any:
    """``log10(step + 1)``: step 0 maps to 0; from step ~10 on the shift is smaller than the
    spacing of log-spaced checkpoints."""
    return np.log10(np.asarray(step, dtype=float) + 1.0)


def trend_threshold(sensitivity: float, dof: float = math.inf) -> float:
    """The t threshold as rare as ``sensitivity`` normal standard deviations when the noise
    was estimated with ``dof`` degrees of freedom (Student t quantile, Cornish-Fisher
    expansion to second order; within a few percent of the exact quantile for dof >= 10)."""
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
    level: float = 1.0,
    dof: float = math.inf,
) -> tuple[Regime, str]:
    """Classify a fitted slope against log10(step) as rising, flat, falling or uncertain.

    Args:
        slope: per decade of steps.
        stderr: its standard error (0 for noise-free data).
        config: ``sensitivity``, ``flat_threshold`` and ``min_relative_slope``.
        level: the practical floor is ``min_relative_slope × |level|``; 1 on the signed-log
            scale (whose slopes are already relative), the λ̂ level on the raw scale.
        dof: degrees of freedom of the noise estimate behind ``stderr``.

    Returns:
        ``(regime, reason)``.
    """
    if not math.isfinite(slope):
        return Regime.UNCERTAIN, f"the slope {slope} is not finite"
    floor = config.min_relative_slope * abs(level)
    if abs(slope) < floor or abs(slope) <= 1e-12 * (1.0 + abs(level)):
        return Regime.FLAT, f"|slope| {abs(slope):.3g}/decade is below the minimum {floor:.3g}"
    precise = not (math.isfinite(stderr) and stderr > 0)
    t = math.copysign(math.inf, slope) if precise else slope / stderr
    threshold = trend_threshold(config.sensitivity, dof)
    if abs(t) >= threshold:
        regime = Regime.RISING if t > 0 else Regime.FALLING
        return regime, f"slope {slope:+.3g}/decade is {abs(t):.1f} standard errors from 0"
    if abs(t) < config.flat_threshold:
        return Regime.FLAT, f"slope {slope:+.3g}/decade is within its noise (t = {t:+.1f})"
    return Regime.UNCERTAIN, f"slope {slope:+.3g}/decade (t = {t:+.1f}) is neither flat nor a trend"


def judge_change(
    coefficient: float,
    stderr: float,
    deviations: np.ndarray,
    *,
    shape: str,
    config: DetectorConfig,
    dof: float = math.inf,
    level: float = 1.0,
    misfit: float = 0.0,
) -> tuple[bool, str]:
    """Is a candidate change real? The decision behind every event.

    Args:
        coefficient: the fitted jump (signed-log units) or change of slope (λ̂ per decade).
        stderr: its standard error.
        deviations: points after the change point minus the old line, each divided by its
            noise std: all of them for a jump; for a kink, whose deviations grow from 0, the
            latest ``persistence``.
        shape: ``"jump"`` or ``"kink"``.
        config: ``sensitivity``, ``flat_threshold``, ``min_jump``, ``min_relative_slope``.
        dof: degrees of freedom of the noise estimate.
        level: a kink's practical minimum is ``min_relative_slope × |level|`` (kinks are
            tested on λ̂ itself; jumps on the signed-log scale, where the level is 1).
        misfit: root mean square of the changed model's standardized residuals from the
            change point on. A t statistic measures the coefficient against the noise, not
            the fit: a kink fitted to a jump has a huge t and residuals far beyond the
            noise. The shape must explain the points (RMS at most 3 noise stds).

    Returns:
        ``(real, reason)``: real when the coefficient is of practical size, exceeds the
        threshold in standard errors, and every deviation lies at least ``flat_threshold``
        in its direction (a single wild estimate cannot make a change).
    """
    minimum = config.min_jump if shape == "jump" else config.min_relative_slope * abs(level)
    unit = "" if shape == "jump" else "/decade"
    if not abs(coefficient) >= minimum:
        return False, f"the {shape} {coefficient:+.3g}{unit} is below the minimum {minimum:g}"
    if misfit > _MAX_MISFIT:
        return False, (
            f"a {shape} does not explain the points after it (residuals {misfit:.1f} noise "
            f"stds RMS, above {_MAX_MISFIT:g})"
        )
    t = abs(coefficient) / stderr if stderr > 0 else math.inf
    sensitivity = config.sensitivity if shape == "jump" else config.kink_sensitivity
    threshold = trend_threshold(sensitivity, dof)
    if t < threshold:
        return False, f"the {shape} is {t:.1f} standard errors (threshold {threshold:.3g})"
    agreeing = np.sign(coefficient) * np.asarray(deviations) >= config.flat_threshold
    if not agreeing.all():
        return False, (
            f"only {int(agreeing.sum())} of the {agreeing.size} points after the change lie "
            f"{config.flat_threshold:g} standard errors beyond the old line"
        )
    return True, f"a {shape} of {coefficient:+.3g}{unit}, {t:.1f} standard errors"


def classify_loss_trend(
    relative_slope: float,
    tolerance: float,
    *,
    relative_stderr: float = 0.0,
    sensitivity: float = 3.0,
) -> tuple[Regime, str]:
    """The loss as falling, flat or rising from its relative change per decade.

    It counts as moving only when its change exceeds ``tolerance`` *and* ``sensitivity``
    standard errors: a training loss read over a few checkpoints is noisy.

    Returns:
        ``(regime, reason)``; :attr:`Regime.UNCERTAIN` when no loss is known.
    """
    return _classify_loss(relative_slope, tolerance, relative_stderr, sensitivity, "per decade")


def classify_loss_change(
    relative_change: float,
    tolerance: float,
    *,
    relative_stderr: float = 0.0,
    sensitivity: float = 3.0,
) -> tuple[Regime, str]:
    """The loss across a jump: ``relative_change`` is after / before − 1."""
    return _classify_loss(relative_change, tolerance, relative_stderr, sensitivity, "")


def _classify_loss(
    value: float, tolerance: float, stderr: float, sensitivity: float, unit: str
) -> tuple[Regime, str]:
    if not math.isfinite(value):
        return Regime.UNCERTAIN, "no loss was given"
    change = f"{value:+.0%}" + (f" {unit}" if unit else "")
    if abs(value) <= tolerance:
        return Regime.FLAT, f"the loss stayed flat ({change})"
    if math.isfinite(stderr) and abs(value) < sensitivity * stderr:
        return Regime.FLAT, f"the loss stayed flat ({change}, within its noise)"
    if value < 0:
        return Regime.FALLING, f"the loss fell ({change})"
    return Regime.RISING, f"the loss rose ({change})"


def classify_kind(new_regime: Regime, loss_trend: Regime) -> tuple[StageKind, str]:
    """Name a change of λ̂ by what the loss did meanwhile (Hoogland et al. 2024).

    λ̂ going up is "acquire" unless the loss rose: a loss that has not fallen *yet* does not
    make it something else. By the free energy ``n·L + λ·log n`` a more complex solution is
    only preferred when it pays for itself in loss, and in training λ̂ often starts rising
    before the loss falls (in ``examples/induction_heads.py`` λ̂ turns up at step ~250 and
    the total training loss moves at ~450); judged over the few checkpoints an online test
    has seen, that loss is flat. Likewise λ̂ going down is "simplify" unless the loss rose
    (the model forgetting is no simplification).

    Returns:
        ``(kind, reason)``: "acquire" when λ̂ goes up while the loss falls or stays flat,
        "simplify" when λ̂ goes down while the loss stays flat or falls, otherwise "turn"
        (λ̂ levels off, the loss rose, or no loss is known).
    """
    calm = loss_trend in (Regime.FALLING, Regime.FLAT)
    if new_regime is Regime.RISING and calm:
        if loss_trend is Regime.FLAT:
            reason = "the model is acquiring structure (the loss has not fallen yet)"
            return StageKind.ACQUIRE, reason
        return StageKind.ACQUIRE, "the model is acquiring structure"
    if new_regime is Regime.FALLING and calm:
        return StageKind.SIMPLIFY, "the model is simplifying"
    return StageKind.TURN, "a change of trend"


# ----------------------------------------------------------------------------------------
# Numerical helpers.


@dataclass(frozen=True)
class _Change:
    shape: str  # "jump" or "kink"
    kink: int  # index of the reported change point in the buffer
    begin: int  # first index of the change (a ramp's start; the kink itself)
    end: int  # first index at the new level (a ramp's end; the kink itself)
    start: int  # first buffer index of the fit
    t: float  # |coefficient| / stderr
    coefficient: float
    stderr: float
    level: float  # value of the old line at the change point (signed-log for a jump)
    slope: float  # old slope per decade
    deviations: np.ndarray
    misfit: float  # RMS of the changed model's standardized residuals from the change on
    rss: float  # standardized residual sum of squares over the common range
    other_t: float = math.inf
    other_rss: float = math.inf
    new_slope_stderr: float = math.nan


# A jump may take up to this many checkpoints: real transitions are ramps of 2-4 estimates
# (the model takes a while to leave a saddle), which a step cannot fit.
_RAMP_WIDTHS = (0, 1, 2, 3)
# A free point of a ramp costs this much residual sum of squares (in noise variances) when
# candidates are compared: Akaike's 2 per parameter, so a wider ramp wins only where its
# points are off the two levels.
_RAMP_POINT_PENALTY = 2.0
# ... and each of its points must be this fraction of the jump away from both levels.
_IN_TRANSIT = 0.1
# A stage with at least this many checkpoints before a candidate jump may curve.
_CURVED_STAGE = 8


def _contenders(changes: list[_Change]) -> list[_Change]:
    """Every jump, and the best kink (least squares: the likelihood's maximum over the change
    point) if it is localized (see ``_LOCALIZED_BY``); a kink elsewhere is not considered,
    even when it would pass on its own."""
    jumps = [c for c in changes if c.shape == "jump"]
    kinks = [c for c in changes if c.shape == "kink"]
    if not kinks:
        return jumps
    best = min(kinks, key=lambda c: c.rss)
    far = [c.rss for c in kinks if abs(c.begin - best.begin) >= _LOCALIZED_WITHIN]
    if far and min(far) < best.rss + _LOCALIZED_BY:
        return jumps
    return [*jumps, best]


def _wls(design: np.ndarray, weight: np.ndarray, y: np.ndarray):
    """Weighted least squares of ``y`` on a stack of designs ``(candidate, point,
    parameter)``: coefficients ``(candidate, parameter)`` and their covariances; candidates
    whose Gram matrix is singular come back as nan."""
    gram = np.einsum("cnp,n,cnq->cpq", design, weight, design)
    det = np.linalg.det(gram)
    ok = np.isfinite(det) & (np.abs(det) > 1e-300)
    cov = np.full_like(gram, np.nan)
    if ok.any():
        cov[ok] = np.linalg.inv(gram[ok])
    beta = np.einsum("cpq,cnq,n->cp", cov, design, weight * y)
    return beta, cov


def _candidates(x, lo, first, n, persistence, shape):
    """Designs ``(candidate, point, parameter)`` of every candidate change of one shape over
    ``[lo, n)``, and per candidate ``(k, end)``."""
    index = np.arange(lo, n)
    xs_all = x[lo:]
    groups: dict[int, tuple[list, list]] = {}
    for k in range(first, n):
        for width in _RAMP_WIDTHS if shape == "jump" else (0,):
            end = k + width
            if shape == "jump" and end > n - 1:
                continue
            if shape == "kink" and n - k - 1 < persistence:
                continue
            xs = xs_all - x[k]
            # A ramp's points between the levels are free (one indicator each): a real
            # transition need not pass the levels in equal steps (−24 -> 2.8 -> 15 at the
            # last saddle of the quickstart is concave on the signed-log scale).
            ramp = [(index == j).astype(float) for j in range(k, end)]
            column = (index >= end).astype(float) if shape == "jump" else np.maximum(xs, 0.0)
            # A jump is tested against a stage that may curve (a quadratic in log-step):
            # a trend that is straight in λ̂ bends on the log scale, and a jump must be
            # sudden, not the bend. A curvature needs a stage of some length to be told
            # from the jump itself.
            curved = shape == "jump" and k - lo >= _CURVED_STAGE
            columns = [np.ones_like(xs), xs] + ([xs * xs] if curved else []) + ramp
            designs, where = groups.setdefault(len(columns) + 1, ([], []))
            designs.append(np.stack([*columns, column], axis=1))
            where.append((k, end))
    return [(np.stack(d), w) for d, w in groups.values()]


def _fits(
    x: np.ndarray,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    first: int,
    window: int,
    persistence: int,
) -> list[_Change]:
    """Every candidate change from ``first`` on: the line of the stage plus a jump (a step,
    or a ramp whose up to 3 points in transit are free) or a kink (a hinge), fitted by weighted
    least squares over one common range ``[first − window, n)``, so that the residual sums
    of squares of all candidates compare. ``curves[shape]`` is ``(values, noise
    variances)`` on the scale that shape is tested on. A jump is also fitted on the kink's
    scale (λ̂ itself): ``other_t`` is its t there."""
    n = x.size
    lo = max(0, first - window)
    out: list[_Change] = []
    for shape, (y, var) in curves.items():
        weight = 1.0 / np.maximum(var[lo:], _VARIANCE_FLOOR)
        sigma = np.sqrt(1.0 / weight)
        ys = y[lo:]
        for design, where in _candidates(x, lo, first, n, persistence, shape):
            beta, cov = _wls(design, weight, ys)
            other = np.full(len(where), math.inf)
            if shape == "jump" and "kink" in curves:
                y2, var2 = curves["kink"]
                b2, c2 = _wls(design, 1.0 / np.maximum(var2[lo:], _VARIANCE_FLOOR), y2[lo:])
                with np.errstate(invalid="ignore", divide="ignore"):
                    other = np.abs(b2[:, -1]) / np.sqrt(np.maximum(c2[:, -1, -1], 1e-300))
                other = np.where(np.isfinite(other), other, math.inf)
                w2 = 1.0 / np.maximum(var2[lo:], _VARIANCE_FLOOR)
                r2 = (y2[lo:] - np.einsum("cnp,cp->cn", design, b2)) * np.sqrt(w2)
                other_rss = np.where(np.isfinite(b2).all(axis=1), (r2 * r2).sum(axis=1), math.inf)
            else:
                other_rss = np.full(len(where), math.inf)
            # A ramp's midpoint on λ̂ itself where it is fitted (the loss drops with λ̂, not
            # with its logarithm: −8,150 -> −2,600 -> −680 is past half-way at −2,600).
            mid = (y2[lo:], b2) if shape == "jump" and "kink" in curves else (ys, beta)
            old = np.einsum("cnp,cp->cn", design[:, :, :-1], beta[:, :-1])
            fitted = old + design[:, :, -1] * beta[:, -1:]
            residual = (ys - fitted) / sigma  # (candidate, point)
            deviation = (ys - old) / sigma
            for c, (k, end) in enumerate(where):
                if not np.isfinite(beta[c]).all():
                    continue
                if shape == "jump" and not _in_transit(ys, design[c], beta[c], k, end, lo):
                    continue
                stderr = math.sqrt(max(float(cov[c, -1, -1]), 0.0))
                # A kink's deviations grow from 0: only the latest must agree.
                post = slice(end - lo, None) if shape == "jump" else slice(-persistence, None)
                coefficient = float(beta[c, -1])
                penalty = _RAMP_POINT_PENALTY * (end - k)  # a free point must earn its place
                new_var = float(cov[c, 1, 1] + cov[c, -1, -1] + 2 * cov[c, 1, -1])
                out.append(
                    _Change(
                        shape=shape,
                        kink=_midpoint(*mid, design[c], c, k, end, lo),
                        begin=k,
                        end=end,
                        start=lo,
                        t=abs(coefficient) / stderr if stderr > 0 else math.inf,
                        coefficient=coefficient,
                        stderr=stderr,
                        level=float(beta[c, 0]),
                        slope=float(beta[c, 1]),
                        deviations=deviation[c, post],
                        misfit=float(np.sqrt(np.mean(residual[c, end - lo :] ** 2))),
                        rss=float(residual[c] @ residual[c]) + penalty,
                        other_t=float(other[c]),
                        other_rss=float(other_rss[c]) + penalty,
                        new_slope_stderr=math.sqrt(max(new_var, 0.0)),
                    )
                )
    return out


def _ramp_fractions(y: np.ndarray, design: np.ndarray, beta: np.ndarray, k: int, end: int,
                    lo: int) -> np.ndarray:
    """How far each point of a ramp from ``k`` to ``end`` is on its way from the stage's line
    (0) to the new level (1); nan for a jump of exactly 0 (noise-free data), where no point
    is on its way anywhere."""
    if beta[-1] == 0.0:
        return np.full(end - k, math.nan)
    base = design.shape[1] - 1 - (end - k)  # the stage's line; then the ramp's indicators
    line = design[k - lo : end - lo, :base] @ beta[:base]
    return (y[k - lo : end - lo] - line) / beta[-1]


def _in_transit(y: np.ndarray, design: np.ndarray, beta: np.ndarray, k: int, end: int,
                lo: int) -> bool:
    """Whether every point of a ramp lies between the levels, at least ``_IN_TRANSIT`` of the
    jump from each: a point as close to a level belongs to it (a wiggle of the new level is no
    ramp, and a free point there would delay the announcement)."""
    frac = _ramp_fractions(y, design, beta, k, end, lo)
    return bool(np.all((frac >= _IN_TRANSIT) & (frac <= 1 - _IN_TRANSIT)))


def _midpoint(y: np.ndarray, betas: np.ndarray, design: np.ndarray, c: int, k: int, end: int,
              lo: int) -> int:
    """Where a ramp from ``k`` to ``end`` crosses half its jump: the first of its points at
    least half-way from the old line to the new level (``end`` if none is). A kink's change
    point is the kink itself."""
    if end <= k:
        return k
    beta = betas[c]
    if not np.isfinite(beta).all():
        return k
    past = np.nonzero(_ramp_fractions(y, design, beta, k, end, lo) >= 0.5)[0]
    return k + (int(past[0]) if past.size else end - k)


def _loss_change(
    x: np.ndarray, loss: np.ndarray, end: int, begin: int, before: int, config: DetectorConfig
) -> tuple[Regime, str]:
    """The loss across a jump from ``begin`` to ``end``: mean log loss of the points from
    ``end`` on against the ``before`` points before ``begin``, with a standard error from the
    loss's own scatter over the buffer."""
    post, pre = loss[end:], loss[max(0, begin - before) : begin]
    post, pre = post[np.isfinite(post)], pre[np.isfinite(pre)]
    finite = np.isfinite(loss)
    if post.size == 0 or pre.size == 0 or not (loss[finite] > 0).all():
        return classify_loss_change(math.nan, config.flat_loss_tolerance)
    log_post, log_pre = float(np.log(post).mean()), float(np.log(pre).mean())
    noise, _ = residual_noise(x[finite], np.log(loss[finite]))
    stderr = noise * math.sqrt(1 / post.size + 1 / pre.size) if math.isfinite(noise) else 0.0
    return classify_loss_change(
        math.expm1(log_post - log_pre),
        config.flat_loss_tolerance,
        relative_stderr=stderr,
        sensitivity=config.sensitivity,
    )


def _loss_trend(x: np.ndarray, loss: np.ndarray, segment: slice, config: DetectorConfig):
    """The loss trend over ``segment``: relative slope per decade, with a standard error
    from the loss's own relative scatter over all of ``x``."""
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
    scatter = np.log(scatter) if (scatter > 0).all() else scatter / np.abs(scatter).mean()
    noise, _ = residual_noise(x[everywhere], scatter)
    stderr = noise * math.sqrt(float(weights @ weights)) if math.isfinite(noise) else 0.0
    return classify_loss_trend(
        float(weights @ values) / level,
        config.flat_loss_tolerance,
        relative_stderr=stderr,
        sensitivity=config.sensitivity,
    )


# ----------------------------------------------------------------------------------------
# Online detection.


@dataclass(frozen=True)
class StageEvent:
    """A change of developmental stage, found online by :class:`StageDetector`.

    Attributes:
        step: the change point: the first checkpoint of the new stage.
        detected_at: the step at which the event was emitted (``>= step``).
        component: the component whose λ̂ this is; ``None`` for the whole model.
        kind: "acquire", "simplify" or "turn" (see :class:`StageKind`).
        previous_regime: the trend of the stage that ended ("rising", "flat", "falling").
        new_regime: for a kink the trend of the new stage; for a jump its direction
            ("rising": λ̂ jumped up).
        llc: λ̂ of the new stage at the change point (fitted, less noisy than the raw value).
        loss: the training loss at the change point, if one was given.
        stage: the index of the stage that starts here (the first event starts stage 1).
        message: a one-line explanation for humans.
        checkpoint: the index of the change point among the checkpoints the detector used.
        delay: checkpoints between the change point and the detection.
        slope: the slope of the new stage, in signed-log units per decade (about the
            relative change of λ̂ per decade where |λ̂| ≫ ``scale``).
        shape: "jump" (λ̂ stepped) or "kink" (its trend changed).
        llc_before: λ̂ of the old stage's line at the change point.
        significance: the change in standard errors.
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
    shape: str = "kink"
    llc_before: float = math.nan
    significance: float = math.nan

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
            "shape": str(self.shape),
            "llc_before": float(self.llc_before),
            "significance": float(self.significance),
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


def _optional_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class StageDetector:
    """Online detector of developmental stages on a λ̂ curve over log-spaced checkpoints.

    Feed it every estimate that is not diverged, at saddles too (see the module docstring for
    the test it runs). The first stage (stage 0) starts at the first checkpoint; each event
    starts the next one, and the new stage's line is fitted from its change point on.

    Args:
        config: thresholds; the defaults suit ~15-25 checkpoints per decade.
        component: the component name to report in events (``None`` for the whole model).

    Example:
        >>> import numpy as np
        >>> steps = np.unique(np.geomspace(1, 1e5, 100).astype(int))
        >>> x = np.log10(steps + 1)
        >>> llc = np.where(x < 2.5, -600.0, 12.0)     # a saddle, then a minimum
        >>> loss = np.where(x < 2.5, 1.0, 0.2)
        >>> detector = StageDetector()
        >>> events = [e for s, l, f in zip(steps, llc, loss)
        ...           if (e := detector.update(int(s), float(l), 0.0, float(f)))]
        >>> [(e.kind.value, e.shape, e.delay) for e in events]
        [('acquire', 'jump', 2)]
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
        # Enough history for the noise estimate and one stage's fit.
        self._history = 3 * config.window + config.persistence
        self._reset()

    def _reset(self) -> None:
        self._steps: list[int] = []
        self._llcs: list[float] = []
        self._stderrs: list[float] = []  # nan when unknown
        self._losses: list[float] = []  # nan when unknown
        self._dropped = 0  # checkpoints trimmed from the front of the buffers
        self._stage_start = 0  # checkpoint index where the current stage began
        self._events: list[StageEvent] = []
        self.num_checkpoints = 0
        """Checkpoints used (finite λ̂, increasing step)."""
        self.num_ignored = 0
        """Checkpoints ignored because λ̂ was not finite."""
        self.num_out_of_order = 0
        """Checkpoints ignored because their step did not exceed the previous one."""

    @property
    def events(self) -> list[StageEvent]:
        """The events emitted so far, in order."""
        return list(self._events)

    @property
    def stage(self) -> int:
        """The index of the current stage (0 until the first event)."""
        return len(self._events)

    def update(
        self, step: int, llc: float, stderr: float = math.nan, loss: float | None = None
    ) -> StageEvent | None:
        """Feed one checkpoint; return the event it completes, if any.

        Args:
            step: the training step (integer >= 0), increasing from call to call; a step that
                does not exceed the previous one is ignored (:attr:`num_out_of_order`).
            llc: the λ̂ estimate, at a minimum or not; a non-finite value is ignored
                (:attr:`num_ignored`). Keep diverged estimates out: they are not λ̂ at all.
            stderr: the standard error of ``llc``
                (:func:`~slt_callbacks.analysis.noise.standard_error` of the chain std);
                nan or 0 when unknown: the noise is then read from the curve's scatter
                (it is anyway, and the larger of the two is used).
            loss: the training loss at this step, used only to name the kind of event.

        Returns:
            The :class:`StageEvent` this checkpoint confirms, else ``None``.

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
        se = _as_float(stderr)
        self._steps.append(step)
        self._llcs.append(value)
        self._stderrs.append(se if math.isfinite(se) and se > 0 else math.nan)
        self._losses.append(_as_float(loss) if loss is not None else math.nan)
        self.num_checkpoints += 1
        excess = len(self._steps) - self._history
        if excess > 0:
            for buffer in (self._steps, self._llcs, self._stderrs, self._losses):
                del buffer[:excess]
            self._dropped += excess
        return self._advance()

    def _arrays(
        self, start: int = 0, n: int | None = None
    ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]], float]:
        """log-steps; the curve and its noise variances on the scale of each shape; the
        degrees of freedom of the noise estimate (inf when every standard error is known).

        Jumps are tested on the signed-log scale, where a jump of −5,800 -> −600 and one of
        12 -> 1.2 are alike. Kinks are tested on λ̂ itself: a trend that is linear in λ̂ (as
        at minima) is curved on the log scale, and curvature would read as a string of
        kinks. One noise model serves both: the larger of the standard error and the
        residual scatter on the signed-log scale (relative noise), the standard error pooled
        over the last few checkpoints, mapped back to λ̂ by the delta method at the level of
        the current stage (which begins at buffer index ``start``; see ``_LEVEL_WITHIN``).
        """
        s = self.config.scale
        x = log_step(np.asarray(self._steps[:n], dtype=float))
        raw = np.asarray(self._llcs[:n], dtype=float)
        z = signed_log(raw, s)
        se = signed_log_stderr(raw, np.asarray(self._stderrs[:n], dtype=float), s)
        # Residual noise of the current stage and the one before (3 windows at most): it
        # follows a noise level that changes between stages.
        recent = slice(-3 * self.config.window, None)
        noise, dof = residual_noise(x[recent], z[recent])
        floor = max(noise if math.isfinite(noise) else 0.0, self.config.min_noise) ** 2
        known = np.isfinite(se)
        # A chain std from 4 chains has 3 degrees of freedom (it is off by 2x either way
        # one time in ten); weights built from it single out points at random. On the
        # signed-log scale the noise is relative, so neighbours share it: where they agree,
        # the median of the last _POOLED standard errors is a far steadier estimate.
        pooled = _trailing_median(se, _POOLED)
        with np.errstate(invalid="ignore", divide="ignore"):
            alike = np.abs(np.log(se / pooled)) <= math.log(_ALIKE)
        se = np.where(alike, pooled, se)
        var = np.maximum(np.where(known, se * se, 0.0), floor)
        # At the level of the curve, not at each noisy estimate: with its own value a point
        # 20% low at 10% noise weighs 2.25x one 20% high, and every fitted line sinks.
        size = np.abs(raw)
        level = size.copy()
        level[start:] = _trailing_median(size[start:], _POOLED)
        with np.errstate(invalid="ignore", divide="ignore"):  # log((s+a)/(s+b)) = z(a) - z(b)
            near = np.abs(np.log((s + size) / (s + level))) <= _LEVEL_WITHIN * np.sqrt(var)
        level = np.where(near, level, size)
        curves = {"jump": (z, var), "kink": (raw, var * (s + level) ** 2)}
        return x, curves, math.inf if known.all() else dof

    def _advance(self) -> StageEvent | None:
        n = len(self._steps)
        start = max(0, self._stage_start - self._dropped)
        best, anything, context = self._decide(start, n)
        if not anything:
            return None
        if best is None or best.shape == "kink":
            # A kink is announced once it has passed at two checkpoints in a row: the first
            # checkpoint a kink passes at is often one whose newest estimates happen to lie
            # off the line, and those also drag its change point late (on rise_plateau at
            # 10% noise, 9 of 20 events were misplaced that way). It also stands when at
            # the next checkpoint something real holds it back (a jump in progress on an
            # accelerating rise, as before the induction bump): the change goes on.
            before = self._decide(start, n - 1)[0] if n - 1 > start else None
            if before is None or before.shape != "kink":
                return None
            best = best or before
        event = self._event(best, start, *context)
        self._events.append(event)
        # The new stage starts where the new level is reached (a ramp's end): the points of
        # the ramp belong to neither level (they were free in the jump's fit) and would bias
        # the new stage's line.
        self._stage_start = self._dropped + start + best.end
        return event

    def _decide(self, start: int, n: int) -> tuple[_Change | None, bool, tuple]:
        """The change the first ``n`` buffered checkpoints establish, if any (the stage began
        at buffer index ``start``); whether any real change was seen; and the arrays behind
        it, for :meth:`_event`."""
        cfg = self.config
        first = max(start + cfg.cooldown, n - cfg.window)
        if first > n - cfg.persistence:
            return None, False, ()
        x, curves, dof = self._arrays(start, n)
        stage = {shape: (y[start:], var[start:]) for shape, (y, var) in curves.items()}
        # The change is the best explanation (least squares) of the points since the stage
        # began, among those that pass the tests; it is announced once it has persisted. A
        # real jump that has not persisted yet, and explains the points better, also holds
        # back a kink before it: its first points, far off the line, would otherwise end
        # that kink.
        best: _Change | None = None
        pending: _Change | None = None
        changes = _fits(x[start:], stage, first - start, cfg.window, cfg.persistence)
        real: list[_Change] = []
        for change in _contenders(changes):
            if not self._real(change, changes, dof):
                continue
            real.append(change)
            unconfirmed = change.shape == "jump" and n - (start + change.end) < cfg.persistence
            if unconfirmed and (pending is None or change.rss < pending.rss):
                pending = change
            if best is None or change.rss < best.rss:
                best = change
        context = (x, curves, dof)
        if best is None:
            return None, False, context
        held = pending is not None and pending.begin > best.begin and pending.rss < best.rss
        if best.shape == "kink" and held:
            return None, True, context
        return self._confirmed(best, real, n - start), True, context

    def _real(self, change: _Change, changes: list[_Change], dof: float) -> bool:
        """:func:`judge_change`, and for a jump two more tests: it is a jump on λ̂ itself too
        (a straight λ̂ trend bends on the signed-log scale, and a bend is no jump), and it
        explains λ̂ better than any kink does (a ramp on a bent curve is a kink)."""
        cfg = self.config
        if change.shape == "kink" and change.begin < _KINK_MIN_STAGE:
            return False
        level = 1.0 if change.shape == "jump" else change.level
        real, _ = judge_change(
            change.coefficient, change.stderr, change.deviations,
            shape=change.shape, config=cfg, dof=dof, level=level, misfit=change.misfit,
        )
        if not real or change.shape == "kink":
            return real
        kink_rss = min((c.rss for c in changes if c.shape == "kink"), default=math.inf)
        # A jump far beyond the threshold is no ramp on a bend, however a real transition's
        # ramp fits λ̂ itself (from −40 to +16 in two checkpoints at the last saddle).
        clear = change.t >= _CLEAR_JUMP * trend_threshold(cfg.sensitivity, dof)
        return change.other_t >= trend_threshold(cfg.sensitivity, dof) and (
            clear or change.other_rss <= kink_rss
        )

    def _confirmed(self, best: _Change, real: list[_Change], n: int) -> _Change | None:
        """``best`` once it has persisted; else, for a jump, the best real jump from the same
        change point that has (a ramp that has not ended yet may be a step whose next point
        wiggles: the jump itself is established)."""

        def persisted(c: _Change) -> bool:
            return n - (c.end if c.shape == "jump" else c.kink) >= self._needed(c.shape)

        if persisted(best):
            return best
        if best.shape != "jump":
            return None
        same = [c for c in real if c.shape == "jump" and c.begin == best.begin and persisted(c)]
        return min(same, key=lambda c: c.rss) if same else None

    def _needed(self, shape: str) -> int:
        """Checkpoints from the change point on (itself included) before a change of this
        shape is announced. A kink needs two more than a jump: it builds up slowly, and two
        points far off the line are a jump."""
        persistence = self.config.persistence
        return persistence if shape == "jump" else persistence + 2

    def _event(
        self,
        change: _Change,
        start: int,
        x: np.ndarray,
        curves: dict[str, tuple[np.ndarray, np.ndarray]],
        dof: float,
    ) -> StageEvent:
        cfg = self.config
        kink = start + change.kink
        raw, raw_var = curves["kink"]
        old_stage = slice(start + change.start, start + change.begin)
        slope_old, stderr_old = _slope(x[old_stage], raw[old_stage], raw_var[old_stage])
        level_old = float(np.mean(raw[old_stage])) if change.begin > change.start else 1.0
        previous, _ = classify_trend(slope_old, stderr_old, cfg, level=level_old, dof=dof)
        losses = np.asarray(self._losses, dtype=float)
        post = slice(kink, None)
        if change.shape == "jump":
            new = Regime.RISING if change.coefficient > 0 else Regime.FALLING
            before = float(signed_log_inverse(change.level, cfg.scale))
            after = float(signed_log_inverse(change.level + change.coefficient, cfg.scale))
            new_slope = change.slope
            loss_trend, loss_reason = _loss_change(
                x, losses, start + change.end, start + change.begin,
                max(cfg.persistence, x.size - start - change.end), cfg
            )
        else:
            new_slope = change.slope + change.coefficient
            floor = cfg.min_relative_slope * abs(change.level)
            new = _direction(new_slope, change.new_slope_stderr, floor)
            before = after = change.level
            loss_trend, loss_reason = _loss_trend(x, losses, post, cfg)
        kind, kind_reason = classify_kind(new, loss_trend)
        step, detected_at = self._steps[kink], self._steps[-1]
        checkpoint = self._dropped + kink
        delay = self.num_checkpoints - 1 - checkpoint
        who = "λ̂" if self.component is None else f"λ̂[{self.component}]"
        if change.shape == "jump":
            # Fitted levels of the two stages, not single logged estimates.
            what = f"{who} jumped from a fitted level of {before:.3g} to {after:.3g}"
        elif new is Regime.FLAT:
            what = f"{who} levelled off at {after:.3g}"
        else:
            what = f"{who} started {new.value} at {after:.3g} ({new_slope:+.3g} per decade)"
        meaning = kind_reason
        if kind is StageKind.TURN:
            meaning = f"{kind_reason} ({previous.value} -> {new.value})"
        loss_part = f" while {loss_reason}" if loss_trend is not Regime.UNCERTAIN else ""
        return StageEvent(
            step=step,
            detected_at=detected_at,
            component=self.component,
            kind=kind,
            previous_regime=previous,
            new_regime=new,
            llc=after,
            loss=_optional_float(float(losses[kink])),
            stage=len(self._events) + 1,
            message=(
                f"step {step}: {what}{loss_part}: {meaning} [{change.t:.1f} standard errors; "
                f"detected at step {detected_at}, {delay} checkpoints later]"
            ),
            checkpoint=checkpoint,
            delay=delay,
            slope=float(new_slope),
            shape=change.shape,
            llc_before=before,
            significance=float(change.t),
        )

    # ------------------------------------------------------------------------------------
    # Checkpointing.

    def state_dict(self) -> dict[str, Any]:
        """The detector's state as plain Python types (``weights_only``-loadable)."""
        return {
            "version": _STATE_VERSION,
            "component": self.component,
            "steps": [int(s) for s in self._steps],
            "llcs": [float(v) for v in self._llcs],
            "stderrs": [_optional_float(v) for v in self._stderrs],
            "losses": [_optional_float(v) for v in self._losses],
            "dropped": int(self._dropped),
            "stage_start": int(self._stage_start),
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
        self._stderrs = nan_if_none(state["stderrs"])
        self._losses = nan_if_none(state["losses"])
        self._dropped = int(state["dropped"])
        self._stage_start = int(state["stage_start"])
        self._events = [StageEvent.from_dict(dict(e)) for e in state["events"]]
        self.num_checkpoints = int(state["num_checkpoints"])
        self.num_ignored = int(state["num_ignored"])
        self.num_out_of_order = int(state["num_out_of_order"])


def _trailing_median(values: np.ndarray, width: int) -> np.ndarray:
    """The median of each value and the ``width − 1`` before it (fewer at the start),
    ignoring nan; nan where all of them are."""
    out = np.empty_like(values)
    for i in range(values.size):
        part = values[max(0, i - width + 1) : i + 1]
        part = part[np.isfinite(part)]
        out[i] = float(np.median(part)) if part.size else math.nan
    return out


def _direction(slope: float, stderr: float, floor: float) -> Regime:
    t = abs(slope) / stderr if stderr > 0 else math.inf
    if abs(slope) < floor or t < _KIND_T:
        return Regime.FLAT
    return Regime.RISING if slope > 0 else Regime.FALLING


def _slope(x: np.ndarray, y: np.ndarray, var: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` on ``x`` and its standard error under variances ``var``."""
    if x.size < 2:
        return math.nan, math.nan
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if sxx <= 0.0:
        return math.nan, math.nan
    weights = xc / sxx
    return float(weights @ y), float(math.sqrt(float(weights**2 @ var)))
