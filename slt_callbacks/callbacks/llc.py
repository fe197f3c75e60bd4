"""LLCMonitor, a thin adapter. *When*: :mod:`._base`; *what*: ``executors.estimate_all``, over
:mod:`._distributed` under DDP; *where*: :mod:`._background`; *with which config*:
:mod:`._run_config`; *what a result becomes*: :mod:`._llc_results`; files: :mod:`._snapshots`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from slt_callbacks.core.calibrate import Calibration
from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.core.diagnostics import HealthCriteria
from slt_callbacks.core.functional import LossFn
from slt_callbacks.core.llc import LLCResult
from slt_callbacks.core.restrict import Selector, resolve_components
from slt_callbacks.executors import Completed, Estimates, ExecutorLike, estimate_all
from slt_callbacks.seeds import derive_seed

from ._background import BackgroundMixin
from ._base import ScheduleLike, _ScheduledMonitor
from ._data import check_batch_norm
from ._distributed import RankedEstimator
from ._guard import Failure, OnFailure
from ._llc_checks import check_default_n_beta, check_llc_arguments
from ._llc_results import Entry, failed_entry, hand_off, llc_entry
from ._loss_average import LossAverage
from ._run_config import RunConfig
from ._snapshots import SnapshotWriter

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
        #: nβ actually used (known after the first estimate).
        self.n_beta: float | None = None
        #: The full results of the latest estimate (traces included; not checkpointed).
        self.last_result: LLCResult | None = None
        self.last_dataset_results: dict[str, LLCResult] = {}
        self._run_config = RunConfig(config, self.calibration, f"{self._name} (prefix={prefix!r})")
        self._snapshots = SnapshotWriter(snapshot_dir, self._name)
        self.snapshot_dir = self._snapshots.directory
        self._estimator, self._loss = RankedEstimator(), LossAverage()
        self._dataset_batches: dict[str, list[Any]] = {}

    @property
    def active_config(self) -> SGLDConfig | None:
        """The SGLD config in use: ``config``, or the calibrated one once ``"auto"`` froze it."""
        return self._run_config.active

    @property
    def last_calibration(self) -> Calibration | None:
        """With ``config="auto"``: the latest calibration sweep."""
        return self._run_config.last_calibration

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "loss_ema": self._loss.value(), "n_beta": self.n_beta,
                **self._run_config.state_dict()}  # "config" and, with "auto", "autocal"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._loss.load(state_dict.get("loss_ema"))
        self.n_beta = state_dict.get("n_beta")
        self._run_config.load_state_dict(state_dict)

    def _reset(self) -> None:
        super()._reset()
        self._loss, self.n_beta = LossAverage(), None
        self._run_config.reset()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        self._loss.update(outputs)  # first: the record of step s includes the batch behind s
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_config.check_split(trainer.world_size)
        if any(p.requires_grad for p in pl_module.parameters()):  # else: at train start
            resolve_components(pl_module, self.components)
        self._snapshots.setup(trainer)
        assert self._sink is not None
        self._sink.update_config({
            self._key("sgld"): self._run_config.run_config_entry(), self._key("seed"): self.seed,
            self._key("components"): sorted(self.components or {}),
            self._key("datasets"): sorted(self.datasets),
        })  # fmt: skip

    def _num_batches(self) -> int | None:
        return self._run_config.num_batches  # None: one pass of data=, or the default draw

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resolve_components(pl_module, self.components)  # frozen parameters may have changed
        check_batch_norm(pl_module, train_mode=self._run_config.base.train_mode, owner=self._name)
        super()._prepare(trainer, pl_module)
        assert self._loss_fn is not None
        self._dataset_batches = self._resolve_datasets(trainer, pl_module, self.datasets)
        check_default_n_beta(self._run_config.base, self._batches, owner=self._name)
        context = dict(loss_fn=self._loss_fn, batches=self._batches, criteria=self.criteria,
                       datasets=self._dataset_batches, components=self.components)
        self._snapshots.save_run(trainer, pl_module, **context)
        self._open_background(trainer, pl_module, **context)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Entry:
        config, seeds = self._submission(trainer, pl_module, step)
        assert self._loss_fn is not None
        estimates = estimate_all(
            pl_module, self._loss_fn, self._batches, step=step, config=config, seeds=seeds,
            datasets=self._dataset_batches, components=self.components, criteria=self.criteria,
            estimate=self._estimator.bind(trainer, self.seed, step),
        )
        return self._entry(estimates, self._loss.value())

    def _submission(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[SGLDConfig, dict[str, int]]:
        last = None if self.last_result is None else self.last_result.status.value
        config = self._run_config.resolve(
            trainer, pl_module, step=step, last_status=last, sink=self._sink, key=self._key,
            loss_fn=self._loss_fn, batches=self._batches, seed=self.seed,
        )
        tags = ["llc", *(f"data/{name}" for name in self._dataset_batches)]
        # Rank zero's seeds: with one process, a sweep of the snapshot reproduces the step.
        seeds = {tag: derive_seed(self.seed, step, 0, tag) for tag in tags}
        self._snapshots.save_step(trainer, pl_module, step, config, seeds)
        return config, seeds

    def _arrived(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 done: Completed) -> Entry:  # fmt: skip
        assert done.estimates is not None
        return self._entry(done.estimates, self._submitted_loss.pop(done.step, None))

    def _entry(self, estimates: Estimates, loss: float | None) -> Entry:
        self.last_result, self.last_dataset_results = estimates.result, estimates.datasets
        entry, metrics = llc_entry(estimates, loss=loss, prefix=self.prefix)
        return entry, {**metrics, **self._run_config.metrics(self._key)}

    def _failed(self, failure: Failure) -> Entry:
        self.last_result, self.last_dataset_results = None, {}
        return failed_entry(loss=self._loss.value(), prefix=self.prefix)

    def _after(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
               entry: dict[str, Any]) -> None:  # fmt: skip
        assert self._sink is not None
        if self.last_result is not None and self.n_beta is None:
            self.n_beta = self.last_result.n_beta
            self._sink.update_config({self._key("n_beta"): self.n_beta})
        hand_off(trainer, pl_module, entry, result=self.last_result,
                 datasets=self.last_dataset_results, sink=self._sink, key=self._key,
                 owner=self._name)  # fmt: skip
