"""Sweeps after training: a real run's snapshot directory, re-estimated, to CSV and to W&B."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slt_callbacks import LLCMonitor, SGLDConfig, sweep_snapshots
from slt_callbacks.cli import main

from .callbacks.helpers import FAST, TinyRegressor, loader, make_trainer, regression_set
from .wandb_reader import offline_environment, read_finished_run, rows_with

STEPS = [0, 4, 8]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One short training run with snapshots and an offline W&B run, for the whole module."""
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as patch:
        offline_environment(root, patch.setenv)
        if wandb.run is not None:
            wandb.finish()
        save_dir = root / "wandb"
        wandb_logger = WandbLogger(offline=True, save_dir=save_dir, project="slt-sweep-test")
        monitor = LLCMonitor(
            config=FAST, schedule=STEPS, components={"first": "net.0.*"},
            datasets={"val": loader(regression_set(32, seed=1), shuffle=False)},
            snapshot_dir=root / "snapshots",
        )
        trainer = make_trainer(root, [monitor], max_steps=8,
                               logger=[CSVLogger(root, name="csv", version=0), wandb_logger])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LLCMonitor at step")
            trainer.fit(TinyRegressor(), loader())
        run_id = wandb_logger.experiment.id
        wandb.finish()
        yield {"root": root, "monitor": monitor, "run_id": run_id, "save_dir": save_dir,
               "wandb": wandb}
        if wandb.run is not None:
            wandb.finish()


def test_sweep_with_the_runs_config_reproduces_the_monitor(trained: dict[str, Any]) -> None:
    root, monitor = trained["root"], trained["monitor"]
    csv_path = root / "out" / "llc.csv"
    # Nothing but the directory: run.pt has the module, loss and components, each snapshot
    # its config and seeds, data*.pt the batches.
    assert (root / "snapshots" / "run.pt").is_file()
    records = sweep_snapshots(root / "snapshots", csv_path=csv_path, progress=False)
    # Same weights, data, config and seeds as the monitor: the same numbers (one process,
    # CPU; float rounding only).
    assert [r.step for r in records] == STEPS
    for record, logged in zip(records, monitor.history, strict=True):
        assert record.step == logged["step"]
        assert record.llc == pytest.approx(logged["llc"], rel=1e-5, abs=1e-6)
        assert record.components["first"][0] == pytest.approx(
            logged["components"]["first"][0], rel=1e-5, abs=1e-6)
        assert record.datasets["val"][0] == pytest.approx(
            logged["datasets"]["val"][0], rel=1e-5, abs=1e-6)
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == STEPS
    assert {"llc", "llc_std", "llc/first", "llc_data/val", "diag/acceptance", "status",
            "n_beta", "file", "error"} <= set(rows[0])
    assert [float(row["llc"]) for row in rows] == pytest.approx([r.llc for r in records])
    assert all(row["error"] == "" for row in rows)


def test_sweep_with_a_new_config_appends_to_the_wandb_run(trained: dict[str, Any]) -> None:
    root, wandb = trained["root"], trained["wandb"]
    final = SGLDConfig(num_chains=2, num_draws=30, num_burnin_steps=5, step_size=5e-4)
    before = set((root / "wandb-env" / "dir").rglob("run-*.wandb")) | set(
        trained["save_dir"].rglob("run-*.wandb"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        records = sweep_snapshots(root / "snapshots", model=TinyRegressor, config=final,
                                  datasets={}, wandb_run=trained["run_id"],
                                  wandb_project="slt-sweep-test", wandb_dir=root / "resumed",
                                  progress=False)
        wandb.finish()
    (resumed,) = [p for p in (root / "resumed").rglob("run-*.wandb") if p not in before]
    run = read_finished_run(resumed.parent)
    assert run["run_id"] == trained["run_id"]
    rows = rows_with(run, "slt_sweep/llc")
    # Every snapshot is a row on the trainer/global_step axis, although the run had already
    # reached step 8: no step= was passed, which W&B would have dropped.
    assert [row["trainer/global_step"] for row in rows] == STEPS
    assert [row["slt_sweep/llc"] for row in rows] == pytest.approx([r.llc for r in records])
    assert any(m.get("glob_name") == "slt_sweep/*" and m["step_metric"] == "trainer/global_step"
               for m in run["metrics"])
    assert run["config"]["slt_sweep/sgld"] == final.to_dict()
    assert all(r.num_chains == 2 and not r.datasets for r in records)


def test_console_script_writes_the_csv(trained: dict[str, Any], capsys: Any) -> None:
    root = trained["root"]
    out = root / "cli.csv"
    status = main([
        "sweep", str(root / "snapshots"), "--model", "tests.callbacks.helpers:TinyRegressor",
        "--config", json.dumps(FAST.to_dict()),
        # The components too: their chains share the global chains' random stream.
        "--seed", "0", "--component", "first=net.0.*", "--no-datasets",
        "--csv", str(out), "--no-progress",
    ])
    assert status == 0
    assert "3 estimate(s) written" in capsys.readouterr().out
    with open(out, newline="") as file:
        rows = list(csv.DictReader(file))
    expected = [entry["llc"] for entry in trained["monitor"].history]
    assert [float(row["llc"]) for row in rows] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_legacy_snapshots_with_a_model_and_the_root_seed(trained: dict[str, Any],
                                                          tmp_path: Path) -> None:
    """Snapshots written before format version 1 (no seeds of the datasets, no run.pt)."""
    import shutil

    import torch

    monitor = trained["monitor"]
    source = trained["root"] / "snapshots"
    for name in ("data.pt", "data-val.pt"):
        shutil.copy(source / name, tmp_path / name)
    new = torch.load(source / "step_00000004.pt", weights_only=True)
    torch.save({k: new[k] for k in ("step", "state_dict", "config", "seed")},
               tmp_path / "step_00000004.pt")
    (record,) = sweep_snapshots(tmp_path, model=TinyRegressor, seed=monitor.seed,
                                components={"first": "net.0.*"}, progress=False)
    logged = monitor.history[1]
    assert record.step == 4 == logged["step"]
    assert record.llc == pytest.approx(logged["llc"], rel=1e-5, abs=1e-6)
    assert record.datasets["val"][0] == pytest.approx(logged["datasets"]["val"][0], rel=1e-5,
                                                      abs=1e-6)


def test_console_script_names_bad_flags(trained: dict[str, Any], capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["sweep", str(trained["root"] / "snapshots"), "--component", "no-equals-sign"])
    assert "Expected --component NAME=GLOB" in capsys.readouterr().err


def test_sweep_without_a_model_says_what_to_pass(tmp_path: Path) -> None:
    import torch

    torch.save({"step": 3, "state_dict": {}, "config": FAST.to_dict(), "seed": 1},
               tmp_path / "step_00000003.pt")
    with pytest.raises(ValueError, match="Expected argument `model`"):
        sweep_snapshots(tmp_path, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No snapshots"):
        sweep_snapshots(tmp_path / "empty", progress=False)
