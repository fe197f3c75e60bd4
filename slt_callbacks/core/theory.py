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

from fractions import Fraction
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


def deep_linear_lambda(widths: list[int] | tuple[int, ...], r: int) -> float:
    r"""Learning coefficient of a deep linear network ``x -> W_L ... W_1 x`` (no biases) with
    layer widths ``widths = (H_1, ..., H_{L+1})`` (input first, output last) at a true map of
    rank ``r`` (Aoyagi 2024).

    With :math:`M_i = H_i - r`, Aoyagi's theorem takes the subset :math:`\Sigma` of the
    indices, of size :math:`\ell + 1`, that satisfies

    .. math::

        \max_{\sigma\in\Sigma} M_\sigma < \min_{k
otin\Sigma} M_k,\qquad
        \ell \max_{\sigma\in\Sigma} M_\sigma \le S < \ell \min_{k
otin\Sigma} M_k,
        \qquad S = \sum_{\sigma\in\Sigma} M_\sigma

    (the conditions on the complement are void when it is empty), and with
    :math:`a = S - \ell(\lceil S/\ell
ceil - 1) \in \{1, \dots, \ell\}`

    .. math::

        \lambda = rac{r(H_1 + H_{L+1}) - r^2}{2} + rac{a(\ell - a)}{4\ell}
                  - rac{\ell(\ell-1)}{4}\Bigl(rac{S}{\ell}\Bigr)^2
                  + rac12 \sum_{\sigma<	au \in \Sigma} M_\sigma M_	au .

    Such a subset is always a set of the smallest :math:`M_i`: sort them; the two smallest
    satisfy the left inequality, and whenever a prefix of the sorted list fails the right one
    (or the strict separation), the prefix one longer satisfies the left one; so the first
    prefix of at least two entries that satisfies both is the subset, and the whole list
    satisfies the left one if no shorter prefix did.

    For two layers this is the reduced-rank regression coefficient of Aoyagi & Watanabe
    (2005), :func:`reduced_rank_regression_lambda` (``widths = (m, h, n)``); for one layer it
    is the regular value ``mn/2``.

    References:
        M. Aoyagi, "Consideration on the learning efficiency of multiple-layered neural
        networks with linear units", Neural Networks 172, 2024.
        M. Aoyagi, S. Watanabe, "Stochastic complexities of reduced rank regression in
        Bayesian estimation", Neural Networks 18, 2005.

    Example:
        >>> deep_linear_lambda((3, 2, 4), 1)       # = reduced_rank_regression_lambda(3, 2, 4, 1)
        4.0
        >>> deep_linear_lambda((1, 1, 1, 1), 0)    # K = (w1 w2 w3)^2: a normal crossing
        0.5
    """
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (list, tuple)):
        raise ValueError(
            f"Expected argument `widths` to be a list or tuple of ints but got "
            f"{type(widths).__name__}."
        )
    if len(widths) < 2:
        raise ValueError(
            f"Expected argument `widths` to hold at least two widths (input and output) but "
            f"got {list(widths)}."
        )
    widths = [check_int(f"widths[{i}]", w) for i, w in enumerate(widths)]
    r = check_int("r", r, minimum=0)
    if r > min(widths):
        raise ValueError(f"Expected `r` <= min(widths) = {min(widths)} but got {r}.")
    m = sorted(w - r for w in widths)
    for size in range(2, len(m) + 1):
        ell, subset, rest = size - 1, m[:size], m[size:]
        total = sum(subset)
        if total < ell * subset[-1]:
            continue
        if rest and not (subset[-1] < rest[0] and total < ell * rest[0]):
            continue
        break
    else:  # pragma: no cover - excluded by the argument in the docstring
        raise AssertionError(f"no subset satisfies Aoyagi's conditions for {widths}, r={r}")
    a = total - ell * (-(-total // ell) - 1)
    pairs = sum(subset[i] * subset[j] for i in range(size) for j in range(i + 1, size))
    # Exact rational arithmetic: the value is a multiple of 1/(4ℓ), and floats would print
    # 5.499999999999998 for 11/2.
    lam = (
        Fraction(r * (widths[0] + widths[-1]) - r * r, 2)
        + Fraction(a * (ell - a), 4 * ell)
        - Fraction(ell - 1, 4 * ell) * total * total
        + Fraction(pairs, 2)
    )
    return float(lam)


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


class DeepLinear(nn.Module):
    """``x -> W_L ... W_1 x`` without biases (a deep linear network), float64; ``widths`` =
    ``(input, hidden..., output)``; the layers are ``self.layers[0]`` ... ``[L-1]``."""

    def __init__(self, widths: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(
                f"Expected argument `widths` to hold at least two widths but got {widths}."
            )
        self.widths = tuple(check_int(f"widths[{i}]", w) for i, w in enumerate(widths))
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=False, dtype=torch.float64)
            for a, b in zip(self.widths[:-1], self.widths[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def minimal_rank_deep_linear_teacher(
    widths: list[int] | tuple[int, ...], r: int, *, seed: int = 0
) -> DeepLinear:
    """A deep linear network in the most singular set of true parameters of rank ``r``: every
    layer has rank exactly ``r`` (the first ``r`` units of each hidden layer carry the map,
    all other weights are zero). Its local learning coefficient is
    :func:`deep_linear_lambda` ``(widths, r)``."""
    model = DeepLinear(widths)
    r = check_int("r", r, minimum=0)
    if r > min(model.widths):
        raise ValueError(f"Expected `r` <= min(widths) = {min(model.widths)} but got {r}.")
    g = torch.Generator().manual_seed(seed)
    last = len(model.layers) - 1
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.weight.zero_()
            if not r:
                continue
            rows = slice(None) if i == last else slice(0, r)
            cols = slice(None) if i == 0 else slice(0, r)
            block = layer.weight[rows, cols]
            block.copy_(torch.randn(block.shape, generator=g, dtype=torch.float64))
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
    "DeepLinear",
    "NormalCrossing",
    "TwoLayerLinear",
    "deep_linear_lambda",
    "finite_temperature_llc_2d",
    "gaussian_nll",
    "minimal_rank_deep_linear_teacher",
    "minimal_rank_teacher",
    "normal_crossing_lambda",
    "reduced_rank_regression_lambda",
    "regression_batches",
]
