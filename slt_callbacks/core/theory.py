"""Closed-form learning coefficients, to check an estimator against (SLT_PRIMER §5).

These are *global* coefficients. The local coefficient at w* equals them only when w* lies
in the most singular set of true parameters (for linear networks: every layer has rank
exactly r); build test teachers accordingly.
"""

from __future__ import annotations

import torch


def reduced_rank_regression_lambda(m: int, h: int, n: int, r: int) -> float:
    """Learning coefficient of a two-layer linear network ``x -> B A x`` (input ``m``, hidden
    ``h``, output ``n``) at a true map of rank ``r`` (Aoyagi & Watanabe 2005).

    Example:
        >>> reduced_rank_regression_lambda(2, 2, 2, 0)
        1.5
        >>> reduced_rank_regression_lambda(3, 2, 4, 1)
        4.0
    """
    for name, value in (("m", m), ("h", h), ("n", n), ("r", r)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(
                f"Expected argument `{name}` to be a non-negative int but got {value!r}."
            )
    if r > min(m, h, n):
        raise ValueError(f"Expected `r` <= min(m, h, n) = {min(m, h, n)} but got {r}.")
    if m + h < n + r:
        return (h * m - h * r + n * r) / 2
    if n + h < m + r:
        return (h * n - h * r + m * r) / 2
    if m + n < h + r:
        return m * n / 2
    lam = (2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2) / 8
    return lam + (1 / 8 if (m + h + n + r) % 2 else 0.0)


def normal_crossing_lambda(powers: list[int]) -> float:
    """λ of ``K(w) = Π w_i^(2 k_i)``: the minimum over ``k_i > 0`` of ``1 / (2 k_i)``."""
    positive = [k for k in powers if k > 0]
    if not positive:
        raise ValueError(f"Expected at least one positive power in `powers` but got {powers}.")
    return min(1 / (2 * k) for k in positive)


def finite_temperature_llc_2d(
    potential, *, n_beta: float, localization: float, half_width: float = 6.0,
    num_points: int = 2001,
) -> float:
    r"""The exact value the LLC estimator targets at finite nβ, for a 2-parameter model with
    ``L(w*) = 0`` at ``w* = 0``: :math:`n\beta\,\mathbb{E}[L(w)]` under
    :math:`p(w) \propto \exp(-n\beta L(w) - \tfrac{\gamma}{2}\lVert w\rVert^2)`, by quadrature
    on a ``num_points``² grid over ``[-half_width, half_width]²`` (float64).

    Args:
        potential: vectorised ``L(w1, w2)`` on tensors.
    """
    grid = torch.linspace(-half_width, half_width, num_points, dtype=torch.float64)
    w1, w2 = torch.meshgrid(grid, grid, indexing="ij")
    loss = potential(w1, w2)
    log_weight = -n_beta * loss - 0.5 * localization * (w1**2 + w2**2)
    weight = torch.exp(log_weight - log_weight.max())
    return float(n_beta * (weight * loss).sum() / weight.sum())


__all__ = [
    "finite_temperature_llc_2d",
    "normal_crossing_lambda",
    "reduced_rank_regression_lambda",
]
