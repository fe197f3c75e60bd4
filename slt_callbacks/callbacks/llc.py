r"""LLCMonitor: the local learning coefficient λ̂ during training, one line in a Trainer."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from slt_callbacks.core.autocal import AutoCalibration
from slt_callbacks.core.calibrate import Calibration, calibrate
from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.core.diagnostics import HealthCriteria, Status
from slt_callbacks.core.functional import LossFn
from slt_callbacks.core.llc import LLCResult, estimate_llc, merge_results
from slt_callbacks.core.restrict import Selector, resolve_components
from slt_callbacks.plots import plot_calibration
from slt_callbacks.records import LLCRecord

from ._base import ScheduleLike, _ScheduledMonitor, callbacks_with, derive_seed, gather, split
from ._guard import (
    FAILED_STATUS,
    FAILED_STATUS_CODE,
    Failure,
    OnFailure,
    attempt,
    raise_if_any_failed,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["LLCMonitor"]

LOSS_EMA_DECAY = 0.9
"""Weight of the past in the training-loss average handed to stage detectors with each record."""

_ALARMING = (Status.ALL_DIVERGED, Status.DIVERGED)
"""Statuses worth a W&B alert. NOT_A_MINIMUM is the normal case while a model trains."""


class LLCMonitor(_ScheduledMonitor):
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
            ``"auto"``: at the first scheduled step, :func:`~slt_callbacks.core.calibrate.
            calibrate` chooses the step size, and the config is frozen from then on (logged to
            the run config, kept in checkpoints).
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
            ``step_<step:08d>.pt`` (``{"step", "state_dict", "config", "seed"}``), and the
            batches as ``data.pt`` (``data-<name>.pt`` per dataset), so the analysis can be
            recomputed or extended after training with :func:`~slt_callbacks.estimate_llc`.
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
    ) -> None:
        super().__init__(schedule=schedule, seed=seed, prefix=prefix, loss_fn=loss_fn, data=data,
                         on_failure=on_failure)
        _check_config(config, calibration)
        _check_mapping("components", components)
        _check_mapping("datasets", datasets)
        for name, value in (datasets or {}).items():
            if isinstance(value, torch.Tensor) or not isinstance(value, Iterable):
                raise ValueError(
                    f"Expected `datasets[{name!r}]` to be a DataLoader or a list of batches but "
                    f"got {type(value).__name__}."
                )
        if criteria is not None and not isinstance(criteria, HealthCriteria):
            raise ValueError(
                f"Expected argument `criteria` to be a HealthCriteria or None but got "
                f"{type(criteria).__name__}."
            )
        if snapshot_dir is not None and not isinstance(snapshot_dir, str | os.PathLike):
            raise ValueError(
                "Expected argument `snapshot_dir` to be None or a path but got "
                f"{type(snapshot_dir).__name__}."
            )
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
        self._loss_ema: torch.Tensor | float | None = None
        self._dataset_batches: dict[str, list[Any]] = {}
        self._backend: str | None = None
        # config="auto": when to calibrate, and the provisional config until then (autocal).
        self._autocal: AutoCalibration | None = None
        self._auto_status: str | None = None

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["loss_ema"] = self._loss_value()
        state["n_beta"] = self.n_beta
        state["config"] = None if self.active_config is None else self.active_config.to_dict()
        if self._autocal is not None:
            state["autocal"] = self._autocal.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._loss_ema = state_dict.get("loss_ema")
        self.n_beta = state_dict.get("n_beta")
        if self.config == "auto" and state_dict.get("autocal") is not None:
            self._auto_policy().load_state_dict(state_dict["autocal"])
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
        self._loss_ema, self.n_beta = None, None
        if self.config == "auto":
            self.active_config = None  # a fresh run calibrates on its own model
            self._autocal, self._auto_status = None, None

    # -- hooks --------------------------------------------------------------------------------

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Before the estimate, so the record of step s includes the batch that produced s.
        self._update_loss_ema(outputs)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active_config is not None:
            self._check_chain_split(self.active_config, trainer.world_size)
        if any(p.requires_grad for p in pl_module.parameters()):
            # Otherwise the model is built in `configure_model`; checked at train start.
            resolve_components(pl_module, self.components)
        if self.snapshot_dir is not None and trainer.is_global_zero:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        assert self._sink is not None
        self._sink.update_config(
            {
                self._key("sgld"): "auto" if self.active_config is None
                else self.active_config.to_dict(),
                self._key("seed"): self.seed,
                self._key("components"): sorted(self.components or {}),
                self._key("datasets"): sorted(self.datasets),
            }
        )

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
        self._check_default_n_beta(config)
        if self.snapshot_dir is not None and trainer.is_global_zero:
            self._save_data()

    def _check_default_n_beta(self, config: SGLDConfig) -> None:
        """The default nβ = n/log n needs n >= 2 samples; say so now, not at the first
        estimate (where it would be logged as a failed step, step after step)."""
        if config.n_beta is not None:
            return
        num_samples = sum(_batch_len(b) for b in self._batches)
        if num_samples < 2:
            raise ValueError(
                f"LLCMonitor: `data` holds {num_samples} sample(s), too few "
                "for the default n_beta = n/log n. Pass more data, or SGLDConfig(n_beta=...)."
            )

    def _num_batches(self) -> int | None:
        # For `data=`/`datasets=` None means "one pass, capped" (as estimate_llc reads data);
        # the default draw from the training set falls back to default_num_batches.
        config = self.active_config or self.calibration.get("base")
        return None if config is None else config.num_batches

    # -- the measurement ----------------------------------------------------------------------

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[dict[str, Any], dict[str, float]]:
        start = time.perf_counter()
        config = self._resolved_config(trainer, pl_module, step)
        if self.snapshot_dir is not None and trainer.is_global_zero:
            self._save_snapshot(pl_module, step, config)
        result = self._estimate(trainer, pl_module, config, self._batches, step, "llc",
                                self.components)
        # Data-restricted estimates run at the global nβ: λ̂ values are only comparable at
        # one temperature, and a default nβ would otherwise follow each dataset's size.
        data_config = replace(config, n_beta=result.n_beta)
        by_data = {
            name: self._estimate(
                trainer, pl_module, data_config, batches, step, f"data/{name}", None
            )
            for name, batches in self._dataset_batches.items()
        }
        seconds = time.perf_counter() - start
        self.last_result, self.last_dataset_results = result, by_data
        record = LLCRecord(
            step=step,
            llc=result.llc_mean,
            llc_std=result.llc_std,
            status=result.status.value,
            loss=self._loss_value(),
            components={n: _summary(r) for n, r in result.components.items()},
            datasets={n: _summary(r) for n, r in by_data.items()},
            seconds=seconds,
            num_chains=result.config.num_chains,
            source=self.prefix,
        )
        entry = record.to_dict()
        del entry["step"]
        metrics = self._metrics(result, by_data, seconds)
        if self._auto_status is not None:  # config="auto": 1 while estimates are provisional
            metrics[self._key("calibration/provisional")] = float(
                self._auto_status == "provisional")
        return entry, metrics

    def _estimate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        config: SGLDConfig,
        batches: list[Any],
        step: int,
        tag: str,
        components: Mapping[str, Selector] | None,
    ) -> LLCResult:
        """One estimate with this rank's share of the chains, merged over ranks."""
        world, rank = trainer.world_size, trainer.global_rank
        local = replace(config, num_chains=split(config.num_chains, world, rank))
        if self._backend is not None:
            local = replace(local, backend=self._backend)
        assert self._loss_fn is not None
        # Every rank reaches the gather, failed or not, so that one rank's failure cannot
        # leave the others waiting in a collective; then all ranks raise it alike.
        outcome = attempt(
            estimate_llc,
            pl_module,
            self._loss_fn,
            batches,
            config=local,
            components=components,
            seed=self._seed(trainer, step, tag),
            on_failure="ignore",  # the monitor reports health itself, once per step
            criteria=self.criteria,
            rank=rank,
        )
        if world == 1:
            raise_if_any_failed([outcome])
        else:
            parts = gather(outcome if isinstance(outcome, Failure) else _to_cpu(outcome), trainer)
            raise_if_any_failed(parts)
        assert isinstance(outcome, LLCResult)
        result = outcome
        if result.backend == "loop" and local.backend == "auto":
            self._backend = "loop"  # vmap failed once (and core warned); do not retry each step
        if world == 1:
            return result
        merged = merge_results(parts, criteria=self.criteria)
        return replace(merged, config=replace(merged.config, backend=config.backend))

    def _metrics(
        self, result: LLCResult, by_data: Mapping[str, LLCResult], seconds: float
    ) -> dict[str, float]:
        metrics = {
            self._key("llc"): result.llc_mean,
            self._key("llc_std"): result.llc_std,
            self._key("llc_seconds"): seconds,
        }
        metrics.update({self._key(f"diag/{k}"): v for k, v in result.diagnostics().items()})
        for name, part in result.components.items():
            metrics[self._key(f"llc/{name}")] = part.llc_mean
            metrics[self._key(f"llc_std/{name}")] = part.llc_std
        for name, part in by_data.items():
            metrics[self._key(f"llc_data/{name}")] = part.llc_mean
            metrics[self._key(f"llc_data_std/{name}")] = part.llc_std
        return metrics

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
        if self.last_result is None:  # the estimate failed; the guard has reported it
            record = LLCRecord.from_dict(entry)
            for hand_off in callbacks_with(trainer, "on_llc_record"):
                hand_off(trainer, pl_module, record)
            return
        if self.n_beta is None:
            self.n_beta = self.last_result.n_beta
            self._sink.update_config({self._key("n_beta"): self.n_beta})
        self._report_health(entry["step"])
        record = LLCRecord.from_dict(entry)
        for hand_off in callbacks_with(trainer, "on_llc_record"):
            hand_off(trainer, pl_module, record)

    # -- helpers ------------------------------------------------------------------------------

    # -- config="auto" (policy in slt_callbacks.core.autocal) ---------------------------------

    def _auto_policy(self) -> AutoCalibration:
        if self._autocal is None:
            self._autocal = AutoCalibration(self.calibration.get("base") or SGLDConfig())
        return self._autocal

    def _resolved_config(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> SGLDConfig:
        """The config of this step's estimate. With ``config="auto"``: the provisional config
        until :class:`~slt_callbacks.core.autocal.AutoCalibration` freezes a calibrated one
        (never at step 0; at a step after a healthy estimate; only at a minimum)."""
        if self.active_config is not None:
            return self.active_config
        assert self._loss_fn is not None and self._sink is not None
        policy = self._auto_policy()
        last = None if self.last_result is None else self.last_result.status
        outcome = None
        if policy.should_calibrate(step, last):
            options = {"on_failure": "ignore", **self.calibration}
            options.setdefault("seed", derive_seed(self.seed, step, 0, "calibrate"))
            # Through `attempt` and the gather: a failure on one rank fails the step on all.
            attempted = attempt(calibrate, pl_module, self._loss_fn, self._batches, **options,
                                rank=trainer.global_rank)  # fmt: skip
            raise_if_any_failed(
                gather(attempted, trainer) if trainer.world_size > 1 else [attempted]
            )
            assert isinstance(attempted, Calibration)
            outcome = attempted
            rank_zero_info(f"LLCMonitor calibration at step {step}:\n{outcome.to_markdown()}")
            self.last_calibration = outcome
            self._show_calibration(trainer, outcome, step)
        decision = policy.decide(outcome, step)
        # Every rank must sample with the same config; rank zero's choice wins.
        chosen = gather(decision.config, trainer)[0]
        self._check_chain_split(chosen, trainer.world_size)
        if decision.frozen:
            self.active_config = chosen
        if decision.status != self._auto_status or outcome is not None:
            if decision.status != "calibrated":
                rank_zero_warn(f"LLCMonitor (config='auto'): {decision.reason}")
            self._sink.update_config({
                self._key("sgld"): chosen.to_dict(),
                self._key("calibration/status"): decision.status,
                self._key("calibration/step"): step,
                self._key("calibration/verified"): outcome is not None and outcome.verified,
                self._key("calibration/reason"): decision.reason,
            })
        self._auto_status = decision.status
        return chosen

    def _show_calibration(self, trainer: pl.Trainer, outcome: Calibration, step: int) -> None:
        """The sweep behind the chosen step size: a W&B table and image with a WandbLogger,
        else a PNG next to the logs (the picture needs the optional matplotlib)."""
        assert self._sink is not None
        rows = [point.to_dict() for point in outcome.table]
        columns = list(rows[0]) if rows else []
        self._sink.log_table(self._key("calibration/table"), columns,
                             [[_cell(r[c]) for c in columns] for r in rows], step)
        if not trainer.is_global_zero:
            return
        try:
            figure = plot_calibration(outcome)
        except ImportError as missing:
            rank_zero_info(f"LLCMonitor: no calibration plot ({missing}).")
            return
        if self._sink.has_wandb:
            self._sink.log_image(self._key("calibration/plot"), figure, step)
        else:
            folder = Path(trainer.log_dir or trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{self.prefix.strip('/').replace('/', '_')}_calibration.png"
            figure.savefig(path, dpi=120)
            rank_zero_info(f"LLCMonitor: calibration plot written to {path}")

    def _report_health(self, step: int) -> None:
        assert self.last_result is not None and self._sink is not None
        parts = [("", self.last_result)]
        parts += [(f"component {n!r}: ", r) for n, r in self.last_result.components.items()]
        parts += [(f"dataset {n!r}: ", r) for n, r in self.last_dataset_results.items()]
        unhealthy = [(tag, r) for tag, r in parts if not r.healthy]
        if not unhealthy:
            return
        lines = [f"{tag}{r.status.value}: {' '.join(r.reasons)}" for tag, r in unhealthy]
        text = f"LLCMonitor at step {step}: " + "\n".join(lines)
        rank_zero_warn(text)
        if any(r.status in _ALARMING for _, r in unhealthy):
            self._sink.alert(f"{self._key('llc')}: chains diverged", text)

    def _check_chain_split(self, config: SGLDConfig, world_size: int) -> None:
        if config.num_chains < world_size:
            raise MisconfigurationException(
                f"LLCMonitor: SGLDConfig.num_chains={config.num_chains} cannot be split across "
                f"{world_size} processes (each runs at least one chain). Use num_chains >= "
                f"{world_size}, ideally a multiple of it."
            )

    def _update_loss_ema(self, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        # Kept on the device as a tensor: no host sync per training step.
        loss = loss.detach().float().reshape(())
        if self._loss_ema is None:
            self._loss_ema = loss
            return
        previous = torch.as_tensor(self._loss_ema, dtype=loss.dtype, device=loss.device)
        self._loss_ema = torch.lerp(previous, loss, 1.0 - LOSS_EMA_DECAY)

    def _loss_value(self) -> float | None:
        if self._loss_ema is None:
            return None
        value = float(self._loss_ema)
        return value if math.isfinite(value) else None

    def _save_snapshot(self, pl_module: pl.LightningModule, step: int, config: SGLDConfig) -> None:
        assert self.snapshot_dir is not None
        weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        _atomic_save(
            {
                "step": step,
                "state_dict": weights,
                "config": config.to_dict(),
                # The seed of rank zero's global estimate: with one process,
                # estimate_llc(..., config=config, seed=seed) on data.pt reproduces slt/llc.
                "seed": derive_seed(self.seed, step, 0, "llc"),
            },
            self.snapshot_dir / f"step_{step:08d}.pt",
        )

    def _save_data(self) -> None:
        assert self.snapshot_dir is not None
        _atomic_save(move_data_to_device(self._batches, "cpu"), self.snapshot_dir / "data.pt")
        for name, batches in self._dataset_batches.items():
            _atomic_save(
                move_data_to_device(batches, "cpu"), self.snapshot_dir / f"data-{name}.pt"
            )


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name in the same directory, then :func:`os.replace`.

    A run killed mid-write (preemption, out of disk) then leaves either the previous file or
    the complete new one under ``path``, never a truncated file that does not load; the
    rename is atomic because both names are on one filesystem.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _batch_len(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first batched tensor."""
    leaves = [x for x in torch.utils._pytree.tree_leaves(batch)
              if isinstance(x, torch.Tensor) and x.dim()]  # fmt: skip
    return int(leaves[0].shape[0]) if leaves else 1


def _summary(result: LLCResult) -> tuple[float, float, str]:
    return (result.llc_mean, result.llc_std, result.status.value)


def _to_cpu(result: LLCResult) -> LLCResult:
    """The result with every tensor on the CPU, so that it pickles across ranks whatever the
    device of the chains."""
    summary = result.summary
    summary = replace(summary, **{f.name: getattr(summary, f.name).cpu() for f in fields(summary)})
    tensors = {
        f.name: value.cpu()
        for f in fields(result)
        if isinstance(value := getattr(result, f.name), torch.Tensor)
    }
    components = {name: _to_cpu(part) for name, part in result.components.items()}
    return replace(result, **tensors, summary=summary, components=components)


def _check_config(config: Any, calibration: Any) -> None:
    if config is not None and config != "auto" and not isinstance(config, SGLDConfig):
        raise ValueError(
            "Expected argument `config` to be an SGLDConfig, 'auto' or None but got "
            f"{config!r}."
        )
    if calibration is not None:
        if not isinstance(calibration, Mapping):
            raise ValueError(
                "Expected argument `calibration` to be a mapping of keyword arguments for "
                f"`calibrate` but got {type(calibration).__name__}."
            )
        if config != "auto":
            raise ValueError(
                "Argument `calibration` only applies with config='auto' but config is "
                f"{config!r}."
            )


def _check_mapping(argument: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ValueError(
            f"Expected argument `{argument}` to be a mapping from name to "
            f"{'selector' if argument == 'components' else 'batches'} but got "
            f"{type(value).__name__}."
        )
    for name in value:
        # Dataset names also name snapshot files, hence no '/' there.
        slash_ok = argument == "components"
        if not isinstance(name, str) or not name or (not slash_ok and "/" in name):
            rule = "non-empty strings" if slash_ok else "non-empty strings without '/'"
            raise ValueError(
                f"Expected the keys of `{argument}` to be {rule} (they become metric names) "
                f"but got {name!r}."
            )


def _cell(value: Any) -> Any:
    """A table cell W&B can show: containers (per-chain lists, reasons) as text."""
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
