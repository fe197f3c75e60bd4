"""LLCMonitor, a thin adapter. *When*: :mod:`._base`; *what*: ``executors.estimate_all``, over
:mod:`._distributed` under DDP; *where*: :mod:`._background`; *with which config*:
:mod:`._run_config`; *what a result becomes*: :mod:`._llc_results`; files: :mod:`._snapshots`;
the run's state between hooks: :mod:`._llc_run`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.core.diagnostics import HealthCriteria
from slt_callbacks.core.functional import LossFn
from slt_callbacks.core.restrict import Selector
from slt_callbacks.executors import Completed, ExecutorLike

from ._background import BackgroundMixin
from ._base import ScheduleLike, _ScheduledMonitor
from ._guard import Failure, OnFailure
from ._llc_checks import check_llc_arguments
from ._llc_results import Entry
from ._llc_run import LLCRun

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["LLCMonitor"]


class LLCMonitor(BackgroundMixin, _ScheduledMonitor):
    r"""Estimate the local learning coefficient λ̂ of the model at scheduled training steps.

    .. math:: \hat\lambda(w^*) = n\beta\,\bigl(\mathbb{E}_w[L_m(w)] - L_n(w^*)\bigr)

    over SGLD chains localized at the current weights w* (Lau et al. 2023); weight- and
    data-restricted λ̂ after Wang et al. 2024. Training is untouched. By default the loss is
    ``training_step`` (``self.log`` silenced) on 16 training batches drawn once. What is
    logged: the README's "What is logged"; each :class:`~slt_callbacks.records.LLCRecord`
    goes to every ``on_llc_record`` in step order and its ``to_dict()`` to :attr:`history`.
    Under DDP the chains are split across ranks and merged; rank zero logs.

    Args:
        config: an :class:`~slt_callbacks.SGLDConfig` (default ``SGLDConfig()``), or ``"auto"``:
            calibrated where w* looks like a minimum, never at step 0, provisional until then
            (``<prefix>calibration/provisional``; :mod:`slt_callbacks.core.autocal`).
        schedule: a :class:`~slt_callbacks.Schedule`, steps, every n steps, None: log-spaced.
        components: ``{name: selector}``: globs over parameter names or boolean masks.
        datasets: ``{name: DataLoader or list of batches}`` for data-restricted λ̂.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss; default ``training_step``.
        data: a DataLoader or a list of batches (not a bare Tensor), read once at train start.
        seed: root of every seed (derived from seed, step, rank): resumed == uninterrupted.
        prefix: start of every metric key; two LLCMonitors in one trainer need different ones.
        snapshot_dir: keep weights, data and run there for ``slt-callbacks sweep``.
        criteria: thresholds of the health checks.
        calibration: keyword arguments of ``calibrate`` with ``config="auto"``.
        on_failure: an estimate that cannot be made: ``"warn"`` (a failed step, training goes
            on), ``"ignore"`` (the same, silent) or ``"raise"``.
        executor: None or ``"inline"``: in the training loop; ``"process"``: one background
            worker; or a ``concurrent.futures.Executor`` (Dask, Ray, submitit adapters).
            Results are logged at their own step when they arrive (README, "Estimates off
            the training path"; :mod:`slt_callbacks.executors`).
        max_pending: estimates in flight at most (each holds a copy of the weights).
        when_full: ``"wait"`` for one to finish, or ``"skip"`` the step (with a warning).
        worker_device: where the worker estimates (``"cuda:1"``); default the module's device.

    Raises:
        ValueError: a bad argument (named in the message), a glob that matches nothing, a
            loss that is not a scalar.
        MisconfigurationException: in ``setup``: no logger, a sharded strategy, a schedule
            that never fires, fewer chains than processes, a second monitor with this prefix.

    Example:
        >>> monitor = LLCMonitor(config=SGLDConfig(num_chains=4), schedule=[0, 100, 1000])
    """

    failure_tag = "llc"

    def __init__(
        self, *, config: SGLDConfig | Literal["auto"] | None = None,
        schedule: ScheduleLike = None, components: Mapping[str, Selector] | None = None,
        datasets: Mapping[str, Iterable[Any]] | None = None, loss_fn: LossFn | None = None,
        data: Iterable[Any] | None = None, seed: int = 0, prefix: str = "slt/",
        snapshot_dir: str | os.PathLike[str] | None = None, criteria: HealthCriteria | None = None,
        calibration: Mapping[str, Any] | None = None, on_failure: OnFailure = "warn",
        executor: ExecutorLike = None, max_pending: int = 4,
        when_full: Literal["wait", "skip"] = "wait", worker_device: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(schedule=schedule, seed=seed, prefix=prefix, loss_fn=loss_fn, data=data,
                         on_failure=on_failure)  # fmt: skip
        check_llc_arguments(config=config, calibration=calibration, components=components,
                            datasets=datasets, criteria=criteria, snapshot_dir=snapshot_dir)
        self._init_background(executor, max_pending=max_pending, when_full=when_full,
                              worker_device=worker_device)  # fmt: skip
        self.config, self.criteria = config, criteria
        self.calibration = dict(calibration) if calibration else {}
        self.components = dict(components) if components else None
        self.datasets = dict(datasets) if datasets else {}
        self._run = LLCRun(config, self.calibration, snapshot_dir, owner=self._name,
                           prefix=prefix, seed=self.seed, components=self.components,
                           criteria=criteria)  # fmt: skip
        self.snapshot_dir = self._run.snapshots.directory

    n_beta = property(lambda self: self._run.n_beta,
                      doc="nβ actually used (known after the first estimate).")
    last_result = property(lambda self: self._run.last_result,
                           doc="The latest estimate's full results (traces; not checkpointed).")
    last_dataset_results = property(lambda self: self._run.last_dataset_results,
                                    doc="The latest estimate's results per ``datasets`` name.")
    active_config = property(lambda self: self._run.config.active, doc="The SGLD config in "
                             "use: ``config``, or the calibrated one once 'auto' froze it.")
    last_calibration = property(lambda self: self._run.config.last_calibration,
                                doc="With ``config='auto'``: the latest calibration sweep.")
    _loss = property(lambda self: self._run.loss)  # the training loss around each step

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self._run.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._run.load_state_dict(state_dict)

    def _reset(self) -> None:
        super()._reset()
        self._run.reset()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        self._loss.update(outputs)  # first: the record of step s includes the batch behind s
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._sink is not None
        self._run.setup(trainer, pl_module, self._sink, self.datasets)

    def _num_batches(self) -> int | None:
        return self._run.config.num_batches  # None: one pass of data=, or the default draw

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run.check_model(pl_module)
        super()._prepare(trainer, pl_module)
        assert self._loss_fn is not None
        datasets = self._resolve_datasets(trainer, pl_module, self.datasets)
        context = self._run.prepare(trainer, pl_module, self._loss_fn, self._batches, datasets)
        self._open_background(trainer, pl_module, **context)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Entry:
        config, seeds = self._run.submission(trainer, pl_module, step)
        estimates = self._run.estimate(trainer, pl_module, step, config, seeds)
        return self._run.entry(estimates, self._loss.value())

    def _submission(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    step: int) -> tuple[SGLDConfig, dict[str, int]]:  # fmt: skip
        return self._run.submission(trainer, pl_module, step)

    def _arrived(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 done: Completed) -> Entry:  # fmt: skip
        assert done.estimates is not None
        return self._run.entry(done.estimates, self._submitted_loss.pop(done.step, None))

    def _failed(self, failure: Failure) -> Entry:
        return self._run.failed()

    def _after(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
               entry: dict[str, Any]) -> None:  # fmt: skip
        self._run.after(trainer, pl_module, entry)
