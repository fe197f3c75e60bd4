"""A LightningModule around any zoo case, for monitors in a real ``Trainer``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .models import ZooCase


class _ListDataset(Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _identity(batch: list[Any]) -> Any:
    return batch[0]


class ZooModule(pl.LightningModule):
    """Trains ``case``'s model with Adam on ``num_batches`` fixed batches (one per step)."""

    def __init__(self, case: ZooCase, *, lr: float = 1e-3, num_batches: int = 8) -> None:
        super().__init__()
        self.case = case
        self.model = case.build()
        self.lr = lr
        self.num_batches = num_batches

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.case.loss_fn(self.model, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        # Each item is already a batch; the loader hands them over one at a time.
        items = self.case.batches(self.num_batches, seed=1)
        return DataLoader(_ListDataset(items), batch_size=1, collate_fn=_identity)
