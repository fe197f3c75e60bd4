"""How the minibatch gradients of a chunk of chains are computed: one interface, several ways.

A backend gets a chunk of chains of one component (their coordinates ``theta``, ``(slots,
size)``), the pool index of each chain's batch at this step, and a buffer to write their
gradients into; it returns their losses. Every backend computes the same arithmetic and
draws no random numbers of its own, so the same seed gives the same numbers up to
floating-point reassociation whichever runs:

- :class:`VmapBackend`: one batched forward over the chunk (``torch.func.vmap``), one
  backward of the summed losses. Chains are independent, so the gradient of the sum w.r.t.
  each chain's leaves is that chain's own gradient. Chains whose batches differ in shape (a
  ragged pool) are split into one call per shape.
- :class:`LoopBackend`: one plain forward per chain, then the same single backward. For
  models vmap cannot trace (in-place updates of buffers, ``.item()`` in ``forward``, ...),
  and on a CPU often as fast.
- :class:`~slt_callbacks.core.fastpath.FastLinearBackend`: for an ``nn.Sequential`` of
  ``nn.Linear`` and elementwise activations on a CPU, a hand-written forward and backward
  per chain; ``backend="auto"`` chooses it where it applies (see that module).

Where the fast path does not apply, ``backend="auto"`` runs :func:`auto_backend`'s choice:
vmap, except on a CPU for a model whose loss costs at least :data:`LOOP_FLOPS` on one batch.

All differentiate only w.r.t. the component's own coordinates (see
:mod:`~slt_callbacks.core.space`): a head's chains pay no weight gradient for the other
layers, and no gradient of the embedding. A backend is bound to one chunk of chains at a
time (:meth:`Backend.bind`) and builds its views of the chunk's buffers once, not per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import BatchPool
from .functional import LossModule, check_scalar_loss, math_attention, preserve_rng
from .space import ComponentSpace

NO_GRAD = (
    "The loss returned by `loss_fn` does not depend on any trainable parameter of the model "
    "(or was detached); is `loss_fn` calling the model it is given?"
)

# Errors that mean "vmap cannot trace this model", not "the user's input is wrong".
VMAP_FAILURES = (RuntimeError, NotImplementedError)


@dataclass
class SamplingProblem:
    """What every chain shares: the loss, the frozen tensors, the pool.

    Attributes:
        wrapper: the user's loss as a module.
        shared: w* of every trainable parameter and the frozen parameters and buffers, in
            the sampling dtype, passed unbatched: stored once, whatever the number of chains.
        pool: the batches.
        autocast: run forward passes under :func:`torch.autocast` with this dtype.
    """

    wrapper: LossModule
    shared: dict[str, torch.Tensor]
    pool: BatchPool
    autocast: torch.dtype | None = None
    _batches: dict[int, Any] = field(default_factory=dict, repr=False)

    def batch(self, index: int) -> Any:
        """Pool batch ``index`` as the loss expects it. A tensor or a tuple (immutable, so
        a loss cannot change what the next step sees) is built once and reused."""
        batch = self._batches.get(index)
        if batch is None:
            batch = self.pool.batch(index)
            if isinstance(batch, torch.Tensor | tuple):
                self._batches[index] = batch
        return batch

    def substitution(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What :func:`torch.func.functional_call` swaps in for a chain at ``params``
        (everything else at w*), under every name the wrapper has for each tensor."""
        return self.wrapper.substitution({**self.shared, **params})

    def loss_with(self, substitution: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """One chain's loss on ``batch`` with a :meth:`substitution` swapped in."""
        return check_scalar_loss(torch.func.functional_call(
            self.wrapper, substitution, (batch,), strict=False, tie_weights=False))

    def loss(self, params: dict[str, torch.Tensor], leaves: Sequence[Any]) -> torch.Tensor:
        """One chain's loss with ``params`` substituted, on the batch of tensor ``leaves``."""
        return self.loss_with(self.substitution(params), self.pool.unflatten(leaves))


class Backend:
    """Computes ``(slots,)`` losses and ``(slots, size)`` gradients for a chunk of chains.

    :meth:`bind` starts a chunk: its coordinates ``theta`` and its gradient buffer ``grad``
    (both ``(slots, size)``) are the same tensors at every step, updated in place, so a
    backend builds its views of them once per chunk; :meth:`forward_backward` is one step.
    """

    name = "base"

    def bind(self, problem: SamplingProblem, space: ComponentSpace, theta: torch.Tensor,
             grad: torch.Tensor) -> None:
        """Start a chunk of chains ``theta`` of component ``space``."""
        self.problem, self.space, self.theta, self.grad = problem, space, theta, grad

    def forward_backward(self, batches: Sequence[int], *, must_depend: bool) -> torch.Tensor:
        """Losses of the bound chains on pool batches ``batches`` (one per chain); their
        gradients w.r.t. the chains' coordinates go into the bound ``grad``. With
        ``must_depend`` a loss that does not depend on the coordinates is the user's error
        (global component)."""
        raise NotImplementedError


class LoopBackend(Backend):
    """One plain forward per chain, then one backward for the chunk (one backward per chain
    costs the engine's setup once per chain; the chunk size bounds the activations alive).
    Each chain's leaves and substitution are built once per chunk."""

    name = "loop"

    def bind(self, problem, space, theta, grad):
        super().bind(problem, space, theta, grad)
        self._leaves = [space.leaves(row) for row in theta]
        self._subs = [problem.substitution(space.tensors(lv)) for lv in self._leaves]

    def _substitution(self, i: int) -> dict[str, torch.Tensor]:
        if self.space.has_scattered:  # rebuilt from w* inside each step's graph
            return self.problem.substitution(self.space.tensors(self._leaves[i]))
        return self._subs[i]

    def forward_backward(self, batches, *, must_depend):
        problem = self.problem
        with autocast_context(self.theta.device, problem.autocast):
            losses = torch.stack([
                problem.loss_with(self._substitution(i), problem.batch(b))
                for i, b in enumerate(batches)
            ])
        n = len(self.space.segments)
        grads = _grads(losses, [leaf for lv in self._leaves for leaf in lv], must_depend)
        for i in range(len(self._leaves)):
            self.space.write_grads(grads[i * n : (i + 1) * n], self.grad[i])
        return losses.detach().to(self.theta.dtype)


class VmapBackend(Backend):
    """One ``torch.func.vmap`` forward per batch shape in the chunk, one backward each."""

    name = "vmap"

    def bind(self, problem, space, theta, grad):
        super().bind(problem, space, theta, grad)
        self._leaves = space.leaves(theta)
        self._single = None
        if theta.shape[0] == 1:  # nothing to batch: a plain call skips vmap's overhead
            self._single = LoopBackend()
            self._single.bind(problem, space, theta, grad)

    def forward_backward(self, batches, *, must_depend):
        if self._single is not None:
            return self._single.forward_backward(batches, must_depend=must_depend)
        theta, grad = self.theta, self.grad
        groups = self.problem.pool.split_by_shape(batches)
        if len(groups) == 1:
            return self._call(self._leaves, batches, grad, must_depend)
        losses = torch.empty(theta.shape[0], dtype=theta.dtype, device=theta.device)
        for _, rows in groups:
            index = torch.tensor(rows, device=theta.device)
            part = torch.empty((len(rows), theta.shape[1]), dtype=grad.dtype,
                               device=grad.device)
            leaves = self.space.leaves(theta.index_select(0, index))
            sub = self._call(leaves, [batches[r] for r in rows], part, must_depend)
            grad.index_copy_(0, index, part)
            losses.index_copy_(0, index, sub)
        return losses

    def _call(self, leaves, batches, grad, must_depend):
        pool, problem = self.problem.pool, self.problem
        group = pool.group_of[batches[0]]
        positions = torch.tensor([pool.position[b] for b in batches], device=pool.device)
        device = grad.device
        with autocast_context(device, problem.autocast), _attention_for_vmap(device):
            losses = torch.func.vmap(problem.loss, in_dims=(0, 0), randomness="different")(
                self.space.tensors(leaves), pool.gather(group, positions)
            )
        self.space.write_grads(_grads(losses, leaves, must_depend), grad)
        return losses.detach().to(grad.dtype)


BACKENDS: dict[str, type[Backend]] = {"vmap": VmapBackend, "loop": LoopBackend}

LOOP_FLOPS = 2e7
"""On a CPU, ``backend="auto"`` runs loop rather than vmap (where the fast path does not
apply) for a model whose loss on one batch costs at least this many floating-point
operations. Measured on one thread, 4 and 16 chains, in two runs
(``benchmarks/regression.py --rule``, ``benchmarks/results/regression_cpu.md``): up to 1.4e7
FLOPs vmap saves more per-chain overhead than it costs (vmap/loop time 0.4-0.92 for a small
MLP, CNN and GPT-2); from 2.8e7 on its batched kernels cost about as much as they save or
more (1.04-1.16 for the anchor MLP as a generic model, 1.08-1.91 for a CNN at 1e8,
0.94-1.14 for a GPT-2 at 1.7e8, 1.15-1.23 for the 2.9e9-FLOP GPT-2 of issue #10)."""


def auto_backend(problem: SamplingProblem) -> str:
    """The generic backend ``backend="auto"`` runs: ``"loop"`` on a CPU when
    :func:`forward_flops` is at least :data:`LOOP_FLOPS`, else ``"vmap"`` (which falls back
    to loop if it cannot trace the model)."""
    if problem.pool.device.type != "cpu":
        return "vmap"
    return "loop" if forward_flops(problem) >= LOOP_FLOPS else "vmap"


def forward_flops(problem: SamplingProblem) -> int:
    """Floating-point operations of the loss at w* on pool batch 0, as counted by
    :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions and
    attention; elementwise operations are not counted); 0 if it cannot count them. The
    global RNG is left as it was, so a loss that draws random numbers sees the same stream
    whichever backend runs."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    device = problem.pool.device
    try:
        with (preserve_rng(device), torch.no_grad(), counter,
              autocast_context(device, problem.autocast)):
            problem.loss_with(problem.substitution({}), problem.batch(0))
    except Exception:  # the loss itself already ran at w* on this batch: the counter failed
        return 0
    return counter.get_total_flops()


def _grads(
    losses: torch.Tensor, leaves: list[torch.Tensor], must_depend: bool
) -> list[torch.Tensor | None]:
    """Gradient of the summed losses w.r.t. each leaf (None where it does not depend)."""
    if not losses.requires_grad:
        if must_depend:
            raise ValueError(NO_GRAD)
        return [None] * len(leaves)
    total = losses if losses.dim() == 0 else losses.sum()  # one chain: no extra node
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    if must_depend and all(g is None for g in grads):
        raise ValueError(NO_GRAD)
    return list(grads)


def _attention_for_vmap(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """On a CPU, the math attention kernel: plain matmuls, which vmap batches; the fused CPU
    kernel has no batching rule and would run once per chain."""
    if device.type == "cpu":
        return math_attention()
    return contextlib.nullcontext()


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    """:func:`torch.autocast` for ``dtype`` on ``device``'s type, or a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
