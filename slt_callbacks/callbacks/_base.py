"""What every monitor shares: *when* to measure, on *which* data, with *which* loss.

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
  needs a batch), before any training step, whatever the schedule: the loss is a scalar,
  depends on the trainable parameters, and looks like a mean (else a warning);
- **what it survives**: a measurement that fails numerically (NaN at w*, a kernel without a
  double backward, out of memory) is logged as a failed step and training goes on
  (:mod:`slt_callbacks.callbacks._guard`), unless ``on_failure="raise"``.

Subclasses implement :meth:`_ScheduledMonitor._measure` (call the core estimator, return a
history entry and the metrics to log) and nothing of the above.

Training must be untouched by a monitor. Every measurement therefore runs inside
:func:`~lightning.pytorch.utilities.seed.isolate_rng` (a user's ``training_step`` or dataset
may draw from the global RNG), with autocast off (the estimators work in fp32 even under
``precision="bf16-mixed"``), and never iterates the training ``DataLoader``: the default data
are drawn once from its *dataset* with the monitor's own generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from slt_callbacks._checks import check_int
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
from slt_callbacks.schedule import Schedule, coerce, fire
from slt_callbacks.sinks import MetricSink

from ._guard import CAUGHT, Failure, FailureGuard, OnFailure

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["TrainingStepLoss", "derive_seed"]

ScheduleLike = Schedule | list[int] | int | None
"""What a monitor's ``schedule=`` accepts (see :func:`slt_callbacks.schedule.coerce`)."""


# --------------------------------------------------------------------------------------------
# The default loss: the user's own training_step, made quiet.
# --------------------------------------------------------------------------------------------


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


def derive_seed(seed: int, step: int, rank: int, tag: str) -> int:
    """A 63-bit seed for one measurement, a pure function of its coordinates.

    Deriving (instead of drawing from a generator that advances) makes a resumed run reproduce
    the numbers of an uninterrupted one without storing generator state, and gives each DDP
    rank independent chains. A hash, not ``seed + step``: nearby seeds must not give
    correlated streams.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}:{tag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------------------------
# The default data: drawn once from the training set, never through its DataLoader.
# --------------------------------------------------------------------------------------------


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
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise ValueError(
            f"{owner}: expected `{argument}` to be an iterable of batches (a DataLoader or a list "
            f"of batches) but got {type(data).__name__}."
        )
    batches = list(itertools.islice(iter(data), limit))
    if not batches:
        raise ValueError(
            f"{owner}: expected `{argument}` to yield at least one batch but it was empty."
        )
    return batches


# --------------------------------------------------------------------------------------------
# Distributed: Lightning's DDP family only.
# --------------------------------------------------------------------------------------------

_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Raise for strategies whose processes do not each hold the whole model."""
    strategy = trainer.strategy
    if isinstance(strategy, _SHARDED):
        raise MisconfigurationException(
            f"{owner} cannot run with {type(strategy).__name__}: the parameters are sharded "
            "across processes, and the estimators need every parameter on every process. Use "
            'strategy="ddp" (or "ddp_spawn"), or a single device.'
        )
    if trainer.world_size > 1 and not isinstance(strategy, DDPStrategy | SingleDeviceStrategy):
        raise MisconfigurationException(
            f"{owner} supports a single device or Lightning's DDP strategies, but the trainer "
            f"uses {type(strategy).__name__} on {trainer.world_size} processes."
        )


def gather(obj: Any, trainer: pl.Trainer) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without DDP).

    ``all_gather_object`` rather than ``strategy.all_gather``: ranks may hold different
    numbers of chains or probes, and tensors of unequal shapes cannot be gathered directly.
    """
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def split(total: int, world_size: int, rank: int) -> int:
    """This rank's share of ``total`` chains or probes (the first ranks take the remainder)."""
    return total // world_size + (1 if rank < total % world_size else 0)


# --------------------------------------------------------------------------------------------
# The base callback.
# --------------------------------------------------------------------------------------------


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
        if data is not None and (isinstance(data, torch.Tensor) or not isinstance(data, Iterable)):
            raise ValueError(
                "Expected argument `data` to be None or an iterable of batches (a DataLoader or "
                f"a list of batches) but got {type(data).__name__}."
            )
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
            self._loss_fn = self._resolve_loss_fn(pl_module)
            self._batches = self._resolve_data(
                trainer, pl_module, self.data, argument="data", num_batches=self._num_batches()
            )
            self._check_loss(pl_module, self._batches[0], "data")

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

    def _resolve_loss_fn(self, pl_module: pl.LightningModule) -> LossFn:
        if self.loss_fn is not None:
            return self.loss_fn
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{self._name}: the default `loss_fn` calls `training_step`, which steps the "
                "optimizers itself under manual optimization. Pass `loss_fn=lambda model, "
                "batch: ...` (the scalar mean loss of `batch`)."
            )
        return TrainingStepLoss()

    def _resolve_data(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        data: Iterable[Any] | None,
        *,
        argument: str,
        num_batches: int | None,
    ) -> list[Any]:
        """Batches on the module's device, fixed for the whole run (the same data at every
        step keeps the curve comparable over training)."""
        if data is None:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, 0, 0, "data"))
            batches = draw_training_batches(
                trainer.train_dataloader,
                num_batches=num_batches or self.default_num_batches,
                generator=generator,
                owner=self._name,
            )
            # Training batches reach training_step through the module's (and datamodule's)
            # transfer hooks; ours take the same path, so the default loss sees the same kind.
            return [
                pl_module._apply_batch_transfer_handler(pl_module._on_before_batch_transfer(b))
                for b in batches
            ]
        batches = take_batches(
            data, limit=num_batches or DEFAULT_MAX_BATCHES, argument=argument, owner=self._name
        )
        return [move_data_to_device(b, pl_module.device) for b in batches]

    def _check_loss(self, pl_module: pl.LightningModule, batch: Any, argument: str) -> None:
        """Before any training step: the loss is a finite-or-not scalar that depends on the
        trainable parameters (an error otherwise) and looks like a mean over the batch (a
        warning otherwise, see :func:`~slt_callbacks.core.functional.sum_reduction_reason`)."""
        assert self._loss_fn is not None
        # Through functional_call with cloned buffers, like every estimate: a loss that
        # updates module state (a counter buffer, running statistics) must not leak into
        # training from this check either.
        wrapper = LossModule(pl_module, self._loss_fn)
        tensors = {**frozen_tensors(pl_module), **trainable_parameters(pl_module)}
        where = f"{self._name} (first batch of `{argument}`)"
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

    def _check_batch_norm(self, pl_module: pl.LightningModule, *, train_mode: bool) -> None:
        """Say what BatchNorm layers do to the measurement in the mode it runs in."""
        reason = batch_norm_reason(pl_module, train_mode=train_mode)
        if reason is not None:
            rank_zero_warn(f"{self._name}: {reason}")

    def _check_schedule_fires(self, max_step: int, what: str) -> None:
        first = self.schedule.next_step(-1)
        if first is None or first > max_step:
            raise MisconfigurationException(
                f"{self._name}: `schedule` = {self.schedule!r} never fires within {what} = "
                f"{max_step} (its first step is {first}), so the monitor would measure nothing. "
                f"Pass a schedule with a step in [0, {max_step}], e.g. schedule=None (log-spaced) "
                f"or schedule=[0, {max_step}]."
            )


def callbacks_with(trainer: pl.Trainer, method: str) -> list[Callable[..., Any]]:
    """The bound ``method`` of every callback of ``trainer`` that defines it."""
    return [getattr(cb, method) for cb in trainer.callbacks if callable(getattr(cb, method, None))]
