r"""The SGLD step, as a small transform over a flat, chain-stacked parameter tensor.

One step, for every chain at once (Welling & Teh 2011; localized as in Lau et al. 2023):

.. math::

    \Delta w = \underbrace{-\tfrac{\epsilon}{2}\bigl(n\beta\,\nabla L_m(w)
               + \gamma (w - w^*)\bigr)}_{\text{drift}} + \sigma\sqrt{\epsilon}\,\xi

read as a chain of gradient transforms (in the spirit of optax's ``noisy_sgd``): scale the
minibatch gradient by nβ, add the localization pull γ(w − w*), scale by −ε/2,
add Gaussian noise. The chains of a restricted estimate carry only the component's own
coordinates (:mod:`~slt_callbacks.core.space`), so nothing needs masking. All of it is six
in-place passes over preallocated ``(chains, parameters)`` buffers, none allocating: the
drift is built in the gradient's buffer, and each chain draws its noise into its own row of
a scratch buffer. Chains are updated a block at a time, the block sized so that its rows
stay in cache across the passes (:func:`block_rows`). On a CPU the Gaussian
draws themselves (PyTorch's Mersenne twister, about 2.7 ns a number) cost about three times
the six passes together; they are the one part of a step that no amount of fusing removes.

The step also returns :math:`\lVert\nabla U(w)\rVert^2` per chain, with
:math:`U = n\beta L + \tfrac{\gamma}{2}\lVert w - w^*\rVert^2`, from which
:func:`mala_log_acceptance` computes a MALA-style acceptance diagnostic at no extra cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

CACHE_BYTES = 2**20
"""Working set of one block of chains in :meth:`SGLDStep.apply_`: about a core's L2 cache."""


def block_rows(num_chains: int, size: int, itemsize: int) -> int:
    """How many chains :meth:`SGLDStep.apply_` updates at a time: as many as keep the
    block's coordinates, gradients and noise (three rows each) within :data:`CACHE_BYTES`,
    so that its six passes read from cache rather than memory. A large model is updated one
    chain at a time; many chains of a small component all at once (fewer, larger ops)."""
    return max(1, min(num_chains, CACHE_BYTES // max(1, 3 * size * itemsize)))


@dataclass(frozen=True)
class SGLDStep:
    """The scalars of one SGLD transform.

    Attributes:
        step_size: ε.
        n_beta: nβ.
        localization: γ.
        noise_level: σ.
        max_grad_norm: clip each chain's minibatch gradient to this L2 norm (None: off).
    """

    step_size: float
    n_beta: float
    localization: float
    noise_level: float = 1.0
    max_grad_norm: float | None = None

    def apply_(
        self,
        theta: torch.Tensor,
        theta0: torch.Tensor,
        grad: torch.Tensor,
        generators: Sequence[torch.Generator],
        noise: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Advance ``theta`` in place by one SGLD step.

        Args:
            theta: ``(chains, params)``, the current draws (a component's own coordinates);
                updated in place.
            theta0: ``(params,)``, w* restricted to those coordinates.
            grad: same shape as ``theta``, minibatch gradients of the mean loss; consumed
                (overwritten).
            generators: one per chain: chain ``i``'s noise comes from ``generators[i]`` and
                from nothing else, so a chain's numbers do not depend on which other chains
                are updated with it.
            noise: ``(rows, params)`` scratch for standard normal draws; chains are updated
                ``rows`` at a time (see :func:`block_rows`). Any ``rows`` gives the same
                numbers.

        Returns:
            ``(drift_sq, clipped)``: ``‖∇U‖²`` per chain, shape ``(chains,)``, and a bool
            tensor of the same shape saying whether the gradient was clipped (None when
            clipping is off, the common case: no tensor to build per step).
        """
        drift_sq = torch.empty(theta.shape[:-1], dtype=theta.dtype, device=theta.device)
        clipped = None
        if self.max_grad_norm is not None:
            clipped = torch.empty(theta.shape[:-1], dtype=torch.bool, device=theta.device)
        rows = noise.shape[0]
        for a in range(0, theta.shape[0], rows):
            b = min(a + rows, theta.shape[0])
            self._update(theta[a:b], theta0, grad[a:b], generators[a:b], noise[: b - a],
                         drift_sq[a:b], None if clipped is None else clipped[a:b])
        return drift_sq, clipped

    def _update(self, theta, theta0, grad, generators, noise, drift_sq, clipped) -> None:
        """:meth:`apply_` on one block of chains, writing ``drift_sq`` and ``clipped``."""
        eps = self.step_size
        if clipped is not None:
            norms = torch.linalg.vector_norm(grad, dim=-1, keepdim=True)
            scale = (self.max_grad_norm / norms.clamp_min(1e-30)).clamp_max_(1.0)
            grad.mul_(scale)
            torch.lt(scale.squeeze(-1), 1.0, out=clipped)
        # delta = -(ε/2)·(nβ·g + γ·(θ − θ*)), built in the gradient's buffer: every line
        # below is one pass over the block and none allocates.
        delta = grad.mul_(-0.5 * eps * self.n_beta)
        if self.localization:
            pull = 0.5 * eps * self.localization
            delta.add_(theta, alpha=-pull).add_(theta0, alpha=pull)
        torch.linalg.vector_norm(delta, dim=-1, out=drift_sq)
        drift_sq.square_().mul_((2.0 / eps) ** 2)
        theta.add_(delta)
        for row, generator in zip(noise, generators, strict=True):
            row.normal_(generator=generator)
        theta.add_(noise, alpha=self.noise_level * math.sqrt(eps))


def mala_log_acceptance(
    drift_sq: torch.Tensor, *, step_size: float, noise_level: float = 1.0
) -> torch.Tensor:
    r"""Log MALA acceptance of each SGLD transition, from consecutive ``‖∇U‖²``.

    For a Langevin proposal :math:`w' \sim N(w - \tfrac{\epsilon}{2}\nabla U(w),
    \sigma^2\epsilon I)` the Metropolis–Hastings log acceptance ratio, with the energy
    difference :math:`U(w') - U(w)` taken by the trapezoidal rule
    :math:`\tfrac12(\nabla U(w) + \nabla U(w'))\cdot(w' - w)` (exact for a quadratic U),
    reduces to

    .. math:: \log\alpha = \frac{\epsilon}{8\sigma^2}\bigl(\lVert\nabla U(w)\rVert^2
              - \lVert\nabla U(w')\rVert^2\bigr).

    It needs no extra forward pass and no loss from a second batch (minibatch loss noise
    times nβ would swamp a loss difference). With minibatch gradients it measures how far
    the discretisation and gradient noise are from an exact Langevin step; values near 0.9
    are considered healthy in the literature.

    Args:
        drift_sq: ``(..., steps)`` of ``‖∇U‖²`` along each chain.

    Returns:
        ``(..., steps - 1)`` log acceptance of each transition (≤ 0 clipped at 0 by the
        caller when turning it into a probability).
    """
    coeff = step_size / (8.0 * noise_level**2)
    return coeff * (drift_sq[..., :-1] - drift_sq[..., 1:])
