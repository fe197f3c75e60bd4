"""The one noise model of λ̂ used by every analysis: the online detector, the retrospective
stages and the relations.

An LLC estimate is the mean over ``num_chains`` SGLD chains; its record carries the standard
deviation *across chains* (``llc_std``). The noise of the mean is its standard error,

.. math:: \\mathrm{se}(\\hat\\lambda) = \\frac{\\mathrm{std}_\\text{chains}}{\\sqrt{C}},

with ``C`` the number of chains. Where ``C`` is unknown the chain std itself is used: an upper
bound (by a factor √C), which costs power but never buys false alarms. Everything here is plain
numpy.

Two further pieces every consumer shares:

- :func:`signed_log`, the scale the detector works on. λ̂ spans five orders of magnitude during
  training: at a saddle it reads large and negative (−10⁴ on a deep linear network), at a
  minimum a few units to tens. ``sign(λ̂)·log1p(|λ̂|/s)`` is linear for ``|λ̂| ≪ s`` and
  logarithmic beyond, so a relative noise of 10% becomes a constant noise of about 0.1 and a
  jump from −5,800 to −600 counts like one from 60 to 6.
- :func:`residual_noise`, the checkpoint-to-checkpoint scatter of a curve about its local trend,
  measured from the curve itself: chain stds can understate it (chains share batches; the
  bias of SGLD varies between checkpoints), so the analyses take the larger of the two.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = [
    "MAD_TO_STD",
    "interpolation_residuals",
    "residual_noise",
    "signed_log",
    "signed_log_inverse",
    "signed_log_stderr",
    "standard_error",
]

MAD_TO_STD = 1.4826
"""``MAD_TO_STD * median(|r|)`` estimates the std of Gaussian ``r``; the median keeps one kink
or one wild estimate from inflating it."""


def _known_chains(num_chains: Any) -> int | None:
    if num_chains is None:
        return None
    if isinstance(num_chains, bool) or not isinstance(num_chains, numbers.Integral):
        raise ValueError(
            f"Expected argument `num_chains` to be None or a positive int but got {num_chains!r}."
        )
    if num_chains < 1:
        raise ValueError(
            f"Expected argument `num_chains` to be None or a positive int but got {num_chains!r}."
        )
    return int(num_chains)


def standard_error(llc_std: Any, num_chains: int | None) -> Any:
    """The standard error of a chain-mean λ̂ from the std across its chains.

    Args:
        llc_std: the std across chains (a float or an array); nan, negative or 0 means
            unknown and gives nan (0 is what a single chain reports, not a noise-free value).
        num_chains: the chains behind the mean; ``None`` when unknown, then the chain std is
            returned unchanged (a conservative bound).

    Returns:
        ``llc_std / sqrt(num_chains)``, as a float for a scalar input, else an array.

    Raises:
        ValueError: ``num_chains`` is not None or a positive int.

    Example:
        >>> standard_error(0.8, 4), standard_error(0.8, None)
        (0.4, 0.8)
    """
    chains = _known_chains(num_chains)
    std = np.asarray(llc_std, dtype=float)
    se = np.where(np.isfinite(std) & (std > 0), std, np.nan)
    if chains is not None:
        se = se / math.sqrt(chains)
    return float(se) if se.ndim == 0 else se


def signed_log(x: Any, scale: float) -> Any:
    """``sign(x) * log1p(|x| / scale)``: linear below ``scale``, logarithmic above."""
    x = np.asarray(x, dtype=float)
    out = np.sign(x) * np.log1p(np.abs(x) / scale)
    return float(out) if out.ndim == 0 else out


def signed_log_inverse(z: Any, scale: float) -> Any:
    """The inverse of :func:`signed_log`."""
    z = np.asarray(z, dtype=float)
    out = np.sign(z) * scale * np.expm1(np.abs(z))
    return float(out) if out.ndim == 0 else out


def signed_log_stderr(x: Any, stderr: Any, scale: float) -> Any:
    """The standard error of ``signed_log(x)`` by the delta method: ``se / (scale + |x|)``."""
    out = np.asarray(stderr, dtype=float) / (scale + np.abs(np.asarray(x, dtype=float)))
    return float(out) if out.ndim == 0 else out


def interpolation_residuals(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each interior point minus the straight line through its two neighbours, scaled to unit
    variance under white noise. A linear trend cancels exactly, a kink or a jump affects one
    or two residuals, so a robust spread of these residuals measures the noise alone."""
    if x.size < 3:
        return np.empty(0)
    left = x[1:-1] - x[:-2]
    right = x[2:] - x[1:-1]
    w_left = right / (left + right)
    w_right = left / (left + right)
    residual = y[1:-1] - (w_left * y[:-2] + w_right * y[2:])
    return residual / np.sqrt(1.0 + w_left**2 + w_right**2)


def residual_noise(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Noise std of ``y`` about its local trend in ``x``, and its degrees of freedom.

    A trimmed root mean square of :func:`interpolation_residuals`: residuals beyond 3.5 robust
    (MAD) standard deviations, i.e. kinks, jumps and wild estimates, are left out, and the rest
    is averaged in squares, which wastes less of a short series than the median does.
    Neighbouring residuals share points (correlation −2/3 for even spacing), which halves the
    effective number of them: hence ``dof = 0.45 * count``.

    Returns:
        ``(std, dof)``; ``(nan, 0)`` with fewer than 5 points.
    """
    residual = interpolation_residuals(np.asarray(x, float), np.asarray(y, float))
    if residual.size < 3:
        return math.nan, 0.0
    robust = MAD_TO_STD * float(np.median(np.abs(residual)))
    kept = residual[np.abs(residual) <= 3.5 * robust]
    if kept.size == 0:
        return 0.0, 0.0
    return float(np.sqrt(np.mean(kept**2))), 0.45 * kept.size
