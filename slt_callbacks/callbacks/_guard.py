"""No fault of ours stops a training run: a measurement that fails is a logged result.

A monitor measures a model that is still training. At some step its loss may be NaN, a kernel
may lack the double backward a Hessian needs, the chains may blow up, memory may run out. None
of that is the user's training going wrong, and none of it may end a run that has been going
for three days. The policy, shared by every monitor:

- the failure is caught around the monitor's own computation (never around training, never
  around ``setup``, where configuration mistakes are raised as they should be);
- it becomes a :class:`Failure` with a *kind* (``nonfinite_loss``, ``no_double_backward``,
  ``out_of_memory``, ``error``) and a reason that says what happened and what to do;
- the step's record says so (``status="failed"``, ``failure``, ``reason``), its metrics are NaN
  and ``<prefix>failures/<monitor>`` counts failed measurements (visible in CSV too);
- a warning is issued once per kind, not once per step;
- ``on_failure="raise"`` re-raises the original exception instead, for those who want it.

Under DDP every rank must reach the same collectives, so each rank's local work is wrapped by
:func:`attempt`, the outcomes are gathered, and :func:`raise_if_any_failed` turns a failure on
any rank into the same :class:`MeasurementFailed` on all of them.

Only numerical and runtime errors are caught (``RuntimeError``, which includes torch's errors,
``NotImplementedError`` and out-of-memory; ``ValueError``; ``ArithmeticError``; ``OSError``
from writing a snapshot). A
``TypeError`` or ``AttributeError`` is a bug in code, and a ``MisconfigurationException`` a
configuration mistake; both propagate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from slt_callbacks.core.functional import NonFiniteLossError

__all__ = ["Failure", "FailureGuard", "MeasurementFailed", "attempt", "raise_if_any_failed"]

OnFailure = Literal["warn", "raise", "ignore"]

CAUGHT = (RuntimeError, ValueError, ArithmeticError, OSError)
"""What a measurement may raise and the run survives (OSError: a snapshot that cannot be
written, e.g. a full disk, must not end the run either)."""

FAILED_STATUS = "failed"
"""``status`` of a history entry whose measurement failed."""

FAILED_STATUS_CODE = 6
"""``slt/diag/status_code`` of a failed LLC estimate: one worse than ``all_diverged`` (5)."""

_ADVICE = {
    "nonfinite_loss": (
        "the loss at the current weights is not finite, so nothing can be measured at this "
        "step; the monitor tries again at its next scheduled step"
    ),
    "no_double_backward": (
        "an operation in the model has no second derivative in this PyTorch build; pass "
        "a loss_fn/model path without it or report the operation"
    ),
    "out_of_memory": (
        "the measurement ran out of memory; use fewer chains or probes, a chunk_size, or "
        "smaller batches"
    ),
    "io_error": "a file could not be written (is the disk full?); the snapshot was skipped",
    "error": "pass on_failure='raise' to the monitor to see the full traceback",
}


@dataclass(frozen=True)
class Failure:
    """A measurement that did not produce a number: its kind, the reason, and where."""

    kind: str
    message: str
    exception: str
    rank: int = 0

    @property
    def reason(self) -> str:
        return f"{self.exception}: {self.message} ({_ADVICE.get(self.kind, _ADVICE['error'])})."

    @classmethod
    def of(cls, error: BaseException, rank: int = 0) -> Failure:
        if isinstance(error, MeasurementFailed):
            return error.failure
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return cls(kind=classify(error), message=text[:500], exception=type(error).__name__,
                   rank=rank)  # fmt: skip


class MeasurementFailed(RuntimeError):
    """A failure on some rank, raised on every rank after the gather."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


def classify(error: BaseException) -> str:
    """The kind of a caught error, for once-per-kind warnings and the logged record."""
    text = str(error)
    if isinstance(error, NonFiniteLossError):
        return "nonfinite_loss"
    if isinstance(error, torch.OutOfMemoryError):
        return "out_of_memory"
    if "derivative for" in text and "not implemented" in text:
        return "no_double_backward"
    if isinstance(error, OSError):
        return "io_error"
    return "error"


T = TypeVar("T")


def attempt(fn: Callable[..., T], *args: Any, rank: int = 0, **kwargs: Any) -> T | Failure:
    """``fn(*args, **kwargs)``, or the :class:`Failure` it raised (only :data:`CAUGHT`
    errors; the original exception is kept as ``__cause__`` of a later re-raise)."""
    try:
        return fn(*args, **kwargs)
    except MisconfigurationException:
        raise
    except CAUGHT as error:
        failure = Failure.of(error, rank)
        _LAST_ERROR[failure] = error
        return failure


_LAST_ERROR: dict[Failure, BaseException] = {}
"""The original exception behind a local failure, so ``on_failure="raise"`` re-raises it."""


def raise_if_any_failed(outcomes: Sequence[Any]) -> None:
    """Raise :class:`MeasurementFailed` for the first :class:`Failure` in ``outcomes`` (a
    gathered list, one entry or tuple of entries per rank)."""
    for outcome in outcomes:
        parts = outcome if isinstance(outcome, tuple) else (outcome,)
        for part in parts:
            if isinstance(part, Failure):
                error = MeasurementFailed(part)
                original = _LAST_ERROR.pop(part, None)
                if original is not None:
                    raise error from original
                raise error


class FailureGuard:
    """Turns the failures of one monitor's measurements into records and once-per-kind
    warnings, or re-raises them under ``on_failure="raise"``.

    Args:
        owner: the monitor's name, for messages.
        on_failure: ``"warn"`` (default; warn once per kind, log, go on), ``"ignore"`` (log
            and go on silently) or ``"raise"`` (re-raise the original exception).
    """

    def __init__(self, owner: str, on_failure: OnFailure) -> None:
        check_on_failure(on_failure)
        self.owner = owner
        self.on_failure = on_failure
        self.warned: set[str] = set()
        self.count = 0

    def handle(self, error: BaseException, step: int, rank: int) -> Failure:
        """Record ``error`` (caught around a measurement at ``step``); re-raise it if asked."""
        failure = Failure.of(error, rank)
        if self.on_failure == "raise":
            original = error.__cause__ if isinstance(error, MeasurementFailed) else None
            raise original or error
        self.count += 1
        if self.on_failure == "warn" and failure.kind not in self.warned:
            self.warned.add(failure.kind)
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(
                f"{self.owner}: the measurement at step {step} failed and was skipped; training "
                f"goes on. {failure.reason} Later failures of this kind ({failure.kind!r}) are "
                "logged without a warning (status 'failed' in the history, the "
                "failures counter in the logger). on_failure='raise' raises instead."
            )
        return failure


def check_on_failure(on_failure: Any) -> None:
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(
            "Expected argument `on_failure` to be 'warn', 'raise' or 'ignore' but got "
            f"{on_failure!r}."
        )
