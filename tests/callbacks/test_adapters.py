"""The README's Ray and submitit adapters, exactly as printed there, run against fakes.

Ray and submitit are not dependencies, so each fake implements the part of their API the
adapters call, with what matters about them: arguments cross a serialization boundary
(cloudpickle, as both do) and the task runs elsewhere (a thread here); a submitit task also
starts in a fresh process, so it finds no run context cached (the fake clears the worker
cache before each task). The code under test is the README's, read from README.md.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from slt_callbacks import LLCMonitor, executors
from slt_callbacks.executors import EstimateJob, EstimateQueue

from .test_background import SCHEDULE, fit, monitor

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(marker: str) -> str:
    """The README's ```python block that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"one README block with {marker!r}, found {len(found)}"
    return found[0]


def crossing(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Callable[[], Any]:
    """The call as a remote worker receives it: serialized and deserialized."""
    fn, args, kwargs = cloudpickle.loads(cloudpickle.dumps((fn, args, kwargs)))
    return lambda: fn(*args, **kwargs)


class FakeRay(types.ModuleType):
    """``ray.remote(**options)(fn).remote(*args).future()``, recording every submission."""

    def __init__(self) -> None:
        super().__init__("ray")
        self.pool = ThreadPoolExecutor(max_workers=1)  # one long-lived Ray worker
        self.calls: list[tuple[dict[str, Any], tuple]] = []

    def remote(self, **options: Any) -> Callable[[Callable[..., Any]], Any]:
        fake = self

        class RemoteFunction:
            def __init__(self, fn: Callable[..., Any]) -> None:
                self.fn = fn

            def remote(self, *args: Any, **kwargs: Any) -> Any:
                fake.calls.append((options, args))
                future = fake.pool.submit(crossing(self.fn, args, kwargs))
                return types.SimpleNamespace(future=lambda: future)  # an ObjectRef

        return RemoteFunction


class FakeSubmitit(types.ModuleType):
    """``submitit.AutoExecutor(folder=...)``: every task a fresh process (no cached context)."""

    def __init__(self) -> None:
        super().__init__("submitit")
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.parameters: dict[str, Any] = {}
        self.calls: list[tuple] = []
        fake = self

        class AutoExecutor:
            def __init__(self, folder: Any) -> None:
                self.folder = folder

            def update_parameters(self, **slurm: Any) -> None:
                fake.parameters.update(slurm)

            def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
                fake.calls.append(args)
                call = crossing(fn, args, kwargs)

                def fresh_process() -> Any:
                    executors._CONTEXTS.clear()  # nothing survives from an earlier task
                    return call()

                future = fake.pool.submit(fresh_process)
                return types.SimpleNamespace(result=future.result)  # a submitit Job

        self.AutoExecutor = AutoExecutor


@pytest.fixture
def fake_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeRay, FakeSubmitit]]:
    ray, submitit = FakeRay(), FakeSubmitit()
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "submitit", submitit)
    yield ray, submitit
    ray.pool.shutdown()
    submitit.pool.shutdown()


def readme_executor(marker: str, name: str) -> type:
    namespace: dict[str, Any] = {"LLCMonitor": lambda **kwargs: None}  # the block's last line
    exec(compile(readme_block(marker), "README.md", "exec"), namespace)
    return namespace[name]


@pytest.fixture(scope="module")
def inline_history(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    inline = monitor()
    fit(tmp_path_factory.mktemp("inline"), inline)
    return inline.history


def assert_same_numbers(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> None:
    assert [h["step"] for h in ours] == SCHEDULE
    for a, b in zip(ours, theirs, strict=True):
        # Same weights, data, config and seeds on one CPU: float rounding only.
        assert a["llc"] == pytest.approx(b["llc"], rel=1e-5, abs=1e-6)
        assert a["datasets"]["val"][0] == pytest.approx(b["datasets"]["val"][0], rel=1e-5,
                                                         abs=1e-6)


def test_readme_ray_adapter(fake_modules: tuple[FakeRay, FakeSubmitit], tmp_path: Path,
                            inline_history: list[dict[str, Any]]) -> None:
    ray, _ = fake_modules
    RayExecutor = readme_executor("class RayExecutor", "RayExecutor")
    background = monitor(executor=RayExecutor(num_cpus=1))
    fit(tmp_path, background)
    assert_same_numbers(background.history, inline_history)
    # One task per scheduled step, with the README's options; one long-lived worker: the
    # run context travels with the first task only.
    assert [options for options, _ in ray.calls] == [{"num_cpus": 1}] * len(SCHEDULE)
    jobs = [args[1] for _, args in ray.calls]  # (run_job, job)
    assert [job.step for job in jobs] == SCHEDULE
    assert [job.context is not None for job in jobs] == [True, False, False]


def test_readme_submitit_adapter(fake_modules: tuple[FakeRay, FakeSubmitit], tmp_path: Path,
                                 inline_history: list[dict[str, Any]]) -> None:
    _, submitit = fake_modules
    SlurmExecutor = readme_executor("class SlurmExecutor", "SlurmExecutor")
    slurm = SlurmExecutor(tmp_path / "jobs", slurm_partition="gpu", gpus_per_node=1)
    assert EstimateQueue(slurm).ship_context == "always"  # fresh_process_per_task = True
    background = monitor(executor=slurm)
    fit(tmp_path, background)
    assert_same_numbers(background.history, inline_history)
    assert submitit.parameters == {"slurm_partition": "gpu", "gpus_per_node": 1}
    jobs: list[EstimateJob] = [args[0] for args in submitit.calls]
    assert [job.step for job in jobs] == SCHEDULE
    # A fresh process per task: every task carries the run context (none asked twice).
    assert all(job.context is not None for job in jobs)


def test_an_adapter_future_that_fails_is_a_reported_step(tmp_path: Path) -> None:
    """What a Ray task error looks like to the monitor: a failed future, reported with its
    step, training going on."""

    class Failing(executors.Executor):
        def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
            future: Future[Any] = Future()
            future.set_exception(RuntimeError("RayTaskError: worker died"))
            return future

    failing = LLCMonitor(config=monitor().config, schedule=SCHEDULE, executor=Failing())
    with pytest.warns(UserWarning, match=r"estimate of step 0 failed on Failing"):
        trainer = fit(tmp_path, failing)
    assert trainer.global_step == max(SCHEDULE) and failing.history == []
