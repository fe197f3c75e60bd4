"""The state of one :class:`~slt_callbacks.LLCMonitor` run, behind the thin adapter.

:class:`LLCRun` owns what the monitor's estimates need between two hooks: the config in use
(:mod:`._run_config`), the training-loss average handed on with each record, the data
subsets, the snapshot files (:mod:`._snapshots`), the DDP estimator (:mod:`._distributed`),
and the latest results and nβ. The monitor calls it in hook order: :meth:`setup`,
:meth:`check_model` then :meth:`prepare` at train start, at each due step
:meth:`submission` (all ranks) and :meth:`estimate` (inline), then :meth:`entry` or
:meth:`failed`, and :meth:`after` once the entry is logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.core.diagnostics import HealthCriteria
from slt_callbacks.core.functional import LossFn
from slt_callbacks.core.llc import LLCResult
from slt_callbacks.core.restrict import Selector, resolve_components
from slt_callbacks.executors import Estimates, estimate_all
from slt_callbacks.seeds import derive_seed
from slt_callbacks.sinks import MetricSink

from ._data import check_batch_norm
from ._distributed import RankedEstimator
from ._llc_checks import check_default_n_beta
from ._llc_results import Entry, failed_entry, hand_off, llc_entry
from ._loss_average import LossAverage
from ._run_config import RunConfig
from ._snapshots import SnapshotWriter

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["LLCRun"]


class LLCRun:
    """Per-run state of an LLC monitor (see the module docstring for the call order).

    Args:
        config: an :class:`SGLDConfig`, ``"auto"`` or None (``SGLDConfig()``).
        calibration: keyword arguments of ``calibrate`` (``config="auto"`` only).
        snapshot_dir: where :mod:`._snapshots` writes, or None.
        owner: the monitor's class name, for messages; prefix: its metric prefix.
        seed, components, criteria: the monitor's arguments of the same names.
    """

    def __init__(
        self, config: SGLDConfig | Literal["auto"] | None, calibration: Mapping[str, Any],
        snapshot_dir: str | os.PathLike[str] | None, *, owner: str, prefix: str, seed: int,
        components: Mapping[str, Selector] | None, criteria: HealthCriteria | None,
    ) -> None:  # fmt: skip
        self.owner, self.prefix, self.seed = owner, prefix, seed
        self.components, self.criteria = components, criteria
        self.config = RunConfig(config, calibration, f"{owner} (prefix={prefix!r})")
        self.snapshots = SnapshotWriter(snapshot_dir, owner)
        self.estimator = RankedEstimator()
        self.loss = LossAverage()
        #: nβ actually used (known after the first estimate).
        self.n_beta: float | None = None
        #: The full results of the latest estimate (traces included; not checkpointed).
        self.last_result: LLCResult | None = None
        self.last_dataset_results: dict[str, LLCResult] = {}
        self._sink: MetricSink | None = None
        self._loss_fn: LossFn | None = None
        self._batches: list[Any] = []
        self._datasets: dict[str, list[Any]] = {}

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``loss_ema``, ``n_beta``, and the run config's ``config`` (and ``autocal``)."""
        return {"loss_ema": self.loss.value(), "n_beta": self.n_beta,
                **self.config.state_dict()}  # fmt: skip

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.loss.load(state_dict.get("loss_ema"))
        self.n_beta = state_dict.get("n_beta")
        self.config.load_state_dict(state_dict)

    def reset(self) -> None:
        """A fresh fit: no loss, nβ or results yet; ``"auto"`` calibrates again."""
        self.loss, self.n_beta = LossAverage(), None
        self.last_result, self.last_dataset_results = None, {}
        self.config.reset()

    # -- train start ------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sink: MetricSink,
              datasets: Mapping[str, Any]) -> None:  # fmt: skip
        """What can be checked without a batch; the run's config in the loggers' config."""
        self._sink = sink
        self.config.check_split(trainer.world_size)
        if any(p.requires_grad for p in pl_module.parameters()):  # else: at train start
            resolve_components(pl_module, self.components)
        self.snapshots.setup(trainer)
        sink.update_config({
            self.key("sgld"): self.config.run_config_entry(), self.key("seed"): self.seed,
            self.key("components"): sorted(self.components or {}),
            self.key("datasets"): sorted(datasets),
        })  # fmt: skip

    def check_model(self, pl_module: pl.LightningModule) -> None:
        """Before the data is read: components resolve, BatchNorm is in a mode we support."""
        resolve_components(pl_module, self.components)  # frozen parameters may have changed
        check_batch_norm(pl_module, train_mode=self.config.base.train_mode, owner=self.owner)

    def prepare(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn,
        batches: list[Any], datasets: dict[str, list[Any]],
    ) -> dict[str, Any]:  # fmt: skip
        """Keep the loss and data; write the run's snapshot; return what a background worker
        needs once per run."""
        self._loss_fn, self._batches, self._datasets = loss_fn, batches, datasets
        check_default_n_beta(self.config.base, batches, owner=self.owner)
        context = dict(loss_fn=loss_fn, batches=batches, criteria=self.criteria,
                       datasets=datasets, components=self.components)  # fmt: skip
        self.snapshots.save_run(trainer, pl_module, **context)
        return context

    # -- each estimate ----------------------------------------------------------------------

    def submission(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[SGLDConfig, dict[str, int]]:
        """The config and seeds of the estimate due at ``step`` (saved with the snapshot)."""
        last = None if self.last_result is None else self.last_result.status.value
        config = self.config.resolve(
            trainer, pl_module, step=step, last_status=last, sink=self._sink, key=self.key,
            loss_fn=self._loss_fn, batches=self._batches, seed=self.seed,
        )
        tags = ["llc", *(f"data/{name}" for name in self._datasets)]
        # Rank zero's seeds: with one process, a sweep of the snapshot reproduces the step.
        seeds = {tag: derive_seed(self.seed, step, 0, tag) for tag in tags}
        self.snapshots.save_step(trainer, pl_module, step, config, seeds)
        return config, seeds

    def estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                 config: SGLDConfig, seeds: dict[str, int]) -> Estimates:  # fmt: skip
        """The estimate in the training loop (chains split across ranks under DDP)."""
        assert self._loss_fn is not None
        return estimate_all(
            pl_module, self._loss_fn, self._batches, step=step, config=config, seeds=seeds,
            datasets=self._datasets, components=self.components, criteria=self.criteria,
            estimate=self.estimator.bind(trainer, self.seed, step),
        )

    def entry(self, estimates: Estimates, loss: float | None) -> Entry:
        """The history entry and metrics of a finished estimate; it becomes the latest."""
        self.last_result, self.last_dataset_results = estimates.result, estimates.datasets
        entry, metrics = llc_entry(estimates, loss=loss, prefix=self.prefix)
        return entry, {**metrics, **self.config.metrics(self.key)}

    def failed(self) -> Entry:
        """The entry of an estimate that could not be made (the guard reported why)."""
        self.last_result, self.last_dataset_results = None, {}
        return failed_entry(loss=self.loss.value(), prefix=self.prefix)

    def after(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
              entry: dict[str, Any]) -> None:  # fmt: skip
        """Once ``entry`` is logged: nβ into the config, health report, record hand-off."""
        assert self._sink is not None
        if self.last_result is not None and self.n_beta is None:
            self.n_beta = self.last_result.n_beta
            self._sink.update_config({self.key("n_beta"): self.n_beta})
        hand_off(trainer, pl_module, entry, result=self.last_result,
                 datasets=self.last_dataset_results, sink=self._sink, key=self.key,
                 owner=self.owner)  # fmt: skip
