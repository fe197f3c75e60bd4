"""Lightning's own DDP, 2 CPU processes: chains split and gathered, numbers logged once.

``ddp_spawn`` starts fresh processes, so the only way to see what they did is what they wrote:
a CSVLogger in ``tmp_path``, read back after ``fit``. The model's learning rate is 0, so the
weights are the same at every step in both runs and the numbers are comparable.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything

from slt_callbacks import estimate_llc, merge_results
from slt_callbacks.callbacks import (
    HessianTraceMonitor,
    LLCMonitor,
    TrainingStepLoss,
    WeightNormMonitor,
)
from slt_callbacks.callbacks._base import derive_seed, draw_training_batches

from .helpers import FAST, TinyRegressor, loader, make_trainer, read_csv_metrics, rows_with

STEPS = [0, 2, 4]


class CleanExit(TinyRegressor):
    """Destroys the gloo process group before the worker exits. Without it, plain Lightning
    ddp_spawn on CPU (no monitors at all) aborted at interpreter exit in 2 of 10 runs here
    ("terminate called without an active exception": gloo threads still alive)."""

    def teardown(self, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
CONFIG = replace(FAST, num_chains=4, num_draws=40)


def run(tmp_path: Path, **trainer_kwargs) -> tuple[TinyRegressor, list[dict[str, str]]]:
    seed_everything(0, verbose=False)
    model = CleanExit(lr=0.0)
    monitors = [
        LLCMonitor(config=CONFIG, schedule=STEPS),
        HessianTraceMonitor(schedule=STEPS, num_probes=64),
        WeightNormMonitor(schedule=STEPS),
    ]
    trainer = make_trainer(tmp_path, monitors, max_steps=4, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        trainer.fit(model, loader())
    return model, read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")


@pytest.mark.ddp
def test_ddp_splits_chains_gathers_them_and_logs_once(tmp_path):
    model, ddp = run(tmp_path / "ddp", strategy="ddp_spawn", devices=2)
    _, single = run(tmp_path / "single")

    # Each number arrives once per scheduled step: only rank zero writes.
    for key in ("slt/llc", "slt/llc_std", "slt/hessian_trace", "slt/weight_norm"):
        assert [step for step, _ in rows_with(ddp, key)] == STEPS, key

    # The logged λ̂ is the merge of both ranks' chains: rebuild it here from the same seeds.
    batches = draw_training_batches(
        loader(), num_batches=16, owner="test",
        generator=torch.Generator().manual_seed(derive_seed(0, 0, 0, "data")),
    )  # fmt: skip
    for step, logged in rows_with(ddp, "slt/llc"):
        per_rank = [
            estimate_llc(model, TrainingStepLoss(), batches, on_failure="ignore",
                         config=replace(CONFIG, num_chains=2),
                         seed=derive_seed(0, step, rank, "llc"))
            for rank in (0, 1)
        ]  # fmt: skip
        assert logged == pytest.approx(merge_results(per_rank).llc_mean, rel=1e-6)

    # ... and agrees with one process running all four chains, within the chains' spread.
    for (_, a), (_, b), (_, sa), (_, sb) in zip(
        rows_with(ddp, "slt/llc"), rows_with(single, "slt/llc"),
        rows_with(ddp, "slt/llc_std"), rows_with(single, "slt/llc_std"), strict=True,
    ):  # fmt: skip
        assert abs(a - b) < 3 * math.hypot(sa, sb) / math.sqrt(CONFIG.num_chains)

    # The Fisher's samples are split across ranks and gathered: the same set of terms.
    assert [v for _, v in rows_with(ddp, "slt/fisher_trace")] == pytest.approx(
        [v for _, v in rows_with(single, "slt/fisher_trace")], rel=1e-6
    )
    # Hutchinson with 32 + 32 probes vs 64 in one process: within the standard errors.
    for (_, a), (_, b), (_, sa), (_, sb) in zip(
        rows_with(ddp, "slt/hessian_trace"), rows_with(single, "slt/hessian_trace"),
        rows_with(ddp, "slt/hessian_trace_stderr"), rows_with(single, "slt/hessian_trace_stderr"),
        strict=True,
    ):  # fmt: skip
        assert abs(a - b) < 4 * math.hypot(sa, sb)
    assert rows_with(ddp, "slt/weight_norm") == rows_with(single, "slt/weight_norm")


@pytest.mark.ddp
def test_ddp_with_an_executor_computes_and_logs_each_estimate_once(tmp_path):
    """strategy="ddp" (Lightning relaunches the script as rank 1, gloo on CPU) with a
    background executor: rank zero submits each scheduled step once, with all chains and
    its own seeds, and logs it once; rank one submits and keeps nothing."""
    root = Path(__file__).resolve().parents[2]
    script = Path(__file__).with_name("ddp_executor_run.py")
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (zero["world_size"], one["world_size"]) == (2, 2)
    assert zero["submitted"] == STEPS and one["submitted"] == []
    assert zero["history"] == STEPS and one["history"] == []
    rows = read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert [step for step, _ in rows_with(rows, "slt/llc")] == STEPS  # logged once each

    # The oracle: one process, all four chains, rank zero's seeds, the same weights.
    model = TinyRegressor(lr=0.0)
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    batches = draw_training_batches(
        loader(), num_batches=16, owner="test",
        generator=torch.Generator().manual_seed(derive_seed(0, 0, 0, "data")),
    )  # fmt: skip
    for (step, logged), kept in zip(rows_with(rows, "slt/llc"), zero["llc"], strict=True):
        expected = estimate_llc(model, TrainingStepLoss(), batches, config=CONFIG,
                                seed=derive_seed(0, step, 0, "llc"), on_failure="ignore")
        # One process, CPU, the same arithmetic: float rounding only.
        assert logged == pytest.approx(expected.llc_mean, rel=1e-5, abs=1e-6)
        assert kept == pytest.approx(logged, rel=1e-6)
