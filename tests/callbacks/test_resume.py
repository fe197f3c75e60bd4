"""Resuming from a checkpoint continues the schedule, keeps the history, reproduces the numbers."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from slt_callbacks.callbacks import HessianTraceMonitor, LLCMonitor, WeightNormMonitor

from .helpers import FAST, TinyRegressor, make_trainer, regression_set


def monitors() -> list:
    return [
        LLCMonitor(config=FAST, components={"first": "net.0.*"}),
        HessianTraceMonitor(num_probes=4),
        WeightNormMonitor(),
        # A second instance of a class, told apart by its prefix (and so its state_key).
        WeightNormMonitor(prefix="slt/every/", schedule=1),
    ]


def fit(tmp_path, callbacks, max_steps, **kwargs):
    seed_everything(0, verbose=False)
    model = TinyRegressor(dropout=0.0)
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps)
    # Full-batch training: the resumed run sees the batches the uninterrupted one saw
    # (Lightning restarts a non-stateful DataLoader on resume), so its weights, and every
    # estimate, must be the same.
    data = DataLoader(regression_set(64), batch_size=64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        trainer.fit(model, data, **kwargs)
    return trainer


def test_resume_continues_the_schedule_and_keeps_the_history(tmp_path):
    whole = monitors()
    fit(tmp_path / "whole", whole, max_steps=12)

    first = monitors()
    trainer = fit(tmp_path / "first", first, max_steps=4)
    ckpt = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(ckpt)
    assert [h["step"] for h in first[0].history] == [0, 1, 2, 3, 4]

    # Our state is plain data: the checkpoint loads without unpickling arbitrary objects.
    states = torch.load(ckpt, weights_only=True)["callbacks"]
    assert {m.state_key for m in first} <= set(states)
    assert states[first[0].state_key]["history"] == first[0].history

    resumed = monitors()
    fit(tmp_path / "resumed", resumed, max_steps=12, ckpt_path=ckpt, weights_only=True)
    for uninterrupted, continued in zip(whole, resumed, strict=True):
        steps = [h["step"] for h in continued.history]
        assert steps == [h["step"] for h in uninterrupted.history]
        assert len(set(steps)) == len(steps)  # step 4 not measured twice
        # Seeds derive from (seed, step, rank): the numbers are those of the whole run.
        assert without_seconds(continued.history) == without_seconds(uninterrupted.history)
    assert [h["step"] for h in resumed[0].history] == [0, 1, 2, 3, 4, 6, 7, 10]


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]
