"""LLCMonitor(config="auto") in a real Trainer: the hook of slt_callbacks.core.autocal."""

from __future__ import annotations

import warnings

from slt_callbacks import LLCMonitor
from slt_callbacks.callbacks import _calibration as calibration_module

from .helpers import FAST, TinyRegressor, loader, make_trainer, read_csv_metrics, rows_with

OPTIONS = {"base": FAST, "step_sizes": [1e-5, 1e-4], "num_draws": 10, "num_burnin_steps": 5,
           "num_chains": 2, "num_power_iterations": 0, "localizations": [1.0]}


def fit_recording(tmp_path, monkeypatch, schedule):
    """Fit with config="auto"; return the monitor, the steps calibrate() ran at, the
    provisional flags logged and the warnings."""
    steps = []
    real = calibration_module.calibrate
    holder = {}

    def recording(model, *args, **kwargs):
        steps.append(holder["trainer"].global_step)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(calibration_module, "calibrate", recording)
    monitor = LLCMonitor(config="auto", schedule=schedule, calibration=OPTIONS)
    holder["trainer"] = trainer = make_trainer(tmp_path, [monitor], max_steps=max(schedule) + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegressor(), loader())
    provisional = rows_with(read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv"),
                            "slt/calibration/provisional")
    return monitor, steps, provisional, [str(w.message) for w in caught]


def test_auto_never_calibrates_at_step_zero_and_says_estimates_are_provisional(
        tmp_path, monkeypatch):
    """At initialisation (and, for this tiny run, every step after: TinyRegressor is still
    far from a minimum, so no estimate is healthy) the monitor estimates with the
    provisional config, logs provisional = 1, warns and writes the status to the run
    config; it never calibrates at step 0."""
    monitor, steps, provisional, messages = fit_recording(tmp_path, monkeypatch, [0, 1, 2])
    assert 0 not in steps
    assert len(monitor.history) == 3 and provisional[0] == (0, 1.0)
    assert any("config='auto'" in m and "provisional" in m for m in messages)
    if not steps:
        assert monitor.active_config is None and all(v == 1.0 for _, v in provisional)


def test_auto_calibrates_at_a_late_first_step_and_records_the_decision(tmp_path, monkeypatch):
    """A schedule that starts after step 0 with nothing before it calibrates at once."""
    monitor, steps, provisional, _ = fit_recording(tmp_path, monkeypatch, [2, 3])
    assert steps[0] == 2
    policy = monitor._run.config.auto.policy
    assert policy is not None and policy.attempts == len(steps) <= policy.max_attempts
    assert monitor.last_calibration is not None
    if policy.status == "calibrated":
        assert monitor.active_config == monitor.last_calibration.config
        assert provisional[0] == (2, 0.0)
    else:
        assert provisional[0] == (2, 1.0)
