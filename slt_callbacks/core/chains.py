"""Run SGLD chains for all components: the step loop, from w* to loss traces.

Layout. A *slot* is a (component, chain) pair, component 0 being the whole model. A slot
carries only its component's coordinates (:class:`~slt_callbacks.core.space.ComponentSpace`):
the chains of component k are one ``(chains, d_k)`` tensor, and everything a component does
not sample is w*, shared by all. Memory is the sum of the components' sizes times the number
of chains, plus one chunk's gradients and activations.

Randomness is fixed per slot before anything runs: each slot walks its own reshuffle of the
pool every epoch (:func:`batch_orders`) and draws its noise from its own generator, seeded
from the caller's. A slot's numbers are therefore the same whichever backend runs it and
whichever other slots share its chunk (:mod:`~slt_callbacks.core.budget`).

Each chunk runs all its steps: gather one batch per chain, forward, backward
(:mod:`~slt_callbacks.core.backends`), :class:`~slt_callbacks.core.sgld.SGLDStep`, write the
losses into a preallocated trace. Nothing is read back to the host until the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backends import BACKENDS, VMAP_FAILURES, Backend, SamplingProblem, autocast_context
from .budget import Chunk, plan_chunks
from .data import BatchPool
from .functional import LossModule, check_scalar_loss, loss_at
from .sgld import SGLDStep
from .space import ComponentSpace


@dataclass
class ChainTraces:
    """Raw output of :func:`run_chains`, on the CPU.

    Attributes:
        loss: ``(components, chains, steps)`` minibatch loss at each step, burn-in included.
        drift_sq: same shape, ``‖∇U‖²`` at each step.
        clipped: ``(components, chains)`` number of steps whose gradient was clipped.
        orders: ``(components, chains, steps)`` pool index of the batch of each step.
        backend: the backend that ran.
        fallback_reason: why ``auto`` fell back to ``loop``, else None.
        chunks: the ``(component, first chain, last chain + 1)`` chunks that ran.
    """

    loss: torch.Tensor
    drift_sq: torch.Tensor
    clipped: torch.Tensor
    orders: torch.Tensor
    backend: str
    fallback_reason: str | None = None
    chunks: tuple[Chunk, ...] = ()


def batch_orders(
    num_slots: int, num_steps: int, num_batches: int, generator: torch.Generator
) -> torch.Tensor:
    """``(slots, steps)`` pool indices: each slot walks through its own reshuffle of the pool
    every epoch, so chains see different minibatch sequences (their spread is then honest)."""
    epochs = math.ceil(num_steps / num_batches)
    keys = torch.rand(
        (num_slots, epochs, num_batches), generator=generator, device=generator.device
    )
    return keys.argsort(dim=-1).reshape(num_slots, -1)[:, :num_steps]


def slot_generators(num_slots: int, generator: torch.Generator) -> list[torch.Generator]:
    """One noise generator per slot, seeded from ``generator`` (which advances once)."""
    seeds = torch.randint(0, 2**62, (num_slots,), generator=generator,
                          device=generator.device).tolist()
    return [torch.Generator(device=generator.device).manual_seed(s) for s in seeds]


def run_chains(
    problem: SamplingProblem,
    spaces: Sequence[ComponentSpace],
    *,
    step: SGLDStep,
    num_chains: int,
    num_steps: int,
    generator: torch.Generator,
    backend: str = "auto",
    max_memory: int | str | None = None,
) -> ChainTraces:
    """Advance ``num_chains`` chains per component for ``num_steps`` SGLD steps.

    Args:
        problem: the loss, the shared frozen tensors and the pool.
        spaces: the components' coordinates, the whole model first.
        step: the SGLD transform.
        generator: the only source of randomness (batch orders, per-slot noise seeds).
        backend: ``"auto"``, ``"vmap"`` or ``"loop"``.
        max_memory: bytes the chains may use, ``"auto"`` or None (see
            :func:`~slt_callbacks.core.budget.plan_chunks`).
    """
    slots = len(spaces) * num_chains
    orders = batch_orders(slots, num_steps, problem.pool.num_batches, generator)
    sampler = _Sampler(problem, step, num_steps, backend, orders.tolist(),
                       slot_generators(slots, generator), spaces[0].theta0.dtype)
    chunks = plan_chunks(problem, spaces, num_chains, max_memory)
    for k, first, stop in chunks:
        sampler.run(spaces[k], k, range(k * num_chains + first, k * num_chains + stop))
    dims = (len(spaces), num_chains)
    cpu = torch.device("cpu")
    return ChainTraces(
        loss=sampler.loss.view(*dims, num_steps).to(cpu),
        drift_sq=sampler.drift_sq.view(*dims, num_steps).to(cpu),
        clipped=sampler.clipped.view(dims).to(cpu),
        orders=orders.view(*dims, num_steps).to(cpu),
        backend=sampler.backend.name,
        fallback_reason=sampler.fallback_reason,
        chunks=tuple(chunks),
    )


class _Sampler:
    """The traces of every slot, and the backend (which ``auto`` may switch once)."""

    def __init__(self, problem: SamplingProblem, step: SGLDStep, num_steps: int, backend: str,
                 orders: list[list[int]], generators: list[torch.Generator],
                 dtype: torch.dtype) -> None:
        self.problem, self.step, self.num_steps = problem, step, num_steps
        self.orders, self.generators = orders, generators
        self.backend: Backend = BACKENDS["vmap" if backend == "auto" else backend]()
        self.try_fallback = backend == "auto"
        self.fallback_reason: str | None = None
        device = problem.pool.device
        self.loss = torch.empty((len(orders), num_steps), dtype=dtype, device=device)
        self.drift_sq = torch.empty_like(self.loss)
        self.clipped = torch.zeros(len(orders), dtype=torch.long, device=device)

    def run(self, space: ComponentSpace, component: int, slots: range) -> None:
        """All steps of the chains ``slots`` of ``component``."""
        theta = space.theta0.expand(len(slots), space.size).clone()  # (chains, d_k)
        grad = torch.empty_like(theta)
        noise = torch.empty_like(space.theta0)
        generators = self.generators[slots.start : slots.stop]
        rows = slice(slots.start, slots.stop)
        for t in range(self.num_steps):
            batches = [self.orders[s][t] for s in slots]
            losses = self._forward_backward(space, theta, batches, grad, component == 0)
            with torch.no_grad():
                drift_sq, clipped = self.step.apply_(theta, space.theta0, grad, generators,
                                                     noise)
                self.loss[rows, t] = losses
                self.drift_sq[rows, t] = drift_sq
                self.clipped[rows] += clipped

    def _forward_backward(self, space, theta, batches, grad, must_depend) -> torch.Tensor:
        if not self.try_fallback:
            return self.backend.forward_backward(self.problem, space, theta, batches, grad,
                                                 must_depend=must_depend)
        self.try_fallback = False  # only the very first call may fall back
        rng = _global_rng_state(theta.device)
        try:
            return self.backend.forward_backward(self.problem, space, theta, batches, grad,
                                                 must_depend=must_depend)
        except VMAP_FAILURES as err:
            self.backend = BACKENDS["loop"]()
            self.fallback_reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            # A loss that draws random numbers (dropout in train mode) must see the same
            # stream as with backend="loop": rewind what the failed attempt consumed.
            _set_global_rng_state(theta.device, rng)
            return self.backend.forward_backward(self.problem, space, theta, batches, grad,
                                                 must_depend=must_depend)


def _global_rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_global_rng_state(
    device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]
) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def evaluate_loss(
    wrapper: LossModule,
    tensors: dict[str, torch.Tensor],
    pool: BatchPool,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """``(num_batches,)`` loss of every pool batch at the given parameters, no gradient.

    Their mean is L_n(w*); each entry is also the paired baseline of every draw that uses
    that batch. Batches are fed one at a time: this is also where the user's loss is
    validated, with plain (un-vmapped) errors.
    """
    with torch.no_grad(), autocast_context(pool.device, autocast):
        return torch.stack(
            [
                check_scalar_loss(loss_at(wrapper, tensors, pool.batch(i))).detach()
                for i in range(pool.num_batches)
            ]
        )
