"""The default loss of every monitor: the user's own ``training_step``, made quiet."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["TrainingStepLoss"]


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _quiet(module: nn.Module) -> Iterator[None]:
    """Make ``self.log``/``self.log_dict`` and every torchmetrics ``Metric`` inert for the block.

    Called from a callback hook, ``self.log("train_loss", ...)`` would overwrite the value the
    user logged for the real training batch (and feed the progress bar, ``EarlyStopping`` and
    ``ModelCheckpoint``). A ``Metric`` updated in ``training_step`` would count our
    evaluations as training batches (and its in-place state updates cannot run under
    ``torch.func`` transforms), so its ``update`` does nothing and calling it returns None.
    Instance attributes are shadowed and restored, the classes are not touched.
    """
    shadows = [(module, "log", _no_op), (module, "log_dict", _no_op)]
    for metric in _metrics(module):
        shadows += [(metric, "forward", _no_op), (metric, "update", _no_op)]
    saved = [(obj, name, obj.__dict__.get(name, _MISSING)) for obj, name, _ in shadows]
    for obj, name, value in shadows:
        obj.__dict__[name] = value
    try:
        yield
    finally:
        for obj, name, previous in reversed(saved):
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous


_MISSING = object()


def _metrics(module: nn.Module) -> list[nn.Module]:
    try:
        from torchmetrics import Metric
    except ImportError:  # torchmetrics is a dependency, but the guard costs nothing
        return []
    return [m for m in module.modules() if isinstance(m, Metric)]


class TrainingStepLoss:
    """``loss_fn(model, batch) = model.training_step(batch, 0)``, with logging silenced.

    The default loss of every monitor: the loss the user trains on, without asking for it
    twice. ``self.log``/``self.log_dict`` and torchmetrics ``Metric`` objects are inert during
    the call, so the user's logged metrics are unchanged. ``training_step``
    may return the loss tensor or a dict with a ``"loss"`` entry. Anything else it does (state
    it mutates, prints) happens at every evaluation: pass ``loss_fn=`` for such modules.

    Usable outside a ``Trainer`` too, e.g. to recompute an estimate from a weight snapshot::

        estimate_llc(module, TrainingStepLoss(), batches, config=config, seed=seed)

    Raises:
        ValueError: ``training_step`` returned something else (e.g. ``None`` under manual
            optimization); pass ``loss_fn=`` to the monitor instead.
    """

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with _quiet(model):
            output = model.training_step(batch, 0)
        if isinstance(output, Mapping) and "loss" in output:
            output = output["loss"]
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                "The default `loss_fn` calls `training_step(batch, 0)` and expects a loss tensor "
                f"or a dict with 'loss', but it returned {type(output).__name__}. Pass "
                "`loss_fn=lambda model, batch: ...` (the scalar mean loss of `batch`) to the "
                "monitor."
            )
        return output

    def __repr__(self) -> str:
        return "TrainingStepLoss()"
