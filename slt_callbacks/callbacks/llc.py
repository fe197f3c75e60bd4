r"""LLCMonitor: the local learning coefficient λ̂ during training, one line in a Trainer.

A thin adapter: *when* comes from :class:`~slt_callbacks.callbacks._base._ScheduledMonitor`,
*what* from :func:`~slt_callbacks.executors.estimate_all` (global, components, datasets),
*where it runs* from :class:`~slt_callbacks.callbacks._background.BackgroundMixin`, the DDP
split from :mod:`._distributed`, ``config="auto"`` from :mod:`._calibration`, warnings and
alerts from :mod:`._health`, the snapshot files from :mod:`slt_callbacks.snapshots`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from slt_callbacks.core.calibrate import Calibration
from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.core.diagnostics import HealthCriteria
from slt_callbacks.core.functional import LossFn
from slt_callbacks.core.llc import LLCResult, estimate_llc
from slt_callbacks.core.restrict import Selector, resolve_components
from slt_callbacks.executors import Completed, Estimates, ExecutorLike, estimate_all
from slt_callbacks.records import LLCRecord
from slt_callbacks.seeds import derive_seed
from slt_callbacks.snapshots import save_snapshot

from ._background import BackgroundMixin, save_run_files
from ._base import ScheduleLike, _ScheduledMonitor, callbacks_with
from ._calibration import RunCalibration
from ._distributed import check_chain_split, estimate_on_ranks
from ._guard import FAILED_STATUS, FAILED_STATUS_CODE, Failure, OnFailure, attempt
from ._health import report_health
from ._llc_checks import check_default_n_beta, check_llc_arguments
from ._loss_average import LossAverage

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["LLCMonitor"]


class LLCMonitor(BackgroundMixin, _ScheduledMonitor):
    r"""Estimate the local learning coefficient λ̂ of the model at scheduled training steps.

    .. math:: \hat\lambda(w^*) = n\beta\,\bigl(\mathbb{E}_w[L_m(w)] - L_n(w^*)\bigr)

    with the expectation over SGLD chains localized at the current weights w* (Lau, Furman,
    Wang, Murfet, Wei 2023, "The Local Learning Coefficient: A Singularity-Aware Complexity
    Measure"). Weight-restricted λ̂ of components and data-restricted λ̂ of named datasets
    follow Wang, Hoogland, van Wingerden, Furman, Murfet 2024 ("Differentiation and
    specialization of attention heads via the refined local learning coefficient"). The work is
    done by :func:`~slt_callbacks.estimate_llc`; the monitor decides *when*, on *which* data,
    and *where* the numbers go. Training is untouched: the model, its gradients, the global
    RNG, the training ``DataLoader`` and the user's logged metrics are exactly as without it.

    Zero configuration works for a ``LightningModule`` whose ``training_step`` returns the loss
    (or a dict with ``"loss"``): the loss is ``training_step`` itself with ``self.log``
    silenced (:class:`~slt_callbacks.callbacks.TrainingStepLoss`), and the data are 16
    batches drawn once from the training set with the monitor's own generator and reused at
    every step, so λ̂ is comparable across training (the same L_n at every checkpoint).

    Metrics, logged through every logger in ``trainer.loggers`` at ``trainer.global_step``
    (keys shown with the default ``prefix="slt/"``):

    - ``slt/llc``: λ̂, mean over the chains that stayed finite. Read it with its status: while
      the model still trains, w* is rarely a local minimum and λ̂ is often negative.
    - ``slt/llc_std``: standard deviation of λ̂ across chains (not a standard error).
    - ``slt/llc/<component>``, ``slt/llc_std/<component>``: weight-restricted λ̂ of each
      component in ``components`` (only its coordinates are sampled, the rest stay at w*).
    - ``slt/llc_data/<dataset>``, ``slt/llc_data_std/<dataset>``: data-restricted λ̂ on each
      entry of ``datasets`` (the same estimator with L_n and L_m on that data).
    - ``slt/diag/acceptance``: mean MALA-style acceptance of the SGLD proposals (≈0.9 is
      healthy; low means ``step_size`` is too large).
    - ``slt/diag/frac_below_init``: fraction of draws whose loss fell below the loss at w* on
      the same batch (near 1: w* is not a minimum).
    - ``slt/diag/drift``: λ̂ of the second half of the draws minus that of the first half
      (far from 0: the chains have not settled; more burn-in or a larger step size).
    - ``slt/diag/num_diverged``: chains whose loss became non-finite (excluded from λ̂).
    - ``slt/diag/clipped_fraction``: fraction of steps whose gradient was clipped
      (``max_grad_norm``).
    - ``slt/diag/status_code``: :attr:`Status.code` of the global estimate, 0 healthy, larger
      is worse (1 not converged, 2 low acceptance, 3 not a minimum, 4 diverged, 5 all diverged).
    - ``slt/llc_seconds``: wall time of the monitor at this step (all estimates, gathering).

    The SGLD hyperparameters go into the W&B run config (``slt/sgld``, and ``slt/n_beta`` once
    it is resolved): λ̂ values are only comparable at equal ε, nβ and γ. An unhealthy estimate
    is never hidden: the step's record keeps its status and a warning says why and what to
    change (``rank_zero_warn``, once per step); chains that diverged raise a W&B alert.

    After every estimate the monitor builds an :class:`~slt_callbacks.records.LLCRecord` and
    calls ``on_llc_record(trainer, pl_module, record)`` on every callback of the trainer that
    defines it (a stage detector, for instance). :attr:`history` holds
    ``LLCRecord.to_dict()`` of each estimate and is saved in checkpoints.

    Under Lightning's DDP the chains are split across processes (``config.num_chains`` in
    total, at least one per process), their traces gathered and merged with
    :func:`~slt_callbacks.merge_results`; every rank holds the merged record, rank zero logs.

    Args:
        config: the SGLD hyperparameters, fixed for the whole run; default ``SGLDConfig()``.
            ``"auto"``: :func:`~slt_callbacks.core.calibrate.calibrate` chooses the step size
            and localization where w* looks like a minimum (never at step 0); until then the
            estimates use a provisional config and are flagged
            (``slt/calibration/provisional``); see :mod:`slt_callbacks.core.autocal`. The
            choice is logged to the run config and kept in checkpoints.
        schedule: when to estimate: a :class:`~slt_callbacks.Schedule`, a list of steps, an
            int (every n steps) or None (log-spaced, 8 per decade).
        components: weight-restricted λ̂: ``{name: selector}`` with a glob over parameter
            names (``"layers.0.*"``), a list of globs, or ``{parameter_name: bool mask}``
            (e.g. from :func:`~slt_callbacks.head_components`).
        datasets: data-restricted λ̂: ``{name: DataLoader or list of batches}``; each is read
            once at the start of training and reused.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of ``batch``; default the
            module's ``training_step`` (quiet).
        data: the batches of the estimate (a DataLoader or a list of batches); read once at the
            start of training (``config.num_batches`` of them, or one pass up to 128). Default:
            ``config.num_batches`` (else 16) batches drawn from the training set.
        seed: root of every seed; each estimate's seed is derived from (seed, step, rank), so a
            resumed run reproduces an uninterrupted one.
        prefix: start of every metric key; two monitors in one trainer need different ones.
        snapshot_dir: if set, the weights of each estimate are saved there as
            ``step_<step:08d>.pt`` (with the config and the seeds of every estimate), the
            batches as ``data.pt`` (``data-<name>.pt`` per dataset) and, if they pickle, the
            module, loss and components as ``run.pt`` (:mod:`slt_callbacks.snapshots`), so the
            analysis can be recomputed or extended after training:
            :func:`~slt_callbacks.sweep_snapshots`, ``slt-callbacks sweep``.
        criteria: thresholds of the health checks.
        calibration: keyword arguments for ``calibrate`` when ``config="auto"`` (e.g.
            ``{"base": SGLDConfig(num_chains=8), "num_draws": 200}``).
        on_failure: an estimate that cannot be made (the loss at w* is NaN, an operation
            without the derivative the chains need, out of memory) is, with ``"warn"``
            (default), logged as a failed step (``slt/llc`` NaN, ``slt/diag/status_code`` 6,
            ``slt/failures/llc`` counting them, a record with ``status="failed"``; the reason
            in :attr:`failures`) with one warning per kind of failure, and training goes on;
            ``"ignore"``: the same without warnings; ``"raise"``: the error ends the run.
            Unhealthy estimates (diverged chains...) are results, not failures: they are
            logged with their status either way.
        executor: where the estimates run. ``None`` (default): inline, in the training loop.
            ``"process"``: one background worker process (spawned, one thread), started at
            train start and stopped at the end of fit; or any ``concurrent.futures.Executor``
            (``dask.distributed.Client(...).get_executor()``, a ``ProcessPoolExecutor``...).
            At a scheduled step the weights are copied to the CPU and submitted, and training
            goes on; each result is logged when it arrives, at its own step (plus
            ``slt/llc_delay_steps``, how many steps later it arrived). The module, loss and
            batches are sent once per run (they must pickle). At the end of fit the monitor
            waits for what is pending (progress bar); a failed estimate is a warning with its
            step (``slt/failures/background``); a checkpoint keeps the pending estimates and
            a resumed run submits them again. Under DDP rank zero submits every estimate, with
            all ``config.num_chains`` chains, and logs it; other ranks keep no history.
            With ``config="auto"``, calibrations run inline (in the training process). See
            :mod:`slt_callbacks.executors` and the README ("Estimates off the training path").
        max_pending: estimates submitted and unfinished at most (each holds a copy of the
            weights in memory).
        when_full: a due step with ``max_pending`` estimates running: ``"wait"`` (default;
            training waits for one to finish) or ``"skip"`` (the step is not estimated, a
            warning names it, ``slt/skipped_estimates`` counts them).
        worker_device: where the worker estimates (``"cuda:1"``: a spare GPU); default the
            device the module trains on.

    Raises:
        ValueError: an argument of the wrong type or value (named in the message); in
            ``setup``/``on_train_start``, a component glob that matches nothing, or a loss that
            is not a scalar.
        MisconfigurationException: in ``setup``: no logger, a sharded strategy, a schedule that
            never fires within ``max_steps``, fewer chains than processes.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from slt_callbacks import SGLDConfig
        >>> monitor = LLCMonitor(config=SGLDConfig(num_chains=4), schedule=[0, 100, 1000],
        ...                      components={"encoder": "encoder.*"})
        >>> trainer = Trainer(callbacks=[monitor], max_steps=1000)  # doctest: +SKIP
    """

    failure_tag = "llc"

    def __init__(
        self,
        *,
        config: SGLDConfig | Literal["auto"] | None = None,
        schedule: ScheduleLike = None,
        components: Mapping[str, Selector] | None = None,
        datasets: Mapping[str, Iterable[Any]] | None = None,
        loss_fn: LossFn | None = None,
        data: Iterable[Any] | None = None,
        seed: int = 0,
        prefix: str = "slt/",
        snapshot_dir: str | os.PathLike[str] | None = None,
        criteria: HealthCriteria | None = None,
        calibration: Mapping[str, Any] | None = None,
        on_failure: OnFailure = "warn",
        executor: ExecutorLike = None,
        max_pending: int = 4,
        when_full: Literal["wait", "skip"] = "wait",
        worker_device: str | None = None,
    ) -> None:
        super().__init__(schedule=schedule, seed=seed, prefix=prefix, loss_fn=loss_fn, data=data,
                         on_failure=on_failure)
        check_llc_arguments(config=config, calibration=calibration, components=components,
                            datasets=datasets, criteria=criteria, snapshot_dir=snapshot_dir)
        self._init_background(executor, max_pending=max_pending, when_full=when_full,
                              worker_device=worker_device)
        self.config = config
        self.components = dict(components) if components else None
        self.datasets = dict(datasets) if datasets else {}
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.criteria = criteria
        self.calibration = dict(calibration) if calibration else {}
        #: The SGLD config in use: ``config``, or the calibrated one once ``"auto"`` resolved.
        self.active_config: SGLDConfig | None = (
            None if config == "auto" else (config or SGLDConfig())
        )
        #: nβ actually used (known after the first estimate).
        self.n_beta: float | None = None
        #: The full result of the latest global estimate (traces included); not checkpointed.
        self.last_result: LLCResult | None = None
        #: The full results of the latest data-restricted estimates, by dataset name.
        self.last_dataset_results: dict[str, LLCResult] = {}
        #: With ``config="auto"``: the calibration sweep behind the chosen config.
        self.last_calibration: Calibration | None = None
        self._loss = LossAverage()
        self._dataset_batches: dict[str, list[Any]] = {}
        self._backend: str | None = None
        #: config="auto": when to calibrate, and the provisional config until then.
        self._auto = RunCalibration(self.calibration) if config == "auto" else None

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["loss_ema"] = self._loss_value()
        state["n_beta"] = self.n_beta
        state["config"] = None if self.active_config is None else self.active_config.to_dict()
        if self._auto is not None:
            state["autocal"] = self._auto.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._loss.load(state_dict.get("loss_ema"))
        self.n_beta = state_dict.get("n_beta")
        if self._auto is not None and state_dict.get("autocal") is not None:
            self._auto.load_state_dict(state_dict["autocal"])
        saved = state_dict.get("config")
        if saved is None:
            return
        saved_config = SGLDConfig.from_dict(saved)
        if self.config == "auto":
            self.active_config = saved_config  # keep what calibration chose before the resume
        elif saved_config != self.active_config:
            rank_zero_warn(
                f"LLCMonitor (prefix={self.prefix!r}): the checkpoint's SGLD config "
                f"{saved_config} differs from this monitor's {self.active_config}; λ̂ before and "
                "after the resume are not comparable."
            )

    def _reset(self) -> None:
        super()._reset()
        self._loss, self.n_beta = LossAverage(), None
        if self.config == "auto":
            self.active_config = None  # a fresh run calibrates on its own model
            self._auto = RunCalibration(self.calibration)

    # -- hooks --------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        # Before the estimate, so the record of step s includes the batch that produced s.
        self._loss.update(outputs)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active_config is not None:
            check_chain_split(self.active_config, trainer.world_size, self._name)
        if any(p.requires_grad for p in pl_module.parameters()):
            # Otherwise the model is built in `configure_model`; checked at train start.
            resolve_components(pl_module, self.components)
        if self.snapshot_dir is not None and trainer.is_global_zero:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        assert self._sink is not None
        self._sink.update_config({
            self._key("sgld"): "auto" if self.active_config is None
            else self.active_config.to_dict(),
            self._key("seed"): self.seed,
            self._key("components"): sorted(self.components or {}),
            self._key("datasets"): sorted(self.datasets),
        })  # fmt: skip

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resolve_components(pl_module, self.components)  # frozen parameters may have changed
        config = self.active_config or self.calibration.get("base") or SGLDConfig()
        self._check_batch_norm(pl_module, train_mode=config.train_mode)
        super()._prepare(trainer, pl_module)
        for name, loader in self.datasets.items():
            argument = f"datasets[{name!r}]"
            batches = self._resolve_data(
                trainer, pl_module, loader, argument=argument, num_batches=self._num_batches()
            )
            self._check_loss(pl_module, batches[0], argument)
            self._dataset_batches[name] = batches
        check_default_n_beta(config, self._batches, owner=self._name)
        context = dict(loss_fn=self._loss_fn, batches=self._batches, criteria=self.criteria,
                       datasets=self._dataset_batches, components=self.components)
        if self.snapshot_dir is not None and trainer.is_global_zero:
            save_run_files(self.snapshot_dir, pl_module, owner=self._name, **context)
        self._open_background(trainer, pl_module, **context)

    def _num_batches(self) -> int | None:
        # For `data=`/`datasets=` None means "one pass, capped" (as estimate_llc reads data);
        # the default draw from the training set falls back to default_num_batches.
        config = self.active_config or self.calibration.get("base")
        return None if config is None else config.num_batches

    # -- the measurement: inline here, or submitted (BackgroundMixin) -------------------------

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[dict[str, Any], dict[str, float]]:
        config, seeds = self._submission(trainer, pl_module, step)
        assert self._loss_fn is not None
        estimates = estimate_all(
            pl_module, self._loss_fn, self._batches, step=step, config=config, seeds=seeds,
            datasets=self._dataset_batches, components=self.components, criteria=self.criteria,
            estimate=partial(self._estimate, trainer, step),
        )
        return self._entry_and_metrics(estimates, self._loss_value())

    def _submission(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[SGLDConfig, dict[str, int]]:
        config = self._resolved_config(trainer, pl_module, step)
        tags = ["llc", *(f"data/{name}" for name in self._dataset_batches)]
        # Rank zero's seeds: with one process, a sweep of the snapshot reproduces the step.
        seeds = {tag: derive_seed(self.seed, step, 0, tag) for tag in tags}
        if self.snapshot_dir is not None and trainer.is_global_zero:
            frozen = tuple(n for n, p in pl_module.named_parameters() if not p.requires_grad)
            save_snapshot(self.snapshot_dir, step=step, state_dict=pl_module.state_dict(),
                          config=config, seeds=seeds, frozen=frozen)
        return config, seeds

    def _arrived(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: Completed
    ) -> tuple[dict[str, Any], dict[str, float]]:
        assert done.estimates is not None
        return self._entry_and_metrics(done.estimates, self._submitted_loss.pop(done.step, None))

    def _entry_and_metrics(
        self, estimates: Estimates, loss: float | None
    ) -> tuple[dict[str, Any], dict[str, float]]:
        self.last_result, self.last_dataset_results = estimates.result, estimates.datasets
        entry = estimates.record(loss=loss, source=self.prefix).to_dict()
        del entry["step"]
        metrics = estimates.metrics(self.prefix)
        if self._auto is not None and self._auto.status is not None:
            # config="auto": 1 while the estimates use the provisional config.
            metrics[self._key("calibration/provisional")] = float(self._auto.provisional)
        return entry, metrics

    def _estimate(self, trainer: pl.Trainer, step: int, model: Any, loss_fn: LossFn,
                  batches: list[Any], *, config: SGLDConfig, components: Any, seed: int,
                  tag: str, criteria: Any) -> LLCResult:  # fmt: skip
        """One estimate with this rank's share of the chains, merged over ranks."""
        if self._backend is not None:
            config = replace(config, backend=self._backend)

        def run(local: SGLDConfig) -> Any:
            outcome = attempt(estimate_llc, model, loss_fn, batches, config=local,
                              components=components, seed=self._seed(trainer, step, tag),
                              on_failure="ignore",  # the monitor reports health, once a step
                              criteria=criteria, rank=trainer.global_rank)  # fmt: skip
            if isinstance(outcome, LLCResult) and (outcome.backend, local.backend) == (
                    "loop", "auto"):  # fmt: skip
                self._backend = "loop"  # vmap failed once (core warned); do not retry each step
            return outcome

        return estimate_on_ranks(trainer, run, config, criteria)

    def _failed(self, failure: Failure) -> tuple[dict[str, Any], dict[str, float]]:
        """A failed estimate keeps the shape of a record (λ̂ NaN, status "failed"), so the
        history, the hand-off to stage detectors and the checkpoint stay uniform."""
        self.last_result, self.last_dataset_results = None, {}
        nan = float("nan")
        record = LLCRecord(step=0, llc=nan, llc_std=nan, status=FAILED_STATUS,
                           loss=self._loss_value(), source=self.prefix)  # fmt: skip
        entry = record.to_dict()
        del entry["step"]
        metrics = {self._key("llc"): nan, self._key("llc_std"): nan,
                   self._key("diag/status_code"): float(FAILED_STATUS_CODE)}  # fmt: skip
        return entry, metrics

    def _after(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, entry: dict[str, Any]
    ) -> None:
        assert self._sink is not None
        if self.last_result is not None:  # else the estimate failed; the guard reported it
            if self.n_beta is None:
                self.n_beta = self.last_result.n_beta
                self._sink.update_config({self._key("n_beta"): self.n_beta})
            report_health(self._sink, entry["step"], self.last_result, self.last_dataset_results,
                          key=self._key, owner=self._name)
        record = LLCRecord.from_dict(entry)
        for hand_off in callbacks_with(trainer, "on_llc_record"):
            hand_off(trainer, pl_module, record)

    # -- helpers ------------------------------------------------------------------------------

    def _resolved_config(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> SGLDConfig:
        """The config of this step. With ``config="auto"``: the provisional config until a
        calibration is frozen (see :class:`~slt_callbacks.core.autocal.AutoCalibration`)."""
        if self.active_config is not None:
            return self.active_config
        assert self._auto is not None and self._loss_fn is not None and self._sink is not None
        last = None if self.last_result is None else self.last_result.status.value
        chosen, frozen = self._auto.config_for(
            trainer, pl_module, loss_fn=self._loss_fn, batches=self._batches, seed=self.seed,
            step=step, last_status=last, sink=self._sink, key=self._key, owner=self._name,
        )
        check_chain_split(chosen, trainer.world_size, self._name)
        self.last_calibration = self._auto.last
        if frozen:
            self.active_config = chosen
        return chosen

    def _loss_value(self) -> float | None:
        return self._loss.value()
