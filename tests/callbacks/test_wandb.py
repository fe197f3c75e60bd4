"""The monitors with a real offline WandbLogger, read back from the run's files."""

from __future__ import annotations

import math
import warnings

import pytest

from slt_callbacks.callbacks import HessianTraceMonitor, LLCMonitor, WeightNormMonitor

from ..wandb_reader import offline_environment, read_finished_run, rows_with
from .helpers import FAST, TinyRegressor, loader, make_trainer


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, every directory it writes in ``tmp_path``; never the network or ``~``."""
    wandb = pytest.importorskip("wandb")
    offline_environment(tmp_path, monkeypatch.setenv)
    if wandb.run is not None:
        wandb.finish()
    yield wandb
    if wandb.run is not None:
        wandb.finish()


@pytest.mark.wandb
def test_wandb_run_gets_metrics_on_the_training_step_axis_and_the_sgld_config(
    tmp_path, offline_wandb
):
    from lightning.pytorch.loggers import WandbLogger

    save_dir = tmp_path / "save"
    logger = WandbLogger(offline=True, save_dir=save_dir, project="slt-callbacks-test")
    monitors = [
        LLCMonitor(config=FAST, schedule=[0, 3], components={"first": "net.0.*"}),
        HessianTraceMonitor(schedule=[3], num_probes=4),
        WeightNormMonitor(schedule=[3]),
    ]
    trainer = make_trainer(tmp_path, monitors, max_steps=3, logger=logger)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        trainer.fit(TinyRegressor(), loader())
    offline_wandb.finish()
    run = read_finished_run(save_dir)

    ours = [m for m in run["metrics"] if m["glob_name"] == "slt/*"]
    assert ours and all(m["step_metric"] == "trainer/global_step" for m in ours)
    assert run["config"]["slt/sgld"] == FAST.to_dict()
    assert run["config"]["slt/n_beta"] == pytest.approx(monitors[0].n_beta)
    assert run["config"]["slt/components"] == ["first"]
    assert run["config"]["slt/hessian"] == {
        "num_probes": 4, "num_batches": 1, "fisher": True, "seed": 0,
    }  # fmt: skip
    llc_rows = rows_with(run, "slt/llc")
    assert [row["trainer/global_step"] for row in llc_rows] == [0, 3]
    assert [row["slt/llc"] for row in llc_rows] == pytest.approx(
        [h["llc"] for h in monitors[0].history]
    )
    assert all(math.isfinite(row["slt/llc/first"]) for row in llc_rows)
    (hessian_row,) = rows_with(run, "slt/hessian_trace")
    assert hessian_row["trainer/global_step"] == 3
    assert hessian_row["slt/hessian_trace"] == pytest.approx(
        monitors[1].history[0]["hessian_trace"]
    )
    assert rows_with(run, "slt/weight_norm")[0]["trainer/global_step"] == 3


@pytest.mark.wandb
def test_auto_config_logs_the_calibration_sweep_as_table_and_image(tmp_path, offline_wandb):
    from lightning.pytorch.loggers import WandbLogger

    save_dir = tmp_path / "save"
    logger = WandbLogger(offline=True, save_dir=save_dir, project="slt-callbacks-test")
    # One localization: the sweep is then exactly the two step sizes.
    options = {"base": FAST, "step_sizes": [1e-5, 1e-4], "localizations": [1.0],
               "num_draws": 10, "num_burnin_steps": 5, "num_chains": 2,
               "num_power_iterations": 0}  # fmt: skip
    monitor = LLCMonitor(config="auto", schedule=[1, 2], calibration=options)
    trainer = make_trainer(tmp_path, [monitor], max_steps=2, logger=logger)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LLCMonitor")
        trainer.fit(TinyRegressor(), loader())
    offline_wandb.finish()
    run = read_finished_run(save_dir)

    (table_row,) = rows_with(run, "slt/calibration/table")
    assert table_row["slt/calibration/table"]["_type"] == "table-file"
    assert table_row["slt/calibration/table"]["nrows"] == 2
    (image_row,) = rows_with(run, "slt/calibration/plot")
    assert image_row["slt/calibration/plot"]["_type"] == "images/separated"
    # The run config names the config the estimates used (frozen or provisional).
    assert run["config"]["slt/sgld"]["step_size"] == monitor.last_result.config.step_size
