"""Training with the monitors is bit-identical to training without them.

The trap this guards against: anything that draws from the global RNG between two training
steps (a shuffling sampler's next epoch, dropout) or iterates the training DataLoader, logs
through ``self.log`` or updates a user's torchmetrics object changes the run. Dropout and a
shuffled DataLoader over several epochs make any such leak show in the final weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torchmetrics
from lightning.pytorch import seed_everything

from slt_callbacks.callbacks import HessianTraceMonitor, LLCMonitor, WeightNormMonitor

from .helpers import FAST, TinyRegressor, loader, make_trainer, read_csv_metrics


class WithMetric(TinyRegressor):
    """Also keeps a torchmetrics running mean, updated in training_step, as users do."""

    def __init__(self) -> None:
        super().__init__(dropout=0.5)
        self.mean_abs_error = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.mean_abs_error((self(batch[0]) - batch[1]).abs().mean())
        self.log("mean_abs_error", self.mean_abs_error, on_step=True, on_epoch=True)
        return loss


def train(tmp_path: Path, callbacks: list) -> tuple[WithMetric, list[dict[str, str]], dict]:
    seed_everything(0, verbose=False)
    model = WithMetric()
    # 8 batches per epoch, 3 epochs: the sampler draws a fresh order from the global RNG each
    # epoch, after the monitors ran in the epochs before.
    trainer = make_trainer(tmp_path, callbacks, max_steps=20)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        trainer.fit(model, loader(shuffle=True))
    rows = read_csv_metrics(Path(trainer.logger.log_dir) / "metrics.csv")
    return model, rows, dict(trainer.callback_metrics)


def user_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows the user's logging wrote (the monitors write rows of their own)."""
    ours = [{k: v for k, v in row.items() if not k.startswith("slt/")} for row in rows]
    return [row for row in ours if any(v for k, v in row.items() if k not in ("step", "epoch"))]


def test_training_is_bit_identical_with_and_without_monitors(tmp_path):
    plain, plain_rows, plain_metrics = train(tmp_path / "plain", [])
    monitors = [
        LLCMonitor(config=FAST, components={"first": "net.0.*"}),
        HessianTraceMonitor(num_probes=4),
        WeightNormMonitor(),
    ]
    watched, watched_rows, watched_metrics = train(tmp_path / "watched", monitors)

    steps = [0, 1, 2, 3, 4, 6, 7, 10, 13, 18]  # the default log-spaced schedule
    assert all([h["step"] for h in m.history] == steps for m in monitors)
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), watched.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # The user's logged metrics, row by row, and what callbacks such as EarlyStopping read.
    assert user_rows(watched_rows) == user_rows(plain_rows)
    assert watched_metrics.keys() == plain_metrics.keys()
    assert all(torch.equal(watched_metrics[k], plain_metrics[k]) for k in plain_metrics)
    # The global RNG continues exactly where it would have.
    assert torch.equal(torch.rand(3), train_and_draw(tmp_path, []))


def train_and_draw(tmp_path: Path, callbacks: list) -> torch.Tensor:
    train(tmp_path / "again", callbacks)
    return torch.rand(3)


class Counting(TinyRegressor):
    """A training_step that updates a registered buffer in place (a step counter, as some
    curriculum or EMA code does): any call on the real module would change its state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def training_step(self, batch, batch_idx):
        self.calls += 1
        return super().training_step(batch, batch_idx)


def test_a_loss_that_mutates_module_state_leaves_it_alone(tmp_path):
    def fit(callbacks):
        seed_everything(0, verbose=False)
        model = Counting()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(LLCMonitor|estimate_llc)")
            make_trainer(tmp_path, callbacks, max_steps=6).fit(model, loader())
        return model

    plain = fit([])
    watched = fit([LLCMonitor(config=FAST, schedule=[0, 3]), WeightNormMonitor(schedule=[0, 3])])
    assert float(plain.calls) == 6.0
    assert all(torch.equal(v, watched.state_dict()[k]) for k, v in plain.state_dict().items())
