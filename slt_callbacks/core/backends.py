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

Both differentiate only w.r.t. the component's own coordinates (see
:mod:`~slt_callbacks.core.space`): a head's chains pay no weight gradient for the other
layers, and no gradient of the embedding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import BatchPool
from .functional import LossModule, check_scalar_loss, loss_at, math_attention
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

    def loss(self, params: dict[str, torch.Tensor], leaves: Sequence[Any]) -> torch.Tensor:
        """One chain's loss with ``params`` substituted, on the batch of tensor ``leaves``."""
        batch = self.pool.unflatten(leaves)
        return check_scalar_loss(loss_at(self.wrapper, {**self.shared, **params}, batch))


class Backend:
    """Computes ``(slots,)`` losses and writes ``(slots, size)`` gradients for a chunk."""

    name = "base"

    def forward_backward(
        self,
        problem: SamplingProblem,
        space: ComponentSpace,
        theta: torch.Tensor,
        batches: Sequence[int],
        grad: torch.Tensor,
        *,
        must_depend: bool,
    ) -> torch.Tensor:
        """Losses of the chains ``theta`` (``(slots, size)``) on pool batches ``batches``;
        their gradients w.r.t. ``theta`` go into ``grad``. With ``must_depend`` a loss that
        does not depend on the coordinates is the user's error (global component)."""
        raise NotImplementedError


class LoopBackend(Backend):
    """One plain forward per chain, then one backward for the chunk (one backward per chain
    costs the engine's setup once per chain; the chunk size bounds the activations alive)."""

    name = "loop"

    def forward_backward(self, problem, space, theta, batches, grad, *, must_depend):
        leaves = [space.leaves(row) for row in theta]
        with autocast_context(theta.device, problem.autocast):
            losses = torch.stack([
                problem.loss(space.tensors(lv), problem.pool.tensor_leaves(b))
                for lv, b in zip(leaves, batches, strict=True)
            ])
        n = len(space.segments)
        grads = _grads(losses, [leaf for lv in leaves for leaf in lv], must_depend)
        for i in range(len(leaves)):
            space.write_grads(grads[i * n : (i + 1) * n], grad[i])
        return losses.detach().to(theta.dtype)


class VmapBackend(Backend):
    """One ``torch.func.vmap`` forward per batch shape in the chunk, one backward each."""

    name = "vmap"

    def forward_backward(self, problem, space, theta, batches, grad, *, must_depend):
        if theta.shape[0] == 1:  # nothing to batch: a plain call skips vmap's overhead
            return LoopBackend().forward_backward(
                problem, space, theta, batches, grad, must_depend=must_depend
            )
        pool = problem.pool
        groups = pool.split_by_shape(batches)
        if len(groups) == 1:
            return self._call(problem, space, theta, batches, grad, must_depend)
        losses = torch.empty(theta.shape[0], dtype=theta.dtype, device=theta.device)
        for _, rows in groups:
            index = torch.tensor(rows, device=theta.device)
            part = torch.empty((len(rows), theta.shape[1]), dtype=grad.dtype,
                               device=grad.device)
            sub = self._call(problem, space, theta.index_select(0, index),
                             [batches[r] for r in rows], part, must_depend)
            grad.index_copy_(0, index, part)
            losses.index_copy_(0, index, sub)
        return losses

    def _call(self, problem, space, theta, batches, grad, must_depend):
        pool = problem.pool
        group = pool.group_of[batches[0]]
        positions = torch.tensor([pool.position[b] for b in batches], device=pool.device)
        leaves = space.leaves(theta)
        with autocast_context(theta.device, problem.autocast), _attention_for_vmap(theta.device):
            losses = torch.func.vmap(problem.loss, in_dims=(0, 0), randomness="different")(
                space.tensors(leaves), pool.gather(group, positions)
            )
        space.write_grads(_grads(losses, leaves, must_depend), grad)
        return losses.detach().to(theta.dtype)


BACKENDS: dict[str, type[Backend]] = {"vmap": VmapBackend, "loop": LoopBackend}


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
