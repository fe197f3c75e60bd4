"""The monitors from a LightningCLI YAML: nested SGLDConfig, schedules, components."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

from slt_callbacks import SGLDConfig
from slt_callbacks.callbacks import HessianTraceMonitor, LLCMonitor, WeightNormMonitor
from slt_callbacks.schedule import Schedule

pytest.importorskip("jsonargparse")

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch):
    # LightningCLI warns when it sees both `args=` and pytest's own command line.
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def monitors_of(trainer) -> dict[type, object]:
    kinds = (LLCMonitor, HessianTraceMonitor, WeightNormMonitor)
    return {type(cb): cb for cb in trainer.callbacks if isinstance(cb, kinds)}


def test_the_example_yaml_builds_the_monitors_and_trains(tmp_path):
    cli = load_example("cli").main(
        args=[
            "--config", str(EXAMPLES / "monitors.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.max_steps", "10",
            "--trainer.enable_progress_bar", "false",
        ],
        run=False,
    )  # fmt: skip
    monitors = monitors_of(cli.trainer)
    llc = monitors[LLCMonitor]
    assert llc.active_config == SGLDConfig(
        step_size=1e-4, localization=100.0, num_chains=4, num_draws=100, num_burnin_steps=50
    )
    assert llc.schedule == Schedule(log_per_decade=4, every=100)
    assert llc.components == {"encoder": "encoder.*", "head": ["head.weight", "head.bias"]}
    assert monitors[HessianTraceMonitor].schedule == Schedule.at([0, 10, 100, 400])
    assert monitors[WeightNormMonitor].schedule == Schedule.every_n(50)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [h["step"] for h in llc.history] == [0, 1, 2, 3, 6, 10]
    assert [h["step"] for h in monitors[HessianTraceMonitor].history] == [0, 10]
    assert set(llc.history[-1]["components"]) == {"encoder", "head"}


def test_config_auto_and_shorthand_schedules_from_yaml(tmp_path):
    config = tmp_path / "auto.yaml"
    config.write_text(
        """
trainer:
  logger: false
  callbacks:
    - class_path: slt_callbacks.callbacks.LLCMonitor
      init_args:
        config: auto
        calibration: {num_draws: 20, num_chains: 2}
        schedule: 25
        prefix: slt/auto/
    - class_path: slt_callbacks.callbacks.LLCMonitor
      init_args:
        config: {num_chains: 2}
        schedule: [5, 50]
"""
    )
    cli = load_example("cli").main(args=["--config", str(config)], run=False)
    auto, plain = (cb for cb in cli.trainer.callbacks if isinstance(cb, LLCMonitor))
    assert auto.config == "auto" and auto.active_config is None
    assert auto.calibration == {"num_draws": 20, "num_chains": 2}
    assert auto.schedule == Schedule.every_n(25) and auto.prefix == "slt/auto/"
    assert plain.active_config == SGLDConfig(num_chains=2)
    assert plain.schedule == Schedule.at([5, 50])
