r"""Estimates off the training path: in a background process, or on a distributed engine.

An LLC estimate is a pure function of (weights, data, config, seed)::

    λ̂(step) = f(w_step, batches, SGLDConfig, seed(step))

so it does not have to run in the training loop. This module ships it elsewhere and brings
the numbers back. It knows nothing of Lightning (torch only); the monitors and the sweep
(:mod:`slt_callbacks.sweep`) sit on top of it.

What travels, and how often:

- a :class:`RunContext`, **once per run**: the model definition (the module itself, pickled
  with its weights of the moment, or a zero-argument factory), the loss, the batch pool, the
  datasets of data-restricted estimates, the components, the health criteria, the device.
  It is serialized once when the queue opens (so that a model that cannot be pickled fails
  at once, in the training process, with advice) and cached by each worker under a key;
- an :class:`EstimateJob`, **once per scheduled step**: the key, the step, the state dict
  (on the CPU, serialized with ``torch.save``), the config and the seeds.

A worker that receives a job for a key it has not seen (a second worker of a pool, a worker
that restarted, a fresh Slurm job) replies "context missing" (a short reply, not an
exception, so that executors which log failed tasks, as Dask does, print nothing; a custom
worker may raise :class:`ContextMissing` instead); the queue submits the job again with the
context attached. A one-worker pool therefore receives the context exactly
once. Executors whose every task runs in a fresh process (submitit) should use
``ship_context="always"`` (or set ``fresh_process_per_task = True`` on the adapter).

Where it runs (``executor=``):

- ``None`` (or ``"inline"``, the same): in the calling process, at once (the same code
  path, no pickling);
- ``"process"``: one local background worker, ``ProcessPoolExecutor(max_workers=1)`` with
  the *spawn* start method (fork would copy a process whose threads, CUDA context and open
  files belong to the trainer), one intra- and one inter-op torch thread and a lower CPU
  priority (``nice`` +10 and ``SCHED_IDLE``, from the moment the process exists; the
  caller's priority while it only waits for the worker, where the OS permits), started and
  shut down by the queue;
- any :class:`concurrent.futures.Executor`: a ``ProcessPoolExecutor`` of your own,
  ``dask.distributed.Client(...).get_executor()`` (a multi-node Dask cluster works the same
  way as a ``LocalCluster``), or a small adapter for Ray or submitit (README, "Estimates off
  the training path").

Constraints of a process worker: the model's class and the loss must be importable in the
worker, or picklable by value. The context is serialized with ``cloudpickle`` when it is
installed (it comes with ``dask``), which also ships lambdas and classes defined in
``__main__`` or a notebook; with the standard ``pickle``, classes must be defined at the top
level of an importable module (or of the ``__main__`` script, which must then guard its
training code with ``if __name__ == "__main__":`` as spawn re-imports it). The default loss
calls ``training_step`` on a copy of the module without a trainer (``self.log`` is silenced,
``self.trainer`` is unavailable). Python's ``Executor`` has no queue bound of its own, hence
:class:`EstimateQueue`:

- at most ``max_pending`` estimates submitted and unfinished; when a new one is due and the
  queue is full, ``when_full="wait"`` blocks the caller until one finishes (every scheduled
  step is estimated; training slows down instead), ``"skip"`` does not submit it and says so
  (:attr:`EstimateQueue.skipped`; the monitor warns and counts skipped steps);
- results are delivered **in step order** (:meth:`EstimateQueue.collect` returns the
  finished prefix of the queue), even when a later step finishes first;
- a job's exception is delivered as a :class:`Completed` with the step and the formatted
  traceback: never raised into the caller, never lost.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
)
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from multiprocessing.context import SpawnProcess
from typing import Any, Literal

import torch
from torch import nn

from ._checks import check_int, check_optional_int
from .core.config import SGLDConfig
from .core.diagnostics import HealthCriteria
from .core.functional import LossFn
from .core.llc import LLCResult, estimate_llc
from .core.restrict import Selector
from .records import LLCRecord

__all__ = [
    "Completed",
    "ContextMissing",
    "EstimateJob",
    "EstimateQueue",
    "Estimates",
    "ExecutorLike",
    "InlineExecutor",
    "RunContext",
    "estimate_all",
    "pack_state",
    "run_job",
    "sampler_key",
    "unpack_state",
]

ExecutorLike = Executor | Literal["inline", "process"] | None
"""What ``executor=`` accepts, everywhere (monitors, :class:`EstimateQueue`,
:func:`~slt_callbacks.sweep_snapshots`, ``slt-callbacks sweep --executor``): None or its
alias ``"inline"`` (in the calling process), ``"process"`` (one background worker) or a
``concurrent.futures.Executor``."""

WhenFull = Literal["wait", "skip"]

_CACHE_SIZE = 4
"""Contexts a worker keeps (one per concurrent run or monitor); the oldest is dropped."""


# --------------------------------------------------------------------------------------------
# What an estimate is: the same function inline and in a worker.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimates:
    """Everything one scheduled step produces.

    Attributes:
        step: the training step of the weights.
        result: the global estimate, with ``result.components`` (weight-restricted λ̂).
        datasets: data-restricted estimates by dataset name, at the global nβ.
        seconds: wall time of all of them, where they ran.
    """

    step: int
    result: LLCResult
    datasets: dict[str, LLCResult]
    seconds: float

    def metrics(self, prefix: str = "slt/") -> dict[str, float]:
        """The numbers a monitor logs (``{prefix}llc``, ``llc_std``, ``diag/*``, ``llc/<c>``,
        ``llc_data/<d>``...; see :class:`~slt_callbacks.LLCMonitor`)."""
        result = self.result
        metrics = {
            f"{prefix}llc": result.llc_mean,
            f"{prefix}llc_std": result.llc_std,
            f"{prefix}llc_seconds": self.seconds,
        }
        metrics.update({f"{prefix}diag/{k}": v for k, v in result.diagnostics().items()})
        for name, part in result.components.items():
            metrics[f"{prefix}llc/{name}"] = part.llc_mean
            metrics[f"{prefix}llc_std/{name}"] = part.llc_std
        for name, part in self.datasets.items():
            metrics[f"{prefix}llc_data/{name}"] = part.llc_mean
            metrics[f"{prefix}llc_data_std/{name}"] = part.llc_std
        return metrics

    def record(self, *, loss: float | None = None, source: str = "slt/") -> LLCRecord:
        """The published :class:`~slt_callbacks.records.LLCRecord` of this step."""
        result = self.result
        return LLCRecord(
            step=self.step,
            llc=result.llc_mean,
            llc_std=result.llc_std,
            status=result.status.value,
            loss=loss,
            components={n: _summary(r) for n, r in result.components.items()},
            datasets={n: _summary(r) for n, r in self.datasets.items()},
            seconds=self.seconds,
            num_chains=result.config.num_chains,
            source=source,
            sampler=sampler_key(result.config),
        )


# The fields of an SGLDConfig that set the scale of its λ̂ (not the number of chains, which
# sets only its noise, nor how the steps are computed).
_SCALE_FIELDS = ("step_size", "n_beta", "localization", "num_burnin_steps", "num_draws",
                 "noise_level", "max_grad_norm")


def sampler_key(config: SGLDConfig) -> str:
    """The settings of ``config`` that set the scale of its λ̂, as one string: the
    ``sampler`` of a record."""
    values = config.to_dict()
    return " ".join(f"{name}={values[name]}" for name in _SCALE_FIELDS)


def _summary(result: LLCResult) -> tuple[float, float, str]:
    return (result.llc_mean, result.llc_std, result.status.value)


Estimator = Callable[..., LLCResult]
"""``estimate(model, loss_fn, batches, *, config, components, seed, tag) -> LLCResult``."""


def estimate_all(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[Any],
    *,
    step: int,
    config: SGLDConfig,
    seeds: Mapping[str, int],
    datasets: Mapping[str, list[Any]] | None = None,
    components: Mapping[str, Selector] | None = None,
    criteria: HealthCriteria | None = None,
    estimate: Estimator | None = None,
) -> Estimates:
    """The global estimate (with components), then each data-restricted one at its nβ.

    Data-restricted estimates run at the global nβ: λ̂ values are only comparable at one
    temperature, and a default nβ would otherwise follow each dataset's size.

    Args:
        model, loss_fn, batches: as for :func:`~slt_callbacks.estimate_llc`.
        step: recorded in the returned :class:`Estimates`.
        config: the SGLD hyperparameters.
        seeds: ``{"llc": seed, "data/<name>": seed, ...}``, one per estimate.
        datasets: ``{name: batches}`` of data-restricted estimates.
        components: weight-restricted estimates, run with the global chains.
        criteria: thresholds of the health checks.
        estimate: replaces :func:`estimate_llc` (the monitor splits chains across DDP ranks
            this way); called with keyword ``tag`` in addition.
    """
    start = time.perf_counter()
    run = estimate or _plain_estimate
    result = run(model, loss_fn, batches, config=config, components=components,
                 seed=seeds["llc"], tag="llc", criteria=criteria)
    data_config = replace(config, n_beta=result.n_beta)
    by_data = {
        name: run(model, loss_fn, data, config=data_config, components=None,
                  seed=seeds[f"data/{name}"], tag=f"data/{name}", criteria=criteria)
        for name, data in (datasets or {}).items()
    }
    seconds = time.perf_counter() - start
    return Estimates(step=step, result=result, datasets=by_data, seconds=seconds)


def _plain_estimate(
    model: nn.Module, loss_fn: LossFn, batches: list[Any], *, config: SGLDConfig,
    components: Mapping[str, Selector] | None, seed: int, tag: str,
    criteria: HealthCriteria | None,
) -> LLCResult:
    # on_failure="ignore": whoever receives the result reports its health, once per step.
    return estimate_llc(model, loss_fn, batches, config=config, components=components,
                        seed=seed, on_failure="ignore", criteria=criteria)


# --------------------------------------------------------------------------------------------
# What travels.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    """The once-per-run part of every estimate.

    Attributes:
        model: the module (pickled once, weights included; each job loads its own weights
            into it) or a zero-argument factory that builds it in the worker.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss.
        batches: the batch pool of the global estimate (CPU tensors travel best).
        datasets: ``{name: batches}`` of data-restricted estimates.
        components: ``{name: selector}`` of weight-restricted estimates.
        criteria: thresholds of the health checks.
        device: where the worker estimates (``"cpu"``, ``"cuda"``, ``"cuda:1"``), read on the
            worker's machine.
        num_threads: ``torch.set_num_threads`` in the worker (None: leave it).
    """

    model: nn.Module | Callable[[], nn.Module]
    loss_fn: LossFn
    batches: list[Any]
    datasets: dict[str, list[Any]] = field(default_factory=dict)
    components: dict[str, Selector] | None = None
    criteria: HealthCriteria | None = None
    device: str = "cpu"
    num_threads: int | None = None


@dataclass(frozen=True)
class EstimateJob:
    """The once-per-step part: which context, which weights, which config and seeds.

    Attributes:
        key: the :class:`RunContext` this job runs in.
        step: the training step of the weights.
        weights: the state dict, serialized by :func:`pack_state`.
        config: the SGLD hyperparameters.
        seeds: ``{"llc": seed, "data/<name>": seed}``.
        frozen: names of parameters that do not train (``requires_grad=False``) at this step.
        context: the serialized context, attached on first submission or after a worker
            reported that it lacks it (:class:`ContextMissing`); None otherwise.
    """

    key: str
    step: int
    weights: bytes
    config: SGLDConfig
    seeds: dict[str, int]
    frozen: tuple[str, ...] = ()
    context: bytes | None = None


_MISSING_REPLY = b"slt_callbacks/context-missing:"  # + the key: run_job's reply


class ContextMissing(RuntimeError):
    """A worker got a job whose context it has not cached; the queue resubmits with it.

    :func:`run_job` replies instead of raising it; a worker of your own may raise it.
    """

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def pack_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as bytes, every tensor on the CPU (``torch.save`` format).

    Bytes, not tensors, cross process boundaries: tensors pickled between processes go
    through shared-memory file descriptors, which every executor handles differently.
    """
    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu", copy=True) for k, v in state.items()}, buffer)
    return buffer.getvalue()


def unpack_state(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state` (tensors only: ``weights_only=True``)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def dump_context(context: RunContext) -> bytes:
    """Serialize ``context`` once, in the submitting process, so that a failure shows there.

    Raises:
        ValueError: something in the context cannot be pickled, with what to do about it.
    """
    try:
        import cloudpickle as pickler  # by value: lambdas, classes of __main__ / notebooks
    except ImportError:
        pickler = pickle
    buffer = io.BytesIO()
    try:
        torch.save(context, buffer, pickle_module=pickler)
    except Exception as error:  # pickling raises many types (PicklingError, TypeError, ...)
        raise ValueError(
            "Cannot send the model, loss or data to a background worker: pickling failed with "
            f"{type(error).__name__}: {error}. Define the module class and `loss_fn` at the top "
            "level of an importable module (or install cloudpickle), or pass executor=None."
        ) from error
    return buffer.getvalue()


def load_context(data: bytes) -> RunContext:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------
# The worker side.
# --------------------------------------------------------------------------------------------


@dataclass
class _Built:
    """A context made ready in a worker: the model on its device, the loss, the data."""

    context: RunContext
    model: nn.Module
    backend: str | None = None  # "loop" once vmap failed for this model


_CONTEXTS: OrderedDict[str, _Built] = OrderedDict()
_CONTEXTS_LOCK = threading.Lock()  # a threaded dask worker may run two jobs at once


def register_context(key: str, context: RunContext) -> None:
    """Build ``context`` in this process and cache it under ``key``."""
    if context.num_threads is not None:
        torch.set_num_threads(context.num_threads)
    model = context.model if isinstance(context.model, nn.Module) else context.model()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected RunContext.model to be an nn.Module or a factory returning one but the "
            f"factory returned {type(model).__name__}."
        )
    model = model.to(context.device)
    with _CONTEXTS_LOCK:
        _CONTEXTS[key] = _Built(context=context, model=model)
        _CONTEXTS.move_to_end(key)
        while len(_CONTEXTS) > _CACHE_SIZE:
            _CONTEXTS.popitem(last=False)


def forget_context(key: str) -> None:
    """Drop a cached context (the run ended)."""
    with _CONTEXTS_LOCK:
        _CONTEXTS.pop(key, None)


def run_job(job: EstimateJob) -> bytes:
    """The worker's entry point: one scheduled step's :class:`Estimates`, serialized.

    Returns:
        The serialized :class:`Estimates`, or, when this process has not cached ``job.key``
        and the job does not carry the context, the "context missing" reply, which the
        queue answers by sending the job again with its context. (A reply, not an
        exception: this is the protocol, not a failure, and executors log failed tasks.)
    """
    with _CONTEXTS_LOCK:
        built = _CONTEXTS.get(job.key)
    if built is None:
        if job.context is None:
            return _MISSING_REPLY + job.key.encode()
        register_context(job.key, load_context(job.context))
        with _CONTEXTS_LOCK:
            built = _CONTEXTS[job.key]
    estimates = _run_built(built, job)
    buffer = io.BytesIO()
    torch.save(estimates, buffer)
    return buffer.getvalue()


def _run_built(built: _Built, job: EstimateJob) -> Estimates:
    model, context = built.model, built.context
    model.load_state_dict(unpack_state(job.weights))
    frozen = set(job.frozen)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    config = job.config if built.backend is None else replace(job.config, backend=built.backend)
    estimates = estimate_all(
        model, context.loss_fn, context.batches, step=job.step, config=config, seeds=job.seeds,
        datasets=context.datasets, components=context.components, criteria=context.criteria,
    )
    if estimates.result.fell_back_to_loop and config.backend == "auto":
        built.backend = "loop"  # vmap failed once (core warned); do not retry at every step
    return estimates


def _load_estimates(data: bytes) -> Estimates:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


WORKER_NICENESS = 10
"""How much lower the ``"process"`` worker's CPU priority is than the trainer's (POSIX
``nice``): where cores are scarce, training comes first and the estimates take what is
left; they still all arrive, at the latest while the monitor waits at the end of fit."""

WORKER_IDLE_CLASS = True
"""Whether the ``"process"`` worker also runs in Linux's ``SCHED_IDLE`` class (where
available): it then gets a core only when nothing else wants it. ``nice`` alone still
gave a nice-10 worker about 10% of a shared core; measured on a loaded 2-core machine the
training loop ran 1.20x slower next to a nice-10 SGLD process and 0.97x next to the same
process in ``SCHED_IDLE`` (``benchmarks/results/overhead_cpu.md``)."""


def lower_priority(pid: int = 0, niceness: int = WORKER_NICENESS, *,
                   idle: bool = WORKER_IDLE_CLASS) -> None:
    """Give process ``pid`` (0: this one) the ``nice`` value of this process plus
    ``niceness`` and, with ``idle``, move it to ``SCHED_IDLE``. Best effort: where not
    permitted or not supported, the priority stays as it was."""
    if niceness and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness)
            os.setpriority(os.PRIO_PROCESS, pid, max(target, os.getpriority(os.PRIO_PROCESS, pid)))
    if idle and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))


def _start_worker(num_threads: int | None, niceness: int) -> None:
    if num_threads is not None:
        torch.set_num_threads(num_threads)
        with contextlib.suppress(RuntimeError):  # only before the first inter-op work
            torch.set_num_interop_threads(num_threads)
    # Threads started from here on inherit the priority (Linux priorities are per thread);
    # the parent already lowered the main thread's at process start (_LowPriorityContext).
    lower_priority(0, 0, idle=WORKER_IDLE_CLASS and niceness > 0)


class _LowPriorityProcess(SpawnProcess):
    """A spawned process whose priority the parent lowers as soon as it exists, so that
    its start-up (importing torch, unpickling the run: seconds of CPU) already yields to
    training."""

    niceness = WORKER_NICENESS

    def start(self) -> None:
        super().start()
        if self.pid is not None:
            lower_priority(self.pid, self.niceness, idle=WORKER_IDLE_CLASS and self.niceness > 0)


class _LowPriorityContext:
    """The *spawn* multiprocessing context, making :class:`_LowPriorityProcess` processes."""

    def __init__(self, niceness: int) -> None:
        self._spawn = get_context("spawn")
        self._niceness = niceness
        self.processes: list[SpawnProcess] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spawn, name)

    def Process(self, *args: Any, **kwargs: Any) -> SpawnProcess:  # multiprocessing's name
        process = _LowPriorityProcess(*args, **kwargs)
        process.niceness = self._niceness  # pickled to the child with the process object
        self.processes.append(process)
        return process


class WorkerPool(ProcessPoolExecutor):
    """The ``"process"`` executor: a ``ProcessPoolExecutor`` whose workers run at a low
    priority while training runs, and at the trainer's once nothing is left to protect."""

    def __init__(self, num_threads: int | None, niceness: int) -> None:
        self._niceness = niceness
        self._context = _LowPriorityContext(niceness)
        super().__init__(max_workers=1, mp_context=self._context,  # type: ignore[arg-type]
                         initializer=_start_worker, initargs=(num_threads, niceness))

    def _alive(self) -> list[int]:
        return [p.pid for p in self._context.processes if p.pid is not None and p.is_alive()]

    def full_priority(self) -> None:
        """The trainer's priority and scheduling class for the workers: called while the
        trainer only waits for them (a full queue under ``when_full="wait"``, the end of
        fit). Best effort: leaving ``SCHED_IDLE`` or lowering ``nice`` needs a permission
        (``CAP_SYS_NICE``, or ``RLIMIT_NICE``) that an ordinary user often lacks; then the
        workers stay where they were."""
        for pid in self._alive():
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0))

    def low_priority(self) -> None:
        """Back to the workers' priority while training runs (always permitted)."""
        for pid in self._alive():
            lower_priority(pid, self._niceness, idle=WORKER_IDLE_CLASS and self._niceness > 0)

    @contextlib.contextmanager
    def waited_on(self) -> Iterator[None]:
        """:meth:`full_priority` for the block, :meth:`low_priority` after it."""
        self.full_priority()
        try:
            yield
        finally:
            self.low_priority()


# --------------------------------------------------------------------------------------------
# Executors we provide.
# --------------------------------------------------------------------------------------------


class InlineExecutor(Executor):
    """Runs each task at once in the calling thread; ``submit`` returns a finished future."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # delivered through the future, like any executor
            future.set_exception(error)
        return future


def process_executor(
    num_threads: int | None = 1, niceness: int = WORKER_NICENESS
) -> WorkerPool:
    """One spawned worker process with ``num_threads`` torch threads (intra- and inter-op),
    at a lower CPU priority (``niceness``, see :data:`WORKER_NICENESS` and
    :data:`WORKER_IDLE_CLASS`), lowered from the moment the process exists."""
    return WorkerPool(num_threads, niceness)


# --------------------------------------------------------------------------------------------
# The client side: a bounded queue, results in step order.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    """One delivered step: its :class:`Estimates`, or the error that stopped it.

    Attributes:
        step: the training step.
        estimates: the estimates (None if the job failed).
        error: ``"<ExceptionType>: message"`` and the worker's traceback (None if it ran).
        job: the job itself (to resubmit it, or to save it with a checkpoint).
        exception: the exception itself, where the executor gives it back (Dask and
            ``ProcessPoolExecutor`` re-raise the worker's exception type here).
    """

    step: int
    estimates: Estimates | None
    error: str | None = None
    job: EstimateJob | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)


@dataclass
class _Pending:
    job: EstimateJob
    future: Future[Any]


class EstimateQueue:
    """Submit estimates to an executor, at most ``max_pending`` unfinished, results in order.

    Args:
        executor: None or ``"inline"`` (in this process), ``"process"`` (one spawned worker,
            owned by the queue) or a ``concurrent.futures.Executor`` (not shut down by the
            queue).
        max_pending: estimates submitted and not finished, at most.
        when_full: ``"wait"`` (block until one finishes) or ``"skip"`` (drop the new step and
            list it in :attr:`skipped`).
        num_threads: torch threads of the ``"process"`` worker (default 1: the worker should
            not crowd the training process); with other executors, set in each worker when it
            builds the context (None: leave them).
        ship_context: ``"once"`` (default; resent only to a worker that replies it lacks
            it) or ``"always"`` (executors with a fresh process per task;
            also chosen when the executor has a true ``fresh_process_per_task`` attribute, as
            a submitit adapter should).

    Example:
        >>> queue = EstimateQueue(None)
        >>> queue.executor_name
        'inline'
    """

    def __init__(
        self,
        executor: ExecutorLike = None,
        *,
        max_pending: int = 2,
        when_full: WhenFull = "wait",
        num_threads: int | None = 1,
        ship_context: Literal["once", "always"] = "once",
    ) -> None:
        executor = check_executor(executor)
        self.max_pending = check_int("max_pending", max_pending, minimum=1)
        if when_full not in ("wait", "skip"):
            raise ValueError(
                f"Expected argument `when_full` to be 'wait' or 'skip' but got {when_full!r}."
            )
        if ship_context not in ("once", "always"):
            raise ValueError(
                "Expected argument `ship_context` to be 'once' or 'always' but got "
                f"{ship_context!r}."
            )
        self.when_full = when_full
        self.num_threads = check_optional_int("num_threads", num_threads, minimum=1)
        # Asking for the context costs a round trip per task when no task finds it cached.
        fresh = getattr(executor, "fresh_process_per_task", False) is True
        self.ship_context = "always" if fresh else ship_context
        self._spec = executor
        self._executor: Executor | None = None
        self._owned = False
        self._key: str | None = None
        self._context: bytes | None = None
        self._queue: deque[_Pending] = deque()
        self._sent_context = False
        # Set by a done-callback (on the executor's thread) when any future finishes, so that
        # collect(), called after every training batch, costs one attribute read otherwise.
        self._news = False
        #: Steps not submitted because the queue was full (``when_full="skip"``).
        self.skipped: list[int] = []

    @property
    def executor_name(self) -> str:
        """``"inline"``, ``"process"`` or the executor's class name."""
        if self._spec is None or isinstance(self._spec, str):
            return self._spec or "inline"
        return type(self._spec).__name__

    @property
    def is_open(self) -> bool:
        return self._key is not None

    @property
    def pending_jobs(self) -> list[EstimateJob]:
        """Submitted and not yet delivered, in step order."""
        return [entry.job for entry in self._queue]

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self, context: RunContext) -> None:
        """Serialize ``context`` (raising here if it cannot be) and start the executor."""
        if self.num_threads is not None and context.num_threads is None and self._spec is not None:
            context = replace(context, num_threads=self.num_threads)
        self.close()
        self._key = uuid.uuid4().hex
        if self._spec is None:
            # Inline: cached directly, never pickled (the live model, no copy).
            register_context(self._key, context)
            self._executor = InlineExecutor()
        else:
            self._context = dump_context(context)
            if self._spec == "process":
                self._executor, self._owned = process_executor(self.num_threads), True
            else:
                assert isinstance(self._spec, Executor)
                self._executor = self._spec
        self._sent_context = False

    def close(self, *, cancel: bool = False) -> None:
        """Stop an owned worker (waiting for it unless ``cancel``); forget the context."""
        if self._owned and self._executor is not None:
            self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
        if self._key is not None:
            forget_context(self._key)
        self._executor, self._owned, self._key, self._context = None, False, None, None
        self._queue.clear()

    # -- submit and collect -------------------------------------------------------------------

    def job(
        self,
        step: int,
        state: Mapping[str, torch.Tensor] | bytes,
        config: SGLDConfig,
        seeds: Mapping[str, int],
        frozen: Iterable[str] = (),
    ) -> EstimateJob:
        """A job for this queue's context (weights copied to the CPU now)."""
        if self._key is None:
            raise RuntimeError("EstimateQueue.job: call open(context) first.")
        weights = state if isinstance(state, bytes) else pack_state(state)
        return EstimateJob(key=self._key, step=int(step), weights=weights, config=config,
                           seeds=dict(seeds), frozen=tuple(sorted(frozen)))

    def submit(self, job: EstimateJob) -> bool:
        """Submit ``job``; False if it was skipped because the queue is full."""
        if self._executor is None:
            raise RuntimeError("EstimateQueue.submit: call open(context) first.")
        if self._unfinished() >= self.max_pending:
            if self.when_full == "skip":
                self.skipped.append(job.step)
                return False
            with self._caller_waits():
                while self._unfinished() >= self.max_pending:
                    wait_futures([e.future for e in self._queue if not e.future.done()],
                                 return_when=FIRST_COMPLETED)
                    self._resubmit_missing()
        ship = self.ship_context == "always" or not self._sent_context
        self._queue.append(_Pending(job, self._send(job, with_context=ship)))
        self._sent_context = True
        return True

    def collect(self) -> list[Completed]:
        """The finished estimates at the head of the queue, in step order (non-blocking).

        Cheap when nothing finished since the last call (one flag read): the monitor calls
        it after every training batch.
        """
        if not self._news:
            return []
        self._news = False  # before looking: a future finishing meanwhile sets it again
        self._resubmit_missing()
        out = []
        while self._queue and self._queue[0].future.done():
            if _is_missing(self._queue[0].future):  # replied since the resubmission above
                self._news = True  # the next call resubmits it
                break
            out.append(self._deliver(self._queue.popleft()))
        return out

    def wait(self, *, progress: bool = False, description: str = "estimates") -> list[Completed]:
        """Every pending estimate, in step order, blocking until the last one finishes.

        Our own ``"process"`` worker gets the caller's priority for the wait (where the OS
        permits, see :meth:`WorkerPool.full_priority`): the caller only waits now.
        """
        bar = _progress(len(self._queue), description) if progress and self._queue else None
        out = []
        try:
            with self._caller_waits():
                while self._queue:
                    head = self._queue[0]
                    wait_futures([head.future])
                    if _is_missing(head.future):
                        self._resubmit_missing()
                        continue
                    out.append(self._deliver(self._queue.popleft()))
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return out

    # -- internals ----------------------------------------------------------------------------

    def _caller_waits(self) -> contextlib.AbstractContextManager[None]:
        """While the caller blocks on our own worker, the worker may take the caller's
        priority (:meth:`WorkerPool.waited_on`); other executors are left alone."""
        if self._owned and isinstance(self._executor, WorkerPool):
            return self._executor.waited_on()
        return contextlib.nullcontext()

    def _unfinished(self) -> int:
        return sum(not entry.future.done() for entry in self._queue)

    def _send(self, job: EstimateJob, *, with_context: bool) -> Future[Any]:
        future = self._submit_to_executor(job, with_context=with_context)
        future.add_done_callback(self._on_done)  # runs at once if already done
        return future

    def _on_done(self, future: Future[Any]) -> None:
        self._news = True

    def _submit_to_executor(self, job: EstimateJob, *, with_context: bool) -> Future[Any]:
        assert self._executor is not None
        job = replace(job, context=self._context if with_context else None)
        try:
            return self._executor.submit(run_job, job)
        except BrokenExecutor:
            if not self._owned:
                raise
            # Our worker died (killed, out of memory): start another once and carry on.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = process_executor(self.num_threads)
            return self._executor.submit(run_job, replace(job, context=self._context))
        except Exception as error:  # e.g. a closed dask client: delivered as this step's error
            failed: Future[Any] = Future()
            failed.set_exception(error)
            return failed

    def _resubmit_missing(self) -> None:
        for entry in self._queue:
            if _is_missing(entry.future):
                entry.future = self._send(entry.job, with_context=True)

    def _deliver(self, entry: _Pending) -> Completed:
        step, future = entry.job.step, entry.future
        error = future.exception()
        if error is None:
            try:
                return Completed(step, _load_estimates(future.result()), job=entry.job)
            except Exception as load_error:  # a result that does not deserialize
                error = load_error
        return Completed(step, None, error=_describe(error), job=entry.job, exception=error)


def _is_missing(future: Future[Any]) -> bool:
    """The worker had no context for the job (:func:`run_job`'s reply, or ContextMissing)."""
    if not future.done() or future.cancelled():
        return False
    if future.exception() is not None:
        return isinstance(future.exception(), ContextMissing)
    result = future.result()
    return isinstance(result, bytes) and result.startswith(_MISSING_REPLY)


def _describe(error: BaseException) -> str:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text.strip() or f"{type(error).__name__}: {error}"


def _progress(total: int, description: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="estimate")


def check_executor(executor: Any) -> ExecutorLike:
    """``executor`` with ``"inline"`` read as None; ``ValueError`` unless it is None,
    ``"inline"``, ``"process"`` or an ``Executor``."""
    if executor is None or executor == "inline":
        return None
    if executor == "process" or isinstance(executor, Executor):
        return executor
    raise ValueError(
        "Expected argument `executor` to be None or 'inline' (in this process), 'process' or a "
        "concurrent.futures.Executor (e.g. dask.distributed.Client(...).get_executor()) but got "
        f"{executor!r}."
    )
