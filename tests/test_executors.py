"""Estimates off the training path: same numbers wherever they run, honest queue bookkeeping."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from typing import Any

import pytest
import torch
from torch import nn

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.executors import (
    _CONTEXTS,
    ContextMissing,
    EstimateQueue,
    RunContext,
    estimate_all,
)

CONFIG = SGLDConfig(num_chains=2, num_draws=20, num_burnin_steps=5, step_size=1e-3)
SEEDS = {"llc": 11, "data/half": 12}


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def make_context(model: nn.Module | None = None, **overrides: Any) -> RunContext:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=g)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    options: dict[str, Any] = dict(
        model=model if model is not None else make_model(),
        loss_fn=mse,
        batches=batches,
        datasets={"half": batches[:2]},
        components={"first": "0.*"},
    )
    options.update(overrides)
    return RunContext(**options)


def weights_at(step: int) -> dict[str, torch.Tensor]:
    """Distinct weights per step, as training would produce."""
    torch_gen = torch.Generator().manual_seed(100 + step)
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch_gen) * 0.5)
    return model.state_dict()


def run_steps(queue: EstimateQueue, steps: list[int]) -> list[Any]:
    for step in steps:
        assert queue.submit(queue.job(step, weights_at(step), CONFIG, SEEDS))
    return queue.wait()


@pytest.fixture(scope="module")
def process_results() -> Iterator[list[Any]]:
    """One spawned worker for the module (starting one takes seconds)."""
    queue = EstimateQueue("process", max_pending=2)
    queue.open(make_context())
    try:
        yield run_steps(queue, [0, 5, 9])
    finally:
        queue.close()


def direct(step: int) -> Any:
    """The oracle: the estimates computed here, on a module holding those weights."""
    model = make_model()
    model.load_state_dict(weights_at(step))
    context = make_context(model)
    return estimate_all(model, mse, context.batches, step=step, config=CONFIG, seeds=SEEDS,
                        datasets=context.datasets, components=context.components)


def assert_same(a: Any, b: Any) -> None:
    # Same weights, data, config and seed, both on CPU with one thread: the only possible
    # difference is float rounding of a different kernel choice, far below 1e-5 relative.
    assert a.step == b.step
    torch.testing.assert_close(a.result.loss_trace, b.result.loss_trace, rtol=1e-5, atol=1e-6)
    assert a.result.llc_mean == pytest.approx(b.result.llc_mean, rel=1e-5, abs=1e-6)
    assert set(a.result.components) == {"first"} == set(b.result.components)
    assert a.result.components["first"].llc_mean == pytest.approx(
        b.result.components["first"].llc_mean, rel=1e-5, abs=1e-6)
    assert a.datasets["half"].llc_mean == pytest.approx(
        b.datasets["half"].llc_mean, rel=1e-5, abs=1e-6)
    assert a.datasets["half"].n_beta == a.result.n_beta  # data estimates at the global nβ


def test_process_worker_equals_direct_estimate(process_results: list[Any]) -> None:
    assert [done.step for done in process_results] == [0, 5, 9]
    assert all(done.error is None for done in process_results), process_results
    for done in process_results:
        assert_same(done.estimates, direct(done.step))
    # Different steps really are different weights (the comparison is not vacuous).
    first, second = (done.estimates.result.llc_mean for done in process_results[:2])
    assert first != second


def test_process_pool_and_inline_equal_direct_estimate() -> None:
    expected = {step: direct(step) for step in (0, 5)}
    # A pool of the user's own. "fork" here only because it starts in a fraction of a second
    # (the "process" executor above covers spawn); two workers, so that the second one to get
    # a job may have no context yet and ask for it.
    pool = ProcessPoolExecutor(max_workers=2, mp_context=get_context("fork"))
    try:
        for spec in (None, pool):
            queue = EstimateQueue(spec, max_pending=2)
            queue.open(make_context())
            done = run_steps(queue, [0, 5])
            queue.close()
            assert [d.error for d in done] == [None, None]
            for d in done:
                assert_same(d.estimates, expected[d.step])
    finally:
        pool.shutdown()


def test_estimate_all_is_estimate_llc() -> None:
    model = make_model()
    model.load_state_dict(weights_at(3))
    context = make_context(model)
    ours = direct(3).result
    core = estimate_llc(model, mse, context.batches, config=CONFIG, components={"first": "0.*"},
                        seed=SEEDS["llc"], on_failure="ignore")
    assert ours.llc_mean == core.llc_mean


# -- the queue's bookkeeping, with executors whose timing the test controls -------------------


class ManualExecutor(Executor):
    """Futures that finish when the test says so (``finish(i)``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.futures: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.calls.append((fn, args))
        future: Future[Any] = Future()
        self.futures.append(future)
        return future

    def finish(self, index: int) -> None:
        fn, args = self.calls[index]
        try:
            self.futures[index].set_result(fn(*args))
        except Exception as error:
            self.futures[index].set_exception(error)


class FreshProcessExecutor(Executor):
    """Runs in this thread but forgets every cached context first: each task behaves like a
    fresh worker process (a Slurm job, a restarted worker)."""

    def __init__(self, raise_missing: bool = False) -> None:
        self.with_context: list[bool] = []
        self.exceptions: list[BaseException | None] = []
        self.raise_missing = raise_missing  # a worker of the user's own that raises instead

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        _CONTEXTS.clear()
        self.with_context.append(args[0].context is not None)
        future: Future[Any] = Future()
        try:
            if self.raise_missing and args[0].context is None:
                raise ContextMissing(args[0].key)
            future.set_result(fn(*args))
        except Exception as error:
            future.set_exception(error)
        self.exceptions.append(future.exception())
        return future


def test_results_are_delivered_in_step_order() -> None:
    executor = ManualExecutor()
    # "always": every job can run first (else a job that overtakes the first one finds no
    # context, which the next test covers).
    queue = EstimateQueue(executor, max_pending=3, ship_context="always")
    queue.open(make_context())
    for step in (1, 2, 3):
        queue.submit(queue.job(step, weights_at(step), CONFIG, SEEDS))
    executor.finish(2)  # step 3 first
    executor.finish(1)
    assert queue.collect() == []  # step 1 is still running: nothing may overtake it
    executor.finish(0)
    assert [done.step for done in queue.collect()] == [1, 2, 3]
    assert queue.collect() == [] and queue.pending_jobs == []
    queue.close()


def test_skip_when_full_records_the_step() -> None:
    executor = ManualExecutor()
    queue = EstimateQueue(executor, max_pending=1, when_full="skip")
    queue.open(make_context())
    assert queue.submit(queue.job(1, weights_at(1), CONFIG, SEEDS))
    assert not queue.submit(queue.job(2, weights_at(2), CONFIG, SEEDS))
    assert queue.skipped == [2]
    executor.finish(0)
    assert queue.submit(queue.job(3, weights_at(3), CONFIG, SEEDS))  # room again
    executor.finish(1)
    assert [done.step for done in queue.wait()] == [1, 3]
    queue.close()


def test_wait_when_full_blocks_until_a_slot_frees() -> None:
    started = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as threads:
        queue = EstimateQueue(threads, max_pending=1, when_full="wait")
        queue.open(make_context())
        started.set()
        for step in (1, 2, 3):
            assert queue.submit(queue.job(step, weights_at(step), CONFIG, SEEDS))
            assert len([j for j in queue.pending_jobs]) <= 3
        done = queue.wait()
        queue.close()
    assert [d.step for d in done] == [1, 2, 3] and queue.skipped == []
    assert all(d.error is None for d in done)


@pytest.mark.parametrize("raise_missing", [False, True], ids=["reply", "raise"])
def test_context_is_shipped_once_and_again_to_a_fresh_worker(raise_missing: bool) -> None:
    executor = FreshProcessExecutor(raise_missing)
    queue = EstimateQueue(executor, max_pending=2)
    queue.open(make_context())
    done = run_steps(queue, [1, 2])
    queue.close()
    assert [d.error for d in done] == [None, None]
    # Job 1 carried the context; job 2 did not, was refused, and went again with it.
    assert executor.with_context == [True, False, True]
    assert_same(done[1].estimates, direct(2))
    # run_job's refusal is a reply, not a task failure (Dask would log one as an ERROR); a
    # worker of the user's own may raise ContextMissing instead.
    refused = ContextMissing if raise_missing else type(None)
    assert [type(e) for e in executor.exceptions] == [type(None), refused, type(None)]


def test_collect_resubmits_a_refused_job_with_its_context() -> None:
    """A job refused for want of its context is never delivered as a result: collect()
    sends it again with the context."""
    executor = ManualExecutor()
    queue = EstimateQueue(executor, max_pending=3)
    queue.open(make_context())
    queue.submit(queue.job(1, weights_at(1), CONFIG, SEEDS))
    queue.submit(queue.job(2, weights_at(2), CONFIG, SEEDS))
    executor.finish(0)
    assert [d.step for d in queue.collect()] == [1]
    _CONTEXTS.clear()  # the worker of job 2 has never seen the context
    executor.finish(1)
    assert queue.collect() == []  # refused: resent with the context, nothing delivered
    assert executor.calls[2][1][0].context is not None
    executor.finish(2)
    (second,) = queue.collect()
    assert second.step == 2 and second.error is None
    assert_same(second.estimates, direct(2))
    queue.close()


def test_worker_error_is_delivered_with_its_step_and_the_queue_goes_on() -> None:
    executor = ManualExecutor()
    queue = EstimateQueue(executor, max_pending=3)
    queue.open(make_context())
    broken = {"0.weight": torch.zeros(3, 3)}  # wrong keys and shapes: load_state_dict raises
    queue.submit(queue.job(1, broken, CONFIG, SEEDS))
    queue.submit(queue.job(2, weights_at(2), CONFIG, SEEDS))
    executor.finish(0)
    executor.finish(1)
    first, second = queue.wait()
    assert first.step == 1 and first.estimates is None
    assert "state_dict" in first.error and "RuntimeError" in first.error
    assert second.step == 2 and second.error is None and second.estimates is not None
    queue.close()


def test_unpicklable_context_fails_when_the_queue_opens() -> None:
    lock = threading.Lock()

    def loss_with_lock(model: nn.Module, batch: Any) -> torch.Tensor:
        with lock:
            return mse(model, batch)

    queue = EstimateQueue(ManualExecutor())
    with pytest.raises(ValueError, match="Cannot send the model, loss or data"):
        queue.open(make_context(loss_fn=loss_with_lock))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"executor": "thread"}, "`executor`"),
        ({"when_full": "drop"}, "`when_full`"),
        ({"max_pending": 0}, "`max_pending`"),
        ({"ship_context": "never"}, "`ship_context`"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EstimateQueue(**kwargs)


def test_executor_that_says_fresh_process_per_task_gets_the_context_every_time() -> None:
    executor = FreshProcessExecutor()
    executor.fresh_process_per_task = True  # as a submitit adapter declares
    queue = EstimateQueue(executor, max_pending=2)
    queue.open(make_context())
    done = run_steps(queue, [1, 2])
    queue.close()
    assert [d.error for d in done] == [None, None]
    assert executor.with_context == [True, True]  # no refused round trip


def worker_scheduling() -> tuple[int, int | None, int, int]:
    """nice, scheduling class and torch threads of the process this runs in."""
    import os

    policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
    return (os.getpriority(os.PRIO_PROCESS, 0), policy, torch.get_num_threads(),
            torch.get_num_interop_threads())


@pytest.mark.skipif(not hasattr(__import__("os"), "SCHED_IDLE"), reason="Linux only")
def test_the_process_worker_yields_the_cpu_to_training() -> None:
    import os

    from slt_callbacks.executors import WORKER_NICENESS, process_executor

    parent = os.getpriority(os.PRIO_PROCESS, 0)
    pool = process_executor(num_threads=1)
    try:
        nice, policy, threads, interop = pool.submit(worker_scheduling).result(timeout=300)
        # Lowered by the parent at process start, so torch's import already yielded.
        assert nice == min(19, parent + WORKER_NICENESS) and policy == os.SCHED_IDLE
        assert (threads, interop) == (1, 1)
        # While the trainer waits for it: the trainer's priority where the OS permits, else
        # unchanged ...
        pool.full_priority()
        after = pool.submit(worker_scheduling).result(timeout=300)[:2]
        assert after in ((parent, os.SCHED_OTHER), (nice, policy))
        # ... and low again when training resumes (always permitted).
        pool.low_priority()
        assert pool.submit(worker_scheduling).result(timeout=300)[:2] == (nice, policy)
    finally:
        pool.shutdown()


class CountingFuture(Future):
    """A future that counts how often it is asked whether it is done."""

    asked = 0

    def done(self) -> bool:
        CountingFuture.asked += 1
        return super().done()


def test_the_poll_after_each_batch_touches_no_future_until_one_finished() -> None:
    """collect() runs after every training batch: with nothing finished it must not walk
    the pending futures (a done-callback raises a flag instead)."""
    executor = ManualExecutor()
    queue = EstimateQueue(executor, max_pending=8, ship_context="always")
    queue.open(make_context())
    for step in range(4):
        queue.submit(queue.job(step, weights_at(step), CONFIG, SEEDS))
    counting = [CountingFuture() for _ in executor.futures]
    for entry, future in zip(queue._queue, counting, strict=True):
        entry.future = future
        future.add_done_callback(queue._on_done)
    executor.futures = counting
    CountingFuture.asked = 0
    queue._news = False
    for _ in range(1000):
        assert queue.collect() == []
    assert CountingFuture.asked == 0
    executor.finish(0)
    assert [done.step for done in queue.collect()] == [0]
    assert CountingFuture.asked > 0
    queue.close()


def test_the_sampler_key_changes_with_what_sets_the_scale_of_llc_only():
    from slt_callbacks import SGLDConfig
    from slt_callbacks.executors import sampler_key

    base = SGLDConfig(step_size=1e-4, localization=100.0)
    # The number of chains sets the noise, the backend how steps are computed: same scale.
    assert sampler_key(base) == sampler_key(SGLDConfig(step_size=1e-4, localization=100.0,
                                                       num_chains=8, backend="loop"))
    for changed in ({"step_size": 5e-5}, {"localization": 1.0}, {"n_beta": 10.0},
                    {"num_draws": 400}, {"num_burnin_steps": 50}, {"noise_level": 0.5},
                    {"max_grad_norm": 1.0}):
        other = SGLDConfig(**{"step_size": 1e-4, "localization": 100.0, **changed})
        assert sampler_key(other) != sampler_key(base), changed
