"""LLCMonitor(executor=...): the same numbers, logged at their own steps, honest bookkeeping."""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from slt_callbacks import LLCMonitor

from .helpers import FAST, TinyRegressor, loader, make_trainer, read_csv_metrics, regression_set
from .helpers import rows_with as csv_rows_with

SCHEDULE = [0, 3, 6]


def fit(tmp_path: Path, monitor: LLCMonitor, *extra: pl.Callback, max_steps: int = 6,
        **kwargs: Any) -> pl.Trainer:
    seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [monitor, *extra], max_steps=max_steps)
    data = DataLoader(regression_set(64), batch_size=64)  # full batch: resumable exactly
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        trainer.fit(TinyRegressor(dropout=0.0), data, **kwargs)
    return trainer


def monitor(**kwargs: Any) -> LLCMonitor:
    return LLCMonitor(config=FAST, schedule=SCHEDULE, components={"first": "net.0.*"},
                      datasets={"val": loader(regression_set(32, seed=1), shuffle=False)},
                      **kwargs)


class Records(pl.Callback):
    """What a stage detector receives."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_llc_record(self, trainer: Any, pl_module: Any, record: Any) -> None:
        self.steps.append(record.step)


class Gate(Executor):
    """A thread that runs tasks only once ``open()`` was called."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.threads = ThreadPoolExecutor(max_workers=1)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def gated() -> Any:
            self.event.wait()
            return fn(*args, **kwargs)

        return self.threads.submit(gated)

    def open(self) -> None:
        self.event.set()


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory: pytest.TempPathFactory) -> LLCMonitor:
    inline = monitor()
    fit(tmp_path_factory.mktemp("inline"), inline)
    return inline


def test_background_process_pool_equals_inline(inline_run: LLCMonitor, tmp_path: Path) -> None:
    # "fork" starts in a fraction of a second; spawn is covered by tests/test_executors.py
    # and tests/test_dask.py.
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("fork")) as pool:
        background = monitor(executor=pool)
        records = Records()
        fit(tmp_path, background, records)
    assert [h["step"] for h in background.history] == SCHEDULE == records.steps
    for ours, theirs in zip(background.history, inline_run.history, strict=True):
        # Same weights, data, config and seeds (one process, CPU): float rounding only.
        assert ours["llc"] == pytest.approx(theirs["llc"], rel=1e-5, abs=1e-6)
        assert ours["components"]["first"][0] == pytest.approx(
            theirs["components"]["first"][0], rel=1e-5, abs=1e-6)
        assert ours["datasets"]["val"][0] == pytest.approx(
            theirs["datasets"]["val"][0], rel=1e-5, abs=1e-6)
        assert ours["loss"] == theirs["loss"]  # the training loss at the step, not at arrival
    rows = read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert [step for step, _ in csv_rows_with(rows, "slt/llc")] == SCHEDULE
    assert all(delay >= 0 for _, delay in csv_rows_with(rows, "slt/llc_delay_steps"))


def test_resume_resubmits_what_was_pending(inline_run: LLCMonitor, tmp_path: Path) -> None:
    gate = Gate()

    class SaveAtStep4(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 4:
                trainer.save_checkpoint(tmp_path / "step4.ckpt")
                gate.open()  # the checkpoint holds steps 0 and 3 as pending

    first = monitor(executor=gate)
    fit(tmp_path / "first", first, SaveAtStep4(), max_steps=4)
    assert [h["step"] for h in first.history] == [0, 3]  # delivered at the end of fit
    state = torch.load(tmp_path / "step4.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert [job["step"] for job in state["background"]["pending"]] == [0, 3]
    assert state["history"] == []

    with ThreadPoolExecutor(max_workers=1) as threads:
        resumed = monitor(executor=threads)
        fit(tmp_path / "resumed", resumed, max_steps=6, ckpt_path=tmp_path / "step4.ckpt",
            weights_only=True)
    assert [h["step"] for h in resumed.history] == SCHEDULE
    # The resubmitted estimates are those of the uninterrupted run (weights kept in the
    # checkpoint, seeds derived from the step).
    assert [h["llc"] for h in resumed.history] == pytest.approx(
        [h["llc"] for h in inline_run.history], rel=1e-5, abs=1e-6)


def test_skip_policy_warns_with_the_step(tmp_path: Path) -> None:
    gate = Gate()

    class OpenAtTheEnd(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 6:
                gate.open()

    skipping = monitor(executor=gate, max_pending=1, when_full="skip")
    with pytest.warns(UserWarning, match=r"step 3 was NOT estimated") as caught:
        fit(tmp_path, skipping, OpenAtTheEnd())
    assert [h["step"] for h in skipping.history] == [0, 6] or [
        h["step"] for h in skipping.history] == [0]
    assert 3 in skipping._background.skipped
    assert any("skipped so far" in str(w.message) for w in caught)
    rows = read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert 3 in [step for step, _ in csv_rows_with(rows, "slt/skipped_estimates")]


class FailsInTheWorker:
    """A loss that works where it was made and raises once unpickled (in the worker)."""

    def __init__(self) -> None:
        self.unpickled = False  # some state: pickle skips __setstate__ for an empty one

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.unpickled = True

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.unpickled:
            raise RuntimeError("boom in the worker")
        x, y = batch
        return nn.functional.mse_loss(model(x), y)


def test_worker_failure_is_reported_with_its_step_and_training_goes_on(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=1) as threads:
        failing = LLCMonitor(config=FAST, schedule=SCHEDULE, loss_fn=FailsInTheWorker(),
                             executor=threads)
        with pytest.warns(UserWarning, match=r"estimate of step 0 failed on ThreadPoolExecutor"):
            trainer = fit(tmp_path, failing)
    assert trainer.global_step == 6 and failing.history == []
    assert failing._background.num_failed == 3
    rows = read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert csv_rows_with(rows, "slt/failures/background") == [(0, 1.0), (3, 2.0), (6, 3.0)]


def test_unpicklable_loss_fails_at_train_start(tmp_path: Path) -> None:
    lock = threading.Lock()

    def loss_with_lock(model: nn.Module, batch: Any) -> torch.Tensor:
        with lock:
            return nn.functional.mse_loss(model(batch[0]), batch[1])

    with ThreadPoolExecutor(max_workers=1) as threads:
        bad = LLCMonitor(config=FAST, schedule=SCHEDULE, loss_fn=loss_with_lock,
                         executor=threads)
        with pytest.raises(ValueError, match=r"LLCMonitor\(executor='ThreadPoolExecutor'\)"):
            fit(tmp_path, bad)


def test_executor_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="`executor`"):
        LLCMonitor(executor="threads")
    with pytest.raises(ValueError, match="`when_full`"):
        LLCMonitor(executor="process", when_full="drop")


# -- review leftovers: one meaning of "inline", bad data, two monitors with one prefix ----------


def test_inline_is_none_everywhere() -> None:
    from slt_callbacks.executors import EstimateQueue, check_executor

    assert check_executor("inline") is None and check_executor(None) is None
    assert LLCMonitor(executor="inline")._background is None  # estimates in the loop
    assert EstimateQueue("inline").executor_name == "inline"
    assert EstimateQueue(None).executor_name == "inline"


def test_inline_alias_gives_the_inline_numbers(inline_run: LLCMonitor, tmp_path: Path) -> None:
    aliased = monitor(executor="inline")
    fit(tmp_path, aliased)
    assert [h["llc"] for h in aliased.history] == [h["llc"] for h in inline_run.history]


@pytest.mark.parametrize("argument", ["data", "datasets"])
def test_a_bare_tensor_as_data_is_refused_with_advice(argument: str) -> None:
    tensor = torch.randn(8, 4)
    value = tensor if argument == "data" else {"val": tensor}
    name = "`data`" if argument == "data" else "`datasets['val']`"
    with pytest.raises(ValueError, match=re.escape(name) + r" .*bare Tensor of shape \(8, 4\)"
                       r".*\[batch\]"):
        LLCMonitor(**{argument: value})


def test_sweep_refuses_a_bare_tensor_as_data(tmp_path: Path) -> None:
    from slt_callbacks import sweep_snapshots

    with pytest.raises(ValueError, match=r"`data` .*bare Tensor of shape \(8, 4\)"):
        sweep_snapshots(tmp_path, data=torch.randn(8, 4), model=nn.Linear(4, 1))


def test_two_llc_monitors_with_one_prefix_are_refused(tmp_path: Path) -> None:
    # Passed to Trainer(...): Lightning refuses equal state keys itself, at construction.
    with pytest.raises(RuntimeError, match="state_key"):
        make_trainer(tmp_path, [LLCMonitor(config=FAST), LLCMonitor(config=FAST)])
    # Added afterwards (or by configure_callbacks): the monitor refuses in setup, before
    # any training step, naming the prefix and the way out.
    trainer = make_trainer(tmp_path, [LLCMonitor(config=FAST, schedule=[0])], max_steps=1)
    trainer.callbacks.append(LLCMonitor(config=FAST, schedule=[0]))
    with pytest.raises(MisconfigurationException, match=r"2 `LLCMonitor` callbacks with "
                       r"prefix='slt/'.*own prefix"):
        trainer.fit(TinyRegressor(), loader())
    assert trainer.global_step == 0
    # Different prefixes coexist.
    both = [LLCMonitor(config=FAST, schedule=[0]), LLCMonitor(config=FAST, schedule=[0],
                                                               prefix="slt/b/")]
    fit(tmp_path / "both", both[0], both[1], max_steps=1)
    assert [len(m.history) for m in both] == [1, 1]
