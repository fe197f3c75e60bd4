"""Chain health: is an LLC estimate a number to trust, and if not, why and what to change.

Each check is a pure function of per-chain summaries that returns a reason (a user-facing
sentence) or None. :func:`assess` runs them all and returns the most severe
:class:`Status` plus every reason. Numerical failure is a *result* (as in optimistix's
``Solution.result``): a diverged chain must not kill a three-day training run, and must never
be averaged in silently. Callers raise only when asked (``on_failure="raise"``).

What the checks look for (SLT_PRIMER §1):

- divergence (non-finite loss): ε too large; the chain is excluded from λ̂;
- λ̂ < 0 with most draws below L_n(w*): w* is not a local minimum (the normal case during
  training: the chains find lower loss nearby), or ε too large relative to γ;
- a loss trace still drifting after burn-in: too few steps, or ε too small to mix;
- low MALA-style acceptance: the discretisation is too coarse, ε too large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from .._checks import check_number


class Status(str, Enum):
    """Health of an estimate, most severe first. The value is the short code that is logged."""

    ALL_DIVERGED = "all_diverged"
    DIVERGED = "diverged"
    NOT_A_MINIMUM = "not_a_minimum"
    LOW_ACCEPTANCE = "low_acceptance"
    NOT_CONVERGED = "not_converged"
    HEALTHY = "healthy"

    @property
    def severity(self) -> int:
        """0 for the most severe; larger is healthier."""
        return list(Status).index(self)

    @property
    def code(self) -> int:
        """A number for scalar loggers: 0 healthy, larger is worse."""
        return len(Status) - 1 - self.severity


@dataclass(frozen=True, kw_only=True)
class HealthCriteria:
    """Thresholds of the health checks.

    Args:
        min_acceptance: below this mean MALA acceptance the estimate is flagged
            (literature: ≈0.9 is healthy; 0.5 leaves room for minibatch noise).
        max_relative_drift: the draws' second-half λ̂ may differ from the first-half λ̂ by at
            most this fraction of |λ̂| ...
        drift_z: ... unless the difference is within this many standard errors across chains.
        min_drift: absolute floor on the tolerated drift (λ̂ units), for λ̂ near 0.
    """

    min_acceptance: float = 0.5
    max_relative_drift: float = 0.2
    drift_z: float = 3.0
    min_drift: float = 0.05

    def __post_init__(self) -> None:
        for name in ("min_acceptance", "max_relative_drift", "drift_z", "min_drift"):
            object.__setattr__(self, name, check_number(name, getattr(self, name)))


@dataclass(frozen=True)
class ChainSummary:
    """Per-chain figures the checks read; every tensor has shape ``(chains,)``."""

    llc: torch.Tensor
    diverged_at: torch.Tensor  # long, -1 if the chain stayed finite
    acceptance: torch.Tensor
    frac_below_init: torch.Tensor
    llc_first_half: torch.Tensor
    llc_second_half: torch.Tensor

    @property
    def ok(self) -> torch.Tensor:
        """Chains that stayed finite: the ones that enter λ̂."""
        return self.diverged_at < 0


def check_divergence(s: ChainSummary, step_size: float) -> tuple[Status, str] | None:
    bad = (~s.ok).nonzero().flatten().tolist()
    if not bad:
        return None
    where = ", ".join(f"chain {c} at step {int(s.diverged_at[c])}" for c in bad)
    advice = f"Reduce step_size (now {step_size:g}) or raise localization."
    if len(bad) == len(s.llc):
        return Status.ALL_DIVERGED, f"All chains diverged ({where}); no estimate. {advice}"
    kept = len(s.llc) - len(bad)
    return Status.DIVERGED, (
        f"{len(bad)} chain(s) diverged ({where}) and were excluded from λ̂ "
        f"({kept} of {len(s.llc)} kept). {advice}"
    )


def check_minimum(s: ChainSummary, llc_mean: float) -> tuple[Status, str] | None:
    if not llc_mean < 0:
        return None
    below = float(s.frac_below_init[s.ok].mean())
    return Status.NOT_A_MINIMUM, (
        f"λ̂ = {llc_mean:.3g} < 0 and {below:.0%} of draws fell below the loss at w*: w* is "
        "not a local minimum at this step (normal while the model is still training), or "
        "step_size is too large for this localization. This number is not a complexity; a "
        "larger localization restrains the chains (and biases λ̂ low)."
    )


def check_acceptance(
    s: ChainSummary, min_acceptance: float, step_size: float
) -> tuple[Status, str] | None:
    acc = s.acceptance[s.ok]
    acc = acc[torch.isfinite(acc)]
    if acc.numel() == 0 or float(acc.mean()) >= min_acceptance:
        return None
    return Status.LOW_ACCEPTANCE, (
        f"MALA acceptance {float(acc.mean()):.2f} < {min_acceptance:.2f}: the SGLD step is too "
        f"coarse for this posterior and λ̂ is biased (usually upward). Reduce step_size "
        f"(now {step_size:g})."
    )


def check_drift(
    s: ChainSummary, llc_mean: float, criteria: HealthCriteria
) -> tuple[Status, str] | None:
    diff = (s.llc_second_half - s.llc_first_half)[s.ok]
    if diff.numel() == 0:
        return None
    mean = float(diff.mean())
    tolerance = max(criteria.max_relative_drift * abs(llc_mean), criteria.min_drift)
    if abs(mean) <= tolerance:
        return None
    if diff.numel() >= 2:
        stderr = float(diff.std()) / math.sqrt(diff.numel())
        if abs(mean) <= criteria.drift_z * stderr:
            return None
    direction = "rising" if mean > 0 else "falling"
    return Status.NOT_CONVERGED, (
        f"The loss trace is still {direction} after burn-in: λ̂ from the second half of the "
        f"draws differs from the first half by {mean:+.3g} (|λ̂| = {abs(llc_mean):.3g}). "
        "Use more num_burnin_steps, or a larger step_size if the chains mix slowly."
    )


def assess(
    s: ChainSummary, llc_mean: float, *, step_size: float, criteria: HealthCriteria
) -> tuple[Status, tuple[str, ...]]:
    """Run every check; return the most severe status and all reasons, most severe first."""
    found = [
        check_divergence(s, step_size),
        None if math.isnan(llc_mean) else check_minimum(s, llc_mean),
        check_acceptance(s, criteria.min_acceptance, step_size),
        None if math.isnan(llc_mean) else check_drift(s, llc_mean, criteria),
    ]
    problems = sorted((f for f in found if f is not None), key=lambda f: f[0].severity)
    if not problems:
        return Status.HEALTHY, ()
    return problems[0][0], tuple(reason for _, reason in problems)
