r"""Choose the SGLD step size, localization and chain length of an LLC estimate from trial
chains, and say why.

An LLC estimate (Lau et al. 2023) is only as good as its step size ε. Too small, and the
chains have not left w* by the end of burn-in: λ̂ is biased *low* and rises as ε grows.
Too large, and the discretisation of the Langevin dynamics inflates the sampled variance:
along a direction of curvature a = nβ·λ (λ an eigenvalue of the Hessian of L_n) the SGLD
chain's stationary variance is 1/(a(1 − εa/4)) instead of 1/a, so λ̂ is biased *high* by
about εa/4 of that direction's share, and beyond ε·nβ·λ_max = 4 the chains diverge. Between
the two, λ̂ hardly depends on ε. :func:`calibrate` runs short chains over a grid of step sizes, finds
that flat region and returns the largest step size inside it: the fastest-mixing chains
whose discretisation bias is still negligible.

The rule (:func:`choose`), in order:

1. **Healthy points only.** A grid point counts if its chains did not diverge, λ̂ > 0, the
   trace stopped drifting, and the MALA acceptance is at least ``min_acceptance`` (0.9 by
   default, the literature's healthy value, stricter than the 0.5 at which
   :func:`~slt_callbacks.core.llc.estimate_llc` merely warns). On the closed-form cases of
   ``SLT_PRIMER`` §5, acceptance 0.95 went with ≈ +7 % bias and 0.88 with ≈ +25 %.
2. **Neighbours agree.** Two neighbouring healthy step sizes ε₁ < ε₂ agree when
   :math:`|\hat\lambda_2 - \hat\lambda_1| + z \cdot \mathrm{se} \le s \cdot
   \log_{10}(\epsilon_2/\epsilon_1) \cdot |\hat\lambda|`: the change, plus ``num_std_errors``
   = *z* standard errors of it, is below ``max_slope`` = *s* relative change per decade of
   step size. This is an equivalence test: flatness must be *shown*, and noise cannot make
   two points agree (short, under-mixed chains are noisy and read λ̂ low; a test that
   accepted "within noise" found false plateaus there). If λ̂ carries a bias linear in ε,
   a secant slope *s* per decade over a half-decade step means a bias of about 0.73·*s* at
   the larger step (0.2 per decade ↔ ≈ 15 %).
3. **Largest step of the flat region.** The flat region is the longest run of consecutive
   healthy grid points whose neighbours agree (ties: the run at larger steps); the
   recommendation is its largest step size.

**The localization γ** is chosen by the same rule, one γ at a time: the ladder
:data:`DEFAULT_LOCALIZATIONS` (1, 10, 100, 1000, 10⁴) is walked upward, a full ε grid at
each γ, and the walk stops at the first γ whose chains stay local, that is, whose series has
a verified flat region, or has a healthy point and no point whose chains escaped below
L_n(w*) (``not_a_minimum``). So γ is the smallest value at which the chains stay local;
λ̂ flat in ε is then checked at that γ. Why smallest: γ adds γ/2‖w − w*‖² to the
potential, and at a singular minimum, where nβ·L_n grows only slowly away from w*, that
term cuts the posterior off and biases λ̂ low (deep linear networks at γ = 100: 29–98 %
low; SLT_PRIMER §8). A series that is merely not flat (short chains) is no reason to climb:
a larger γ mixes faster and looks flatter, but flat at the wrong value. At a true minimum
γ = 1 is therefore what the rule returns; near a saddle the small-γ chains escape along the
descending directions (λ̂ < 0) and the ladder climbs until γ outweighs the negative
curvature, γ ≳ nβ·|λ_min|. Pass ``localizations=[...]`` to sweep your own values in full
(:func:`choose` applies the same order), or ``[γ]`` to fix it.

All grid points reuse the same seed by default (*common random numbers*): chain *c* sees the
same minibatch order and the same noise draws at every step size, so neighbouring estimates
are strongly correlated (0.8–0.98 per chain on the closed-form cases) and their difference
is measured with a paired standard error 2–4× smaller than the unpaired one. Flatness is
then a sharp test, not a test that passes because short chains are noisy.

If no run of two agreeing points exists (the plateau is narrower than the grid spacing, or
the calibration chains are too short to reach it), the largest healthy step is recommended:
without a plateau, λ̂(ε) of short chains rises with ε because small steps have not mixed
(biased low), while the health checks (acceptance ≥ 0.9) already exclude the coarse steps
that bias it high. If no point is healthy, ``config`` is None and ``reason`` says what to
change.

**Chain length, then ε at equal length** (:func:`settle`; skipped with ``max_steps=None``).
The screen's short chains cannot tell a mixed chain from one that has not left w*: at a
singular minimum λ̂ first sits on a plateau of the regular directions, then rises over tens
of thousands of steps as the chains fill the directions where L grows only at high order
(a depth-3 deep linear network: ≈ x⁶, posterior width (nβ)^(−1/6)); a flat stretch of
λ̂(ε) among short chains can be that plateau. So the chain length is chosen from the chains
themselves: pilot chains (``num_chains`` of them, from w*, no burn-in, the same seed) start
at the largest healthy step of the chosen series (the fastest mixing), their length T
doubles from twice the screening length until the chains at ε/2 are stationary
(:func:`~slt_callbacks.core.mixing.assess_mixing`: λ̂ over [T/2, T) within ``max_trend``
of λ̂ over [T/4, T/2), half a standard error included, and an effective sample size of at
least ``min_ess`` from the integrated autocorrelation time); then ε runs at the same T,
and the config is accepted (``verified=True``) when halving ε moved λ̂, plus one paired
standard error, by less than the full estimate's standard error (std of per-chain λ̂ /
√``base.num_chains``): the stability target itself, at the length the config will
run. A disagreement is diagnosed by running ε/2 for 2T, the same simulated time: if λ̂
then agrees, or reads above ε's (the step's bias is upward in ε, so that is the coarse
chains still rising), the chains were under-mixed (T doubles), else the step size biases λ̂
(ε halves, at most ``max_halvings`` times, and T doubles with it: the same simulated time
ε·T, so chains at a smaller step are never judged before they have travelled as far).
Coarse chains that drift while the fine ones look stationary are told apart the same way
(ε/2 for 2T: still moving → T doubles; settled → ε halves). Directions along which L is
exactly constant (the GL(r) symmetry orbits of a deep
linear network) do not change λ̂ and need not be mixed; only their effect on it is tested
(chains drifting along them into stiffer regions read λ̂ high and fail the trend test at
the coarse step, which then halves). The recommended config has burn-in = draws = T/2.
Within ``max_steps`` (the longest pilot chain; the phase costs at most a few times
``num_chains · max_steps`` gradient evaluations per halving) the rule may not verify; it
then returns the stationary (ε, ε/2) pair with the longest simulated time ε·T (ties: the
one closest to agreement; its half step ε/2 when the coarse run's acceptance fell below
``min_acceptance``), ``verified=False``: at a singular minimum a short pair can agree
on the early plateau of the regular directions and read λ̂ far too low. If the chains at ε/2
ran the whole budget still rising (not stationary, trend > 0), travelled further (larger
ε·T) and read λ̂ above that pair, their ε and T are returned instead, and the reason says its λ̂ is
a lower bound. Before that, ε itself runs as long: it travels twice as far, and if its λ̂ is
finite, higher still and not falling, with a measured acceptance of at least
``min_acceptance``, it takes their place (the reason says it is unverified and may read
high). With no stationary pilot at all no config is returned.

An unverified choice or no choice warns by default (``on_failure="warn"``), like an
unhealthy LLC estimate; ``on_failure="raise"`` raises :class:`CalibrationError` instead.

The default grid is centred on the primer's heuristic ε·nβ·λ_max = 0.1, spanning 1e-3 to 3
in half-decades, with λ_max from a few power iterations of Hessian-vector products. At a
point where the Hessian carries no scale (nβ·λ_max ≤ γ, e.g. the origin of a linear
network, where it vanishes) a fixed grid from 1e-7 to 1e-2 is used instead.

References:
    E. Lau, Z. Furman, G. Wang, D. Murfet, S. Wei, "The Local Learning Coefficient: A
    Singularity-Aware Complexity Measure", 2023 (SGLD estimator; step-size bias).
    M. Welling, Y. W. Teh, "Bayesian Learning via Stochastic Gradient Langevin Dynamics",
    ICML 2011.
"""

from __future__ import annotations

import math
import numbers
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from .._checks import check_int, check_number
from ..analysis.noise import standard_error
from .config import SGLDConfig
from .curvature import top_hessian_eigenvalue
from .data import build_pool
from .diagnostics import HealthCriteria, Status
from .functional import (
    LossFn,
    check_model_and_loss,
    trainable_parameters,
)
from .llc import LLCResult, OnFailure, estimate_llc
from .mixing import Halving, Mixing, assess_mixing, compare_halving

__all__ = [
    "DEFAULT_LOCALIZATIONS",
    "DEFAULT_STEP_SIZES",
    "Calibration",
    "CalibrationError",
    "CalibrationPoint",
    "Choice",
    "PilotRun",
    "Settled",
    "calibrate",
    "choose",
    "settle",
    "top_hessian_eigenvalue",
]

DEFAULT_STEP_SIZES: tuple[float, ...] = tuple(float(f"{10 ** (k / 2):.2g}") for k in range(-14, -3))
"""The fixed grid, 1e-7 to 1e-2 in half-decades, used when the curvature gives no scale."""

DEFAULT_LOCALIZATIONS: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0)
"""The γ ladder tried, smallest first, until one gives a verified flat region in ε."""

TARGET_STEP_CURVATURE = 0.1
"""ε·nβ·λ_max at the centre of the curvature-based grid (the primer's "≲ 0.1" heuristic)."""

CURVATURE_GRID_EXPONENTS = range(-4, 4)
"""Half-decade offsets from the centre: ε·nβ·λ_max from 1e-3 to about 3, so that the health
checks (acceptance, divergence at ε·nβ·λ_max ≈ 4), not the grid, bound the step size: at
singular minima the chains mix slowly in the flat directions and the best step is often
near the top of what the stiff directions allow (ε·nβ·λ_max ≈ 1)."""

_HEALTHY_CRITERIA = HealthCriteria(min_acceptance=0.9)


class CalibrationError(RuntimeError):
    """Raised by ``calibrate(..., on_failure="raise")`` when no verified step size exists.

    Attributes:
        calibration: the full :class:`Calibration`, table included, for inspection.
    """

    def __init__(self, calibration: Calibration) -> None:
        super().__init__(calibration.reason)
        self.calibration = calibration


@dataclass(frozen=True, kw_only=True)
class CalibrationPoint:
    """One grid point of a calibration: a short LLC estimate and its health.

    Attributes:
        step_size: ε.
        n_beta: nβ actually used (the default n/log n resolved).
        localization: γ.
        llc_mean: λ̂, mean over the chains that stayed finite.
        llc_std: standard deviation of λ̂ across those chains.
        llc_per_chain: λ̂ of each chain (nan where it diverged); with a shared ``seed`` the
            rule pairs chains across step sizes.
        num_chains: chains run.
        seed: the seed of this point's chains.
        status: health of the estimate (:class:`~slt_callbacks.core.diagnostics.Status`).
        reasons: why it is not healthy, with advice (empty when healthy).
        acceptance: mean MALA-style acceptance.
        drift: λ̂ of the second half of the draws minus λ̂ of the first half.
        frac_below_init: fraction of draws whose loss fell below L_n(w*).
        num_diverged: chains whose loss became non-finite.
        healthy: whether the rule may use this point (``status`` is healthy).
        step_curvature: ε·nβ·λ_max, nan when λ_max was not estimated (keep it ≲ 0.1).
        chosen: whether this is the recommended point.
        seconds: wall time of this point.
    """

    step_size: float
    n_beta: float
    localization: float
    llc_mean: float
    llc_std: float
    llc_per_chain: tuple[float, ...] = ()
    num_chains: int = 0
    seed: int | None = None
    status: Status = Status.HEALTHY
    reasons: tuple[str, ...] = ()
    acceptance: float = float("nan")
    drift: float = float("nan")
    frac_below_init: float = float("nan")
    num_diverged: int = 0
    healthy: bool = True
    step_curvature: float = float("nan")
    chosen: bool = False
    seconds: float = float("nan")

    @classmethod
    def from_result(
        cls, result: LLCResult, *, seed: int | None, step_curvature: float
    ) -> CalibrationPoint:
        """Summarise an :class:`~slt_callbacks.core.llc.LLCResult` as a table row."""
        return cls(
            step_size=result.config.step_size,
            n_beta=result.n_beta,
            localization=result.config.localization,
            llc_mean=result.llc_mean,
            llc_std=result.llc_std,
            llc_per_chain=tuple(float(v) for v in result.llc_per_chain),
            num_chains=result.config.num_chains,
            seed=seed,
            status=result.status,
            reasons=result.reasons,
            acceptance=result.acceptance,
            drift=result.drift,
            frac_below_init=result.frac_below_init,
            num_diverged=result.num_diverged,
            healthy=result.healthy and math.isfinite(result.llc_mean),
            step_curvature=step_curvature,
            seconds=result.seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (status as its short code), e.g. for a ``wandb.Table`` row."""
        out = asdict(self)
        out["status"] = self.status.value
        return out


@dataclass(frozen=True, kw_only=True)
class PilotRun:
    """One long calibration run of the chain-length phase (see :func:`calibrate`): chains
    from w* with no burn-in, judged by :func:`~slt_callbacks.core.mixing.assess_mixing`.

    Attributes:
        step_size: ε.
        localization: γ.
        n_beta: nβ actually used.
        num_steps: T; the estimate is λ̂ over ``[T/2, T)``.
        mixing: the stationarity verdict (λ̂, trend, τ, ESS).
        acceptance: mean MALA-style acceptance over all T steps.
        seconds: wall time.
    """

    step_size: float
    localization: float
    n_beta: float
    num_steps: int
    mixing: Mixing
    acceptance: float = float("nan")
    seconds: float = float("nan")


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The outcome of :func:`calibrate`: a recommended config, and the evidence for it.

    Attributes:
        config: the recommended :class:`~slt_callbacks.core.config.SGLDConfig`: ``base`` with
            the chosen ``step_size``, ``localization`` (and ``n_beta`` where swept) and,
            after the chain-length phase, ``num_burnin_steps`` = ``num_draws`` = T/2. None
            when no grid point was healthy or no pilot chains were stationary.
        table: every grid point, sorted by localization, nβ, then step size.
        chosen_index: index of the recommended point in ``table``, or None.
        verified: True when the chain-length phase verified the choice (stationary
            chains at ε and ε/2, halving within the standard error; see :func:`settle`),
            or, with ``max_steps=None``, when the screen found a flat region (``flat``).
        rule: the selection rule, as a sentence.
        reason: why this point (or why none), with advice.
        grid: how the step sizes were chosen.
        top_eigenvalue: λ_max of the Hessian of L_n at w* (largest in magnitude), from
            power iteration; nan when not estimated.
        criteria: the health thresholds the table was judged by.
        seconds: wall time of the whole calibration.
        pilots: the long runs of the chain-length phase, in the order they ran (empty when
            ``max_steps=None``).
        flat: whether the screening grid showed a flat region in ε (``verified`` when
            the chain-length phase did not run).
    """

    config: SGLDConfig | None
    table: tuple[CalibrationPoint, ...]
    chosen_index: int | None
    verified: bool
    rule: str
    reason: str
    grid: str = ""
    top_eigenvalue: float = float("nan")
    criteria: HealthCriteria = field(default_factory=lambda: _HEALTHY_CRITERIA)
    seconds: float = float("nan")
    pilots: tuple[PilotRun, ...] = ()
    flat: bool = False

    @property
    def chosen(self) -> CalibrationPoint | None:
        """The recommended grid point, or None."""
        return None if self.chosen_index is None else self.table[self.chosen_index]

    def to_markdown(self) -> str:
        """The table as GitHub markdown, the chosen row marked, with the rule and reason."""
        head = ("| ε | nβ | γ | ε·nβ·λ_max | λ̂ | std | acceptance | drift | below w* "
                "| diverged | status | chosen |")
        lines = [head, "|" + "---|" * 12]
        for p in self.table:
            cells = [
                f"{p.step_size:.2g}", f"{p.n_beta:.4g}", f"{p.localization:g}",
                _fmt(p.step_curvature, ".2g"), _fmt(p.llc_mean, ".4g"), _fmt(p.llc_std, ".3g"),
                _fmt(p.acceptance, ".3f"), _fmt(p.drift, "+.3g"), _fmt(p.frac_below_init, ".2f"),
                f"{p.num_diverged}/{p.num_chains}", p.status.value, "**←**" if p.chosen else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Grid: {self.grid}"]
        if self.pilots:
            lines += ["", "Chain length and halving (pilot chains from w*, no burn-in; λ̂ over "
                      "[T/2, T), trend = λ̂[T/2, T) − λ̂[T/4, T/2)):", "", _pilot_head(),
                      "|" + "---|" * 10, *(_pilot_row(p) for p in self.pilots)]
        lines += ["", f"Rule: {self.rule}", f"Choice: {self.reason}"]
        return "\n".join(lines)


def _pilot_head() -> str:
    return ("| ε | γ | steps | λ̂ | std | trend ± se | τ | ESS | acceptance | stationary |")


def _pilot_row(p: PilotRun) -> str:
    m = p.mixing
    cells = [f"{p.step_size:.3g}", f"{p.localization:g}", str(p.num_steps),
             _fmt(m.llc, ".4g"), _fmt(m.llc_std, ".3g"),
             f"{_fmt(m.trend, '+.3g')} ± {_fmt(m.trend_se, '.2g')}", _fmt(m.tau, ".0f"),
             _fmt(m.ess, ".0f"), _fmt(p.acceptance, ".3f"), "yes" if m.stationary else "no"]
    return "| " + " | ".join(cells) + " |"


def _fmt(value: float, spec: str) -> str:
    return "–" if not math.isfinite(value) else format(value, spec)


# --------------------------------------------------------------------------- the rule


class Choice(NamedTuple):
    """What :func:`choose` returns.

    Attributes:
        index: the recommended row of the table, or None when no row is healthy.
        reason: a sentence saying why (or why none), with advice.
        verified: whether the row lies in a flat region (False for a fallback or None).
    """

    index: int | None
    reason: str
    verified: bool


def rule_text(*, max_slope: float, num_std_errors: float, min_acceptance: float) -> str:
    """The rule of :func:`choose` with its parameters, as one sentence."""
    return (
        f"Smallest localization first, stopping at the first where the chains stay local "
        f"(a healthy point and none not_a_minimum). Among healthy points (no divergence, "
        f"λ̂ > 0, no drift, acceptance ≥ {min_acceptance:g}), take the longest run of "
        f"consecutive step sizes whose neighbours agree (λ̂ changes, plus "
        f"{num_std_errors:g} standard errors paired across chains, by at most "
        f"{max_slope:.0%} per decade of step size), and choose the largest step size in it: "
        "flat means the discretisation bias is negligible, largest means the chains mix "
        "fastest. Without such a run, the largest healthy step is chosen, marked unverified."
    )


def choose(
    table: Sequence[CalibrationPoint],
    *,
    max_slope: float = 0.2,
    num_std_errors: float = 2.0,
) -> Choice:
    """Pick the recommended grid point of a calibration table; a pure function.

    Points are grouped into series of equal ``(localization, n_beta)`` and sorted by step
    size. Series are tried in order of increasing localization (the least-biased first;
    a larger γ keeps chains healthy but biases λ̂ low), then of first appearance of nβ. The
    first series with a flat region wins; the first series whose chains stay local (a
    healthy point, none ``not_a_minimum``) ends the search even without one. Within a
    series the rule is the module's (see :mod:`slt_callbacks.core.calibrate`): among
    ``healthy`` points, the longest run of consecutive grid points whose neighbours agree,
    and its largest step size.

    Neighbours ε₁ < ε₂ agree when ``|λ̂₂ − λ̂₁| + num_std_errors · se <= max_slope ·
    log10(ε₂/ε₁) · scale``, with ``scale`` the mean of ``|λ̂₁|`` and ``|λ̂₂|`` and ``se``
    the standard error of the difference: paired (``std(λ̂₂,c − λ̂₁,c) / √chains``) when
    both points ran the same chains from the same seed, else ``√(s₁²/C₁ + s₂²/C₂)``.

    Args:
        table: the grid points; only ``step_size``, ``n_beta``, ``localization``,
            ``llc_mean``, ``llc_std``, ``llc_per_chain``, ``num_chains``, ``seed`` and
            ``healthy`` are read.
        max_slope: tolerated relative change of λ̂ per decade of step size.
        num_std_errors: differences within this many standard errors count as noise.

    Returns:
        A :class:`Choice` ``(index, reason, verified)``: the index into ``table`` (None
        when no point is healthy), a sentence saying why, and whether the choice lies in a
        flat region. Without an agreeing pair, the largest healthy step of the series where
        the search ended (else of the first series with a healthy point) is returned with
        ``verified=False``.

    Example:
        >>> rows = [CalibrationPoint(step_size=e, n_beta=100.0, localization=1.0,
        ...                          llc_mean=m, llc_std=0.1, num_chains=4)
        ...         for e, m in [(1e-5, 1.0), (1e-4, 2.9), (1e-3, 3.0), (1e-2, 5.0)]]
        >>> choose(rows)[0]
        2
    """
    check_number("max_slope", max_slope)
    check_number("num_std_errors", num_std_errors)
    series = _series(table)
    if not any(table[i].healthy for indices in series for i in indices):
        return Choice(None, _no_healthy_reason(table), False)
    for indices in series:
        run = _longest_flat_run(table, indices, max_slope, num_std_errors)
        if run:
            best = run[-1]
            p = table[best]
            reason = (
                f"ε = {p.step_size:.2g} is the largest step of the flat region "
                f"{table[run[0]].step_size:.2g}–{p.step_size:.2g} ({len(run)} agreeing "
                f"healthy points, λ̂ = {_span(table, run)}) at nβ = {p.n_beta:.4g}, "
                f"γ = {p.localization:g}."
            )
            return Choice(best, reason + _skipped_note(table, series, indices), True)
        if _is_local(table, indices):
            break  # the chains stay local here: a larger γ would only add bias
    else:
        indices = next(s for s in series if any(table[i].healthy for i in s))
    best = max((i for i in indices if table[i].healthy), key=lambda i: table[i].step_size)
    p = table[best]
    where = f"ε = {p.step_size:.2g} (nβ = {p.n_beta:.4g}, γ = {p.localization:g})"
    if sum(table[i].healthy for i in indices) == 1:
        why = f"Only one healthy point, {where}: flatness could not be checked (not verified)."
    else:
        why = (f"No two neighbouring healthy step sizes agree closely enough to show a flat "
               f"region, so flatness is not verified; chose the largest healthy step, "
               f"{where}: short chains at small steps have not mixed and read λ̂ low, and "
               "the health checks already exclude the coarse steps that read it high.")
    return Choice(best, why + _skipped_note(table, series, indices) + (
        " Lengthen the calibration chains (num_burnin_steps, num_draws) or refine the grid "
        "around it, and check the full estimate's diagnostics."
    ), False)


def _is_local(table: Sequence[CalibrationPoint], indices: Iterable[int]) -> bool:
    """A series whose chains stay local: some point is healthy and none escaped below
    L_n(w*) (``not_a_minimum``). Then a larger γ is not needed, flat region or not."""
    rows = [table[i] for i in indices]
    return (any(p.healthy for p in rows)
            and not any(p.status is Status.NOT_A_MINIMUM for p in rows))


def _series(table: Sequence[CalibrationPoint]) -> list[list[int]]:
    """Indices grouped by (localization, n_beta), each sorted by step size."""
    order: dict[tuple[float, float], list[int]] = {}
    for i, p in enumerate(table):
        order.setdefault((p.localization, p.n_beta), []).append(i)
    keys = sorted(order, key=lambda k: k[0])  # stable: nβ keeps first-appearance order
    return [sorted(order[k], key=lambda i: table[i].step_size) for k in keys]


def _longest_flat_run(
    table: Sequence[CalibrationPoint],
    indices: list[int],
    max_slope: float,
    num_std_errors: float,
) -> list[int]:
    """The longest run (≥ 2 points) of consecutive healthy points whose neighbours agree;
    ties go to the run at larger step sizes. Empty if there is none."""
    best: list[int] = []
    run: list[int] = []
    for i in indices:
        p = table[i]
        if not p.healthy:
            run = []
            continue
        if run and not agree(table[run[-1]], p, max_slope=max_slope,
                             num_std_errors=num_std_errors):
            run = []
        run = [*run, i]
        if len(run) >= 2 and len(run) >= len(best):
            best = run
    return best


def agree(
    lower: CalibrationPoint,
    upper: CalibrationPoint,
    *,
    max_slope: float,
    num_std_errors: float,
) -> bool:
    """Whether λ̂ at two step sizes agrees (see :func:`choose` for the tolerance)."""
    if not (math.isfinite(lower.llc_mean) and math.isfinite(upper.llc_mean)):
        return False
    diff = abs(upper.llc_mean - lower.llc_mean)
    decades = abs(math.log10(upper.step_size / lower.step_size))
    scale = 0.5 * (abs(lower.llc_mean) + abs(upper.llc_mean))
    se = difference_std_error(lower, upper)
    noise = num_std_errors * se if math.isfinite(se) else 0.0
    # An equivalence test: the change plus its noise must fit the tolerance. Noisy short
    # chains therefore cannot make two points "agree" (they did, on under-mixed chains of
    # deep linear networks, and the rule then chose a step 25–35 % low).
    return diff + noise <= max_slope * decades * scale


def difference_std_error(a: CalibrationPoint, b: CalibrationPoint) -> float:
    """Standard error of ``b.llc_mean − a.llc_mean``; paired across chains when both ran
    the same chains from the same seed (common random numbers), else unpaired."""
    pa, pb = a.llc_per_chain, b.llc_per_chain
    paired = (
        a.seed is not None and a.seed == b.seed and len(pa) == len(pb) >= 2
        and all(math.isfinite(v) for v in (*pa, *pb))
    )
    if paired:
        diffs = [y - x for x, y in zip(pa, pb, strict=True)]
        return statistics.stdev(diffs) / math.sqrt(len(diffs))
    if a.num_chains < 2 or b.num_chains < 2:
        return float("nan")
    return math.sqrt(a.llc_std**2 / a.num_chains + b.llc_std**2 / b.num_chains)


def _span(table: Sequence[CalibrationPoint], run: list[int]) -> str:
    values = [table[i].llc_mean for i in run]
    return f"{min(values):.3g}–{max(values):.3g}"


def _skipped_note(
    table: Sequence[CalibrationPoint], series: list[list[int]], chosen: list[int]
) -> str:
    before = series[: series.index(chosen)]
    if not before:
        return ""
    skipped = ", ".join(
        f"(nβ = {table[s[0]].n_beta:.4g}, γ = {table[s[0]].localization:g})" for s in before
    )
    return f" Series tried first had no flat region: {skipped}."


def _no_healthy_reason(table: Sequence[CalibrationPoint]) -> str:
    if not table:
        return "The table is empty; there is nothing to choose from."
    if all(p.status is Status.ALL_DIVERGED for p in table):
        return (
            "Every grid point diverged: all step sizes are too large for this model. Add "
            f"smaller step sizes (the smallest tried was {min(p.step_size for p in table):.2g})."
        )
    counts: dict[str, int] = {}
    for p in table:
        counts[p.status.value] = counts.get(p.status.value, 0) + 1
    summary = ", ".join(f"{n}× {s}" for s, n in sorted(counts.items()))
    advice = []
    if Status.NOT_A_MINIMUM.value in counts:
        advice.append("w* may not be a local minimum (still training): try larger "
                      "`localizations`")
    if Status.LOW_ACCEPTANCE.value in counts:
        advice.append("lower acceptance may be unavoidable with minibatch noise: relax "
                      "`criteria=HealthCriteria(min_acceptance=...)` or use larger batches")
    if Status.NOT_CONVERGED.value in counts:
        advice.append("chains still drift: lengthen `num_burnin_steps`")
    return (
        f"No grid point was healthy ({summary}); no step size is recommended. "
        + ("; ".join(advice) + "." if advice else "Inspect the table's reasons.")
    )


# --------------------------------------------------------------------------- chain length


class Settled(NamedTuple):
    """What :func:`settle` returns.

    Attributes:
        step_size: the recommended ε, or None when no pilot was stationary.
        num_steps: the chain length T (burn-in T/2, draws T/2), or None.
        verified: whether halving ε moved λ̂ by less than the full estimate's standard
            error, with both chains stationary at T.
        reason: a sentence saying why, with the numbers.
    """

    step_size: float | None
    num_steps: int | None
    verified: bool
    reason: str


PilotFn = Callable[[float, int], PilotRun]


def settle(
    run: PilotFn,
    step_size: float,
    *,
    min_steps: int,
    max_steps: int,
    max_halvings: int,
    num_chains: int,
    min_acceptance: float = _HEALTHY_CRITERIA.min_acceptance,
) -> Settled:
    """The chain-length rule: choose T from the chains, then ε by halving at equal T.

    ``run(ε, T)`` gives a :class:`PilotRun` (same seed every call). Starting at
    ``step_size`` (the largest healthy step of the screening grid: the fastest mixing),
    each round

    1. doubles T from the current length (first ``min_steps``) until the chains at **ε/2**
       are stationary (:func:`~slt_callbacks.core.mixing.assess_mixing`), never beyond
       ``max_steps``; ε/2 is the slower of the pair, so T then suffices for both;
    2. runs ε at the same T and compares (:func:`~slt_callbacks.core.mixing.compare_halving`):
       if both are stationary and λ̂ moved by less than the full estimate's standard error
       (``num_chains`` chains), ε and T are the answer, verified;
    3. otherwise tells the two causes apart by running ε/2 for 2T, the same simulated time
       ε·T as the coarse chains: if λ̂ then agrees, or reads above the coarse chains (the
       step's bias is upward in ε: the coarse chains were still rising), the chains were
       under-mixed and T doubles; if it reads below (discretisation bias), or if the
       coarse chains were not stationary (they drift into stiffer regions), ε halves, at
       most ``max_halvings`` times.

    When the budget runs out, the stationary pair with the longest simulated time ε·T is
    returned with ``verified=False`` (a single stationary run where no pair was), or a run
    that travelled further and whose λ̂ was still rising above it (a lower bound: the chains
    at ε/2; or ε run as long, when it reads higher still at a healthy acceptance, said to
    be unverified and possibly high); when no chains were stationary, ``step_size`` and T
    are None.
    """
    eps, steps, halvings = step_size, min_steps, 0
    best: list[_Candidate] = []  # stationary pairs (ε, ε/2 at T), else single runs
    history: list[str] = []
    while True:
        fine, steps, why, last = _stationary_length(run, eps / 2, steps, max_steps)
        if fine is None and why.endswith("diverged") and halvings < max_halvings:
            history.append(why)  # too coarse for long chains: halve, same simulated time
            eps, steps, halvings = eps / 2, 2 * steps, halvings + 1
            continue
        if fine is None:
            rising = (_Candidate(math.inf, eps / 2, last.num_steps, last.mixing.llc, False)
                      if last is not None and _rising(last.mixing) else None)
            if rising is not None:
                rising = _further(run, eps, rising, history, min_acceptance)
            return _unsettled(best, why, history, rising, min_acceptance)
        best.append(_Candidate(math.inf, eps / 2, steps, fine.mixing.llc, False))
        coarse = run(eps, steps)
        if coarse.mixing.stationary:
            halving = compare_halving(coarse.mixing, fine.mixing, num_chains=num_chains)
            history.append(_halving_text(eps, steps, coarse.mixing, halving))
            if halving.agree:
                return Settled(eps, steps, True, "; ".join(history) + ".")
            best.append(_Candidate(abs(halving.shift) / halving.target_se, eps, steps,
                                   coarse.mixing.llc, True, acceptance=coarse.acceptance))
            if _under_mixed(run, coarse, eps, steps, max_steps, num_chains, history):
                steps *= 2
                continue
        else:
            history.append(f"at ε = {eps:.3g} the chains are {coarse.mixing.reason}, while "
                           "at ε/2 they are stationary")
            if _fine_still_moving(run, fine, eps, steps, max_steps, num_chains, history):
                steps *= 2
                continue
        if halvings == max_halvings:
            return _unsettled(best, f"no agreement within {max_halvings} halvings of ε",
                              history, min_acceptance=min_acceptance)
        # Half the step, twice the steps: the same simulated time ε·T, so a chain at the
        # smaller step is never judged before it has travelled as far (short chains at small
        # steps sit on the plateau of the regular directions and look stationary).
        eps, steps, halvings = eps / 2, 2 * steps, halvings + 1


class _Candidate(NamedTuple):
    """A fallback of :func:`settle`: a stationary pair (ratio = |shift| / se), else a
    single run (ratio inf)."""

    ratio: float
    step_size: float
    num_steps: int
    llc: float
    pair: bool
    what: str = "whose λ̂ was still rising: a lower bound"  # how the reason names a rising run
    acceptance: float = math.nan  # of the run at step_size (a pair: its coarse run)

    @property
    def simulated_time(self) -> float:
        """ε·T: how far the chains travelled."""
        return self.step_size * self.num_steps


def _rising(m: Mixing) -> bool:
    """λ̂ finite, positive and still rising (not stationary, trend > 0)."""
    return not m.stationary and math.isfinite(m.llc) and m.llc > 0 and m.trend > 0


def _further(run: PilotFn, eps: float, rising: _Candidate, history: list[str],
             min_acceptance: float) -> _Candidate:
    """Out of budget with the chains at ε/2 still rising: ε run as long travels twice as far
    in simulated time. If its λ̂ is finite, above ε/2's and not falling, and its acceptance
    is measured and at least ``min_acceptance``, it replaces them as the furthest candidate
    (measured on a depth-4 DLN: ε/2 = 6.5e-6 over 64,000 steps read 3.32 and rising, 17%
    low, ε = 1.3e-5 as long 3.62 at acceptance 0.93). It is not verified, and a coarser step
    can read high: with another seed ε = 2.6e-5 read 4.75, 19% high, at acceptance 0.82
    (long chains reach stiffer regions, where the step biases λ̂ upward), which is what the
    acceptance test turns down."""
    pilot = run(eps, rising.num_steps)
    m = pilot.mixing
    failed = ("λ̂ not finite" if not math.isfinite(m.llc) else
              "not above ε/2's" if m.llc <= rising.llc else
              "falling" if not m.stationary and m.trend <= 0 else
              "acceptance not measured" if math.isnan(pilot.acceptance) else
              f"acceptance below {min_acceptance:g}" if pilot.acceptance < min_acceptance
              else "")
    history.append(
        f"ε = {eps:.3g} run as long ({rising.num_steps} steps, ε·T = "
        f"{eps * rising.num_steps:.2g}) reads {m.llc:.4g} at acceptance {pilot.acceptance:.3f}"
        + (f": turned down ({failed})" if failed else
           ": higher than at ε/2, so it is the furthest candidate"))
    if failed:
        return rising
    state = "stationary" if m.stationary else "still rising"
    return _Candidate(math.inf, eps, rising.num_steps, m.llc, False, (
        f"ε itself run as long, {state}: likely still low, though a coarser step can also "
        f"read high (its acceptance stayed ≥ {min_acceptance:g})"))


def _fine_still_moving(run: PilotFn, fine: PilotRun, eps: float, steps: int, max_steps: int,
                       num_chains: int, history: list[str]) -> bool:
    """Coarse chains drifting while the fine ones look stationary: either the coarse ones
    wander into stiffer regions (halve ε) or the fine ones still sit on the plateau of
    chains that have not left w* (a slow relaxation looks flat). ε/2 run for 2T tells:
    if λ̂ moves by more than its standard error or is no longer stationary, T doubles."""
    if 2 * steps > max_steps:
        return False
    longer = run(eps / 2, 2 * steps)
    target = standard_error(fine.mixing.llc_std, num_chains)
    moving = (not longer.mixing.stationary
              or abs(longer.mixing.llc - fine.mixing.llc) > target)
    history.append(f"ε/2 run for {2 * steps} steps reads {longer.mixing.llc:.4g}"
                   + (": the fine chains were still relaxing, so T doubles" if moving
                      else ": the fine chains are settled, so ε halves"))
    return moving


def _under_mixed(run: PilotFn, coarse: PilotRun, eps: float, steps: int, max_steps: int,
                 num_chains: int, history: list[str]) -> bool:
    """Whether ε/2 run for 2T (the coarse chains' simulated time) agrees with ε at T: the
    disagreement at equal T was then the fine chains' slower mixing, not the step size."""
    if 2 * steps > max_steps:
        return False
    longer = run(eps / 2, 2 * steps)
    same_time = compare_halving(coarse.mixing, longer.mixing, num_chains=num_chains,
                                margin=False)  # other lengths, other streams: not paired
    # The step's own bias is upward in ε (a coarser step samples a wider distribution: module
    # docstring), so ε/2 reading *above* ε after the same simulated time is no step bias: the
    # coarse chains had not relaxed yet (measured: a depth-4 DLN, 2.72 at ε = 1.3e-5 against
    # 3.09 at ε/2 for 2T and still rising; halving there left chains that travelled 4x less).
    # Unpaired streams and no margin: with equal true values noise alone makes this fire
    # now and then, which costs budget (T doubles), not correctness.
    behind = (not same_time.agree and math.isfinite(same_time.shift)
              and same_time.shift < 0)
    history.append(
        f"ε/2 run for {2 * steps} steps (the same simulated time) reads {longer.mixing.llc:.4g}"
        + (": under-mixed, so T doubles" if same_time.agree else
           ": above ε, so the coarse chains had not relaxed and T doubles" if behind else
           ": the step size biases λ̂, so ε halves"))
    return same_time.agree or behind


def _stationary_length(
    run: PilotFn, eps: float, steps: int, max_steps: int
) -> tuple[PilotRun | None, int, str, PilotRun | None]:
    """The first T (doubling from ``steps``, at most ``max_steps``) at which the chains at
    ``eps`` are stationary; None with the reason if there is none, and the last run when
    the budget ran out."""
    last = None
    while steps <= max_steps:
        last = run(eps, steps)
        m = last.mixing
        if m.stationary:
            return last, steps, "", None
        if not math.isfinite(m.llc):
            return None, steps, f"at ε = {eps:.3g}, T = {steps} some chain diverged", None
        if m.llc <= 0:
            return None, steps, (f"at ε = {eps:.3g}, T = {steps} λ̂ = {m.llc:.3g} ≤ 0: the "
                                 "chains escape below L_n(w*) in long runs (no minimum at "
                                 "this γ)"), None
        steps *= 2
    why = (f"the budget max_steps = {max_steps} is too short for stationary chains at "
           f"ε = {eps:.3g}" + (f" ({last.mixing.reason})" if last else ""))
    return None, steps, why, last


def _halving_text(eps: float, steps: int, coarse: Mixing, h: Halving) -> str:
    verdict = "<" if h.agree else ">"
    return (f"at T = {steps} steps (burn-in {steps // 2}), halving ε = {eps:.3g} moved λ̂ "
            f"from {coarse.llc:.4g} by {-h.shift:+.3g} (paired se {h.shift_se:.2g}), "
            f"{verdict} the full estimate's standard error {h.target_se:.2g}")


def _half_of(pair: _Candidate, best: list[_Candidate]) -> _Candidate:
    """The stationary run at ε/2 that ``pair`` was compared with: :func:`settle` appends it
    to ``best`` just before the pair (the pair itself if it is missing)."""
    return next((c for c in best if not c.pair and c.num_steps == pair.num_steps
                 and c.step_size == pair.step_size / 2), pair)


def _unsettled(best: list[_Candidate], why: str, history: list[str],
               rising: _Candidate | None = None,
               min_acceptance: float = _HEALTHY_CRITERIA.min_acceptance) -> Settled:
    """The fallback out of budget from the stationary candidates ``best``, or ``rising``:
    the finest chains, which ran the whole budget with λ̂ still rising."""
    prefix = "; ".join(history) + "; " if history else ""
    if not best:
        return Settled(None, None, False, f"{prefix}{why}: no chain length verified.")
    # The stationary pair with the longest simulated time ε·T (at a singular minimum λ̂
    # rises with it: short pairs can agree on the early plateau of the regular directions),
    # ties broken by agreement; else the finest stationary single run.
    pairs = [c for c in best if c.pair]
    pick = (max(pairs, key=lambda c: (c.simulated_time, -c.ratio)) if pairs
            else min(best, key=lambda c: c.step_size))
    what = (f"the stationary pair with the longest simulated time ε·T (halving moved λ̂ by "
            f"{pick.ratio:.2g} standard errors)" if pick.pair else
            "the finest step size whose chains were stationary")
    # A pair whose coarse run's acceptance fell below the threshold over the long run
    # (measured: a depth-4 DLN at T = 256,000, ε = 1.3e-5 at acceptance 0.877; the screen
    # ties such acceptance to upward bias): its half step, stationary at the same length
    # and healthier, is the reading. Dropping such pairs instead would fall back to a
    # short pair on the early plateau (there ε·T = 0.10, 32% low).
    if pick.pair and pick.acceptance < min_acceptance:
        what += (f", whose step ran at acceptance {pick.acceptance:.3f}, below "
                 f"{min_acceptance:g}: its half step, stationary at the same length")
        pick = _half_of(pick, best)
    # The finest chains ran the whole budget, travelled further in simulated time and
    # still rose above the stationary pick: the pick sat on the early plateau (measured:
    # a depth-4 DLN, the only stationary pair 21% low at ε·T = 0.1, the chains at ε/2
    # 3.5% low at ε·T = 0.8 and rising). They read λ̂ from below, closer: they are chosen,
    # and the reason says it is a lower bound.
    if (rising is not None and rising.llc > pick.llc
            and rising.simulated_time > pick.simulated_time):
        what = (f"the chains that travelled furthest (ε·T = {rising.simulated_time:.2g}, "
                f"against {pick.simulated_time:.2g} for {what}, λ̂ = {pick.llc:.4g}), "
                f"{rising.what}")
        pick = rising
    return Settled(pick.step_size, pick.num_steps, False, (
        f"{prefix}{why}. Not verified: chose {what}, ε = {pick.step_size:.3g} with "
        f"T = {pick.num_steps} steps (λ̂ = {pick.llc:.4g}); raise `max_steps` to verify it."))


class _Pilots:
    """Runs and remembers the pilot chains of one calibration: ``(ε, T) -> PilotRun``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: list[Any],
                 config: SGLDConfig, seed: int, mixing: dict[str, float]) -> None:
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.config, self.seed, self.mixing = config, seed, mixing
        self.runs: list[PilotRun] = []
        self._cache: dict[tuple[float, int], PilotRun] = {}

    def __call__(self, eps: float, steps: int) -> PilotRun:
        key = (eps, steps)
        if key not in self._cache:
            config = replace(self.config, step_size=eps, num_burnin_steps=0, num_draws=steps)
            result = estimate_llc(self.model, self.loss_fn, self.batches, config=config,
                                  seed=self.seed, on_failure="ignore")
            trace = result.n_beta * (result.loss_trace.double()
                                     - result.baseline_trace.double())  # (chain, draw)
            pilot = PilotRun(step_size=eps, localization=config.localization,
                             n_beta=result.n_beta, num_steps=steps,
                             mixing=assess_mixing(trace, **self.mixing),
                             acceptance=result.acceptance, seconds=result.seconds)
            self._cache[key] = pilot
            self.runs.append(pilot)
        return self._cache[key]


# --------------------------------------------------------------------------- curvature


# --------------------------------------------------------------------------- calibrate


def calibrate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    base: SGLDConfig | None = None,
    step_sizes: Sequence[float] | None = None,
    n_betas: Sequence[float] | None = None,
    localizations: Sequence[float] | None = None,
    num_draws: int = 500,
    num_burnin_steps: int = 500,
    num_chains: int = 8,
    seed: int = 0,
    common_random_numbers: bool = True,
    max_slope: float = 0.2,
    num_std_errors: float = 2.0,
    criteria: HealthCriteria | None = None,
    num_power_iterations: int = 20,
    max_steps: int | None = 64_000,
    max_halvings: int = 3,
    max_trend: float = 0.1,
    min_ess: float = 100.0,
    on_failure: OnFailure = "warn",
) -> Calibration:
    """Choose the SGLD step size, localization and chain length (optionally nβ) for LLC
    estimates of ``model``.

    Screen: one short LLC estimate per grid point (``step_sizes`` × ``n_betas`` ×
    ``localizations``), judged by the health checks; :func:`choose` picks the series (the
    smallest γ whose chains stay local: with ``localizations`` unset, the γ ladder
    :data:`DEFAULT_LOCALIZATIONS` is walked upward and stops there). Then the chain-length
    phase (:func:`settle`): pilot chains from the largest healthy step of that series,
    lengthened until stationary, ε halved until halving moves λ̂ by less than the full
    estimate's standard error. The module docstring states the rule and why;
    :meth:`Calibration.to_markdown` and :func:`slt_callbacks.plots.plot_calibration` show
    the evidence.

    Calibrate once, at a representative checkpoint (a trained model, not the random
    initialisation), and keep the resulting config for every checkpoint of the run: LLC
    values are only comparable at equal ε, nβ and γ.

    Args:
        model: the network at w*; left exactly as it was, and the global RNG untouched.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss on ``batch``.
        data: an iterable of batches, drawn once into a pool that every grid point shares
            (so a shuffling DataLoader cannot give grid points different L_n).
        base: every field of the recommendation that is not calibrated (chain count and
            length of the full estimate, dtype, backend, ...); default ``SGLDConfig()``.
        step_sizes: the ε grid; default: centred on ε·nβ·λ_max = 0.1, 1e-3 to 3 in
            half-decades, or :data:`DEFAULT_STEP_SIZES` where the Hessian at w* gives no
            scale (nβ·λ_max ≤ γ).
        n_betas: nβ values to sweep; default ``[base.n_beta]`` (not swept).
        localizations: γ values to sweep in full; default: the ladder
            :data:`DEFAULT_LOCALIZATIONS`, smallest first, stopping at the first γ with a
            verified flat region (``base.localization`` is not used). Pass
            ``[base.localization]`` to keep γ fixed.
        num_draws: draws per calibration chain.
        num_burnin_steps: burn-in steps per calibration chain. Chains too short to mix
            at the plateau leave it narrower than the grid spacing and the choice
            unverified; 500 + 500 verified all of the primer's linear-network cases.
        num_chains: chains per grid point; more than a routine estimate because the rule
            needs the standard error of λ̂ differences (chains are batched, so on small
            models they cost little). At least 2.
        seed: the only source of randomness; the same seed gives the same calibration.
        common_random_numbers: every grid point uses ``seed`` itself, so differences
            between step sizes are paired (see the module docstring). False: one seed per
            grid point, drawn from a generator seeded with ``seed``.
        max_slope: tolerated relative change of λ̂ per decade of step size.
        num_std_errors: differences within this many standard errors count as noise.
        criteria: health thresholds; default ``HealthCriteria(min_acceptance=0.9)``.
        num_power_iterations: Hessian-vector products spent on λ_max; 0 skips it (then the
            default grid is :data:`DEFAULT_STEP_SIZES`).
        max_steps: the longest pilot chain of the chain-length phase (see the module
            docstring), at least ``2 · (num_burnin_steps + num_draws)``; None skips the
            phase: the chain length is ``base``'s and ``verified`` means a flat region of
            the screen.
        max_halvings: times the chain-length phase may halve ε.
        max_trend: tolerated relative trend of λ̂ between [T/4, T/2) and [T/2, T).
        min_ess: effective draws over all pilot chains required for stationarity.
        on_failure: when no verified config exists (no healthy point, or the chain-length
            phase did not verify): ``"warn"`` (default) and return, ``"raise"``
            :class:`CalibrationError`, or ``"ignore"``.

    Returns:
        A :class:`Calibration`; ``.config`` is None when no grid point was healthy.

    Raises:
        ValueError: a bad argument, named in the message.
        CalibrationError: with ``on_failure="raise"``, when the choice is not verified.

    Example:
        >>> x = torch.randn(1024, 3, generator=torch.Generator().manual_seed(0))
        >>> model = nn.Linear(3, 2, bias=False)
        >>> data = [(x[i:i + 256], model(x[i:i + 256]).detach()) for i in range(0, 1024, 256)]
        >>> loss_fn = lambda m, b: 0.5 * ((m(b[0]) - b[1]) ** 2).sum(-1).mean()
        >>> cal = calibrate(model, loss_fn, data, base=SGLDConfig(localization=1.0),
        ...                 num_draws=100, num_burnin_steps=50, max_steps=None,
        ...                 on_failure="ignore")   # the screen only (fast)
        >>> cal.config is None or cal.config.step_size in [p.step_size for p in cal.table]
        True
    """
    start = time.perf_counter()
    base = SGLDConfig() if base is None else base
    _check_arguments(model, loss_fn, base, num_draws, num_burnin_steps, num_chains, seed,
                     common_random_numbers, num_power_iterations, on_failure)
    criteria = _check_criteria(criteria)
    choose([], max_slope=max_slope, num_std_errors=num_std_errors)  # validates both
    _check_length_arguments(max_steps, max_halvings, max_trend, min_ess,
                            2 * (num_burnin_steps + num_draws))
    steps = None if step_sizes is None else _check_grid("step_sizes", step_sizes)
    betas = [base.n_beta] if n_betas is None else _check_grid("n_betas", n_betas)
    ladder = (list(DEFAULT_LOCALIZATIONS) if localizations is None
              else _check_grid("localizations", localizations, allow_zero=True))
    # One pool for every grid point: a shuffling DataLoader must not change L_n between them.
    device = _device_of(model)
    pool = build_pool(data, num_batches=base.num_batches, device=device)
    batches = [pool.batch(i) for i in range(pool.num_batches)]
    lam_max, power_note = _top_eigenvalue(model, loss_fn, batches[0], num_power_iterations,
                                          seed, device)  # fmt: skip
    trial = replace(base, num_draws=num_draws, num_burnin_steps=num_burnin_steps,
                    num_chains=num_chains)
    screen = _Screen(model, loss_fn, batches, trial, criteria, lam_max, pool.num_samples,
                     max_slope=max_slope, num_std_errors=num_std_errors)  # fmt: skip
    rows, grid_note = screen.walk(ladder, steps, betas, _seeds(seed, common_random_numbers),
                                  stop_early=localizations is None,
                                  num_power_iterations=num_power_iterations)  # fmt: skip
    grid_note += f" {power_note}" if power_note else ""

    index, reason, flat = choose(rows, max_slope=max_slope, num_std_errors=num_std_errors)
    recommended, verified, pilots = None, flat, ()
    if index is not None:
        rows[index] = replace(rows[index], chosen=True)
        p = rows[index]
        recommended = replace(base, step_size=p.step_size, localization=p.localization,
                              n_beta=base.n_beta if n_betas is None else p.n_beta)
        if max_steps is not None:
            length = LengthRule(max_steps=max_steps, max_halvings=max_halvings,
                                max_trend=max_trend, min_ess=min_ess,
                                min_steps=2 * (num_burnin_steps + num_draws),
                                min_acceptance=criteria.min_acceptance)
            pilots_fn = _Pilots(model, loss_fn, batches,
                                replace(recommended, num_chains=num_chains), seed,
                                length.mixing_options)
            recommended, verified, reason = _choose_length(
                recommended, _first_pilot_step(rows, p), reason, length, pilots_fn,
                base.num_chains)
            pilots = tuple(pilots_fn.runs)
    calibration = Calibration(
        config=recommended, table=tuple(rows), chosen_index=index, verified=verified,
        rule=rule_text(max_slope=max_slope, num_std_errors=num_std_errors,
                       min_acceptance=criteria.min_acceptance)
        + ("" if max_steps is None else " " + length_rule_text(max_trend, min_ess)),
        reason=reason, grid=grid_note, top_eigenvalue=lam_max, criteria=criteria,
        seconds=time.perf_counter() - start, pilots=pilots, flat=flat,
    )  # fmt: skip
    _handle_failure(calibration, on_failure)
    return calibration


def _check_criteria(criteria: Any) -> HealthCriteria:
    criteria = _HEALTHY_CRITERIA if criteria is None else criteria
    if not isinstance(criteria, HealthCriteria):
        raise ValueError(
            f"Expected argument `criteria` to be a HealthCriteria but got "
            f"{type(criteria).__name__}."
        )
    return criteria


def _device_of(model: nn.Module) -> torch.device:
    params = trainable_parameters(model)
    if not params:
        raise ValueError(
            "Expected `model` to have trainable parameters (requires_grad=True) but it has none."
        )
    return next(iter(params.values())).device


def _top_eigenvalue(model: nn.Module, loss_fn: LossFn, batch: Any, num_iterations: int,
                    seed: int, device: torch.device) -> tuple[float, str]:  # fmt: skip
    """λ_max of the Hessian at w* (NaN where not estimated) and a note on why not."""
    if not num_iterations:
        return float("nan"), ""
    try:
        lam_max = top_hessian_eigenvalue(
            model, loss_fn, batch, num_iterations=num_iterations,
            generator=torch.Generator(device=device).manual_seed(seed),
        )
    except Exception as error:  # a numerical failure is a result here
        return float("nan"), (f"λ_max not estimated (power iteration failed: "
                              f"{type(error).__name__}: {error}).")
    return (lam_max if math.isfinite(lam_max) else float("nan")), ""


class _Screen:
    """The ε (× nβ) grid at each γ of the ladder: one short estimate per point."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: list[Any],
                 trial: SGLDConfig, criteria: HealthCriteria, lam_max: float,
                 num_samples: int, *, max_slope: float, num_std_errors: float) -> None:  # fmt: skip
        self.model, self.loss_fn, self.batches, self.trial = model, loss_fn, batches, trial
        self.criteria, self.lam_max, self.num_samples = criteria, lam_max, num_samples
        self.max_slope, self.num_std_errors = max_slope, num_std_errors

    def walk(self, ladder: list[float], steps: list[float] | None, betas: list[float | None],
             seeds_iter: Iterator[int], *, stop_early: bool,
             num_power_iterations: int) -> tuple[list[CalibrationPoint], str]:  # fmt: skip
        """Rows of every γ swept and the grid note. With ``stop_early`` (the default ladder):
        smallest γ first, stopping at the first γ whose series is verified flat in ε or whose
        chains stay local (a larger γ only restrains the chains more and biases λ̂ low)."""
        rows: list[CalibrationPoint] = []
        notes: list[str] = []
        backend = self.trial.backend
        for gamma in sorted(ladder):
            plan, note = _plan(steps, betas, [gamma], self.trial, self.num_samples,
                               self.lam_max, num_power_iterations)  # fmt: skip
            if note not in notes:
                notes.append(note)
            seeds = [next(seeds_iter) for _ in plan]
            series, backend = _run_grid(self.model, self.loss_fn, self.batches,
                                        replace(self.trial, backend=backend), plan,
                                        self.criteria, self.lam_max, seeds, self.num_samples)
            rows += series
            if stop_early and (_is_local(series, range(len(series))) or choose(
                    series, max_slope=self.max_slope,
                    num_std_errors=self.num_std_errors).verified):
                break
        grid_note = " ".join(notes)
        if stop_early:
            tried = sorted({p.localization for p in rows})
            grid_note += (f" γ ladder {', '.join(f'{g:g}' for g in DEFAULT_LOCALIZATIONS)}, "
                          f"smallest first, stopped at γ = {tried[-1]:g}.")
        return rows, grid_note


@dataclass(frozen=True)
class LengthRule:
    """The budget and tolerances of the chain-length phase (see :func:`settle`)."""

    max_steps: int
    max_halvings: int
    max_trend: float
    min_ess: float
    min_steps: int
    min_acceptance: float = _HEALTHY_CRITERIA.min_acceptance

    @property
    def mixing_options(self) -> dict[str, float]:
        return {"max_trend": self.max_trend, "min_ess": self.min_ess}


def length_rule_text(max_trend: float, min_ess: float) -> str:
    """The chain-length rule of :func:`settle`, as one sentence."""
    return (
        "Then, from that step size: double the chain length T until chains at ε/2 are "
        f"stationary (λ̂ over [T/2, T) within {max_trend:.0%} of λ̂ over [T/4, T/2), "
        f"including half a standard error, and ESS ≥ {min_ess:g}), run ε at the same T, "
        "and accept when halving ε moves λ̂, plus one paired standard error, by less than "
        "the full estimate's standard error (chain std/√num_chains); otherwise run ε/2 for "
        "2T (the same simulated time): if that agrees, or reads above ε (the step's bias is "
        "upward, so the coarse chains had not relaxed), double T, else halve ε (and double "
        "T). Out of budget, the stationary pair that travelled furthest (ε·T) is returned, "
        "unverified (its ε/2 if its ε ran at an unhealthy acceptance), unless the chains "
        "at ε/2 ran the whole budget still rising above it; then they are, or ε run as "
        "long if it reads higher, is not falling and its acceptance is healthy. The "
        "config's burn-in and draws are T/2 each."
    )


START_ACCEPTANCE = 0.8
"""The chain-length phase starts at the largest screened step of the chosen series whose
chains stayed finite and local with at least this acceptance: below the screen's 0.9,
because the phase itself halves a step that biases λ̂, and a coarse start is what keeps
it from judging chains at small steps that have not yet left w*."""


def _first_pilot_step(rows: Sequence[CalibrationPoint], chosen: CalibrationPoint) -> float:
    """The step the chain-length phase starts from (see :data:`START_ACCEPTANCE`)."""
    usable = [
        q.step_size for q in rows
        if q.n_beta == chosen.n_beta and q.localization == chosen.localization
        and q.num_diverged == 0 and math.isfinite(q.llc_mean) and q.llc_mean > 0
        and q.status is not Status.NOT_A_MINIMUM and q.acceptance >= START_ACCEPTANCE
    ]
    return max([chosen.step_size, *usable])


def _choose_length(
    screened: SGLDConfig,
    start: float,
    screen_reason: str,
    rule: LengthRule,
    pilots: PilotFn,
    num_chains: int,
) -> tuple[SGLDConfig | None, bool, str]:
    """Run :func:`settle` from ``start`` (:func:`_first_pilot_step`: the fastest-mixing
    chains; a flat region of short chains may be a plateau of chains that have not yet left
    w*); the config with the chosen ε and chain length, whether it is verified, and the
    reason (the screen's, then the length's)."""
    settled = settle(pilots, start, min_steps=rule.min_steps,
                     max_steps=rule.max_steps, max_halvings=rule.max_halvings,
                     num_chains=num_chains, min_acceptance=rule.min_acceptance)
    reason = f"Screen: {screen_reason} Chain length: {settled.reason}"
    if settled.step_size is None or settled.num_steps is None:
        return None, False, reason + " No config is recommended."
    steps = settled.num_steps
    config = replace(screened, step_size=settled.step_size, num_burnin_steps=steps // 2,
                     num_draws=steps - steps // 2)
    return config, settled.verified, reason


def _plan(
    steps: list[float] | None,
    betas: list[float | None],
    gammas: list[float],
    trial: SGLDConfig,
    num_samples: int,
    lam_max: float,
    num_power_iterations: int,
) -> tuple[list[tuple[float, float | None, float]], str]:
    """Grid points ``(ε, requested nβ, γ)`` in table order (γ, then nβ as given, then ε),
    and a sentence saying how the step sizes were chosen."""
    plan: list[tuple[float, float | None, float]] = []
    notes: list[str] = []
    for gamma in sorted(gammas):
        for beta in betas:
            resolved = replace(trial, n_beta=beta).resolved_n_beta(num_samples)
            grid, note = _step_grid(steps, resolved, gamma, lam_max, num_power_iterations)
            if note not in notes:
                notes.append(note)
            plan += [(eps, beta, gamma) for eps in grid]
    return plan, " ".join(notes)


def _run_grid(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[Any],
    trial: SGLDConfig,
    plan: list[tuple[float, float | None, float]],
    criteria: HealthCriteria,
    lam_max: float,
    seeds: list[int],
    num_samples: int,
) -> tuple[list[CalibrationPoint], str]:
    """One short LLC estimate per grid point, summarised as table rows; also the backend
    later points should use. An estimator that raises (a NaN at w*, a kernel without the
    needed derivative) gives an unhealthy row with the error as its reason, never an
    exception: a calibration inside a training run must not stop it."""
    rows: list[CalibrationPoint] = []
    backend = trial.backend
    for (eps, beta, gamma), seed in zip(plan, seeds, strict=True):
        config = replace(trial, step_size=eps, n_beta=beta, localization=gamma,
                         backend=backend)
        start = time.perf_counter()
        try:
            result = estimate_llc(model, loss_fn, batches, config=config, seed=seed,
                                  on_failure="ignore", criteria=criteria)
        except Exception as error:  # a numerical failure is a result here
            rows.append(_failed_point(config, config.resolved_n_beta(num_samples), seed,
                                      error, time.perf_counter() - start))
            continue
        if backend == "auto" and result.fell_back_to_loop:
            backend = "loop"  # vmap failed once: do not retry (and warn) at every point
        rows.append(CalibrationPoint.from_result(
            result, seed=seed, step_curvature=eps * result.n_beta * abs(lam_max)))
    return rows, backend


def _failed_point(
    config: SGLDConfig, n_beta: float, seed: int, error: Exception, seconds: float
) -> CalibrationPoint:
    """The row of a grid point whose estimate raised: no estimate (reported like a point
    whose chains all diverged), the error as the reason."""
    return CalibrationPoint(
        step_size=config.step_size,
        n_beta=n_beta,
        localization=config.localization,
        llc_mean=float("nan"),
        llc_std=float("nan"),
        num_chains=config.num_chains,
        seed=seed,
        status=Status.ALL_DIVERGED,
        reasons=(f"The estimator failed at this grid point ({type(error).__name__}: "
                 f"{error}); no estimate.",),
        healthy=False,
        seconds=seconds,
    )


def _step_grid(
    steps: list[float] | None,
    n_beta: float,
    localization: float,
    lam_max: float,
    num_power_iterations: int,
) -> tuple[list[float], str]:
    if steps is not None:
        return sorted(steps), f"given: {len(steps)} step sizes."
    scale = n_beta * abs(lam_max)
    if math.isfinite(scale) and scale > localization:
        centre = TARGET_STEP_CURVATURE / scale
        grid = [float(f"{centre * 10 ** (k / 2):.2g}") for k in CURVATURE_GRID_EXPONENTS]
        return sorted(set(grid)), (
            f"centred on ε·nβ·λ_max = {TARGET_STEP_CURVATURE:g} (ε = {centre:.2g} at "
            f"nβ = {n_beta:.4g}, λ_max = {lam_max:.3g} by power iteration), "
            "ε·nβ·λ_max from 1e-3 to 3 in half-decades."
        )
    why = ("curvature not estimated (num_power_iterations=0)" if not num_power_iterations
           else f"the Hessian at w* gives no scale (nβ·λ_max = {scale:.2g} ≤ γ = "
                f"{localization:g})")
    return list(DEFAULT_STEP_SIZES), (
        f"fixed log grid 1e-7 to 1e-2 in half-decades: {why}."
    )


def _seeds(seed: int, common: bool) -> Iterator[int]:
    """The seed of each grid point in table order: ``seed`` itself (common random numbers),
    or one per point drawn from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield seed if common else int(torch.randint(0, 2**62, (1,), generator=g))


def _handle_failure(calibration: Calibration, on_failure: OnFailure) -> None:
    if calibration.verified or on_failure == "ignore":
        return
    if on_failure == "raise":
        raise CalibrationError(calibration)
    warnings.warn(f"calibrate: {calibration.reason}", stacklevel=3)


# --------------------------------------------------------------------------- validation


def _check_arguments(
    model: Any,
    loss_fn: Any,
    base: Any,
    num_draws: Any,
    num_burnin_steps: Any,
    num_chains: Any,
    seed: Any,
    common_random_numbers: Any,
    num_power_iterations: Any,
    on_failure: Any,
) -> None:
    check_model_and_loss(model, loss_fn)
    if not isinstance(base, SGLDConfig):
        raise ValueError(
            f"Expected argument `base` to be an SGLDConfig or None but got "
            f"{type(base).__name__}."
        )
    check_int("num_draws", num_draws, minimum=2)
    check_int("num_burnin_steps", num_burnin_steps, minimum=0)
    check_int("num_chains", num_chains, minimum=2)
    check_int("seed", seed, minimum=0)
    check_int("num_power_iterations", num_power_iterations, minimum=0)
    if not isinstance(common_random_numbers, bool):
        raise ValueError(
            "Expected argument `common_random_numbers` to be a bool but got "
            f"{common_random_numbers!r}."
        )
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(
            "Expected argument `on_failure` to be 'warn', 'raise' or 'ignore' but got "
            f"{on_failure!r}."
        )


def _check_length_arguments(max_steps: Any, max_halvings: Any, max_trend: Any, min_ess: Any,
                            min_steps: int) -> None:
    if max_steps is not None:
        check_int("max_steps", max_steps, minimum=8)
        if max_steps < min_steps:
            raise ValueError(
                f"Expected argument `max_steps` to be None or at least 2 × (num_burnin_steps "
                f"+ num_draws) = {min_steps} (the first pilot length) but got {max_steps}."
            )
    check_int("max_halvings", max_halvings, minimum=0)
    check_number("max_trend", max_trend)
    check_number("min_ess", min_ess)


def _check_grid(name: str, values: Any, *, allow_zero: bool = False) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(
            f"Expected argument `{name}` to be a sequence of floats but got "
            f"{type(values).__name__}."
        )
    values = list(values)
    if not values:
        raise ValueError(f"Expected argument `{name}` to hold at least one value but got [].")
    bound = "non-negative" if allow_zero else "positive"
    for v in values:
        ok = (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
              and (v >= 0 if allow_zero else v > 0))
        if not ok:
            raise ValueError(
                f"Expected argument `{name}` to hold {bound} finite floats but got {v!r} in "
                f"{values!r}."
            )
    floats = [float(v) for v in values]
    if len(set(floats)) != len(floats):
        raise ValueError(f"Expected argument `{name}` to hold distinct values but got "
                         f"{values!r}.")
    return floats
