r"""Whether SGLD chains have mixed, and whether halving ε moves λ̂: pure functions on traces.

:func:`~slt_callbacks.core.calibrate.calibrate` chooses the chain length from the chains
themselves with these tests, and compares a step size with its half at equal, mixed
conditions. Everything here reads a ``(chains, steps)`` trace of

.. math:: d_{c,t} = n\beta\,\bigl(L_{m_t}(w_{c,t}) - L_{m_t}(w^*)\bigr),

the per-draw summand of λ̂ (the loss at w* of the same batch subtracted, as
:func:`~slt_callbacks.core.llc.estimate_llc` does), drawn with no burn-in.

**Stationarity** (:func:`assess_mixing`). The second half of the trace, ``[T/2, T)``, is
the estimate (burn-in = the first half, the usual convention of Gelman and Rubin); the
quarter before it, ``[T/4, T/2)``, is compared with it. A chain still relaxing (λ̂ rising
as the chains fill the flat directions of a singular minimum, or drifting as they wander
into stiffer regions) shows as a difference of the two window means. The test is an
equivalence test: the trend *plus* ``num_std_errors`` of its standard error across chains
must lie within ``max_trend`` of |λ̂|, so that a noisy short trace cannot pass (half a
standard error by default: a full one lengthened the chains of a regular model, which mix
in tens of steps, to 8000 steps on noise alone). It also
asks for an effective sample size, from the integrated autocorrelation time (Sokal's
automatic window), of at least ``min_ess`` draws over all chains.

**Halving** (:func:`compare_halving`). With the chain length fixed, λ̂ at ε and at ε/2
(same seed, same number of steps, both stationary) must differ, plus one paired standard
error of the difference, by less than the standard error the full estimate will have,
``std of per-chain λ̂ / √(num_chains)``: the stability target itself, measured on the
calibration's chains with a margin for their noise.

References:
    A. Sokal, "Monte Carlo Methods in Statistical Mechanics: Foundations and New
    Algorithms", 1997 (integrated autocorrelation time, automatic windowing).
    A. Gelman, D. Rubin, "Inference from Iterative Simulation Using Multiple Sequences",
    Statistical Science 7, 1992 (discard the first half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_number
from ..analysis.noise import standard_error

__all__ = ["Halving", "Mixing", "assess_mixing", "compare_halving",
           "integrated_autocorrelation_time"]


def integrated_autocorrelation_time(trace: torch.Tensor, *, window_factor: float = 5.0
                                    ) -> float:
    r"""Integrated autocorrelation time of ``(chains, steps)`` traces, in steps.

    :math:`\tau = 1 + 2\sum_{k=1}^{M}\rho(k)` with ρ the autocorrelation averaged over the
    chains (each chain centred on its own mean) and M the smallest lag with
    ``M >= window_factor · τ(M)`` (Sokal's automatic window). 1 for white noise.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(4, 4096, generator=g, dtype=torch.float64)
        >>> round(integrated_autocorrelation_time(x))
        1
    """
    x = trace.double()
    if x.dim() != 2 or x.shape[1] < 4:
        raise ValueError(f"Expected argument `trace` of shape (chains, steps >= 4) but got "
                         f"{tuple(trace.shape)}.")
    x = x - x.mean(dim=1, keepdim=True)
    steps = x.shape[1]
    spectrum = torch.fft.rfft(x, n=2 * steps)
    acov = torch.fft.irfft(spectrum * spectrum.conj(), n=2 * steps)[:, :steps].mean(0)
    if not float(acov[0]) > 0:
        return 1.0
    rho = acov / acov[0]
    taus = 2 * torch.cumsum(rho, 0) - 1  # τ(M) for M = 0, 1, ...
    lags = torch.arange(steps, dtype=torch.float64)
    ok = torch.nonzero(lags >= window_factor * taus).flatten()
    index = int(ok[0]) if ok.numel() else steps - 1
    return max(float(taus[index]), 1.0)


@dataclass(frozen=True)
class Mixing:
    """The stationarity verdict on one trace (see the module docstring).

    Attributes:
        num_steps: T, the length of the trace; the estimate uses ``[T/2, T)``.
        llc_per_chain: ``(chains,)`` λ̂ of each chain over ``[T/2, T)``.
        llc: their mean; ``llc_std`` their standard deviation.
        trend: mean over chains of λ̂``[T/2, T)`` − λ̂``[T/4, T/2)``.
        trend_se: its standard error across chains.
        tau: integrated autocorrelation time of ``[T/2, T)`` (steps).
        ess: effective sample size of ``[T/2, T)`` over all chains, ``chains · T/2 / τ``.
        stationary: whether the trend and the sample size pass.
        reason: a sentence saying why (not).
    """

    num_steps: int
    llc_per_chain: tuple[float, ...]
    llc: float
    llc_std: float
    trend: float
    trend_se: float
    tau: float
    ess: float
    stationary: bool
    reason: str


def assess_mixing(
    trace: torch.Tensor,
    *,
    max_trend: float = 0.1,
    num_std_errors: float = 0.5,
    min_ess: float = 100.0,
) -> Mixing:
    """Whether a ``(chains, steps)`` trace of nβ(L − L*) is stationary over its second half.

    Stationary when ``|trend| + num_std_errors · trend_se <= max_trend · |λ̂|`` and
    ``ess >= min_ess`` (see the module docstring). Non-finite traces are never stationary.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> flat = 3.0 + torch.randn(8, 2000, generator=g, dtype=torch.float64)
        >>> assess_mixing(flat).stationary
        True
        >>> rising = flat + torch.linspace(-2.0, 0.0, 2000, dtype=torch.float64)
        >>> assess_mixing(rising).stationary
        False
    """
    check_number("max_trend", max_trend)
    check_number("num_std_errors", num_std_errors)
    check_number("min_ess", min_ess)
    x = trace.double()
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 8:
        raise ValueError(f"Expected argument `trace` of shape (chains >= 2, steps >= 8) but "
                         f"got {tuple(trace.shape)}.")
    chains, steps = x.shape
    if not bool(torch.isfinite(x).all()):
        nan = float("nan")
        return Mixing(steps, (nan,) * chains, nan, nan, nan, nan, nan, 0.0, False,
                      "some chain diverged (non-finite loss)")
    late = x[:, steps // 2:].mean(1)
    early = x[:, steps // 4: steps // 2].mean(1)
    diff = late - early
    llc, trend = float(late.mean()), float(diff.mean())
    trend_se = float(diff.std()) / math.sqrt(chains)
    tau = integrated_autocorrelation_time(x[:, steps // 2:])
    ess = chains * (steps - steps // 2) / tau
    flat = abs(trend) + num_std_errors * trend_se <= max_trend * abs(llc)
    enough = ess >= min_ess
    if flat and enough:
        reason = (f"stationary over {steps} steps: trend {trend:+.3g} ± {trend_se:.2g} within "
                  f"{max_trend:.0%} of λ̂ = {llc:.4g}, ESS {ess:.0f}")
    elif not flat:
        reason = (f"not stationary over {steps} steps: λ̂ moved by {trend:+.3g} ± "
                  f"{trend_se:.2g} from [T/4, T/2) to [T/2, T) (λ̂ = {llc:.4g}; tolerated: "
                  f"{max_trend:.0%} including {num_std_errors:g} standard error)")
    else:
        reason = (f"too few effective draws over {steps} steps: ESS {ess:.0f} < {min_ess:g} "
                  f"(τ = {tau:.0f} steps)")
    return Mixing(steps, tuple(float(v) for v in late), llc, float(late.std()), trend,
                  trend_se, tau, ess, flat and enough, reason)


@dataclass(frozen=True)
class Halving:
    """λ̂ at ε against λ̂ at ε/2, at equal chain length.

    Attributes:
        shift: λ̂(ε) − λ̂(ε/2).
        shift_se: its standard error, paired across chains (same seed).
        target_se: the standard error of the full estimate at ε, ``std / √num_chains``.
        agree: ``|shift| + shift_se <= target_se``.
    """

    shift: float
    shift_se: float
    target_se: float
    agree: bool


def compare_halving(coarse: Mixing, fine: Mixing, *, num_chains: int, margin: bool = True
                    ) -> Halving:
    """Whether halving ε moves λ̂ by less than the full estimate's standard error.

    ``coarse`` and ``fine`` are :func:`assess_mixing` of the same chains (same seed, same
    length) at ε and ε/2; ``num_chains`` is the chain count of the full estimate.
    ``margin=False`` drops the paired standard error from the test (for runs of different
    lengths, whose chains are not paired).

    Example:
        >>> m = lambda v: Mixing(1000, (v - 0.1, v + 0.1), v, 0.1414, 0.0, 0.0, 1.0, 1e3,
        ...                      True, "")
        >>> compare_halving(m(3.0), m(3.05), num_chains=4).agree
        True
        >>> compare_halving(m(3.0), m(3.2), num_chains=4).agree
        False
    """
    if len(coarse.llc_per_chain) != len(fine.llc_per_chain):
        raise ValueError("Expected `coarse` and `fine` to hold the same number of chains but "
                         f"got {len(coarse.llc_per_chain)} and {len(fine.llc_per_chain)}.")
    shift = coarse.llc - fine.llc
    diffs = torch.tensor(coarse.llc_per_chain, dtype=torch.float64) - torch.tensor(
        fine.llc_per_chain, dtype=torch.float64)
    shift_se = float(diffs.std()) / math.sqrt(diffs.numel())
    target = standard_error(coarse.llc_std, num_chains)  # the full estimate's noise model
    # One paired standard error of margin: the full estimate's own check of the halving
    # has noise of about that size, so a shift just under the target would fail it half
    # the time.
    agree = math.isfinite(shift) and abs(shift) + (shift_se if margin else 0.0) <= target
    return Halving(shift, shift_se, target, agree)
