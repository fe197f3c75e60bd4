r"""The SGLD step, as a small transform over a flat, chain-stacked parameter tensor.

One step, for every chain at once (Welling & Teh 2011; localized as in Lau et al. 2023):

.. math::

    \Delta w = \underbrace{-\tfrac{\epsilon}{2}\bigl(n\beta\,\nabla L_m(w)
               + \gamma (w - w^*)\bigr)}_{\text{drift}} + \sigma\sqrt{\epsilon}\,\xi

read as a chain of gradient transforms (in the spirit of optax's ``noisy_sgd``): scale the
minibatch gradient by nβ, add the localization pull γ(w − w*), scale by −ε/2,
add Gaussian noise. The chains of a restricted estimate carry only the component's own
coordinates (:mod:`~slt_callbacks.core.space`), so nothing needs masking. All of it is a
handful of in-place tensor ops on one ``(chains, parameters)`` buffer, so the update costs
little next to the forward and backward pass.

The step also returns :math:`\lVert\nabla U(w)\rVert^2` per chain, with
:math:`U = n\beta L + \tfrac{\gamma}{2}\lVert w - w^*\rVert^2`, from which
:func:`mala_log_acceptance` computes a MALA-style acceptance diagnostic at no extra cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
            noise: ``(params,)`` scratch buffer for one chain's standard normal draws.

        Returns:
            ``(drift_sq, clipped)``: ``‖∇U‖²`` per chain, shape ``(chains,)``, and a bool
            tensor of the same shape saying whether the gradient was clipped.
        """
        eps = self.step_size
        if self.max_grad_norm is not None:
            norms = torch.linalg.vector_norm(grad, dim=-1, keepdim=True)
            scale = (self.max_grad_norm / norms.clamp_min(1e-30)).clamp_max_(1.0)
            grad.mul_(scale)
            clipped = (scale < 1.0).squeeze(-1)
        else:
            clipped = torch.zeros(theta.shape[:-1], dtype=torch.bool, device=theta.device)
        # delta = -(ε/2)·(nβ·g + γ·(θ − θ*)), built in the gradient's buffer: every line
        # below is one pass over (chains, params) and none allocates.
        delta = grad.mul_(-0.5 * eps * self.n_beta)
        if self.localization:
            pull = 0.5 * eps * self.localization
            delta.add_(theta, alpha=-pull).add_(theta0, alpha=pull)
        drift_sq = torch.linalg.vector_norm(delta, dim=-1).square_().mul_((2.0 / eps) ** 2)
        theta.add_(delta)
        noise_scale = self.noise_level * math.sqrt(eps)
        for row, generator in zip(theta, generators, strict=True):
            row.add_(noise.normal_(generator=generator), alpha=noise_scale)
        return drift_sq, clipped


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
