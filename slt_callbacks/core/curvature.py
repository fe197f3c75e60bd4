"""Curvature of the loss at the current weights: Hessian trace and empirical Fisher trace.

Both estimators evaluate ``loss_fn(model, batch)`` (the *mean* loss of the batch) with
:func:`torch.func.functional_call` on detached copies of the trainable parameters, so the
model's parameters, buffers, ``.grad`` attributes, train/eval flags and the global RNG are
exactly as they were afterwards. Evaluation is in eval mode (dropout off, BatchNorm on its
running statistics). Only parameters with ``requires_grad=True`` are differentiated;
frozen parameters and buffers stay fixed, like constants of the loss.

- :func:`hessian_trace`: Hutchinson's stochastic estimate of :math:`\\operatorname{tr} H`
  from Hessian-vector products (reverse-over-reverse, vectorised over probes).
- :func:`fisher_trace`: the trace of the empirical Fisher matrix from per-sample gradients.

Both return a :class:`TraceEstimate` with a standard error; report it next to the value.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from slt_callbacks._checks import check_int, check_optional_int
from slt_callbacks.core.functional import (
    LossFn,
    LossModule,
    check_scalar_loss,
    frozen_tensors,
    loss_at,
    math_attention,
    module_mode,
    preserve_rng,
    trainable_parameters,
)

__all__ = [
    "TraceEstimate",
    "fisher_trace",
    "hessian_trace",
    "math_attention",
    "top_hessian_eigenvalue",
]


@dataclass(frozen=True)
class TraceEstimate:
    """A Monte Carlo estimate of a matrix trace.

    Attributes:
        value: the estimate, the mean of ``samples``.
        stderr: the standard error of the mean, ``std(samples, ddof=1) / sqrt(num_samples)``;
            ``nan`` when ``num_samples == 1`` (one draw says nothing about its spread).
        num_samples: how many terms were averaged (probes for the Hessian, data points for
            the Fisher).
        samples: the per-term values, shape ``(num_samples,)``, float64 on the CPU.
    """

    value: float
    stderr: float
    num_samples: int
    samples: torch.Tensor = field(repr=False, compare=False)

    @classmethod
    def from_samples(cls, samples: torch.Tensor) -> TraceEstimate:
        """Summarise per-term values (any device; one host transfer)."""
        host = samples.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        n = host.numel()
        # torch.std with one element warns and returns nan; say nan without the warning.
        stderr = float(host.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan
        return cls(value=float(host.mean()), stderr=stderr, num_samples=n, samples=host)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_probes: int = 16,
    generator: torch.Generator,
    chunk_size: int | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate of the trace of the Hessian of the loss at the current weights.

    With :math:`L(w)` = ``loss_fn(model, batch)`` and :math:`H = \\nabla^2_w L(w)` over the
    trainable parameters,

    .. math::

        \\operatorname{tr} H \\approx \\frac{1}{m} \\sum_{k=1}^{m} v_k^\\top H v_k,
        \\qquad v_k \\in \\{-1, +1\\}^d \\text{ i.i.d. Rademacher},

    unbiased because :math:`\\mathbb{E}[v v^\\top] = I` (Hutchinson 1989). Among i.i.d.
    probe distributions Rademacher has the least variance,
    :math:`\\operatorname{Var}[v^\\top H v] = 2 \\sum_{i \\ne j} H_{ij}^2`, so the estimate is
    exact when :math:`H` is diagonal (Avron & Toledo 2011); the relative error otherwise
    falls as :math:`1/\\sqrt{m}`. Each :math:`H v` is a reverse-over-reverse product
    (:func:`torch.func.vjp` of :func:`torch.func.grad`), vectorised over the probes with
    :func:`torch.func.vmap`.

    Args:
        model: the network; left exactly as it was.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss of the batch.
        batch: whatever ``loss_fn`` takes.
        num_probes: number of Rademacher probes :math:`m`, a positive int.
        generator: the only source of randomness; on the parameters' device.
        chunk_size: probes per vectorised chunk (``None``: all at once). Smaller values bound
            memory at the cost of speed; the result does not depend on it.

    Returns:
        A :class:`TraceEstimate` whose ``samples`` are the :math:`v_k^\\top H v_k`.

    Raises:
        ValueError: a bad ``num_probes``, ``generator`` (type or device) or ``chunk_size``; a
            model without trainable parameters; a loss that is not a floating-point scalar.

    References:
        M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
        Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18(3), 1989.
        H. Avron and S. Toledo, "Randomized algorithms for estimating the trace of an
        implicit symmetric positive semi-definite matrix", J. ACM 58(2), 2011.

    Example:
        >>> import torch.nn.functional as F
        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def loss_fn(m, b):
        ...     return F.mse_loss(m(b[0]), b[1])
        >>> est = hessian_trace(model, loss_fn, (x, y), num_probes=32,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> est.num_samples
        32
    """
    check_int("num_probes", num_probes)
    check_optional_int("chunk_size", chunk_size)
    params = _trainable(model)
    _check_generator(generator, params)
    primals = {name: p.detach() for name, p in params.items()}
    with _second_order(model, primals):
        hvp = _linearised_hvp(model, loss_fn, batch, primals)
        probes = {
            name: _rademacher((num_probes, *p.shape), p, generator) for name, p in primals.items()
        }

        def quadratic_form(v: dict[str, torch.Tensor]) -> torch.Tensor:
            (hv,) = hvp(v)
            return sum((v[name] * hv[name]).sum() for name in v)

        # randomness="different": a training_step may draw random numbers (global RNG, which
        # the surrounding fork_rng isolates); vmap refuses random ops by default.
        values = torch.func.vmap(quadratic_form, chunk_size=chunk_size, randomness="different")(
            probes
        )  # (probe,)
    return TraceEstimate.from_samples(values)


def fisher_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    chunk_size: int | None = None,
) -> TraceEstimate:
    """Trace of the empirical Fisher matrix from per-sample gradients.

    With :math:`\\ell_i(w)` = ``loss_fn(model, batch_i)``, where ``batch_i`` is the
    :math:`i`-th sample kept as a batch of size one, and :math:`g_i = \\nabla_w \\ell_i(w)`
    over the trainable parameters,

    .. math::

        \\operatorname{tr} \\hat F
        = \\operatorname{tr} \\Big(\\frac{1}{n} \\sum_{i=1}^{n} g_i g_i^\\top\\Big)
        = \\frac{1}{n} \\sum_{i=1}^{n} \\lVert g_i \\rVert^2 .

    The :math:`1/n` makes it comparable in scale to the Hessian of the *mean* loss (for a
    well-specified likelihood model near a minimum both approach the Fisher information of
    one sample). It is not the Fisher of the mean loss's gradient, which would be
    :math:`1/n` times smaller. Per-sample gradients come from :func:`torch.func.vmap` over
    :func:`torch.func.grad`. Every tensor leaf of ``batch`` (a tensor, or a tuple, list or
    dict of them, nested) is sliced along dim 0 and must have the same length :math:`n`
    there; non-tensor leaves and 0-dim tensors are passed to every sample unchanged.

    Args:
        model: the network; left exactly as it was.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss of the batch.
        batch: a tensor or a (nested) tuple/list/dict with tensor leaves.
        chunk_size: samples per vectorised chunk (``None``: all at once), to bound memory.

    Returns:
        A :class:`TraceEstimate` whose ``samples`` are the :math:`\\lVert g_i \\rVert^2`; its
        ``stderr`` is their standard deviation over :math:`\\sqrt n`.

    Raises:
        ValueError: a bad ``chunk_size``; a batch without batched tensor leaves or whose
            leaves disagree on the batch size; a model without trainable parameters; a loss
            that is not a floating-point scalar.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def loss_fn(m, b):
        ...     return ((m(b[0]) - b[1]) ** 2).mean()
        >>> fisher_trace(model, loss_fn, (x, y)).num_samples
        8
    """
    check_optional_int("chunk_size", chunk_size)
    params = _trainable(model)
    leaves, spec = pytree.tree_flatten(batch)
    batched = _batched_leaf_indices(leaves)
    primals = {name: p.detach() for name, p in params.items()}
    fixed = frozen_tensors(model)
    wrapper = LossModule(model, loss_fn)

    def sample_loss(
        trainable: dict[str, torch.Tensor], rows: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        # Under vmap each row has lost dim 0; unsqueeze so loss_fn still sees a batch of one.
        sample = list(leaves)
        for index, row in zip(batched, rows, strict=True):
            sample[index] = row.unsqueeze(0)
        return loss_at(wrapper, {**fixed, **trainable}, pytree.tree_unflatten(sample, spec))

    def squared_grad_norm(rows: tuple[torch.Tensor, ...]) -> torch.Tensor:
        grads = torch.func.grad(lambda t: sample_loss(t, rows).reshape(()))(primals)
        return sum(g.square().sum() for g in grads.values())

    rows = tuple(leaves[i] for i in batched)
    with (
        module_mode(model, train=False),
        preserve_rng(next(iter(primals.values())).device),
        # First order only, but vmap over a fused attention kernel is not supported either.
        math_attention(),
        _pure_loss_required(),
    ):
        _check_loss(wrapper, fixed, primals, batch)
        values = torch.func.vmap(
            squared_grad_norm, chunk_size=chunk_size, randomness="different"
        )(rows)  # (sample,)
    return TraceEstimate.from_samples(values)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"Expected `model` to be a torch.nn.Module but got {type(model).__name__}."
        )
    params = trainable_parameters(model)
    if not params:
        raise ValueError(
            "Expected `model` to have at least one parameter with requires_grad=True but all "
            "of its parameters are frozen (or it has none)."
        )
    return params


@contextlib.contextmanager
def _second_order(model: nn.Module, primals: dict[str, torch.Tensor]) -> Iterator[None]:
    """Where Hessian-vector products are taken: eval mode, the caller's RNG preserved, grad
    enabled, the math attention kernel (the fused ones have no double backward), and
    functorch's in-place-mutation error explained."""
    with (
        module_mode(model, train=False),
        preserve_rng(next(iter(primals.values())).device),
        torch.enable_grad(),
        math_attention(),
        _pure_loss_required(),
    ):
        yield


def _linearised_hvp(
    model: nn.Module, loss_fn: LossFn, batch: Any, primals: dict[str, torch.Tensor]
) -> Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor]]]:
    """``v -> (H v,)`` at ``primals``, reverse-over-reverse (forward-over-reverse fails with
    ``F.mse_loss``). The gradient is linearised once, so each product costs one backward.
    The loss is first checked to be a scalar, outside the transforms, so a per-sample loss
    is reported as such rather than as an obscure transform error."""
    fixed = frozen_tensors(model)
    wrapper = LossModule(model, loss_fn)

    def loss(trainable: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_at(wrapper, {**fixed, **trainable}, batch).reshape(())

    _check_loss(wrapper, fixed, primals, batch)
    _, hvp = torch.func.vjp(torch.func.grad(loss), primals)
    return hvp


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    generator: torch.Generator,
    num_iterations: int = 20,
    rtol: float = 1e-3,
) -> float:
    r"""The largest-magnitude eigenvalue of the Hessian of ``loss_fn`` at the current weights,
    by power iteration on Hessian-vector products.

    Iteration stops when the Rayleigh quotient :math:`v^\top H v` changes by less than
    ``rtol`` relatively. The model is left untouched (evaluated with
    :func:`torch.func.functional_call` in eval mode) and the global RNG is not used.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss.
        batch: one batch as ``loss_fn`` takes it.
        generator: draws the start vector; on the parameters' device.
        num_iterations: at most this many products.
        rtol: relative tolerance of the stopping test.

    Returns:
        The Rayleigh quotient at the last iterate (signed: negative at a saddle whose
        steepest direction is downhill); 0.0 when :math:`H v` vanishes.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).sum(-1).mean()
        >>> round(top_hessian_eigenvalue(model, loss_fn, x,
        ...                              generator=torch.Generator().manual_seed(0)), 3)
        2.0
    """
    check_int("num_iterations", num_iterations)
    primals = {name: p.detach() for name, p in _trainable(model).items()}
    with _second_order(model, primals):
        hvp = _linearised_hvp(model, loss_fn, batch, primals)
        v = {
            n: torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
            for n, p in primals.items()
        }
        v = _scaled(v, 1.0 / _norm(v))
        value = 0.0
        for _ in range(num_iterations):
            (hv,) = hvp(v)
            new = float(sum((v[n] * hv[n]).sum() for n in v))
            norm = _norm(hv)
            if norm == 0.0 or not math.isfinite(norm):
                return 0.0 if norm == 0.0 else float("nan")
            converged = abs(new - value) <= rtol * abs(new)
            value = new
            if converged:
                break
            v = _scaled(hv, 1.0 / norm)
    return value


def _norm(v: dict[str, torch.Tensor]) -> float:
    return math.sqrt(float(sum(t.square().sum() for t in v.values())))


def _scaled(v: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    return {n: t * factor for n, t in v.items()}


def _check_loss(
    wrapper: LossModule,
    fixed: dict[str, torch.Tensor],
    primals: dict[str, torch.Tensor],
    batch: Any,
) -> None:
    # One plain forward outside the functorch transforms, so that a per-sample loss
    # (reduction="none") is reported as such rather than as an obscure transform error.
    with torch.no_grad():
        check_scalar_loss(loss_at(wrapper, {**fixed, **primals}, batch))


def _batched_leaf_indices(leaves: list[Any]) -> list[int]:
    indices = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not indices:
        raise ValueError(
            "Expected `batch` to contain at least one tensor with a batch dimension (dim 0) "
            f"but its leaves are {[type(x).__name__ for x in leaves]}."
        )
    sizes = {int(leaves[i].shape[0]) for i in indices}
    if len(sizes) != 1:
        shapes = [tuple(leaves[i].shape) for i in indices]
        raise ValueError(
            "Expected every tensor in `batch` to have the same size along dim 0 (the samples) "
            f"but got shapes {shapes}."
        )
    return indices


def _rademacher(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device, dtype=like.dtype)
    return bits.mul_(2).sub_(1)


def _check_generator(generator: Any, params: dict[str, nn.Parameter]) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            "Expected `generator` to be a torch.Generator (e.g. "
            f"torch.Generator(device).manual_seed(0)) but got {type(generator).__name__}."
        )
    for name, p in params.items():
        if not _same_device(generator.device, p.device):
            raise ValueError(
                f"Expected `generator` to be on the parameters' device {p.device} but it is on "
                f"{generator.device} (parameter {name!r}); create it with "
                f"torch.Generator(device={str(p.device)!r})."
            )


def _same_device(a: torch.device, b: torch.device) -> bool:
    # An index-less device ("cuda") means the current one; do not reject it on that alone.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextlib.contextmanager
def _pure_loss_required() -> Iterator[None]:
    """Turn torch.func's error for a loss that writes module state in place (a buffer
    incremented in ``training_step``) into one that says what to do about it."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if "mutate" not in text and "captured" not in text:
            raise
        raise RuntimeError(
            "`loss_fn` updates module state in place (e.g. a buffer incremented in "
            "training_step), which torch.func transforms cannot differentiate through. Pass a "
            f"`loss_fn` that only computes the loss. ({text.splitlines()[0]})"
        ) from err
