"""Closed-form learning coefficients and the reference problems they belong to.

Use them to check an estimator (or a choice of hyperparameters) on a case whose answer is
known before trusting it on a network whose answer is not::

    teacher = minimal_rank_teacher(3, 2, 4, 1)          # true λ = 4
    data = regression_batches(teacher, 3)
    estimate_llc(teacher, gaussian_nll, data, config=...)

These are *global* coefficients. The local coefficient at w* equals them only when w* lies
in the most singular set of true parameters (for linear networks: every layer has rank
exactly r); :func:`minimal_rank_teacher` builds such a point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_int


def reduced_rank_regression_lambda(m: int, h: int, n: int, r: int) -> float:
    """Learning coefficient of a two-layer linear network ``x -> B A x`` (input ``m``, hidden
    ``h``, output ``n``) at a true map of rank ``r`` (Aoyagi & Watanabe 2005).

    Example:
        >>> reduced_rank_regression_lambda(2, 2, 2, 0)
        1.5
        >>> reduced_rank_regression_lambda(3, 2, 4, 1)
        4.0
    """
    m, h, n, r = (
        check_int(name, v, minimum=0) for name, v in zip("mhnr", (m, h, n, r), strict=True)
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
    potential,
    *,
    n_beta: float,
    localization: float,
    half_width: float = 6.0,
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


def gaussian_nll(model: nn.Module, batch: Any) -> torch.Tensor:
    """½‖y − f(x)‖² averaged over the batch: the negative log-likelihood of unit-variance
    Gaussian regression up to a constant, the loss the coefficients above refer to."""
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def regression_batches(
    teacher: nn.Module,
    input_dim: int,
    *,
    num_samples: int = 10_000,
    batch_size: int = 500,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Noise-free samples ``(x, teacher(x))`` with ``x ~ N(0, I)`` in float64, as batches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, input_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x)
    return [
        (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, num_samples, batch_size)
    ]


class TwoLayerLinear(nn.Module):
    """``x -> B A x`` without biases (reduced-rank regression), float64."""

    def __init__(self, m: int, h: int, n: int) -> None:
        super().__init__()
        self.a = nn.Linear(m, h, bias=False, dtype=torch.float64)
        self.b = nn.Linear(h, n, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def minimal_rank_teacher(m: int, h: int, n: int, r: int, *, seed: int = 0) -> TwoLayerLinear:
    """A true parameter in the most singular set: both layers of rank exactly ``r`` (the
    first ``r`` hidden units carry the map, the others are zero in both layers). Its local
    learning coefficient is :func:`reduced_rank_regression_lambda` ``(m, h, n, r)``."""
    g = torch.Generator().manual_seed(seed)
    model = TwoLayerLinear(m, h, n)
    with torch.no_grad():
        model.a.weight.zero_()
        model.b.weight.zero_()
        if r:
            model.a.weight[:r] = torch.randn(r, m, generator=g, dtype=torch.float64)
            model.b.weight[:, :r] = torch.randn(n, r, generator=g, dtype=torch.float64)
    return model


class NormalCrossing(nn.Module):
    """``K(w) = Π w_i^(2 k_i)`` at ``w* = 0`` (float64), with λ =
    :func:`normal_crossing_lambda` ``(powers)``; its loss ignores the data:
    ``loss_fn = lambda model, batch: model()``."""

    def __init__(self, powers: tuple[int, ...] = (1, 2)) -> None:
        super().__init__()
        self.powers = tuple(powers)
        self.w = nn.Parameter(torch.zeros(len(self.powers), dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        out = torch.ones((), dtype=self.w.dtype)
        for i, k in enumerate(self.powers):
            out = out * self.w[i] ** (2 * k)
        return out


__all__ = [
    "NormalCrossing",
    "TwoLayerLinear",
    "finite_temperature_llc_2d",
    "gaussian_nll",
    "minimal_rank_teacher",
    "normal_crossing_lambda",
    "reduced_rank_regression_lambda",
    "regression_batches",
]
