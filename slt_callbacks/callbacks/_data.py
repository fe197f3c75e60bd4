"""Which data and which loss a monitor measures with, read once and checked before any step.

The default data are drawn once from the training *dataset* with the monitor's own
generator, never through the training ``DataLoader`` (that would advance a stateful iterator
or, through a shuffling sampler, the global RNG); user data are read once and kept, so every
measurement of a run sees the same batches. The loss is checked on the first batch: a
scalar that depends on the trainable parameters (else an error), and that looks like a mean
over the batch (else a warning).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from slt_callbacks.core.config import DEFAULT_MAX_BATCHES
from slt_callbacks.core.functional import (
    LossFn,
    LossModule,
    batch_norm_reason,
    check_scalar_loss,
    frozen_tensors,
    loss_at,
    loss_depends_on_parameters,
    module_mode,
    sum_reduction_reason,
    trainable_parameters,
)
from slt_callbacks.seeds import derive_seed

from ._loss import TrainingStepLoss

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "check_batch_norm",
    "check_data_argument",
    "check_loss",
    "draw_training_batches",
    "resolve_data",
    "resolve_loss_fn",
    "take_batches",
]


def check_data_argument(argument: str, data: Any, *, optional: bool = True) -> None:
    """``data`` is an iterable of batches (or None, if ``optional``); a bare Tensor is refused:
    iterating it would yield its rows as "batches" (one sample each, without targets)."""
    if data is None and optional:
        return
    expected = f"argument `{argument}` to be {'None or ' if optional else ''}an iterable of " \
        "batches (a DataLoader or a list of batches)"
    if isinstance(data, torch.Tensor):
        raise ValueError(
            f"Expected {expected} but got a bare Tensor of shape {tuple(data.shape)}. Wrap it: "
            f"`{argument}=[batch]`, or "
            f"`{argument}=DataLoader(TensorDataset(x, y), batch_size=...)`."
        )
    if not isinstance(data, Iterable):
        raise ValueError(f"Expected {expected} but got {type(data).__name__}.")


def draw_training_batches(
    loader: Any, *, num_batches: int, generator: torch.Generator, owner: str
) -> list[Any]:
    """``num_batches`` batches from ``loader``'s map-style dataset, indices drawn with
    ``generator`` (without replacement while the dataset lasts), collated with the loader's
    ``collate_fn`` and ``batch_size``.

    The training ``DataLoader`` itself is never iterated: that would advance a stateful
    iterator or, through a shuffling sampler, the global RNG.
    """
    advice = f"Pass `data=` (a DataLoader or a list of batches) to {owner}."
    if not isinstance(loader, DataLoader):
        raise ValueError(
            f"{owner}: the default data are drawn from the trainer's train DataLoader, but the "
            f"train dataloader is {type(loader).__name__}. {advice}"
        )
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(
            f"{owner}: the default data are drawn by index from the training dataset, but it is "
            f"an iterable-style {type(dataset).__name__} without random access. {advice}"
        )
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    if not isinstance(batch_size, int) or len(dataset) == 0:
        raise ValueError(
            f"{owner}: cannot tell the batch size of the train DataLoader (batch_size="
            f"{batch_size!r}, {len(dataset)} samples). {advice}"
        )
    # At most one pass, without replacement: repeated samples would inflate n (and with it
    # the default nβ = n/log n) without adding data.
    if len(dataset) < batch_size:
        num_batches, batch_size = 1, len(dataset)
    num_batches = min(num_batches, len(dataset) // batch_size)
    order = torch.randperm(len(dataset), generator=generator)
    indices = order[: num_batches * batch_size].view(num_batches, batch_size).tolist()
    return [loader.collate_fn([dataset[i] for i in row]) for row in indices]


def take_batches(data: Iterable[Any], *, limit: int, argument: str, owner: str) -> list[Any]:
    """The first ``limit`` batches of a user's ``data``, kept for the whole run so that every
    measurement sees the same data."""
    try:
        check_data_argument(argument, data)
    except ValueError as error:
        raise ValueError(f"{owner}: {error}") from None
    batches = list(itertools.islice(iter(data), limit))
    if not batches:
        raise ValueError(
            f"{owner}: expected `{argument}` to yield at least one batch but it was empty."
        )
    return batches


def resolve_loss_fn(loss_fn: LossFn | None, pl_module: pl.LightningModule, owner: str) -> LossFn:
    """``loss_fn``, else :class:`TrainingStepLoss` (refused under manual optimization)."""
    if loss_fn is not None:
        return loss_fn
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"{owner}: the default `loss_fn` calls `training_step`, which steps the "
            "optimizers itself under manual optimization. Pass `loss_fn=lambda model, "
            "batch: ...` (the scalar mean loss of `batch`)."
        )
    return TrainingStepLoss()


def resolve_data(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    data: Iterable[Any] | None,
    *,
    argument: str,
    num_batches: int | None,
    default_num_batches: int,
    seed: int,
    owner: str,
) -> list[Any]:
    """Batches on the module's device, fixed for the whole run (the same data at every
    step keeps the curve comparable over training): ``num_batches`` (else
    ``default_num_batches``) drawn from the training set when ``data`` is None, else the
    first ``num_batches`` of ``data`` (else one pass, capped at ``DEFAULT_MAX_BATCHES``)."""
    if data is None:
        num_batches = num_batches or default_num_batches
        generator = torch.Generator().manual_seed(derive_seed(seed, 0, 0, "data"))
        batches = draw_training_batches(
            trainer.train_dataloader, num_batches=num_batches, generator=generator, owner=owner
        )
        # Training batches reach training_step through the module's (and datamodule's)
        # transfer hooks; ours take the same path, so the default loss sees the same kind.
        return [
            pl_module._apply_batch_transfer_handler(pl_module._on_before_batch_transfer(b))
            for b in batches
        ]
    limit = num_batches or DEFAULT_MAX_BATCHES
    batches = take_batches(data, limit=limit, argument=argument, owner=owner)
    return [move_data_to_device(b, pl_module.device) for b in batches]


def check_loss(
    pl_module: pl.LightningModule, loss_fn: LossFn, batch: Any, *, argument: str, owner: str
) -> None:
    """Before any training step: the loss is a finite-or-not scalar that depends on the
    trainable parameters (an error otherwise) and looks like a mean over the batch (a
    warning otherwise, see :func:`~slt_callbacks.core.functional.sum_reduction_reason`)."""
    # Through functional_call with cloned buffers, like every estimate: a loss that
    # updates module state (a counter buffer, running statistics) must not leak into
    # training from this check either.
    wrapper = LossModule(pl_module, loss_fn)
    tensors = {**frozen_tensors(pl_module), **trainable_parameters(pl_module)}
    where = f"{owner} (first batch of `{argument}`)"
    with module_mode(pl_module, train=False):
        with torch.no_grad():
            try:
                loss = loss_at(wrapper, tensors, batch)
                check_scalar_loss(loss, argument="loss_fn")
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
        if tensors and not loss_depends_on_parameters(wrapper, tensors, batch):
            raise ValueError(
                f"{where}: the loss returned by `loss_fn` does not depend on any trainable "
                "parameter of the model (or was detached), so every measurement would be "
                "0 or undefined. Is `loss_fn` calling the model it is given?"
            )
        with torch.no_grad():
            reason = sum_reduction_reason(lambda b: loss_at(wrapper, tensors, b), batch)
    if reason is not None:
        rank_zero_warn(f"{where}: {reason}")


def check_batch_norm(pl_module: pl.LightningModule, *, train_mode: bool, owner: str) -> None:
    """Say what BatchNorm layers do to the measurement in the mode it runs in."""
    reason = batch_norm_reason(pl_module, train_mode=train_mode)
    if reason is not None:
        rank_zero_warn(f"{owner}: {reason}")

