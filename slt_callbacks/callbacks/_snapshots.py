"""``LLCMonitor(snapshot_dir=...)``: what a sweep after training needs, written during it.

Once per run (train start, global rank zero): the batches (``data.pt``, ``data-<name>.pt``)
and, if they pickle, the module, loss and components (``run.pt``). At each estimate: the
weights, config, seeds and frozen parameters (``step_<step:08d>.pt``). The format is
:mod:`slt_callbacks.snapshots`'; :func:`~slt_callbacks.sweep_snapshots` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.executors import dump_context
from slt_callbacks.snapshots import save_batches, save_run, save_snapshot

from ._background import run_context

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["SnapshotWriter", "save_run_files"]


class SnapshotWriter:
    """Writes a monitor's snapshot files on global rank zero (nothing without a directory).

    Args:
        directory: where; None: no snapshots.
        owner: the monitor's name, for messages.
    """

    def __init__(self, directory: str | os.PathLike[str] | None, owner: str) -> None:
        self.directory = None if directory is None else Path(directory)
        self.owner = owner

    def setup(self, trainer: pl.Trainer) -> None:
        if self.directory is not None and trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)

    def save_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, **context: Any) -> None:
        """The once-per-run files (see :func:`save_run_files`)."""
        if self.directory is not None and trainer.is_global_zero:
            save_run_files(self.directory, pl_module, owner=self.owner, **context)

    def save_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        step: int,
        config: SGLDConfig,
        seeds: Mapping[str, int],
    ) -> None:
        """The weights of the estimate at ``step``, with what reproduces it."""
        if self.directory is None or not trainer.is_global_zero:
            return
        frozen = tuple(n for n, p in pl_module.named_parameters() if not p.requires_grad)
        save_snapshot(self.directory, step=step, state_dict=pl_module.state_dict(),
                      config=config, seeds=dict(seeds), frozen=frozen)  # fmt: skip


def save_run_files(
    directory: Path,
    pl_module: pl.LightningModule,
    *,
    owner: str,
    **context: Any,
) -> None:
    """``data.pt``, ``data-<name>.pt`` and, if the run pickles, ``run.pt`` in ``directory``
    (see :mod:`slt_callbacks.snapshots`): what a sweep after training needs besides the
    weights."""
    ready = run_context(pl_module, **context)
    save_batches(directory, ready.batches, ready.datasets)
    try:
        save_run(directory, dump_context(ready))
    except ValueError as error:
        rank_zero_info(
            f"{owner}: no run.pt in {directory} ({error}); pass model= (and loss_fn=) to "
            "sweep_snapshots for a sweep after training."
        )
