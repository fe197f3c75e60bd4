"""Run SGLD chains for all components and chains at once on chain-stacked parameters.

Layout. The sampled (trainable) parameters of the model are flattened into one vector of
length D. Every *slot* — a (component, chain) pair, component 0 being the whole model — holds
its own copy, stacked into ``theta`` of shape ``(components, chains, D)``. Per-parameter
views of ``theta`` are handed to :func:`torch.func.functional_call`, so the model's own
tensors are never written.

Backends, which compute the same arithmetic and consume the generator identically, so the
same seed gives the same numbers up to floating-point reassociation:

- ``vmap``: one batched forward over all slots (``torch.func.vmap``), one backward of the
  summed slot losses — chains are independent, so the gradient of the sum w.r.t. ``theta`` is
  every slot's own gradient, obtained as one flat ``(slots, D)`` tensor with no copying.
- ``loop``: one plain forward per slot, then the same single backward. For models vmap
  cannot trace (in-place updates of buffers, ``.item()`` in ``forward``, ...).

Each step: gather one batch per slot from the pool (each chain has its own shuffled order),
forward, backward, :class:`~slt_callbacks.core.sgld.SGLDStep`, write the slot losses into a
preallocated trace. Nothing is read back to the host until the end.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from .data import BatchPool
from .functional import LossModule, check_scalar_loss, loss_at
from .sgld import SGLDStep

_NO_GRAD = (
    "The loss returned by `loss_fn` does not depend on any trainable parameter of the model "
    "(or was detached); is `loss_fn` calling the model it is given?"
)

# Errors that mean "vmap cannot trace this model", not "the user's input is wrong".
VMAP_FAILURES = (RuntimeError, NotImplementedError)


@dataclass
class FlatLayout:
    """Where each sampled parameter lives in the flat vector."""

    names: list[str]
    shapes: list[torch.Size]
    offsets: list[int]
    size: int

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> FlatLayout:
        names, shapes, offsets, pos = [], [], [], 0
        for name, t in tensors.items():
            names.append(name)
            shapes.append(t.shape)
            offsets.append(pos)
            pos += t.numel()
        return cls(names, shapes, offsets, pos)

    def flatten(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([tensors[n].detach().reshape(-1).to(dtype) for n in self.names])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter views of ``flat`` (``(..., D)``), keeping the leading dims."""
        lead = flat.shape[:-1]
        return {
            n: flat[..., o : o + s.numel()].view(*lead, *s)
            for n, s, o in zip(self.names, self.shapes, self.offsets, strict=True)
        }


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
    """

    loss: torch.Tensor
    drift_sq: torch.Tensor
    clipped: torch.Tensor
    orders: torch.Tensor
    backend: str
    fallback_reason: str | None = None


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


def run_chains(
    wrapper: LossModule,
    layout: FlatLayout,
    theta0: torch.Tensor,
    fixed: dict[str, torch.Tensor],
    pool: BatchPool,
    *,
    step: SGLDStep,
    num_chains: int,
    num_steps: int,
    masks: torch.Tensor | None,
    generator: torch.Generator,
    backend: str = "auto",
    autocast: torch.dtype | None = None,
) -> ChainTraces:
    """Advance ``num_chains`` chains per component for ``num_steps`` SGLD steps.

    Args:
        wrapper: the user's loss as a module.
        layout: flat layout of the sampled parameters.
        theta0: ``(D,)`` w* in the sampling dtype.
        fixed: frozen parameters and buffers, passed unbatched.
        pool: the batches.
        step: the SGLD transform.
        masks: ``(components, D)`` 0/1 masks (row 0 all ones for the whole model), or None
            when only the whole model is sampled.
        generator: the only source of randomness (batch orders, noise).
        backend: ``"auto"``, ``"vmap"`` or ``"loop"``.
        autocast: run forward passes under :func:`torch.autocast` with this dtype.
    """
    num_components = 1 if masks is None else masks.shape[0]
    slots = num_components * num_chains
    dims = (num_components, num_chains, layout.size)
    theta = theta0.expand(dims).clone()
    mask3 = None if masks is None else masks.unsqueeze(1)  # (components, 1, D)
    orders = batch_orders(slots, num_steps, pool.num_batches, generator)
    noise = torch.empty(dims, dtype=theta0.dtype, device=theta0.device)
    grad = torch.empty(dims, dtype=theta0.dtype, device=theta0.device)
    flat_grad = grad.view(slots, layout.size)
    grad_views = {  # where each leaf's gradient goes, per backend
        "vmap": list(layout.views(flat_grad).values()),
        "loop": [v for row in flat_grad for v in layout.views(row).values()],
    }
    loss_trace = torch.empty((slots, num_steps), dtype=theta0.dtype, device=theta0.device)
    drift_trace = torch.empty_like(loss_trace)
    clipped = torch.zeros((num_components, num_chains), dtype=torch.long, device=theta0.device)
    needs_grad = (
        [[True] * len(layout.names)]
        if masks is None
        else [
            [
                bool(row[o : o + s.numel()].any())
                for s, o in zip(layout.shapes, layout.offsets, strict=True)
            ]
            for row in masks
        ]
    )

    def leaves_of(mode: str) -> list[torch.Tensor]:
        """Fresh autograd leaves sharing theta's storage, so that autograd returns one
        gradient per leaf and a single cat lays them out flat. (Differentiating w.r.t.
        theta, or indexing a stacked leaf per slot, would scatter every gradient into a
        zero-filled (slots, D) tensor.) vmap: one ``(slots, *shape)`` leaf per parameter;
        loop: one leaf per (slot, parameter), slot-major like the flat layout."""
        flat = theta.view(slots, layout.size)
        if mode == "vmap":
            return [v.detach().requires_grad_(True) for v in layout.views(flat).values()]
        # Per slot, only the parameters its component samples need a gradient: a component
        # on the last layer then skips the (costly) first-layer weight gradient.
        return [
            v.detach().requires_grad_(needs_grad[s // num_chains][j])
            for s, f in enumerate(flat)
            for j, v in enumerate(layout.views(f).values())
        ]

    def losses_of(mode: str, leaves: list[torch.Tensor], batch: list[Any]) -> torch.Tensor:
        with autocast_context(theta.device, autocast):
            if mode == "vmap":
                losses = torch.func.vmap(
                    lambda p, b: _slot_loss(wrapper, p, fixed, pool, b),
                    in_dims=(0, 0),
                    randomness="different",
                )(dict(zip(layout.names, leaves, strict=True)), batch)
            else:
                n = len(layout.names)
                losses = torch.stack(
                    [
                        _slot_loss(
                            wrapper,
                            dict(zip(layout.names, leaves[s * n : (s + 1) * n], strict=True)),
                            fixed,
                            pool,
                            batch[s],
                        )
                        for s in range(slots)
                    ]
                )
        return losses.to(theta.dtype)

    orders_list: list[list[int]] = []

    def batches(mode: str, t: int) -> list[Any]:
        if mode == "vmap":  # one (slots, ...) tensor per leaf
            return pool.gather(orders[:, t])
        if not orders_list:  # one host read, up front, then plain views: nothing is copied
            orders_list.extend(orders.tolist())
        return [pool.tensor_leaves(orders_list[s][t]) for s in range(slots)]

    def forward_backward(mode: str, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        leaves = leaves_of(mode)
        losses = losses_of(mode, leaves, batches(mode, t))
        _grad(losses, leaves, grad_views[mode])
        return losses, grad

    mode = "vmap" if backend in ("auto", "vmap") else "loop"
    fallback_reason = None
    for t in range(num_steps):
        if t == 0 and backend == "auto":
            rng = _global_rng_state(theta.device)
            try:
                losses, grad = forward_backward(mode, t)
            except VMAP_FAILURES as err:
                mode = "loop"
                fallback_reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                # A loss that draws random numbers (dropout in train mode) must see the same
                # stream as with backend="loop": rewind what the failed attempt consumed.
                _set_global_rng_state(theta.device, rng)
                losses, grad = forward_backward(mode, t)
        else:
            losses, grad = forward_backward(mode, t)
        with torch.no_grad():
            noise.normal_(generator=generator)
            drift_sq, was_clipped = step.apply_(theta, theta0, grad, noise, mask3)
            loss_trace[:, t] = losses.detach()
            drift_trace[:, t] = drift_sq.reshape(slots)
            clipped += was_clipped
    cpu = torch.device("cpu")
    return ChainTraces(
        loss=loss_trace.view(*dims[:2], num_steps).to(cpu),
        drift_sq=drift_trace.view(*dims[:2], num_steps).to(cpu),
        clipped=clipped.to(cpu),
        orders=orders.view(*dims[:2], num_steps).to(cpu),
        backend=mode,
        fallback_reason=fallback_reason,
    )


def _global_rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_global_rng_state(
    device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]
) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _slot_loss(
    wrapper: LossModule,
    params: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    pool: BatchPool,
    leaves: list[torch.Tensor],
) -> torch.Tensor:
    loss = loss_at(wrapper, {**fixed, **params}, pool.unflatten(leaves))
    return check_scalar_loss(loss)


def _grad(
    losses: torch.Tensor, leaves: list[torch.Tensor], out: list[torch.Tensor]
) -> None:
    """Write the gradient of each slot's loss w.r.t. its own parameters into ``out``.

    Slots are independent, so the gradient of the summed losses is every slot's own.
    ``leaves`` are one ``(slots, *shape)`` tensor per parameter (vmap) or one tensor per
    (slot, parameter) (loop); ``out`` holds same-shaped views of the flat ``(slots, D)``
    gradient buffer, so each gradient is copied exactly once, whatever its memory layout.
    """
    if not losses.requires_grad:
        raise ValueError(_NO_GRAD)
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    found = iter(torch.autograd.grad(losses.sum(), wanted, allow_unused=True))
    grads = [next(found) if leaf.requires_grad else None for leaf in leaves]
    if all(g is None for g in grads):
        raise ValueError(_NO_GRAD)
    for g, view in zip(grads, out, strict=True):
        if g is None:
            view.zero_()
        else:
            view.copy_(g)


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    """:func:`torch.autocast` for ``dtype`` on ``device``'s type, or a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate_loss(
    wrapper: LossModule,
    tensors: dict[str, Any],
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
