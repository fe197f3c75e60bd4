r"""Estimate the local learning coefficient (LLC) of a model at its current weights.

.. math:: \hat\lambda(w^*) = n\beta\,\bigl(\mathbb{E}_w[L_m(w)] - L_n(w^*)\bigr)

with the expectation over SGLD draws from the localized tempered posterior (Lau, Furman, Wang,
Murfet, Wei 2023, "The Local Learning Coefficient: A Singularity-Aware Complexity Measure").
Weight-restricted LLCs (Wang, Hoogland, van Wingerden, Furman, Murfet 2024) sample only a
component's coordinates, all others frozen at w*; they run batched together with the global
chains. A data-restricted LLC is the same call on the restricted data.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import secrets
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from .backends import SamplingProblem
from .chains import ChainTraces, evaluate_loss, run_chains
from .config import AUTOCAST_DTYPES, DTYPES, SGLDConfig
from .data import build_pool
from .diagnostics import ChainSummary, HealthCriteria, Status, assess
from .functional import (
    LossFn,
    LossModule,
    NonFiniteLossError,
    check_model_and_loss,
    frozen_tensors,
    loss_at,
    module_mode,
    preserve_rng,
    sum_reduction_reason,
    trainable_parameters,
)
from .restrict import Selector, resolve_components
from .sgld import SGLDStep, mala_log_acceptance
from .space import ComponentSpace

OnFailure = Literal["warn", "raise", "ignore"]


class LLCEstimationError(RuntimeError):
    """Raised by ``estimate_llc(..., on_failure="raise")`` for an unhealthy estimate.

    Attributes:
        result: the full :class:`LLCResult`, traces included, for inspection.
    """

    def __init__(self, result: LLCResult) -> None:
        super().__init__("; ".join(result.reasons) or result.status.value)
        self.result = result


@dataclass(frozen=True)
class LLCResult:
    """One LLC estimate, with everything needed to check or recompute it.

    Attributes:
        llc_mean: mean of λ̂ over the chains that stayed finite (nan if none did).
        llc_std: standard deviation of λ̂ across those chains (nan with fewer than two).
        loss_trace: ``(chains, num_draws)`` minibatch loss at each draw, burn-in excluded.
        baseline_trace: ``(chains, num_draws)`` loss at w* of the batch each draw used;
            ``llc_per_chain = n_beta * (loss_trace - baseline_trace).mean(1)``.
        burnin_loss_trace: ``(chains, num_burnin_steps)``.
        init_loss: L_n(w*), the mean loss over the batch pool at the snapshot.
        n_beta: nβ actually used (resolved default included).
        num_samples: samples in the batch pool (the n of L_n).
        status: the most severe :class:`Status`; ``reasons`` say why, with advice.
        summary: per-chain health figures (:class:`ChainSummary`).
        clipped_fraction: ``(chains,)`` fraction of steps whose gradient was clipped.
        components: restricted estimates by component name (same fields, no nesting).
        config: the configuration used.
        backend: ``"fast"``, ``"vmap"`` or ``"loop"`` (joined by ``+`` when components ran
            on different ones); ``backend_reason`` says why loop, or why not the fast path,
            if auto chose so. ``vmap_failed``: auto tried vmap and it could not run the
            model, so those chains ran on loop (not set when auto chose loop for a large
            model on a CPU, :func:`~slt_callbacks.core.backends.auto_backend`).
        seconds: wall time of the whole estimate.
    """

    llc_mean: float
    llc_std: float
    loss_trace: torch.Tensor
    baseline_trace: torch.Tensor
    burnin_loss_trace: torch.Tensor
    init_loss: float
    n_beta: float
    num_samples: int
    status: Status
    reasons: tuple[str, ...]
    summary: ChainSummary
    clipped_fraction: torch.Tensor
    config: SGLDConfig
    components: dict[str, LLCResult] = field(default_factory=dict)
    backend: str = "vmap"
    backend_reason: str | None = None
    seconds: float = float("nan")
    vmap_failed: bool = False

    @property
    def llc_per_chain(self) -> torch.Tensor:
        """``(chains,)`` λ̂ of each chain; nan for a diverged chain (kept in ``summary``)."""
        return self.summary.llc

    @property
    def fell_back_to_loop(self) -> bool:
        """``backend="auto"`` ran some chains on the loop backend because vmap could not
        trace the model (the core warned once). Callers pin ``backend="loop"`` for later
        estimates."""
        return self.vmap_failed and "loop" in self.backend.split("+")

    @property
    def healthy(self) -> bool:
        return self.status is Status.HEALTHY

    @property
    def acceptance(self) -> float:
        """Mean MALA-style acceptance over finite chains (see :func:`mala_log_acceptance`)."""
        return _mean_finite(self.summary.acceptance[self.summary.ok])

    @property
    def frac_below_init(self) -> float:
        """Mean fraction of draws whose loss fell below the loss at w* on the same batch."""
        return _mean_finite(self.summary.frac_below_init[self.summary.ok])

    @property
    def num_diverged(self) -> int:
        return int((~self.summary.ok).sum())

    @property
    def drift(self) -> float:
        """Mean over finite chains of λ̂(second half of draws) − λ̂(first half)."""
        s = self.summary
        return _mean_finite((s.llc_second_half - s.llc_first_half)[s.ok])

    def diagnostics(self) -> dict[str, float]:
        """Health figures as plain floats (for ``slt/diag/...`` logging)."""
        return {
            "acceptance": self.acceptance,
            "frac_below_init": self.frac_below_init,
            "drift": self.drift,
            "num_diverged": float(self.num_diverged),
            "status_code": float(self.status.code),
            "clipped_fraction": _mean_finite(self.clipped_fraction),
        }


def _mean_finite(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else float("nan")


def chain_acceptance(drift_sq: torch.Tensor, config: SGLDConfig) -> torch.Tensor:
    """``(chains,)`` mean MALA-style acceptance over the draws, from ``(chains, steps)``
    traces of ``‖∇U‖²`` (see :func:`~slt_callbacks.core.sgld.mala_log_acceptance`)."""
    log_acc = mala_log_acceptance(
        drift_sq[:, config.num_burnin_steps :].double(),
        step_size=config.step_size,
        noise_level=config.noise_level,
    )
    return log_acc.clamp(max=0).exp().mean(dim=1)


def summarize(
    loss: torch.Tensor,
    baseline: torch.Tensor,
    acceptance: torch.Tensor,
    clipped_fraction: torch.Tensor,
    *,
    init_loss: float,
    n_beta: float,
    num_samples: int,
    config: SGLDConfig,
    criteria: HealthCriteria,
    **extra: Any,
) -> LLCResult:
    """Build an :class:`LLCResult` from raw per-chain traces.

    Args:
        loss: ``(chains, steps)`` minibatch losses, burn-in first.
        baseline: ``(chains, num_draws)`` loss at w* of the batch each draw used.
        acceptance: ``(chains,)`` from :func:`chain_acceptance`.
        clipped_fraction: ``(chains,)`` fraction of steps whose gradient was clipped.
        extra: passed to :class:`LLCResult` (``backend``, ``components``, ...).
    """
    burnin = config.num_burnin_steps
    # Paired with the loss at w* of the same batch: the same expectation as
    # E[L_m(w)] - L_n(w*), without the batch-to-batch spread of the loss at w*.
    draws = loss[:, burnin:].double() - baseline.double()
    summary = _chain_summary(loss, draws, acceptance, n_beta)
    ok, llc = summary.ok, summary.llc
    kept = llc[ok]
    mean = float(kept.mean()) if kept.numel() else float("nan")
    std = float(kept.std()) if kept.numel() >= 2 else float("nan")
    status, reasons = assess(summary, mean, step_size=config.step_size, criteria=criteria)
    return LLCResult(
        llc_mean=mean,
        llc_std=std,
        loss_trace=loss[:, burnin:],
        baseline_trace=baseline,
        burnin_loss_trace=loss[:, :burnin],
        init_loss=float(init_loss),
        n_beta=float(n_beta),
        num_samples=num_samples,
        status=status,
        reasons=reasons,
        summary=summary,
        clipped_fraction=clipped_fraction.double(),
        config=config,
        **extra,
    )


def _chain_summary(
    loss: torch.Tensor, draws: torch.Tensor, acceptance: torch.Tensor, n_beta: float
) -> ChainSummary:
    """Per-chain λ̂ and health figures; a chain that ever went non-finite gets nan."""
    finite = torch.isfinite(loss)
    first_bad = torch.where(
        finite.all(dim=1), -1, (~finite).double().argmax(dim=1)
    ).long()
    ok = first_bad < 0
    half = draws.shape[1] // 2
    return ChainSummary(
        llc=torch.where(ok, n_beta * draws.mean(dim=1), torch.nan),
        diverged_at=first_bad,
        acceptance=torch.where(ok, acceptance, torch.nan),
        frac_below_init=(draws < 0).double().mean(dim=1),
        llc_first_half=n_beta * draws[:, :half].mean(dim=1),
        llc_second_half=n_beta * draws[:, half:].mean(dim=1),
    )


def estimate_llc(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    config: SGLDConfig | None = None,
    components: Mapping[str, Selector] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    on_failure: OnFailure = "warn",
    criteria: HealthCriteria | None = None,
) -> LLCResult:
    """Estimate the LLC of ``model`` at its current weights, and restricted LLCs.

    Args:
        model: any ``nn.Module``, left exactly as it was (parameters, buffers, modes,
            ``.grad``, global RNG). Its ``requires_grad`` parameters are sampled.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the scalar mean loss on ``batch``.
        data: an iterable of batches (DataLoader, list of tensors / tuples / dicts) of any
            shapes, drawn once into a pool (:mod:`~slt_callbacks.core.data`). For a
            data-restricted LLC pass the restricted data.
        config: SGLD hyperparameters; default :class:`SGLDConfig()`.
        components: weight-restricted LLCs ``{name: glob, list of globs or {parameter_name:
            bool mask}}``; their chains carry only the component's coordinates.
        seed: seeds a private generator (None: a fresh seed); or pass ``generator``.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` an unhealthy estimate.
        criteria: thresholds of the health checks.

    Returns:
        An :class:`LLCResult`; ``result.components[name]`` for each component.

    Raises:
        ValueError: bad arguments (named in the message).
        LLCEstimationError: with ``on_failure="raise"``, if any estimate is unhealthy.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> x = torch.randn(512, 3, generator=torch.Generator().manual_seed(0))
        >>> data = [(x[i:i + 128], x[i:i + 128] @ torch.ones(3, 2)) for i in range(0, 512, 128)]
        >>> loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
        >>> cfg = SGLDConfig(step_size=1e-4, num_draws=50, num_burnin_steps=10)
        >>> result = estimate_llc(model, loss_fn, data, config=cfg, seed=0, on_failure="ignore")
        >>> result.loss_trace.shape
        torch.Size([4, 50])
    """
    config = SGLDConfig() if config is None else config
    _check_arguments(model, loss_fn, config, on_failure)
    criteria = HealthCriteria() if criteria is None else criteria
    start = time.perf_counter()
    run = _prepare(model, loss_fn, data, config, components, seed, generator)
    with _sampling_context(model, config, run):
        batch_losses = evaluate_loss(run.problem.wrapper, run.tensors_at_w_star,
                                     run.problem.pool, run.problem.autocast)
        _check_init_loss(float(batch_losses.mean()))
        _warn_if_sum_reduced(run)
        traces = _run(run, config)
    result = _summarise(traces, batch_losses.cpu(), run, config, criteria,
                        time.perf_counter() - start)
    _handle_failure(result, on_failure)
    return result


@dataclass
class _Prepared:
    """Everything the chains need, built once from the user's arguments."""

    problem: SamplingProblem
    spaces: list[ComponentSpace]
    names: list[str]
    n_beta: float
    generator: torch.Generator
    device: torch.device

    @property
    def tensors_at_w_star(self) -> dict[str, torch.Tensor]:
        return self.problem.shared


def _prepare(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: SGLDConfig,
    components: Mapping[str, Selector] | None,
    seed: int | None,
    generator: torch.Generator | None,
) -> _Prepared:
    """Resolve components, draw the pool, lay out each component's coordinates."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError(
            "Expected `model` to have trainable parameters (requires_grad=True) but it has none."
        )
    resolved = resolve_components(model, components)
    device = next(iter(params.values())).device
    model_dtype = next(iter(params.values())).dtype
    dtype = _sampling_dtype(config, model_dtype)
    generator = _generator(seed, generator, device)
    cast = dtype if dtype != model_dtype else None
    pool = build_pool(data, num_batches=config.num_batches, device=device, float_dtype=cast)
    # w* is shared by every chain, once; in the model's dtype it is the model's own storage,
    # which nothing writes to.
    w_star = {name: p.detach().to(dtype) for name, p in params.items()}
    fixed = {
        name: t.to(dtype) if t.is_floating_point() and cast is not None else t
        for name, t in frozen_tensors(model).items()
    }
    problem = SamplingProblem(
        wrapper=LossModule(model, loss_fn),
        shared={**fixed, **w_star},
        pool=pool,
        autocast=AUTOCAST_DTYPES[config.autocast] if config.autocast else None,
    )
    spaces = [ComponentSpace.of(w_star)]
    spaces += [ComponentSpace.of(w_star, masks) for masks in resolved.values()]
    return _Prepared(
        problem=problem,
        spaces=spaces,
        names=list(resolved),
        n_beta=config.resolved_n_beta(pool.num_samples),
        generator=generator,
        device=device,
    )


@contextlib.contextmanager
def _sampling_context(model: nn.Module, config: SGLDConfig, run: _Prepared) -> Iterator[None]:
    """Gradients on, the model in the sampling mode, and the caller's RNG restored after."""
    with (
        preserve_rng(run.device),
        module_mode(model, train=config.train_mode),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        # Only user code that draws from the global RNG (dropout in train_mode) sees this
        # seed; preserve_rng restores the caller's state afterwards. Not torch.manual_seed:
        # it reseeds every CUDA device, and preserve_rng restores only the CPU generator and
        # the model's device.
        inner_seed = int(torch.randint(0, 2**62, (1,), generator=run.generator,
                                       device=run.device))
        torch.default_generator.manual_seed(inner_seed)
        if run.device.type == "cuda":
            torch.cuda.default_generators[run.device.index or 0].manual_seed(inner_seed)
        yield


def _check_init_loss(init_loss: float) -> None:
    if not math.isfinite(init_loss):
        # NonFiniteLossError (a ValueError): a monitor records it as a failed step.
        raise NonFiniteLossError(
            f"The loss at the current weights is {init_loss} on `data`; the LLC is "
            "undefined at a non-finite loss."
        )


def _warn_if_sum_reduced(run: _Prepared) -> None:
    """A sum-reduced loss makes λ̂ wrong by about the batch size (issue #8)."""
    with torch.no_grad():
        reason = sum_reduction_reason(
            lambda b: loss_at(run.problem.wrapper, run.tensors_at_w_star, b),
            run.problem.pool.batch(0),
        )
    if reason is not None:
        warnings.warn(f"estimate_llc: {reason}", stacklevel=3)


def _run(run: _Prepared, config: SGLDConfig) -> ChainTraces:
    traces = run_chains(
        run.problem, run.spaces,
        step=SGLDStep(
            step_size=config.step_size, n_beta=run.n_beta, localization=config.localization,
            noise_level=config.noise_level, max_grad_norm=config.max_grad_norm,
        ),
        num_chains=config.num_chains,
        num_steps=config.num_steps,
        generator=run.generator,
        backend=config.backend,
        max_memory=config.max_memory,
    )
    if traces.fallback_reason is not None:
        warnings.warn(
            "estimate_llc: vmap could not run this model, so chains ran one after another "
            f"(backend='loop'): {traces.fallback_reason}. Pass SGLDConfig(backend='loop') to "
            "skip the attempt.",
            stacklevel=3,
        )
    return traces


def _summarise(
    traces: ChainTraces,
    batch_losses: torch.Tensor,
    run: _Prepared,
    config: SGLDConfig,
    criteria: HealthCriteria,
    seconds: float,
) -> LLCResult:
    """One :class:`LLCResult` per component from the raw traces (component 0 is global)."""
    common = dict(
        init_loss=float(batch_losses.mean()), n_beta=run.n_beta,
        num_samples=run.problem.pool.num_samples,
        config=config, criteria=criteria, backend=traces.backend,
        backend_reason=traces.fallback_reason or traces.fast_path_reason, seconds=seconds,
        vmap_failed=traces.fallback_reason is not None,
    )
    steps = traces.loss.shape[-1]
    parts = [
        summarize(
            traces.loss[k],
            batch_losses[traces.orders[k, :, config.num_burnin_steps :]],
            chain_acceptance(traces.drift_sq[k], config),
            traces.clipped[k] / steps,
            **common,
        )
        for k in range(traces.loss.shape[0])
    ]
    return replace(parts[0], components=dict(zip(run.names, parts[1:], strict=True)))


def merge_results(results: Sequence[LLCResult], *, criteria: HealthCriteria | None = None
                  ) -> LLCResult:
    """Combine estimates of the same snapshot made with disjoint chains (e.g. one per DDP
    rank) into one, as if all chains had run together. Per-chain traces are concatenated
    and every statistic and health check is recomputed."""
    if not results:
        raise ValueError("Expected `results` to hold at least one LLCResult but got none.")
    first = results[0]
    criteria = HealthCriteria() if criteria is None else criteria

    def combine(parts: Sequence[LLCResult]) -> LLCResult:
        return summarize(
            torch.cat([torch.cat([p.burnin_loss_trace, p.loss_trace], 1) for p in parts]),
            torch.cat([p.baseline_trace for p in parts]),
            torch.cat([p.summary.acceptance for p in parts]),
            torch.cat([p.clipped_fraction for p in parts]),
            init_loss=parts[0].init_loss,
            n_beta=parts[0].n_beta,
            num_samples=parts[0].num_samples,
            config=replace(parts[0].config, num_chains=sum(p.config.num_chains for p in parts)),
            criteria=criteria,
            backend=parts[0].backend,
            backend_reason=parts[0].backend_reason,
            seconds=max(p.seconds for p in parts),
            vmap_failed=parts[0].vmap_failed,
        )

    merged = combine(results)
    components = {
        name: combine([r.components[name] for r in results]) for name in first.components
    }
    return replace(merged, components=components)


def _check_arguments(
    model: Any, loss_fn: Any, config: Any, on_failure: Any
) -> None:
    check_model_and_loss(model, loss_fn)
    if not isinstance(config, SGLDConfig):
        raise ValueError(f"Expected `config` to be an SGLDConfig but got {type(config).__name__}.")
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(
            f"Expected `on_failure` to be 'warn', 'raise' or 'ignore' but got {on_failure!r}."
        )


def _sampling_dtype(config: SGLDConfig, model_dtype: torch.dtype) -> torch.dtype:
    if config.dtype is not None:
        return DTYPES[config.dtype]
    if model_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return model_dtype


def _generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator:
    if generator is not None:
        if seed is not None:
            raise ValueError("Pass either `seed` or `generator`, not both.")
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"Expected `generator` to be a torch.Generator but got {type(generator).__name__}."
            )
        if generator.device.type != device.type:
            raise ValueError(
                f"Expected `generator` on the model's device ({device}) but it is on "
                f"{generator.device}."
            )
        return generator
    if seed is None:
        seed = secrets.randbits(63)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not (
        0 <= int(seed) < 2**63
    ):
        raise ValueError(f"Expected `seed` to be an int in [0, 2**63) or None but got {seed!r}.")
    seed = int(seed)
    return torch.Generator(device=device).manual_seed(seed)


def _handle_failure(result: LLCResult, on_failure: OnFailure) -> None:
    unhealthy = [("", result)] + [(f"[{n}] ", r) for n, r in result.components.items()]
    unhealthy = [(tag, r) for tag, r in unhealthy if not r.healthy]
    if not unhealthy or on_failure == "ignore":
        return
    if on_failure == "raise":
        raise LLCEstimationError(unhealthy[0][1])
    for tag, r in unhealthy:
        warnings.warn(f"estimate_llc {tag}{r.status.value}: {' '.join(r.reasons)}", stacklevel=3)
