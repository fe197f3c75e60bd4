"""What every monitor shares: *when* to measure, and the bookkeeping around it.

A monitor is a thin adapter. :class:`_ScheduledMonitor` owns the Lightning side of it:

- **when**: at the first optimizer step at or after each scheduled step, once (a "next due
  step" pointer, checkpointed, so a ``global_step`` that moves by 2 per batch under manual
  optimization with two optimizers skips nothing), step 0 in ``on_train_start`` for a fresh
  run, never during the sanity check or ``fast_dev_run``;
- **where to**: a :class:`~slt_callbacks.sinks.MetricSink` over ``trainer.loggers``, writing on
  global rank zero only;
- **what it remembers**: ``history`` (one plain dict per measurement) and the last step
  measured, in ``state_dict`` so a resumed run continues the schedule;
- **what it refuses**: bad configuration, found in ``setup`` (or in ``on_train_start`` for what
  needs a batch), before any training step, whatever the schedule;
- **what it survives**: a measurement that fails numerically (NaN at w*, a kernel without a
  double backward, out of memory) is logged as a failed step and training goes on
  (:mod:`slt_callbacks.callbacks._guard`), unless ``on_failure="raise"``.

Which data and which loss are :mod:`._data`'s (the default loss is :mod:`._loss`'s), the DDP
side :mod:`._distributed`'s. Subclasses implement :meth:`_ScheduledMonitor._measure` (call
the core estimator, return a history entry and the metrics to log) and nothing of the above.

Training must be untouched by a monitor. Every measurement therefore runs inside
:func:`~lightning.pytorch.utilities.seed.isolate_rng` (a user's ``training_step`` or dataset
may draw from the global RNG), with autocast off (the estimators work in fp32 even under
``precision="bf16-mixed"``), and never iterates the training ``DataLoader``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng

from slt_callbacks._checks import check_int
from slt_callbacks.core.functional import LossFn, trainable_parameters
from slt_callbacks.schedule import Schedule, coerce, fire
from slt_callbacks.seeds import derive_seed
from slt_callbacks.sinks import MetricSink

from ._data import (
    check_data_argument,
    check_loss,
    draw_training_batches,
    resolve_data,
    resolve_loss_fn,
    take_batches,
)
from ._distributed import check_strategy, gather, split
from ._guard import CAUGHT, Failure, FailureGuard, OnFailure
from ._loss import TrainingStepLoss

if TYPE_CHECKING:
    import lightning.pytorch as pl

# Importable from here too, as before the split (and pickled run files name
# slt_callbacks.callbacks._base.TrainingStepLoss).
__all__ = ["TrainingStepLoss", "check_strategy", "derive_seed", "draw_training_batches",
           "gather", "split", "take_batches"]  # fmt: skip

ScheduleLike = Schedule | list[int] | int | None
"""What a monitor's ``schedule=`` accepts (see :func:`slt_callbacks.schedule.coerce`)."""


class _ScheduledMonitor(Callback):
    """Runs :meth:`_measure` at the steps of ``schedule`` and logs what it returns.

    Args:
        schedule: a :class:`~slt_callbacks.Schedule`, a list of steps, an int (every n steps)
            or None (log-spaced, 8 per decade).
        seed: root of every seed the monitor uses (see :func:`derive_seed`).
        prefix: start of every metric key; also part of :attr:`state_key`, so two instances
            of one monitor can coexist (Lightning refuses two with equal state keys).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default :class:`TrainingStepLoss`.
        data: batches for the estimate; default drawn from the training set.
        on_failure: what a measurement that fails numerically does: ``"warn"`` (log the step
            as failed, warn once per kind of failure, train on), ``"ignore"`` (the same
            without the warning) or ``"raise"`` (re-raise, which ends the run).
    """

    #: Short name of the measurement in ``<prefix>failures/<tag>``.
    failure_tag: str = "measurement"

    #: Whether the monitor evaluates a loss on data (the weight-norm monitor does not).
    uses_data: bool = True
    #: Batches drawn from the training set by default.
    default_num_batches: int = 16

    def __init__(
        self,
        *,
        schedule: ScheduleLike,
        seed: int,
        prefix: str,
        loss_fn: LossFn | None = None,
        data: Iterable[Any] | None = None,
        on_failure: OnFailure = "warn",
    ) -> None:
        self.schedule = coerce(schedule)
        self._guard = FailureGuard(type(self).__name__, on_failure)
        self.on_failure = on_failure
        seed = check_int("seed", seed, minimum=0)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(
                f"Expected argument `prefix` to be a non-empty string but got {prefix!r}."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(
                "Expected argument `loss_fn` to be None or a callable loss_fn(model, batch) -> "
                f"scalar Tensor but got {type(loss_fn).__name__}."
            )
        check_data_argument("data", data)
        self.seed = seed
        self.prefix = prefix
        self.loss_fn = loss_fn
        self.data = data
        self.history: list[dict[str, Any]] = []
        #: ``{"step", "kind", "reason"}`` of every measurement that failed (checkpointed).
        self.failures: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._next_due: int | None = self.schedule.next_step(-1)
        self._enabled = True
        self._sink: MetricSink | None = None
        self._loss_fn: LossFn | None = None
        self._batches: list[Any] = []

    # -- identity and state ---------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def _name(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """Plain values only, so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {
            "history": [dict(entry) for entry in self.history],
            "last_step": self._last_step,
            "next_due": self._next_due,
            "failures": [dict(f) for f in self.failures],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict["history"]]
        self._last_step = state_dict["last_step"]
        self.failures = [dict(f) for f in state_dict.get("failures", [])]
        self._guard.count = len(self.failures)
        # A checkpoint from before the pointer existed: the next scheduled step after the
        # last one checked is where the pointer would be.
        self._next_due = state_dict.get(
            "next_due",
            self.schedule.next_step(-1 if self._last_step is None else self._last_step),
        )

    # -- Lightning hooks --------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._enabled = not trainer.fast_dev_run
        if not self._enabled:
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                f"Cannot use `{self._name}` callback with `Trainer` that has no logger: its "
                "numbers would go nowhere. Pass e.g. `logger=CSVLogger('runs')`."
            )
        check_strategy(trainer, self._name)
        self._check_unique_prefix(trainer)
        if trainer.max_steps >= 0:
            self._check_schedule_fires(trainer.max_steps, "max_steps")
        if trainer.global_step == 0:
            # A fresh fit. (A resumed one loads its history after setup; a second fit on the
            # same trainer continues from its global_step and keeps what was measured.)
            self._reset()
        self._sink = MetricSink.from_trainer(trainer)
        self._sink.define_metrics(self.prefix)
        self._setup(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        if trainer.max_steps < 0 and trainer.global_step == 0:
            budget = trainer.estimated_stepping_batches
            if math.isfinite(budget):
                self._check_schedule_fires(int(budget), "the estimated number of training steps")
        with self._isolated(pl_module):
            self._prepare(trainer, pl_module)
        self._maybe_run(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._enabled:
            self._maybe_run(trainer, pl_module)

    # -- the decision and the run -----------------------------------------------------------

    def _due(self, trainer: pl.Trainer) -> bool:
        """At the first optimizer step at or after the next scheduled step, once.

        ``global_step`` counts optimizer steps, and it need not move by one per batch: under
        gradient accumulation ``on_train_batch_end`` sees the same value several times, under
        manual optimization with two optimizers it moves by two. Asking "is this step
        scheduled?" would measure twice in the first case and skip every odd scheduled step in
        the second; keeping a pointer to the next due step and firing when ``global_step``
        reaches or passes it does neither. The pointer then moves past ``global_step``, so
        scheduled steps that were jumped over are covered by this one measurement.
        """
        step = trainer.global_step
        if trainer.sanity_checking or step == self._last_step:
            return False
        self._last_step = step
        run, self._next_due = fire(self.schedule, step, self._next_due)
        return run

    def _maybe_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        step = trainer.global_step
        try:
            with self._isolated(pl_module):
                entry, metrics = self._measure(trainer, pl_module, step)
        except CAUGHT as error:
            failure = self._guard.handle(error, step, trainer.global_rank)
            self.failures.append({"step": step, "kind": failure.kind, "reason": failure.reason})
            entry, metrics = self._failed(failure)
            metrics[self._key(f"failures/{self.failure_tag}")] = float(self._guard.count)
        entry = {"step": step, **entry}
        self.history.append(entry)
        assert self._sink is not None
        self._sink.log(metrics, step=step)
        self._after(trainer, pl_module, entry)

    @contextlib.contextmanager
    def _isolated(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Global RNG state restored afterwards, autocast off (fp32 estimates under mixed
        precision)."""
        device = pl_module.device
        with (
            isolate_rng(include_cuda=device.type == "cuda"),
            torch.autocast(device_type=device.type, enabled=False),
        ):
            yield

    # -- for subclasses ----------------------------------------------------------------------

    def _reset(self) -> None:
        """Forget what an earlier fit measured (the monitor is reused for a fresh run)."""
        self.history, self._last_step, self.failures = [], None, []
        self._next_due = self.schedule.next_step(-1)
        self._guard.count = 0

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate what can be validated without a batch (components, chain split...)."""

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At train start, before any step: the model, the loss and data, checked on one
        batch."""
        if self.uses_data:
            if not trainable_parameters(pl_module):
                raise ValueError(
                    f"{self._name}: the model has no trainable parameter (requires_grad=True), "
                    "so there is nothing to measure. Unfreeze the parameters to measure, or "
                    "remove the monitor."
                )
            self._loss_fn = resolve_loss_fn(self.loss_fn, pl_module, self._name)
            self._batches = self._resolve_data(
                trainer, pl_module, self.data, argument="data", num_batches=self._num_batches()
            )
            check_loss(pl_module, self._loss_fn, self._batches[0], argument="data",
                       owner=self._name)

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Return ``(history entry without "step", metrics to log)``."""
        raise NotImplementedError

    def _failed(self, failure: Failure) -> tuple[dict[str, Any], dict[str, float]]:
        """The history entry (without "step") and metrics of a failed measurement: NaN for
        every value the monitor logs, so the gap shows in every logger."""
        return {"status": "failed", "failure": failure.kind}, {}

    def _after(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, entry: dict[str, Any]
    ) -> None:
        """After logging: warnings, hand-offs."""

    def _num_batches(self) -> int | None:
        """Batches to keep (None: the default for the training set, one pass of ``data``)."""
        return self.default_num_batches

    # -- helpers ----------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _seed(self, trainer: pl.Trainer, step: int, tag: str) -> int:
        return derive_seed(self.seed, step, trainer.global_rank, tag)

    def _resolve_data(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        data: Iterable[Any] | None,
        *,
        argument: str,
        num_batches: int | None,
    ) -> list[Any]:
        """See :func:`~slt_callbacks.callbacks._data.resolve_data`."""
        return resolve_data(trainer, pl_module, data, argument=argument, num_batches=num_batches,
                            default_num_batches=self.default_num_batches, seed=self.seed,
                            owner=self._name)  # fmt: skip

    def _resolve_datasets(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, datasets: Mapping[str, Any]
    ) -> dict[str, list[Any]]:
        """``datasets={name: data}`` read like ``data``, each checked on its first batch."""
        assert self._loss_fn is not None
        resolved = {}
        for name, data in datasets.items():
            where = f"datasets[{name!r}]"
            batches = self._resolve_data(trainer, pl_module, data, argument=where,
                                         num_batches=self._num_batches())  # fmt: skip
            check_loss(pl_module, self._loss_fn, batches[0], argument=where, owner=self._name)
            resolved[name] = batches
        return resolved

    def _check_unique_prefix(self, trainer: pl.Trainer) -> None:
        """Two monitors of one class with one prefix would log into the same keys (Lightning
        refuses them at ``Trainer(...)``, not when added to ``trainer.callbacks`` later or by
        ``configure_callbacks``)."""
        twins = [cb for cb in trainer.callbacks if cb is not self
                 and type(cb) is type(self) and cb.prefix == self.prefix]  # fmt: skip
        if twins:
            raise MisconfigurationException(
                f"The Trainer has {len(twins) + 1} `{self._name}` callbacks with prefix="
                f"{self.prefix!r}: their metrics and checkpoint state would collide. Give each "
                f"its own prefix, e.g. {self._name}(prefix='slt/a/') and "
                f"{self._name}(prefix='slt/b/')."
            )

    def _check_schedule_fires(self, max_step: int, what: str) -> None:
        first = self.schedule.next_step(-1)
        if first is None or first > max_step:
            raise MisconfigurationException(
                f"{self._name}: `schedule` = {self.schedule!r} never fires within {what} = "
                f"{max_step} (its first step is {first}), so the monitor would measure nothing. "
                f"Pass a schedule with a step in [0, {max_step}], e.g. schedule=None (log-spaced) "
                f"or schedule=[0, {max_step}]."
            )
