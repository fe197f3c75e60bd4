"""Every monitor in a real ``Trainer`` on every zoo architecture (issue #8, item 6).

For each architecture of :mod:`tests.zoo.models` the four monitors (LLC with per-head
components, Hessian/Fisher traces, weight norms, stage transitions) run for a few training
steps. The run must reach its end; training must be bit-identical to the same run without
monitors (every tensor of the ``state_dict``, BatchNorm running statistics included); every
estimate must be finite or carry a status that says why not.

The chains and probes are tiny (plumbing, not accuracy: 2 chains x 10 draws, one probe). Run
as a script to print the zoo table (architecture x monitor: runs / backend / seconds per
estimate / untouched)::

    python -m tests.zoo.test_zoo_monitors
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from slt_callbacks import SGLDConfig
from slt_callbacks.callbacks import HessianTraceMonitor, LLCMonitor, WeightNormMonitor
from slt_callbacks.callbacks.stages import StageTransitionMonitor

from ..callbacks.helpers import make_trainer
from .lightning import ZooModule
from .models import CASES, ZooCase, case

try:
    from slt_callbacks import head_components
except ImportError:  # another branch adds it; a layer glob stands in until then
    head_components = None

TINY = SGLDConfig(num_chains=2, num_draws=10, num_burnin_steps=2, step_size=1e-5)
"""Plumbing, not accuracy: enough draws for a mean and a spread."""

MAX_STEPS = 3
SCHEDULE = [0, 2]


def components(module: ZooModule) -> dict[str, Any]:
    """Two heads of the first attention layer when the architecture has heads (and
    ``head_components`` exists), else the first block as a glob."""
    if head_components is not None:
        try:
            heads = head_components(module, layers=[0], heads=[0, 1])
        except ValueError:  # no attention layout: a CNN
            heads = {}
        if heads:
            return heads
    first = next(n for n, _ in module.named_parameters() if ".0." in n)
    return {"block0": first[: first.index(".0.") + 3] + "*"}


def trainer(root: Path, callbacks: list[pl.Callback]) -> pl.Trainer:
    return make_trainer(root, callbacks, max_steps=MAX_STEPS, deterministic=True)


def timed(monitor: Any) -> list[float]:
    """Wall seconds of each of ``monitor``'s measurements (the instance's ``_measure``)."""
    seconds: list[float] = []
    measure = monitor._measure

    def wrapper(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return measure(*args)
        finally:
            seconds.append(time.perf_counter() - start)

    monitor._measure = wrapper
    return seconds


def run_case(zoo: ZooCase, root: Path) -> dict[str, dict[str, Any]]:
    """Fit ``zoo`` with and without the monitors; one row per monitor for the table."""
    plain = ZooModule(zoo, num_batches=MAX_STEPS)
    trainer(root / "plain", []).fit(plain)
    expected = {k: v.clone() for k, v in plain.state_dict().items()}

    module = ZooModule(zoo, num_batches=MAX_STEPS)
    llc = LLCMonitor(config=TINY, schedule=SCHEDULE, components=components(module))
    hessian = HessianTraceMonitor(schedule=SCHEDULE, num_probes=1)
    norms = WeightNormMonitor(schedule=SCHEDULE)
    stages = StageTransitionMonitor(verbose=False)
    monitors = {"llc": llc, "hessian": hessian, "norms": norms, "stages": stages}
    seconds = {name: timed(m) for name, m in monitors.items() if name != "stages"}
    fitted = trainer(root / "monitored", list(monitors.values()))
    with warnings.catch_warnings():
        # Mid-training estimates are rarely healthy, BatchNorm models are told about their
        # mode, vmap falls back to the loop backend on some models: all expected here.
        warnings.simplefilter("ignore")
        fitted.fit(module)

    state = module.state_dict()
    untouched = set(state) == set(expected) and all(
        torch.equal(state[k], expected[k]) for k in expected
    )
    backend = llc.last_result.backend if llc.last_result is not None else "-"
    rows = {
        "llc": dict(history=llc.history, backend=backend, seconds=seconds["llc"],
                    values=[h["llc"] for h in llc.history]
                    + [c[0] for h in llc.history for c in h["components"].values()]),
        "hessian": dict(history=hessian.history, backend="math attention",
                        seconds=seconds["hessian"],
                        values=[h["hessian_trace"] for h in hessian.history]
                        + [h.get("fisher_trace", 0.0) for h in hessian.history]),
        "norms": dict(history=norms.history, backend="-", seconds=seconds["norms"],
                      values=[h["weight_norm"] for h in norms.history]),
        "stages": dict(history=stages.records if hasattr(stages, "records") else [],
                       backend="-", seconds=[], values=[]),
    }  # fmt: skip
    for row in rows.values():
        row.update(steps=fitted.global_step, untouched=untouched)
    return rows


def flagged(entry: dict[str, Any]) -> bool:
    return entry.get("status", "healthy") != "healthy"


def check(rows: dict[str, dict[str, Any]]) -> None:
    for name, row in rows.items():
        assert row["steps"] == MAX_STEPS, f"{name}: the run stopped at {row['steps']}"
        assert row["untouched"], "training differs with the monitors"
        if name == "stages":
            # The stage monitor saw every LLC record (it reads them, healthy or not).
            assert [r.step for r in row["history"]] == SCHEDULE
            continue
        assert [h["step"] for h in row["history"]] == SCHEDULE, name
        for entry in row["history"]:
            # Finite, or flagged with a status that says why not. (A standard error over one
            # probe is NaN by definition: one draw says nothing about its spread.)
            numbers = [v for k, v in entry.items() if isinstance(v, float)
                       and k != "loss" and not k.endswith("stderr")]  # fmt: skip
            assert all(math.isfinite(v) for v in numbers) or flagged(entry), (name, entry)
    llc = rows["llc"]
    assert all(math.isfinite(v) for v in llc["values"]) or all(
        flagged(h) or any(c[2] != "healthy" for c in h["components"].values())
        for h in llc["history"]
    )


@pytest.mark.parametrize("name", list(CASES))
def test_every_monitor_runs_on_every_architecture_and_leaves_training_alone(name, tmp_path):
    check(run_case(case(name), tmp_path))


def table(root: Path) -> str:
    lines = ["| architecture | monitor | runs | backend | seconds per estimate | untouched |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, zoo in CASES.items():
        try:
            rows = run_case(zoo, root / name)
        except Exception as error:
            lines.append(f"| {name} | all | no: {type(error).__name__}: {error} | | | |")
            continue
        for monitor, row in rows.items():
            statuses = sorted({h.get("status", "ok") for h in row["history"]
                               if isinstance(h, dict)})  # fmt: skip
            runs = "yes" if row["steps"] == MAX_STEPS else "no"
            runs += f" ({', '.join(statuses)})" if statuses else ""
            per = (f"{sum(row['seconds']) / len(row['seconds']):.2f}" if row["seconds"]
                   else "-")  # fmt: skip
            lines.append(f"| {name} | {monitor} | {runs} | {row['backend']} | {per} | "
                         f"{'yes' if row['untouched'] else 'NO'} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        print(table(Path(folder)))
