"""The monitors from a LightningCLI YAML config, without writing any Python for them.

Run (CPU, about a minute; numbers go to ./runs/cli as CSV)::

    python examples/cli.py fit --config examples/monitors.yaml

``examples/monitors.yaml`` lists the callbacks under ``trainer.callbacks`` with ``class_path``
and ``init_args``, including a nested ``config:`` (an :class:`~slt_callbacks.SGLDConfig`) and a
``schedule:`` (a :class:`~slt_callbacks.Schedule`, a list of steps, or an int). Any value can be
overridden on the command line, e.g. ``--trainer.max_steps 100``.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TeacherData(pl.LightningDataModule):
    """Regression on a random two-layer teacher network: ``y = teacher(x) + noise``.

    Args:
        num_samples: size of the training set.
        input_dim: dimension of ``x``.
        batch_size: training batch size.
        noise: standard deviation of the label noise.
        seed: seed of the teacher and of the samples.
    """

    def __init__(
        self,
        num_samples: int = 2048,
        input_dim: int = 8,
        batch_size: int = 64,
        noise: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        g = torch.Generator().manual_seed(hp.seed)
        x = torch.randn(hp.num_samples, hp.input_dim, generator=g)
        w1 = torch.randn(hp.input_dim, 4, generator=g) / math.sqrt(hp.input_dim)
        w2 = torch.randn(4, 1, generator=g)
        y = torch.tanh(x @ w1) @ w2 + hp.noise * torch.randn(hp.num_samples, 1, generator=g)
        self.train_set = TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)


class StudentMLP(pl.LightningModule):
    """A student MLP; ``training_step`` returns the loss, so the monitors need no loss_fn.

    Args:
        input_dim: dimension of ``x`` (match the data module).
        hidden: width of the hidden layers.
        lr: Adam learning rate.
    """

    def __init__(self, input_dim: int = 8, hidden: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` as on the command line."""
    return LightningCLI(
        StudentMLP,
        TeacherData,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
