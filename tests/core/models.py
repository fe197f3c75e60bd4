"""Small models with known learning coefficients, shared by the core tests."""

from __future__ import annotations

import math

import torch
from torch import nn


def mse_half(model: nn.Module, batch) -> torch.Tensor:
    """Gaussian negative log-likelihood (unit variance) up to a constant: ½‖y − f(x)‖²."""
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def regression_data(teacher, m: int, *, n: int = 10_000, batch: int = 500, seed: int = 0):
    """Noise-free samples of ``y = teacher(x)``, ``x ~ N(0, I_m)``, as a list of batches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def wbic_n_beta(n: int) -> float:
    return n / math.log(n)


class TwoLayerLinear(nn.Module):
    """``x -> B A x`` without biases (reduced-rank regression)."""

    def __init__(self, m: int, h: int, n: int) -> None:
        super().__init__()
        self.a = nn.Linear(m, h, bias=False, dtype=torch.float64)
        self.b = nn.Linear(h, n, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def minimal_rank_teacher(m: int, h: int, n: int, r: int, *, seed: int = 0) -> TwoLayerLinear:
    """A true parameter in the most singular set: both layers of rank exactly ``r`` (the
    first ``r`` hidden units carry the map, the others are zero in both layers)."""
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
    """``K(w) = w1² w2⁴`` at w* = 0, λ = 1/4; the data are ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return self.w[0] ** 2 * self.w[1] ** 4


def normal_crossing_loss(model: nn.Module, batch) -> torch.Tensor:
    return model()
