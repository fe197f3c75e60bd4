r"""Saddle-to-saddle learning: a deep linear network whose development is known in advance.

A linear network ``x -> W_L ... W_1 x`` trained by gradient descent from a tiny initialisation
on noise-free data ``y = T x`` (``x ~ N(0, I)``) learns the singular modes of the teacher
``T`` one at a time, largest first (Saxe, McClelland & Ganguli 2014, "Exact solutions to the
nonlinear dynamics of learning in deep linear neural networks"; Jacot et al. 2021,
"Saddle-to-saddle dynamics in deep linear networks: small initialization training, symmetry,
and sparsity"). With the loss ½‖y − f(x)‖² the population loss after ``k`` modes is
learned is ``½ Σ_{i>k} s_i²``: the loss falls in steps, and between the drops the weights sit
near a saddle of the loss, where an LLC estimate reads large and negative (the chains find
the next mode downhill). After the last drop the network is at a true minimum whose layers
all have rank ``r`` (the unlearned directions stay at the scale of the initialisation), the
most singular set of true parameters: its local learning coefficient is the
reduced-rank-regression value of Aoyagi & Watanabe (2005) for depth 2
(:func:`~slt_callbacks.core.theory.reduced_rank_regression_lambda`).

For a two-layer network with balanced small weights each mode's strength ``u`` follows
``du/dt = 2u(s − u)`` (in units of ``1/lr`` steps), so mode ``i`` is half-learned after about
``ln(s_i / u_0) / (2 s_i lr)`` steps, ``u_0`` its strength at initialisation: the drops are
about ``log10(s_i / s_{i+1})`` decades apart (a little less). The default teacher, singular
values 10, 3 and 1, puts them at steps ≈ 40, 110 and 260 (0.4–0.45 decade apart).

Why not a wider spread: an LLC estimate sees a saddle only if the chains can escape it, i.e.
if the unlearned mode's negative curvature ``nβ·s_r`` beats the localization ``γ`` (with the
default ``γ = 100`` and the quickstart's ``nβ ≈ 148``: ``s_r ≳ 0.7``), while the step size
must stay below ``≈ 0.1 / (nβ · 2 s_1)`` (the top curvature at the minimum is ``2 s_1``). With
``ε = 1e-4`` that bounds ``s_1 / s_r`` to about 10.

Everything here is torch only and seeded by explicit generators, so tests, the quickstart
example and the stage-detector benchmark share one definition of the problem::

    problem = SaddleProblem()                        # 6-5-6, singular values 10, 3, 1
    model = problem.model()                          # float32 DeepLinearNet, tiny init
    x, y = problem.data()
    ...train with SGD(lr=problem.lr), record (step, loss)...
    drops = loss_drop_steps(steps, losses, problem.plateau_losses)
    problem.true_lambda                              # 16.0 at the final minimum
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_int, check_number
from ..core import theory
from ..core.theory import reduced_rank_regression_lambda

__all__ = ["DeepLinearNet", "SaddleProblem", "loss_drop_steps", "teacher_matrix"]


class DeepLinearNet(nn.Module):
    """``x -> W_L ... W_1 x``: a stack of bias-free ``nn.Linear`` layers (``layers.0`` ...).

    Args:
        widths: ``(input, hidden..., output)``; ``len(widths) - 1`` layers.
        init_scale: standard deviation of every initial weight (small: saddle-to-saddle).
        generator: the source of the initial weights.
        dtype: parameter dtype.
    """

    def __init__(
        self,
        widths: Sequence[int],
        *,
        init_scale: float,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        widths = _check_widths(widths)
        check_number("init_scale", init_scale, strict=True)
        self.layers = nn.Sequential(
            *(nn.Linear(a, b, bias=False, dtype=dtype) for a, b in itertools.pairwise(widths))
        )
        with torch.no_grad():
            for layer in self.layers:
                weight = torch.randn(layer.weight.shape, generator=generator, dtype=dtype)
                layer.weight.copy_(init_scale * weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def end_to_end(self) -> torch.Tensor:
        """The product ``W_L ... W_1`` (output × input)."""
        out = self.layers[0].weight
        for layer in self.layers[1:]:
            out = layer.weight @ out
        return out


def teacher_matrix(
    input_dim: int,
    output_dim: int,
    singular_values: Sequence[float],
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``T = U diag(s) Vᵀ`` (``output_dim × input_dim``) with random orthonormal ``U``, ``V``."""
    input_dim = check_int("input_dim", input_dim)
    output_dim = check_int("output_dim", output_dim)
    s = torch.as_tensor([float(v) for v in singular_values], dtype=torch.float64)
    if len(s) > min(input_dim, output_dim):
        raise ValueError(
            f"Expected at most min(input_dim, output_dim) = {min(input_dim, output_dim)} "
            f"singular values but got {len(s)}."
        )
    u, _ = torch.linalg.qr(torch.randn(output_dim, output_dim, generator=generator,
                                       dtype=torch.float64))  # fmt: skip
    v, _ = torch.linalg.qr(torch.randn(input_dim, input_dim, generator=generator,
                                       dtype=torch.float64))  # fmt: skip
    r = len(s)
    return ((u[:, :r] * s) @ v[:, :r].T).to(dtype)


@dataclass(frozen=True)
class SaddleProblem:
    """A saddle-to-saddle run: teacher, data, student and optimiser settings, all seeded.

    Attributes:
        widths: the student's widths ``(input, hidden..., output)``.
        singular_values: the teacher's nonzero singular values, largest first, well separated
            (a factor ≈ 3 between neighbours puts the drops ≈ 0.4 decade apart).
        init_scale: standard deviation of the student's initial weights.
        lr: SGD learning rate.
        num_samples: size of the (noise-free) training set.
        batch_size: SGD minibatch size.
        seed: root of every generator (teacher, data, student).
    """

    widths: tuple[int, ...] = (6, 5, 6)
    singular_values: tuple[float, ...] = (10.0, 3.0, 1.0)
    init_scale: float = 1e-3
    lr: float = 0.02
    num_samples: int = 1024
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        widths = _check_widths(self.widths)
        object.__setattr__(self, "widths", widths)
        s = tuple(float(v) for v in self.singular_values)
        if any(not math.isfinite(v) or v <= 0 for v in s) or list(s) != sorted(s, reverse=True):
            raise ValueError(
                "Expected `singular_values` to be positive, finite and in decreasing order but "
                f"got {self.singular_values!r}."
            )
        if len(s) > min(widths):
            raise ValueError(
                f"Expected at most min(widths) = {min(widths)} singular values (the teacher's "
                f"rank must be reachable by the student) but got {len(s)}."
            )
        object.__setattr__(self, "singular_values", s)
        check_number("init_scale", self.init_scale, strict=True)
        check_number("lr", self.lr, strict=True)
        check_int("num_samples", self.num_samples)
        check_int("batch_size", self.batch_size)
        check_int("seed", self.seed, minimum=0)

    @property
    def rank(self) -> int:
        """The teacher's rank ``r``: the number of loss drops."""
        return len(self.singular_values)

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def plateau_losses(self) -> tuple[float, ...]:
        """Population loss ``½ Σ_{i>k} s_i²`` on plateau ``k = 0 .. r`` (the last is 0)."""
        s = self.singular_values
        return tuple(0.5 * sum(v * v for v in s[k:]) for k in range(len(s) + 1))

    @property
    def true_lambda(self) -> float:
        """λ at the final minimum, where every layer has rank ``r``: the reduced-rank-regression
        value for depth 2 (Aoyagi & Watanabe 2005), Aoyagi's deep-linear value beyond
        (:func:`~slt_callbacks.core.theory.deep_linear_lambda`, where available)."""
        if self.depth == 2:
            m, h, n = self.widths
            return reduced_rank_regression_lambda(m, h, n, self.rank)
        deep = getattr(theory, "deep_linear_lambda", None)
        if deep is None:
            raise NotImplementedError(
                f"true_lambda needs slt_callbacks.core.theory.deep_linear_lambda for depth "
                f"{self.depth}; this version has only the depth-2 formula."
            )
        return float(deep(self.widths, self.rank))

    def predicted_drop_steps(self) -> tuple[float, ...]:
        """Where theory puts the drops (depth 2, balanced small weights): mode ``i`` half
        learned after ``ln(s_i / u_0) / (2 s_i lr)`` steps with ``u_0 = init_scale² ·
        sqrt(hidden)``, the typical initial strength of a mode. A guide (within ~20% of
        measured runs), not the truth: measure drops with :func:`loss_drop_steps`."""
        if self.depth != 2:
            raise NotImplementedError("predicted_drop_steps is derived for depth 2 only.")
        u0 = self.init_scale**2 * math.sqrt(self.widths[1])
        return tuple(math.log(s / u0) / (2 * s * self.lr) for s in self.singular_values)

    def teacher(self) -> torch.Tensor:
        return teacher_matrix(
            self.widths[0], self.widths[-1], self.singular_values,
            generator=torch.Generator().manual_seed(self.seed),
        )  # fmt: skip

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` with ``x ~ N(0, I)`` and ``y = T x`` exactly (no noise), float32."""
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.num_samples, self.widths[0], generator=g)
        return x, x @ self.teacher().T

    def model(self) -> DeepLinearNet:
        """The student at its (tiny, seeded) initialisation."""
        g = torch.Generator().manual_seed(self.seed + 2)
        return DeepLinearNet(self.widths, init_scale=self.init_scale, generator=g)


def loss_drop_steps(
    steps: Sequence[int], losses: Sequence[float], plateaus: Sequence[float]
) -> list[int | None]:
    """The step of each loss drop: the first step at which the loss falls below the midpoint
    ``(plateaus[k] + plateaus[k + 1]) / 2`` of two neighbouring plateaus (for a sigmoidal drop,
    the step where the mode is half learned). ``None`` for a drop that never happened.

    Args:
        steps: increasing training steps.
        losses: the training loss at those steps.
        plateaus: the plateau values, decreasing (e.g. :attr:`SaddleProblem.plateau_losses`).
    """
    if len(steps) != len(losses):
        raise ValueError(
            f"Expected `steps` and `losses` of equal length but got {len(steps)} and "
            f"{len(losses)}."
        )
    if len(plateaus) < 2 or any(a <= b for a, b in itertools.pairwise(plateaus)):
        raise ValueError(
            f"Expected at least two strictly decreasing `plateaus` but got {list(plateaus)!r}."
        )
    out: list[int | None] = []
    start = 0
    for high, low in itertools.pairwise(plateaus):
        mid = 0.5 * (high + low)
        found = next((i for i in range(start, len(losses)) if losses[i] < mid), None)
        out.append(None if found is None else int(steps[found]))
        start = found if found is not None else len(losses)
    return out


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence) or len(widths) < 2:
        raise ValueError(
            f"Expected `widths` to be a sequence of at least two positive ints but got "
            f"{widths!r}."
        )
    return tuple(check_int(f"widths[{i}]", w) for i, w in enumerate(widths))
