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

from .backends import (
    BACKENDS,
    VMAP_FAILURES,
    Backend,
    SamplingProblem,
    auto_backend,
    autocast_context,
)
from .budget import Chunk, plan_chunks
from .data import BatchPool
from .fastpath import FastLinearBackend, FastPathUnsupported, fast_path_applies
from .functional import LossModule, check_scalar_loss, loss_at
from .sgld import SGLDStep, block_rows
from .space import ComponentSpace


@dataclass
class ChainTraces:
    """Raw output of :func:`run_chains`, on the CPU.

    Attributes:
        loss: ``(components, chains, steps)`` minibatch loss at each step, burn-in included.
        drift_sq: same shape, ``‖∇U‖²`` at each step.
        clipped: ``(components, chains)`` number of steps whose gradient was clipped.
        orders: ``(components, chains, steps)`` pool index of the batch of each step.
        backend: the backend that ran (``"fast+vmap"`` if chunks ran on different ones).
        fallback_reason: why ``auto`` fell back to ``loop``, else None.
        chunks: the ``(component, first chain, last chain + 1)`` chunks that ran.
        fast_path_reason: why ``auto`` tried the fast path and left it, else None.
    """

    loss: torch.Tensor
    drift_sq: torch.Tensor
    clipped: torch.Tensor
    orders: torch.Tensor
    backend: str
    fallback_reason: str | None = None
    chunks: tuple[Chunk, ...] = ()
    fast_path_reason: str | None = None


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
        backend: ``"auto"``, ``"vmap"`` or ``"loop"``. ``"auto"`` runs the fast path
            (:mod:`~slt_callbacks.core.fastpath`) where it applies, else
            :func:`~slt_callbacks.core.backends.auto_backend`'s choice (vmap, or loop on a
            CPU for a large model), falling back to loop if vmap cannot trace the model.
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
        backend="+".join(sampler.ran),
        fallback_reason=sampler.fallback_reason,
        chunks=tuple(chunks),
        fast_path_reason=sampler.fast_path_reason,
    )


class _Sampler:
    """The traces of every slot, and the backends (which ``auto`` may switch once)."""

    def __init__(self, problem: SamplingProblem, step: SGLDStep, num_steps: int, backend: str,
                 orders: list[list[int]], generators: list[torch.Generator],
                 dtype: torch.dtype) -> None:
        self.problem, self.step, self.num_steps = problem, step, num_steps
        self.orders, self.generators = orders, generators
        self.auto = backend == "auto"
        self._generic: Backend | None = None if self.auto else BACKENDS[backend]()
        self.try_fallback = self.try_fast = self.auto
        self.fallback_reason: str | None = None
        self.fast_path_reason: str | None = None
        self.ran: list[str] = []
        device = problem.pool.device
        self.loss = torch.empty((len(orders), num_steps), dtype=dtype, device=device)
        self.drift_sq = torch.empty_like(self.loss)
        self.clipped = torch.zeros(len(orders), dtype=torch.long, device=device)

    def run(self, space: ComponentSpace, component: int, slots: range) -> None:
        """All steps of the chains ``slots`` of ``component``."""
        theta = space.theta0.expand(len(slots), space.size).clone()  # (chains, d_k)
        grad = torch.empty_like(theta)
        block = block_rows(len(slots), space.size, theta.element_size())
        noise = theta.new_empty((block, space.size))
        loss = torch.empty((self.num_steps, len(slots)), dtype=theta.dtype,
                           device=theta.device)  # (step, chain)
        drift_sq, clipped = torch.empty_like(loss), torch.zeros_like(loss[0], dtype=torch.long)
        generators = self.generators[slots.start : slots.stop]
        orders = list(zip(*self.orders[slots.start : slots.stop], strict=True))  # (step, chain)
        self._bind(space, theta, grad)
        for t, batches in enumerate(orders):
            loss[t] = self._forward_backward(batches, component == 0)
            with torch.no_grad():
                drift_sq[t], hit = self.step.apply_(theta, space.theta0, grad, generators,
                                                    noise)
                if hit is not None:
                    clipped += hit
        rows = slice(slots.start, slots.stop)
        self.loss[rows], self.drift_sq[rows] = loss.T, drift_sq.T
        self.clipped[rows] = clipped
        if self.backend.name not in self.ran:
            self.ran.append(self.backend.name)

    @property
    def generic(self) -> Backend:
        """The backend where the fast path does not run; ``auto`` chooses it the first time
        it is needed (:func:`~slt_callbacks.core.backends.auto_backend`)."""
        if self._generic is None:
            self._generic = BACKENDS[auto_backend(self.problem)]()
            self.try_fallback = self._generic.name == "vmap"  # loop is the fallback
        return self._generic

    @generic.setter
    def generic(self, backend: Backend) -> None:
        self._generic = backend

    def _bind(self, space: ComponentSpace, theta: torch.Tensor, grad: torch.Tensor) -> None:
        if self.try_fast and fast_path_applies(self.problem, space):
            self.backend, self.validate = FastLinearBackend(), True
        else:
            self.backend, self.validate = self.generic, False
        self.backend.bind(self.problem, space, theta, grad)

    def _forward_backward(self, batches: Sequence[int], must_depend: bool) -> torch.Tensor:
        backend = self.backend
        if backend is not self._generic:
            return self._fast_step(batches, must_depend)
        if not self.try_fallback:
            return backend.forward_backward(batches, must_depend=must_depend)
        self.try_fallback = False  # only the very first generic call may fall back
        rng = _global_rng_state(backend.theta.device)
        try:
            return backend.forward_backward(batches, must_depend=must_depend)
        except VMAP_FAILURES as err:
            self.generic = self.backend = BACKENDS["loop"]()
            self.backend.bind(backend.problem, backend.space, backend.theta, backend.grad)
            self.fallback_reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            # A loss that draws random numbers (dropout in train mode) must see the same
            # stream as with backend="loop": rewind what the failed attempt consumed.
            _set_global_rng_state(backend.theta.device, rng)
            return self.backend.forward_backward(batches, must_depend=must_depend)

    def _fast_step(self, batches: Sequence[int], must_depend: bool) -> torch.Tensor:
        """A step on the fast path: its first in a chunk is checked against the loop backend;
        if the check fails, or a later step meets a use of the model it cannot reproduce,
        the chunk continues on the generic backend."""
        fast, reason = self.backend, None
        if self.validate:
            self.validate = False
            losses, reason = validated(fast, batches, must_depend)
        else:
            rng = _global_rng_state(fast.theta.device)
            try:
                return fast.forward_backward(batches, must_depend=must_depend)
            except FastPathUnsupported as err:
                _set_global_rng_state(fast.theta.device, rng)
                reason = f"fast path not used: {err}"
                losses = None
        if reason is None:
            return losses
        self.try_fast, self.fast_path_reason = False, reason
        self.backend = self.generic
        self.generic.bind(fast.problem, fast.space, fast.theta, fast.grad)
        if losses is None:
            losses = self._forward_backward(batches, must_depend)
        return losses


def validated(
    fast: Backend, batches: Sequence[int], must_depend: bool
) -> tuple[torch.Tensor, str | None]:
    """One step of the bound ``fast`` backend checked against :class:`LoopBackend` on the
    same chains, batches and global RNG state. Returns the losses (the gradients are in the
    bound buffer) and None if the two agree to float reassociation, else the loop step's
    results and why the fast path is not to be used."""
    reference = BACKENDS["loop"]()
    reference.bind(fast.problem, fast.space, fast.theta, fast.grad)
    rng = _global_rng_state(fast.theta.device)
    expected = reference.forward_backward(batches, must_depend=must_depend)
    expected_grad = fast.grad.clone()
    after = _global_rng_state(fast.theta.device)
    _set_global_rng_state(fast.theta.device, rng)
    try:
        losses = fast.forward_backward(batches, must_depend=must_depend)
    except Exception as err:  # the loop step worked: anything else is the fast path's
        reason = str(err) or type(err).__name__
    else:
        tol = 1e-4 if fast.theta.dtype == torch.float32 else 1e-9
        if _close(losses, expected, tol) and _close(fast.grad, expected_grad, tol):
            return losses, None
        reason = "its first step differed from the generic path's"
    fast.grad.copy_(expected_grad)
    _set_global_rng_state(fast.theta.device, after)
    return expected, f"fast path not used: {reason}"


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """``a`` equals ``b`` to ``tol`` relative to ``b``'s largest entry, both finite."""
    if not b.numel():
        return True
    if not bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
        return False
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


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
