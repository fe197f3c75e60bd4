"""Calling a user's ``loss_fn(model, batch)`` on parameters that are not the model's own.

Every estimator in :mod:`slt_callbacks.core` evaluates the loss at weights other than the
ones stored in the model (SGLD draws, Hessian probes, per-sample gradients), and none of
them may change the model. The helpers here are the one place that knows how:

- :class:`LossModule` turns ``loss_fn(model, batch)`` into a module whose ``forward`` is the
  loss, so :func:`torch.func.functional_call` can swap parameters in and out without touching
  the user's tensors (:func:`loss_at`);
- :func:`module_mode` puts a model in eval (or train) mode and restores every submodule's own
  flag afterwards, not just the root's;
- :func:`trainable_parameters` names the parameters that are sampled (``requires_grad``);
- :func:`check_scalar_loss` rejects a loss that is not a scalar with a message that says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``; parameters are those of ``model``.

    Parameter names seen by :func:`torch.func.functional_call` are prefixed with ``"model."``;
    :meth:`substitution` builds the mapping, tied weights included.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        # Every name under which each tensor is reachable (tied weights have several), so
        # substitution can skip functional_call's per-call tie analysis: it walks the whole
        # module tree, which costs as much as a small layer's forward.
        names: dict[int, list[str]] = {}
        for name, t in [*model.named_parameters(remove_duplicate=False),
                        *model.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(t), []).append(f"model.{name}")
        self._aliases = {group[0][len("model."):]: group for group in names.values()}

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def substitution(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map model-relative names (as ``named_parameters()`` gives them) to every name
        this module exposes for them."""
        out = {}
        for name, value in tensors.items():
            for alias in self._aliases.get(name, (f"model.{name}",)):
                out[alias] = value
        return out


def loss_at(
    wrapper: LossModule, tensors: Mapping[str, torch.Tensor], batch: Any
) -> torch.Tensor:
    """The loss of ``wrapper.model`` on ``batch`` with ``tensors`` (model-relative names)
    substituted for its parameters/buffers; the model itself is not modified."""
    return torch.func.functional_call(
        wrapper, wrapper.substitution(tensors), (batch,), strict=False, tie_weights=False
    )


@contextlib.contextmanager
def module_mode(model: nn.Module, *, train: bool) -> Iterator[None]:
    """Set ``model.train(train)`` for the duration of the block, then restore each
    submodule's own ``training`` flag (a user may keep e.g. a frozen encoder in eval)."""
    flags = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with ``requires_grad=True``, by name (tied parameters once).

    These are the coordinates an LLC is defined over; frozen parameters stay at their
    values, like buffers.
    """
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def frozen_tensors(model: nn.Module, *, clone_buffers: bool = True) -> dict[str, torch.Tensor]:
    """Frozen parameters and buffers by name, detached.

    Buffers are cloned so that a loss evaluated in train mode (BatchNorm updating running
    statistics) cannot write into the user's model.
    """
    out: dict[str, torch.Tensor] = {
        name: p.detach() for name, p in model.named_parameters() if not p.requires_grad
    }
    for name, b in model.named_buffers():
        out[name] = b.detach().clone() if clone_buffers else b.detach()
    return out


def check_scalar_loss(loss: Any, *, argument: str = "loss_fn") -> torch.Tensor:
    """Return ``loss`` if it is a real scalar tensor, else raise a ``ValueError`` that names
    ``argument`` and says what arrived."""
    if not isinstance(loss, torch.Tensor):
        raise ValueError(
            f"Expected `{argument}` to return a scalar torch.Tensor (the mean loss of the "
            f"batch) but it returned {type(loss).__name__}."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"Expected `{argument}` to return a scalar loss (the mean over the batch) but "
            f"it returned a tensor of shape {tuple(loss.shape)}; reduce it with .mean()."
        )
    if not loss.dtype.is_floating_point:
        raise ValueError(
            f"Expected `{argument}` to return a floating-point loss but got dtype {loss.dtype}."
        )
    return loss.reshape(())


def check_model_and_loss(model: Any, loss_fn: Any) -> None:
    """The first two arguments every estimator takes: a module and ``loss_fn(model, batch)``.

    Raises:
        ValueError: naming the argument, the expectation and what arrived.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"Expected argument `model` to be a torch.nn.Module but got {type(model).__name__}."
        )
    if not callable(loss_fn):
        raise ValueError(
            "Expected argument `loss_fn` to be a callable loss_fn(model, batch) -> scalar "
            f"Tensor but got {type(loss_fn).__name__}."
        )


@contextlib.contextmanager
def preserve_rng(device: torch.device) -> Iterator[None]:
    """Restore the global CPU RNG, and that of ``device`` if it is an accelerator, after the
    block: a user's loss may draw random numbers, and the caller's stream must not move."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            yield
        return
    index = device.index
    if index is None:
        index = torch.get_device_module(device.type).current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        yield
