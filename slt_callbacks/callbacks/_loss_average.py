"""The training loss around a step, handed to stage detectors with each record."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["LOSS_EMA_DECAY", "LossAverage"]

LOSS_EMA_DECAY = 0.9
"""Weight of the past in the exponential moving average of the training loss."""


class LossAverage:
    """Exponential moving average of the losses ``training_step`` returned.

    Kept on the device as a tensor: :meth:`update` runs at every training step and must not
    synchronize with the host; :meth:`value` (once per estimate) does.
    """

    def __init__(self) -> None:
        self._average: torch.Tensor | float | None = None

    def update(self, outputs: Any) -> None:
        """Fold in the loss of ``outputs`` (a tensor or a dict with ``"loss"``; else nothing)."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        loss = loss.detach().float().reshape(())
        average = self._average
        if not isinstance(average, torch.Tensor) or average.device != loss.device:
            # The first loss (or one restored from a checkpoint, a float): our own copy, so
            # the in-place update below never writes into the user's loss tensor.
            self._average = loss.clone() if average is None else torch.tensor(
                float(average), dtype=loss.dtype, device=loss.device)
            if average is None:
                return
        self._average.lerp_(loss, 1.0 - LOSS_EMA_DECAY)  # one kernel per training step

    def value(self) -> float | None:
        """The average as a float, None if unknown or not finite."""
        if self._average is None:
            return None
        value = float(self._average)
        return value if math.isfinite(value) else None

    def load(self, value: float | None) -> None:
        """Restore a :meth:`value` (from a checkpoint)."""
        self._average = value
