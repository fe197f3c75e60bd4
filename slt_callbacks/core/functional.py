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
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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


# --------------------------------------------------------------------------------------------
# Checks on the user's loss that every estimator (and every monitor, in setup) can call.
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(ValueError):
    """The loss at the current weights w* is NaN or infinite: no estimate is defined there.

    A ``ValueError`` (it used to be a plain one); its own type lets a monitor tell "the model
    diverged at this step" from a configuration mistake and keep training going.
    """


SUM_REDUCTION_THRESHOLD = 1.5
""":func:`sum_reduction_reason` flags ``(L(A) + L(B)) / L(A ∪ B)`` below this (mean: 2, sum: 1)."""


def split_batch(batch: Any) -> tuple[Any, Any] | None:
    """``batch`` cut into its first and second half along dim 0, or None when that is not
    well defined (no tensor with a batch dimension, tensors that disagree on dim 0, or fewer
    than two samples). Non-tensor leaves and 0-dim tensors go to both halves."""
    leaves, spec = torch.utils._pytree.tree_flatten(batch)
    batched = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.dim() > 0]
    sizes = {int(leaves[i].shape[0]) for i in batched}
    if len(sizes) != 1 or (size := sizes.pop()) < 2:
        return None
    half = size // 2
    first, second = list(leaves), list(leaves)
    for i in batched:
        first[i], second[i] = leaves[i][:half], leaves[i][half:]
    unflatten = torch.utils._pytree.tree_unflatten
    return unflatten(first, spec), unflatten(second, spec)


def sum_reduction_reason(loss_of: Callable[[Any], torch.Tensor], batch: Any) -> str | None:
    r"""Why ``loss_of`` looks like a *sum* over the batch rather than a mean, or None.

    The rule: cut ``batch`` into halves A and B (along dim 0) and compute

    .. math:: r = \frac{L(A) + L(B)}{L(A \cup B)} .

    For a mean over samples of equal halves :math:`r = 2` exactly (the full-batch mean is the
    average of the two half means), for a sum :math:`r = 1` exactly, whatever the data, the
    model or the noise in the per-sample losses: the test compares the loss with itself, not
    with an expected value, so one batch suffices and no tolerance has to be tuned. Odd batch
    sizes move a mean's :math:`r` only by the unequal halves (≈ 2 ± 1/size); a mean plus a
    constant term (a weight penalty) keeps :math:`r = 2`; a sum plus a penalty lies between 1
    and 2. Anything below the midpoint :data:`SUM_REDUCTION_THRESHOLD` = 1.5 is flagged.
    Skipped (None) when the batch cannot be halved, a loss is not finite, or the full loss is
    ~0 (the ratio says nothing there); a per-token mean of a language model has :math:`r = 2`
    as well (its halves have equal token counts without padding).

    Why it matters: λ̂ = nβ (E L − L(w*)) assumes L is a mean; a sum over m samples is m
    times larger, so the posterior is m times sharper and λ̂ comes out wrong by a large factor
    (≈ 19× on a 16-sample batch, labelled healthy), with no other symptom.

    Args:
        loss_of: ``batch -> scalar loss`` at fixed weights (no gradient needed).
        batch: one batch, as the loss takes it.

    Returns:
        A sentence naming the ratio and what to do, or None when the loss looks like a mean.
    """
    halves = split_batch(batch)
    if halves is None:
        return None
    full, first, second = (float(loss_of(b)) for b in (batch, *halves))
    if not all(math.isfinite(v) for v in (full, first, second)) or abs(full) < 1e-12:
        return None
    ratio = (first + second) / full
    if ratio >= SUM_REDUCTION_THRESHOLD:
        return None
    return (
        f"`loss_fn` looks sum-reduced over the batch: the losses of the two halves of a batch "
        f"add up to {ratio:.2f}× the loss of the whole batch (a mean gives 2, a sum 1). λ̂ "
        "assumes the mean loss per sample (nβ carries the sample size); a sum makes it wrong "
        "by about the batch size. Use a mean (e.g. reduction='mean', or divide by the batch "
        "size)."
    )


def loss_depends_on_parameters(
    wrapper: LossModule, tensors: Mapping[str, torch.Tensor], batch: Any
) -> bool:
    """Whether the loss on ``batch`` has a gradient path to at least one of ``tensors`` that
    requires grad (a loss that ignores the model, or detaches it, has none). One forward, no
    backward: nothing is written to ``.grad``."""
    with torch.enable_grad():
        loss = loss_at(wrapper, tensors, batch)
    return isinstance(loss, torch.Tensor) and loss.requires_grad


def batch_norm_reason(model: nn.Module, *, train_mode: bool | None) -> str | None:
    """What BatchNorm layers do to an estimate in the mode it runs in, or None without them.

    In eval mode (the default, ``train_mode=False``) BatchNorm normalises with its running
    statistics: the loss is a fixed function of w, as the estimator assumes, but it is not
    the function being trained; early in training the running statistics lag the weights,
    the eval-mode loss at w* can sit far above the minimum the weights are near, and λ̂ can
    read hugely negative (λ̂ ≈ −15,000 has been reported on a small CNN). In train mode
    BatchNorm uses each batch's own statistics: the function training optimises, but a
    sample's loss depends on the rest of its batch (and dropout is on too).
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    names = [name or type(m).__name__ for name, m in model.named_modules()
             if isinstance(m, _BatchNorm)]  # fmt: skip
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if train_mode:
        mode = (
            "It is evaluated in train mode (SGLDConfig(train_mode=True)): BatchNorm uses each "
            "batch's own statistics, the function training optimises, but the loss of a sample "
            "then depends on the rest of its batch and dropout is active."
        )
    else:
        mode = (
            "It is evaluated in eval mode: BatchNorm normalises with its running statistics, a "
            "fixed function of w but not the one being trained; while the running statistics "
            "lag the weights (early in training) the loss at w* is not at a minimum of that "
            "function and λ̂ can read hugely negative (≈ -15,000 reported on a small CNN)."
        )
    return (
        f"The model has BatchNorm layers ({shown}). {mode} Choose with "
        "SGLDConfig(train_mode=...): False (default) once the running statistics have settled "
        "(λ̂ of the model you would deploy), True to measure the function being trained."
    )


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to its plain-math implementation.

    The fused kernels (flash, memory-efficient, and the CPU flash kernel PyTorch picks by
    default) have a backward but no double backward: a Hessian-vector product through them
    fails with ``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
    not implemented`` (Hugging Face GPT-2, Llama, ``nn.TransformerEncoder``...). The math
    kernel is ordinary differentiable tensor algebra, so every order of derivative exists;
    it is slower and uses more memory, which is the price of a correct second derivative.
    The setting is thread-local and restored on exit, so training never sees it.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield
