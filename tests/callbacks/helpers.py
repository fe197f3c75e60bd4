"""Tiny Lightning modules and trainers shared by the callback tests."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slt_callbacks import SGLDConfig

FAST = SGLDConfig(num_chains=2, num_draws=20, num_burnin_steps=5)
"""Short chains: the callback tests check plumbing, the core tests check accuracy."""


def regression_set(n: int = 128, *, seed: int = 0) -> TensorDataset:
    """``y = sum(x) + noise`` in 4 dimensions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class TinyRegressor(pl.LightningModule):
    """An MLP with dropout whose ``training_step`` logs its loss, as users write them."""

    def __init__(
        self, *, dropout: float = 0.2, lr: float = 0.05, return_dict: bool = False
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 1)
        )
        self.lr = lr
        self.return_dict = return_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss} if self.return_dict else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(dataset: TensorDataset | None = None, *, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset or regression_set(), batch_size=16, shuffle=shuffle)


def make_trainer(tmp_path: Path, callbacks: list, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        max_steps=8,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def read_csv_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a CSVLogger's ``metrics.csv`` (every row, empty cells as '')."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def rows_with(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row with ``key`` set."""
    return [(int(row["step"]), float(row[key])) for row in rows if row.get(key, "") != ""]
