"""Small models with known learning coefficients, shared by the core tests."""

from __future__ import annotations

import math

import torch
from torch import nn

from slt_callbacks.core.theory import (  # noqa: F401  (re-exported for the tests)
    NormalCrossing,
    TwoLayerLinear,
    gaussian_nll,
    minimal_rank_teacher,
    regression_batches,
)

mse_half = gaussian_nll


def regression_data(teacher, m: int, *, n: int = 10_000, batch: int = 500, seed: int = 0):
    """Noise-free samples of ``y = teacher(x)``, ``x ~ N(0, I_m)``, as a list of batches."""
    return regression_batches(teacher, m, num_samples=n, batch_size=batch, seed=seed)


def wbic_n_beta(n: int) -> float:
    return n / math.log(n)


def normal_crossing_loss(model: nn.Module, batch) -> torch.Tensor:
    return model()
