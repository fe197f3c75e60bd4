r"""The fast path: stacks of ``nn.Linear`` and elementwise activations, differentiated by hand.

The generic backends (:mod:`~slt_callbacks.core.backends`) swap each chain's parameters into
the user's model with :func:`torch.func.functional_call`, let autograd record the forward and
run its engine backward, and copy the gradients into the chains' flat buffer. For a small
model on a CPU that bookkeeping is a sizeable share of a step. When the model is an
``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations (ReLU, Tanh, Sigmoid,
GELU, Identity), :class:`FastLinearBackend` instead runs, per chain,

.. math::

    h_0 = x,\qquad h_k = \phi_k(h_{k-1} W_k^\top + b_k)

with the chain's weights read straight out of its coordinates (views, no copy), hands the
output to the user's ``loss_fn`` as a leaf, lets autograd differentiate only the loss with
respect to it, and then backpropagates by hand, writing :math:`\partial L/\partial W_k =
\delta_k^\top h_{k-1}` and :math:`\partial L/\partial b_k = \sum_n \delta_{k,n}` directly
into the chain's gradient row (``out=``). The ops are the ones autograd would run
(``addmm``, ``mm``, the activations' own backward kernels), so the numbers are the generic
path's up to floating-point reassociation.

``loss_fn`` receives a stand-in for the model that can only be called with one tensor; any
other use of it (``model.parameters()``, ``model[0]``, a second call) raises
:class:`FastPathUnsupported` and the chunk runs on the generic backend instead. Its first step
is also run both ways and compared (:func:`~slt_callbacks.core.chains.validated`), so a loss
that behaves differently with the stand-in is caught before it matters.

``backend="auto"`` chooses the fast path when :func:`fast_path_applies`: a CPU (where the
per-op overhead it removes matters; a GPU batches chains with vmap instead), no autocast,
float32 or float64, a component made of whole parameters of the stack, and no hooks. The
result's ``backend`` says ``"fast"`` when it ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backends import NO_GRAD, Backend
from .functional import check_scalar_loss


class FastPathUnsupported(Exception):
    """The loss uses the model in a way the fast path does not reproduce."""


Activation = tuple[Callable[[torch.Tensor], torch.Tensor],
                   Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]
"""``(forward(x), backward(grad, x, y))`` of an elementwise activation ``y = φ(x)``."""

_ACTIVATIONS: dict[type, Callable[[nn.Module], Activation]] = {
    nn.ReLU: lambda m: (torch.relu, lambda g, x, y: torch.ops.aten.threshold_backward(g, y, 0)),
    nn.Tanh: lambda m: (torch.tanh, lambda g, x, y: torch.ops.aten.tanh_backward(g, y)),
    nn.Sigmoid: lambda m: (torch.sigmoid, lambda g, x, y: torch.ops.aten.sigmoid_backward(g, y)),
    nn.GELU: lambda m: (
        lambda x: F.gelu(x, approximate=m.approximate),
        lambda g, x, y: torch.ops.aten.gelu_backward(g, x, approximate=m.approximate),
    ),
}


@dataclass(frozen=True)
class _Op:
    """One step of the stack: a linear layer (parameter names) or an activation."""

    weight: str | None = None
    bias: str | None = None
    activation: Activation | None = None


def linear_stack(model: nn.Module) -> list[_Op] | None:
    """The ops of ``model`` if it is an ``nn.Sequential`` of ``nn.Linear`` and supported
    elementwise activations without hooks (exact types: a subclass may override
    ``forward``), else None."""
    if type(model) is not nn.Sequential or _has_hooks(model):
        return None
    ops = []
    for name, child in model.named_children():
        if _has_hooks(child):
            return None
        if type(child) is nn.Linear:
            bias = f"{name}.bias" if child.bias is not None else None
            ops.append(_Op(weight=f"{name}.weight", bias=bias))
        elif type(child) in _ACTIVATIONS:
            ops.append(_Op(activation=_ACTIVATIONS[type(child)](child)))
        elif type(child) is not nn.Identity:
            return None
    return ops if any(op.weight for op in ops) else None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    names = ("_global_forward_hooks", "_global_forward_pre_hooks",
             "_global_backward_hooks", "_global_backward_pre_hooks")
    return any(getattr(m, n, None) for n in names)


def fast_path_applies(problem: Any, space: Any) -> bool:
    """Whether ``backend="auto"`` runs the chunks of ``space`` on :class:`FastLinearBackend`
    (see the module docstring for the conditions)."""
    theta0 = space.theta0
    if (theta0.device.type != "cpu" or problem.autocast is not None or space.has_scattered
            or theta0.dtype not in (torch.float32, torch.float64) or _global_hooks()):
        return False
    ops = linear_stack(problem.wrapper.model)
    if ops is None:
        return False
    names = {n for op in ops for n in (op.weight, op.bias) if n}
    return all(s.name in names for s in space.segments)


class _StandIn:
    """What ``loss_fn`` receives as the model on the fast path: it can be called once with
    one tensor, and nothing else."""

    __slots__ = ("_forward",)

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        object.__setattr__(self, "_forward", forward)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs or len(args) != 1:
            raise FastPathUnsupported("`loss_fn` calls the model with other than one input")
        return self._forward(args[0])

    def __getattr__(self, name: str) -> Any:
        raise FastPathUnsupported(f"`loss_fn` reads `model.{name}`")

    def __setattr__(self, name: str, value: Any) -> None:
        raise FastPathUnsupported(f"`loss_fn` sets `model.{name}`")


class FastLinearBackend(Backend):
    """Per chain, a hand-written forward and backward of the linear stack (module docstring);
    gradients go straight into the chunk's gradient rows."""

    name = "fast"

    def bind(self, problem, space, theta, grad):
        super().bind(problem, space, theta, grad)
        self._ops = linear_stack(problem.wrapper.model)
        assert self._ops is not None, "bind() a FastLinearBackend only where it applies"
        where = {s.name: s for s in space.segments}

        def rows(buffer: torch.Tensor, i: int) -> dict[str, torch.Tensor]:
            return {n: buffer[i, s.offset : s.offset + s.size].view(s.shape)
                    for n, s in where.items()}

        self._params = [{**problem.shared, **rows(theta, i)} for i in range(len(theta))]
        self._grads = [rows(grad, i) for i in range(len(theta))]
        sampled = [bool({op.weight, op.bias} & where.keys()) for op in self._ops]
        # The input gradient of op k is needed only if something before it is sampled.
        self._needs_input_grad = [any(sampled[:k]) for k in range(len(self._ops))]

    def forward_backward(self, batches, *, must_depend):
        loss_fn, problem = self.problem.wrapper.loss_fn, self.problem
        self._saved: list[list[Any] | None] = [None] * len(batches)
        outputs: list[torch.Tensor | None] = [None] * len(batches)
        losses = []
        for i, b in enumerate(batches):
            model = _StandIn(lambda x, i=i: self._forward(i, x, outputs))
            losses.append(check_scalar_loss(loss_fn(model, problem.batch(b))))
        total = torch.stack(losses)
        used = [i for i, z in enumerate(outputs) if z is not None]
        deltas = [None] * len(batches)
        if total.requires_grad and used:
            found = torch.autograd.grad(total.sum(), [outputs[i] for i in used],
                                        allow_unused=True)
            for i, d in zip(used, found, strict=True):
                deltas[i] = d
        if must_depend and all(d is None for d in deltas):
            raise ValueError(NO_GRAD)
        for i, delta in enumerate(deltas):
            self._backward(i, delta)
        return total.detach().to(self.theta.dtype)

    def _forward(self, i: int, x: Any, outputs: list[torch.Tensor | None]) -> torch.Tensor:
        if outputs[i] is not None:
            raise FastPathUnsupported("`loss_fn` calls the model more than once")
        if not (isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype == self.theta.dtype
                and not x.requires_grad):
            raise FastPathUnsupported("the model's input is not a 2-D tensor of the "
                                      "sampling dtype")
        params, saved, h = self._params[i], [], x
        for op in self._ops:
            saved.append(h)
            if op.activation is not None:
                h = op.activation[0](h)
                continue
            w = params[op.weight].t()
            h = torch.mm(h, w) if op.bias is None else torch.addmm(params[op.bias], h, w)
        saved.append(h)
        self._saved[i] = saved
        outputs[i] = h.detach().requires_grad_(True)
        return outputs[i]

    def _backward(self, i: int, delta: torch.Tensor | None) -> None:
        """Backpropagate ``delta`` (the loss's gradient w.r.t. the stack's output) through
        chain ``i``'s stack, writing its gradient row; zeros if the loss ignored the model."""
        grads = self._grads[i]
        if delta is None:
            for g in grads.values():
                g.zero_()
            return
        saved, params = self._saved[i], self._params[i]
        for k in range(len(self._ops) - 1, -1, -1):
            op, h_in = self._ops[k], saved[k]
            if op.activation is not None:
                if not self._needs_input_grad[k]:
                    return
                delta = op.activation[1](delta, h_in, saved[k + 1])
                continue
            if op.weight in grads:
                torch.mm(delta.t(), h_in, out=grads[op.weight])
            if op.bias in grads:
                torch.sum(delta, 0, out=grads[op.bias])
            if not self._needs_input_grad[k]:
                return
            delta = torch.mm(delta, params[op.weight])
