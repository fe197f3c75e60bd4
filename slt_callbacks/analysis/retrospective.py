"""Stage boundaries of a whole λ̂ curve, found after training (Hoogland et al. 2024).

Hoogland et al. 2024 ("The developmental landscape of in-context learning"; "Loss landscape
degeneracy and stagewise development in transformers") estimate λ̂ on log-spaced checkpoints,
smooth the curve in log(step), and call the critical points of the smoothed curve (where
dλ̂/dlog t changes sign or goes flat) stage boundaries. :func:`retrospective_stages` does
that, with the slope's standard error from the one noise model (:mod:`.noise`), on λ̂ itself
or, with ``scale``, on the signed-log scale the online detector uses (for curves that
include estimates at saddles, from −10⁴ to +10). On that scale a jump of λ̂ smooths into a
short bump of the slope; such a bump is one boundary (at its peak), not two.

Jumps first: a smoothed curve turns a jump of λ̂ (a loss drop at a saddle, −600 -> −30) into
a bump of the slope, which critical points of the smoothed curve locate poorly or not at all.
So the curve is first segmented at its *jumps* (:func:`find_jumps`: binary segmentation with a
two-sided test on the signed-log scale, the same noise model and thresholds as the online
detector), and the smoothed analysis runs on each piece between jumps; the boundaries are the
jumps and the critical points of the pieces.

Plain numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import check_int, check_number
from .noise import residual_noise, signed_log, signed_log_inverse, signed_log_stderr
from .online import (
    DetectorConfig,
    Regime,
    StageKind,
    _as_float,
    _loss_change,
    _loss_trend,
    _optional_float,
    classify_kind,
    classify_trend,
    log_step,
    trend_threshold,
)

__all__ = [
    "Jump",
    "SmoothedCurve",
    "StageBoundary",
    "find_jumps",
    "retrospective_stages",
    "smooth_log_step",
]


@dataclass(frozen=True)
class _Noise:
    var: np.ndarray  # per-point noise variance
    dof: float  # degrees of freedom of the estimate; inf when every standard error is known


def _noise_model(stderr_var: np.ndarray, x: np.ndarray, y: np.ndarray) -> _Noise:
    """Per-point noise variance: the larger of the squared standard error and the residual
    scatter of the curve (see :mod:`.noise`)."""
    noise, dof = residual_noise(x, y)
    known = np.isfinite(stderr_var)
    floor = noise * noise if math.isfinite(noise) else 0.0
    var = np.maximum(np.where(known, stderr_var, 0.0), floor)
    return _Noise(var=var, dof=math.inf if known.all() else dof)


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
    stderrs: Sequence[float] | np.ndarray | None = None,
    smoothing: float | None = None,
    scale: float | None = None,
) -> SmoothedCurve:
    """Smooth λ̂ in log10(step + 1) with a Gaussian kernel (local-linear regression).

    Local-linear rather than a plain kernel average: it has no bias at the ends of the curve
    (a kernel average flattens the first and last bandwidth) and yields the derivative
    dλ̂/dlog t directly, with its standard error, which is what the stage boundaries of
    Hoogland et al. 2024 are defined by.

    Args:
        steps: training steps, strictly increasing once non-finite λ̂ are dropped.
        llcs: λ̂ at each step; non-finite values are dropped.
        stderrs: the standard error of each λ̂
            (:func:`~slt_callbacks.analysis.noise.standard_error`; optional, non-finite or 0
            means unknown).
        smoothing: the kernel's standard deviation in decades of steps; default four times
            the median spacing of the checkpoints in log-step (0.2 decade at 20 checkpoints
            per decade).
        scale: smooth ``signed_log(λ̂, scale)`` instead of λ̂ (standard errors mapped by the
            delta method); ``smoothed`` and ``slope`` are then on that scale.

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
    se_all = np.full_like(y_all, math.nan) if stderrs is None else np.asarray(stderrs, float)
    if se_all.shape != y_all.shape:
        raise ValueError(
            f"Expected `stderrs` to have the shape of `llcs` {y_all.shape} but got "
            f"{se_all.shape}."
        )
    keep = np.flatnonzero(np.isfinite(y_all))
    if keep.size < 5:
        raise ValueError(f"Expected at least 5 finite `llcs` but got {keep.size}.")
    if np.any(np.diff(step_arr[keep]) <= 0) or step_arr[keep][0] < 0:
        raise ValueError("Expected `steps` to be non-negative and strictly increasing.")
    x = log_step(step_arr[keep])
    y, se = y_all[keep], se_all[keep]
    if scale is not None:
        scale = check_number("scale", scale, strict=True)
        y, se = signed_log(y, scale), signed_log_stderr(y, se, scale)
    if smoothing is None:
        smoothing = 4.0 * float(np.median(np.diff(x)))
    bandwidth = check_number("smoothing", smoothing, strict=True)

    noise = _noise_model(np.where(se > 0, se * se, math.nan), x, y)

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


@dataclass(frozen=True)
class Jump:
    """A jump of λ̂ found by :func:`find_jumps`; indices into the arrays given to it.

    Attributes:
        begin: the first point of the transition (the change point).
        end: the first point at the new level (``begin`` for a sudden jump; up to 3 points
            of a ramp lie in between and belong to neither level).
        size: the jump on the signed-log scale (new level minus old, at the junction).
        t: ``size`` in standard errors.
        before, after: the levels of the two lines at the junction, signed-log scale.
    """

    begin: int
    end: int
    size: float
    t: float
    before: float
    after: float


# Points on each side of a candidate jump: lines over 8 points, or 4 when stages are short.
_JUMP_WINDOWS = (8, 4)
# The most a line may leave unexplained on either side of a jump (mean square, noise units):
# a trend change inside a window misfits its line and must not pass for a jump.
_MAX_SIDE_MISFIT = 4.0


def _line(x: np.ndarray, y: np.ndarray, var: np.ndarray, at: np.ndarray):
    """Weighted line through ``(x, y)``: its values at ``at``, their variances, and the mean
    square of the standardized residuals (per residual degree of freedom)."""
    w = 1.0 / var
    sw = w.sum()
    mx = float(w @ x) / sw
    xc = x - mx
    sxx = float(w @ (xc * xc))
    slope = float(w @ (xc * y)) / sxx
    mean = float(w @ y) / sw
    residual = (y - mean - slope * xc) * np.sqrt(w)
    value = mean + slope * (at - mx)
    return value, 1.0 / sw + (at - mx) ** 2 / sxx, float(residual @ residual) / max(x.size - 2, 1)


def _jump_at(x, scales, lo, hi, k, width):
    """The two-sided test of a jump whose transition covers points ``k .. k + width − 1``
    (none for a sudden jump) inside ``[lo, hi)``: for each window, a line on each side, both
    evaluated at the two ends of the gap between them. If the lines cross inside the gap, a
    continuous bend explains the points and the t is 0; else it is the smaller difference in
    standard errors. Returns ``(t on every scale, size, before, after)`` for the best window
    whose lines fit both sides, or None."""
    best = None
    ends = np.array([x[k - 1], x[k + width]])
    for window in _JUMP_WINDOWS:
        left = slice(max(lo, k - window), k)
        right = slice(k + width, min(hi, k + width + window))
        if left.stop - left.start < 3 or right.stop - right.start < 3:
            continue
        ts, fits = [], []
        for y, var in scales:
            a, va, ma = _line(x[left], y[left], var[left], ends)
            b, vb, mb = _line(x[right], y[right], var[right], ends)
            if max(ma, mb) > _MAX_SIDE_MISFIT:
                break
            d = b - a
            t = d / np.sqrt(va + vb)
            nearest = int(np.argmin(np.abs(t)))
            ts.append(0.0 if d[0] * d[1] <= 0 else float(t[nearest]))
            fits.append((float(a[nearest]), float(b[nearest])))
        else:
            if best is None or abs(ts[0]) > abs(best[0][0]):
                (a, b) = fits[0]
                best = (ts, b - a, a, b)
    return best


def find_jumps(
    x: np.ndarray,
    z: np.ndarray,
    var: np.ndarray,
    *,
    raw: tuple[np.ndarray, np.ndarray] | None = None,
    config: DetectorConfig | None = None,
    dof: float = math.inf,
) -> list[Jump]:
    """Jumps of a whole curve, by binary segmentation (Scott & Knott 1974; Killick et al.
    2012 for the family).

    At every candidate change point (and transition width 0-3) a line is fitted on each side
    (up to 8 points, limited by the jumps found so far) and both are evaluated at the
    junction; their difference over its standard error is the jump's t. The best candidate of
    a piece is a jump when that t exceeds ``config.sensitivity`` (Student t when the noise
    was read from the curve), the jump is at least ``config.min_jump``, both lines fit their
    points (a change of trend inside a window does not), and, as online, it is also a jump on
    λ̂ itself (``raw``: a straight λ̂ trend bends on the log scale, but a bend is no jump).
    The piece is then split at it and both halves are searched again.

    Args:
        x: log-steps, increasing.
        z: the curve on the signed-log scale; ``var``: its noise variances.
        raw: λ̂ itself and its noise variances, for the second test; None to skip it.
        config: thresholds (``sensitivity``, ``min_jump``); the defaults otherwise.
        dof: degrees of freedom of the noise estimate.

    Returns:
        The jumps in order.
    """
    cfg = DetectorConfig() if config is None else config
    threshold = trend_threshold(cfg.sensitivity, dof)
    scales = [(z, var)] + ([raw] if raw is not None else [])
    found: list[Jump] = []
    pieces = [(0, x.size)]
    while pieces:
        lo, hi = pieces.pop()
        best: Jump | None = None
        for k in range(lo + 3, hi - 2):
            for width in range(4):
                if k + width + 3 > hi:
                    break
                test = _jump_at(x, scales, lo, hi, k, width)
                if test is None:
                    continue
                ts, size, before, after = test
                real = all(abs(t) >= threshold for t in ts) and abs(size) >= cfg.min_jump
                if real and (best is None or abs(ts[0]) > best.t):
                    best = Jump(k, k + width, size, abs(ts[0]), before, after)
        if best is not None:
            found.append(best)
            pieces += [(lo, best.begin), (best.end, hi)]
    return sorted(found, key=lambda jump: jump.begin)


def retrospective_stages(
    steps: Sequence[int] | np.ndarray,
    llcs: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray | None = None,
    *,
    stderrs: Sequence[float] | np.ndarray | None = None,
    smoothing: float | None = None,
    scale: float | None = None,
    config: DetectorConfig | None = None,
    min_points: int = 3,
    min_stage_decades: float | None = None,
    component: str | None = None,
) -> list[StageBoundary]:
    """Stage boundaries of a whole λ̂ curve: its jumps, and the critical points of the
    smoothed curve between them, in the manner of Hoogland et al. 2024.

    First the jumps (:func:`find_jumps`, on the signed-log scale with
    :attr:`DetectorConfig.scale`, or ``scale``). Then each piece between jumps is smoothed in
    log-step (:func:`smooth_log_step`); each checkpoint's smoothed slope is classified with
    :func:`classify_trend` (the same thresholds as the online detector, with the slope's
    standard error); runs of one regime at least ``min_points`` checkpoints and
    ``min_stage_decades`` long are stages, and a boundary lies where the slope crosses
    halfway between the mean slopes of the two stages. For a kink smoothed by a symmetric
    kernel that is the kink itself; for a peak it is where dλ̂/dlog t changes sign. A rising
    or falling run no longer than ``2.5`` bandwidths between two other runs is a jump too
    small for :func:`find_jumps`, blurred by the kernel: one boundary, at its steepest point.
    The kind comes from the loss: across a jump as online, over the new stage otherwise
    (:func:`classify_kind`).

    Args:
        steps: training steps, strictly increasing.
        llcs: λ̂ at each step; non-finite values are skipped.
        losses: training loss at each step (optional), to tell "acquire"/"simplify".
        stderrs: standard error of each λ̂ (optional;
            :func:`~slt_callbacks.analysis.noise.standard_error`).
        smoothing: kernel std in decades; default 4 median checkpoint spacings of the whole
            curve.
        scale: analyse ``signed_log(λ̂, scale)`` between jumps (for curves with estimates at
            saddles; the online detector's :attr:`DetectorConfig.scale`); None: λ̂ itself.
        config: thresholds (``sensitivity``, ``flat_threshold``, ``min_relative_slope``,
            ``min_jump``, ``flat_loss_tolerance``, ``min_noise``); the defaults of
            :class:`DetectorConfig` otherwise.
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
    whole = smooth_log_step(steps, llcs, stderrs=stderrs, smoothing=smoothing, scale=scale)
    index, x = whole.index, whole.log_steps
    raw = np.asarray(llcs, dtype=float)[index]
    se = (np.full(len(np.asarray(llcs)), math.nan) if stderrs is None
          else np.asarray(stderrs, dtype=float))[index]
    loss_all = np.full(len(np.asarray(llcs)), math.nan)
    if losses is not None:
        loss_all = np.array([_as_float(v) for v in losses], dtype=float)
        if loss_all.shape != (len(np.asarray(llcs)),):
            raise ValueError(
                f"Expected `losses` to have the length of `llcs` ({len(np.asarray(llcs))}) "
                f"but got {loss_all.shape[0]}."
            )
    loss = loss_all[index]
    z, var, raw_scale = _jump_scales(x, raw, se, cfg, scale)
    jumps = find_jumps(x, z, var, raw=raw_scale, config=cfg, dof=whole.dof)
    found = [_jump_found(jump, x, raw, loss, cfg) for jump in jumps]
    edges = [0] + [e for jump in jumps for e in (jump.begin, jump.end)] + [x.size]
    for lo, hi in zip(edges[::2], edges[1::2], strict=True):
        if hi - lo >= 5:
            piece = smooth_log_step(whole.steps[lo:hi], raw[lo:hi], stderrs=se[lo:hi],
                                    smoothing=whole.bandwidth, scale=scale)
            found += _trend_found(piece, lo, x, loss, cfg, scale, min_points,
                                  min_stage_decades)
    found.sort(key=lambda item: item.at)
    boundaries: list[StageBoundary] = []
    for item in found:
        i = int(np.argmin(np.abs(x - item.at)))
        (loss_trend, loss_reason), after = item.loss, item.new
        kind, kind_reason = classify_kind(after, loss_trend)
        step = int(whole.steps[i])
        boundaries.append(
            StageBoundary(
                step=step,
                checkpoint=int(index[i]),
                log_step=item.at,
                kind=kind,
                previous_regime=item.previous,
                new_regime=after,
                llc=item.llc,
                loss=_optional_float(float(loss[i])),
                slope=item.slope,
                stage=len(boundaries) + 1,
                message=_message(
                    component=component,
                    step=step,
                    previous=item.previous,
                    new=after,
                    slope=item.slope,
                    loss_reason=loss_reason,
                    loss_known=loss_trend is not Regime.UNCERTAIN,
                    kind=kind,
                    kind_reason=kind_reason,
                    jump=item.jump,
                ),
            )
        )
    return boundaries


@dataclass(frozen=True)
class _Found:
    previous: Regime
    new: Regime
    at: float  # log-step of the boundary
    loss: tuple[Regime, str]  # what the loss did
    slope: float  # of the new stage, per decade (signed-log units for a jump: its size)
    llc: float  # λ̂ at the boundary (the new level, for a jump)
    jump: bool


def _jump_scales(x, raw, se, cfg, scale):
    """The signed-log curve and its noise variances (the larger of the squared standard
    error and the curve's residual scatter, floored at ``min_noise``), and the same noise on
    λ̂ itself, by the delta method."""
    s = cfg.scale if scale is None else scale
    z = signed_log(raw, s)
    z_se = signed_log_stderr(raw, se, s)
    noise, _ = residual_noise(x, z)
    floor = max(noise if math.isfinite(noise) else 0.0, cfg.min_noise) ** 2
    var = np.maximum(np.where(np.isfinite(z_se), z_se * z_se, 0.0), floor)
    return z, var, (raw, var * (s + np.abs(raw)) ** 2)


def _jump_found(jump: Jump, x, raw, loss, cfg) -> _Found:
    """A jump as a boundary: rising or falling, named by the loss across it (as online)."""
    window = _JUMP_WINDOWS[0]
    end = min(jump.end + window, x.size)
    loss_change = _loss_change(x[:end], loss[:end], jump.end, jump.begin, window, cfg)
    return _Found(
        previous=Regime.FLAT,
        new=Regime.RISING if jump.size > 0 else Regime.FALLING,
        at=float(x[jump.begin]),
        loss=loss_change,
        slope=jump.size,
        llc=float(raw[jump.end]),
        jump=True,
    )


def _trend_found(piece, lo, x, loss, cfg, scale, min_points, min_stage_decades):
    """The critical points of one smoothed piece (starting at index ``lo``) as boundaries."""
    out = []
    for before, after, at, segment, end in _trend_changes(
        piece, cfg, scale, min_points, min_stage_decades
    ):
        i = int(np.argmin(np.abs(piece.log_steps - at)))
        value = float(np.interp(at, piece.log_steps, piece.smoothed))
        if scale is not None:
            value = float(signed_log_inverse(value, scale))
        loss_segment = slice(segment.start + lo, segment.stop + lo)
        out.append(
            _Found(
                previous=before,
                new=after,
                at=at,
                loss=_loss_trend(x, loss, loss_segment, cfg),
                slope=float(piece.slope[i : end + 1].mean()),
                llc=value,
                jump=False,
            )
        )
    return out


def _trend_changes(curve, cfg, scale, min_points, min_stage_decades):
    """Critical points of one smoothed piece: ``(previous, new, log-step, loss segment,
    stage end)``, indices relative to the piece."""
    x, slope = curve.log_steps, curve.slope
    # On the signed-log scale slopes are already relative: the practical floor is absolute.
    levels = np.ones_like(curve.smoothed) if scale is not None else curve.smoothed
    regimes = [
        classify_trend(float(s), float(se), cfg, level=float(m), dof=curve.dof)[0]
        for s, se, m in zip(slope, curve.slope_stderr, levels, strict=True)
    ]
    extent = curve.bandwidth if min_stage_decades is None else min_stage_decades
    extent = check_number("min_stage_decades", extent, strict=False)
    runs = _segments(regimes, x, min_points, extent)
    found: list[tuple[Regime, Regime, float, slice, int]] = []
    j = 0
    while j < len(runs) - 1:
        (before, first_a, last_a), (after, first_b, last_b) = runs[j], runs[j + 1]
        following = runs[j + 2] if j + 2 < len(runs) else None
        short = x[last_b] - x[first_b] <= 2.5 * curve.bandwidth
        if after is not Regime.FLAT and following is not None and short:
            peak = first_b + int(np.argmax(np.abs(slope[first_b : last_b + 1])))
            around = slice(max(first_b - 2, 0), min(last_b + 3, x.size))
            found.append((before, after, float(x[peak]), around, following[2]))
            j += 2
            continue
        target = 0.5 * (slope[first_a : last_a + 1].mean() + slope[first_b : last_b + 1].mean())
        junction = 0.5 * float(x[last_a] + x[first_b])
        at = _crossing(x, slope, first_a, last_b, junction, float(target))
        i = int(np.argmin(np.abs(x - at)))
        found.append((before, after, at, slice(i, last_b + 1), last_b))
        j += 1
    return found


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
    jump: bool = False,
) -> str:
    who = "λ̂" if component is None else f"λ̂[{component}]"
    if jump:
        direction = "up" if new is Regime.RISING else "down"
        change = f"{who} jumped {direction} ({slope:+.3g} on the signed-log scale)"
    elif new is Regime.FLAT:
        change = f"{who} levelled off ({slope:+.3g} per decade)"
    else:
        change = f"{who} started {new.value} ({slope:+.3g} per decade)"
    loss = f" while {loss_reason}" if loss_known else f" ({loss_reason})"
    meaning = kind_reason
    if kind is StageKind.TURN:
        meaning = f"{kind_reason} ({previous.value} -> {new.value})"
    return f"step {step}: {change}{loss}: {meaning}"


