"""The Lightning side of estimates off the training path (:mod:`slt_callbacks.executors`).

A monitor with ``executor=`` does not measure at a scheduled step: it copies the weights to
the CPU, submits a job and returns to training. :class:`BackgroundEstimates` keeps that
bookkeeping out of the monitor:

- **once per run** (train start, global rank zero): the run context (the module, the loss,
  the batch pool, datasets, components) is serialized and the executor started;
- **per scheduled step**: :meth:`submit` (or, with ``when_full="skip"`` and a full queue, a
  warning that names the step);
- **per training batch**: :meth:`collect`, non-blocking, the finished estimates in step
  order; the monitor logs each at its own step;
- **at the end of fit**: :meth:`drain`, with a progress bar;
- **in checkpoints**: the pending jobs (weights, config, seeds), resubmitted on resume.

Under DDP only global rank zero submits and logs (each estimate is computed once, with all
``config.num_chains`` chains, on the executor); the other ranks do nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from slt_callbacks._checks import check_int, check_optional_int
from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.executors import (
    Completed,
    EstimateJob,
    EstimateQueue,
    ExecutorLike,
    RunContext,
    check_executor,
    pack_state,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["BackgroundEstimates", "BackgroundMixin", "run_context"]


class BackgroundEstimates:
    """An :class:`~slt_callbacks.executors.EstimateQueue` run from Lightning hooks.

    Args:
        executor: ``"process"`` or a ``concurrent.futures.Executor`` (not None: inline
            estimates do not come here).
        owner: the monitor's name, for messages.
        max_pending: estimates in flight at most.
        when_full: ``"wait"`` or ``"skip"`` (see :class:`EstimateQueue`).
        num_threads: torch threads of the worker.
        device: where the worker estimates; None: the device the module trains on.
    """

    def __init__(
        self,
        executor: ExecutorLike,
        *,
        owner: str,
        max_pending: int = 2,
        when_full: str = "wait",
        num_threads: int | None = 1,
        device: str | None = None,
    ) -> None:
        if check_executor(executor) is None:
            raise ValueError("BackgroundEstimates needs an executor; inline runs in the monitor.")
        if device is not None and not isinstance(device, str):
            raise ValueError(
                f"Expected argument `device` to be None or a device string such as 'cuda:1' but "
                f"got {device!r}."
            )
        check_int("max_pending", max_pending, minimum=1)
        check_optional_int("num_threads", num_threads, minimum=1)
        self.owner = owner
        self.device = device
        self.queue = EstimateQueue(
            executor, max_pending=max_pending, when_full=when_full,  # type: ignore[arg-type]
            num_threads=num_threads,
        )
        self.num_failed = 0
        self.num_delivered = 0
        self._resume: list[dict[str, Any]] = []

    # -- lifecycle ------------------------------------------------------------------------

    def open(
        self,
        pl_module: pl.LightningModule,
        *,
        loss_fn: Any,
        batches: list[Any],
        datasets: Mapping[str, list[Any]],
        components: Mapping[str, Any] | None,
        criteria: Any,
    ) -> None:
        """Ship the once-per-run context; resubmit what a checkpoint left pending."""
        context = run_context(pl_module, loss_fn=loss_fn, batches=batches, datasets=datasets,
                              components=components, criteria=criteria, device=self.device)
        try:
            self.queue.open(context)
        except ValueError as error:
            name = self.queue.executor_name
            raise ValueError(f"{self.owner}(executor={name!r}): {error}") from None
        rank_zero_info(
            f"{self.owner}: estimates run on {self.queue.executor_name} "
            f"(device {context.device}, at most {self.queue.max_pending} pending, "
            f"when full: {self.queue.when_full})."
        )
        pending, self._resume = self._resume, []
        for saved in pending:
            self._submit_job(self.queue.job(
                saved["step"], _bytes(saved["weights"]), SGLDConfig.from_dict(saved["config"]),
                saved["seeds"], saved["frozen"],
            ))
        if pending:
            rank_zero_info(
                f"{self.owner}: resubmitted {len(pending)} estimate(s) that were pending in the "
                f"checkpoint (steps {[s['step'] for s in pending]})."
            )

    def close(self) -> None:
        self.queue.close(cancel=True)

    # -- per step ---------------------------------------------------------------------------

    def submit(
        self,
        pl_module: pl.LightningModule,
        step: int,
        config: SGLDConfig,
        seeds: Mapping[str, int],
    ) -> bool:
        """Copy the weights now and submit; False (with a warning) if the step was skipped."""
        frozen = [n for n, p in pl_module.named_parameters() if not p.requires_grad]
        job = self.queue.job(step, pack_state(pl_module.state_dict()), config, seeds, frozen)
        return self._submit_job(job)

    def _submit_job(self, job: EstimateJob) -> bool:
        if self.queue.submit(job):
            return True
        rank_zero_warn(
            f"{self.owner}: step {job.step} was NOT estimated: {self.queue.max_pending} "
            f"estimate(s) are still running on {self.queue.executor_name} (when_full='skip'). "
            f"{len(self.queue.skipped)} step(s) skipped so far: {self.queue.skipped}. Use "
            "when_full='wait', a larger max_pending, a sparser schedule or a faster executor."
        )
        return False

    def collect(self) -> list[Completed]:
        """Finished estimates, in step order (non-blocking)."""
        return self.queue.collect()

    def drain(self) -> list[Completed]:
        """Wait for every pending estimate (progress bar), in step order."""
        if self.queue.pending_jobs:
            rank_zero_info(
                f"{self.owner}: waiting for {len(self.queue.pending_jobs)} pending estimate(s)."
            )
        return self.queue.wait(progress=True, description=self.owner)

    def count(self, done: Completed) -> None:
        """Count ``done`` as delivered or failed, as it is published (so that the counts in
        its messages and metrics are those at its turn, whatever arrived with it)."""
        if done.error is None:
            self.num_delivered += 1
        else:
            self.num_failed += 1

    def describe_failure(self, done: Completed) -> str:
        """The warning for a failed job: its step, the monitor's status, the traceback."""
        return (
            f"{self.owner}: the estimate of step {done.step} failed on "
            f"{self.queue.executor_name}; training goes on ({self.num_delivered} delivered, "
            f"{self.num_failed} failed, {len(self.queue.pending_jobs)} pending, "
            f"{len(self.queue.skipped)} skipped).\n{done.error}"
        )

    @property
    def skipped(self) -> list[int]:
        return self.queue.skipped

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The pending jobs (plain values and tensors: ``weights_only`` loading works), the
        skipped steps and the failure count."""
        jobs = self.queue.pending_jobs if self.queue.is_open else []
        saved = [
            {
                "step": job.step,
                "weights": torch.frombuffer(bytearray(job.weights), dtype=torch.uint8),
                "config": job.config.to_dict(),
                "seeds": dict(job.seeds),
                "frozen": list(job.frozen),
            }
            for job in jobs
        ]
        return {
            "pending": saved + [dict(entry) for entry in self._resume],
            "skipped": list(self.queue.skipped),
            "num_failed": self.num_failed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._resume = [dict(entry) for entry in state["pending"]]
        self.queue.skipped[:] = list(state["skipped"])
        self.num_failed = int(state["num_failed"])


def _bytes(weights: Any) -> bytes:
    return weights.numpy().tobytes() if isinstance(weights, torch.Tensor) else bytes(weights)


def run_context(
    pl_module: pl.LightningModule,
    *,
    loss_fn: Any,
    batches: list[Any],
    datasets: Mapping[str, list[Any]],
    components: Mapping[str, Any] | None,
    criteria: Any,
    device: str | None = None,
) -> RunContext:
    """What every estimate of this run shares, with the data on the CPU."""
    return RunContext(
        model=pl_module,  # pickled without its trainer (LightningModule.__getstate__)
        loss_fn=loss_fn,
        batches=move_data_to_device(batches, "cpu"),
        datasets={k: move_data_to_device(v, "cpu") for k, v in datasets.items()},
        components=dict(components) if components else None,
        criteria=criteria,
        device=device or str(pl_module.device),
    )


class BackgroundMixin:
    """Hooks that turn a :class:`~slt_callbacks.callbacks._base._ScheduledMonitor` into one
    whose measurements may run on an executor.

    The monitor calls :meth:`_init_background` in ``__init__`` and :meth:`_open_background`
    at the end of ``_prepare``, and implements :meth:`_submission` (what to submit at a due
    step) and :meth:`_arrived` (the history entry and metrics of a delivered estimate). With
    ``executor=None`` every hook falls through to the inline behaviour.
    """

    _background: BackgroundEstimates | None

    def _init_background(
        self,
        executor: ExecutorLike,
        *,
        max_pending: int,
        when_full: str,
        worker_device: str | None,
    ) -> None:
        executor = check_executor(executor)  # "inline" is None: estimates in the loop
        self._background = None if executor is None else BackgroundEstimates(
            executor, owner=type(self).__name__, max_pending=max_pending,
            when_full=when_full, device=worker_device,
        )
        self._submitted_loss: dict[int, float | None] = {}

    # -- for the monitor ----------------------------------------------------------------------

    def _submission(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[SGLDConfig, dict[str, int]]:
        """The config and seeds of the estimate due at ``step`` (all ranks call this)."""
        raise NotImplementedError

    def _arrived(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: Completed
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """The history entry (without "step") and metrics of a delivered estimate."""
        raise NotImplementedError

    def _open_background(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, **context: Any
    ) -> None:
        if self._background is not None and trainer.is_global_zero:
            self._background.open(pl_module, **context)

    # -- Lightning hooks ----------------------------------------------------------------------

    def _maybe_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._background is None:
            super()._maybe_run(trainer, pl_module)  # type: ignore[misc]
            return
        if not self._due(trainer):  # type: ignore[attr-defined]
            return
        step = trainer.global_step
        with self._isolated(pl_module):  # type: ignore[attr-defined]
            config, seeds = self._submission(trainer, pl_module, step)
        if not trainer.is_global_zero:  # under DDP each estimate is computed and logged once
            return
        self._submitted_loss[step] = self._loss.value()  # type: ignore[attr-defined]
        if not self._background.submit(pl_module, step, config, seeds):
            skipped = float(len(self._background.skipped))
            self._sink.log({self._key("skipped_estimates"): skipped}, step=step)  # type: ignore[attr-defined]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)  # type: ignore[misc]
        if self._background is not None and self._background.queue.is_open:
            self._publish_all(trainer, pl_module, self._background.collect())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._background is not None and self._background.queue.is_open:
            self._publish_all(trainer, pl_module, self._background.drain())
            self._background.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._background is not None:
            self._background.close()  # pending work is in the last checkpoint, if any

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._background is not None:
            self._background.close()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # type: ignore[misc]
        if self._background is not None:
            state["background"] = self._background.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        background = state.pop("background", None)
        super().load_state_dict(state)  # type: ignore[misc]
        if background is not None and self._background is not None:
            self._background.load_state_dict(background)

    # -- delivery -------------------------------------------------------------------------

    def _publish_all(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, completed: list[Completed]
    ) -> None:
        for done in completed:
            self._publish_one(trainer, pl_module, done)

    def _publish_one(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: Completed
    ) -> None:
        assert self._background is not None
        self._background.count(done)
        sink = self._sink  # type: ignore[attr-defined]
        key = self._key  # type: ignore[attr-defined]
        if done.error is not None:
            text = self._background.describe_failure(done)
            rank_zero_warn(text)
            sink.alert(f"{key('llc')}: background estimate failed", text)
            sink.log({key("failures/background"): float(self._background.num_failed)},
                     step=done.step)
            return
        entry, metrics = self._arrived(trainer, pl_module, done)
        # How far training had moved on when the number arrived (0: inline).
        metrics[key("llc_delay_steps")] = float(trainer.global_step - done.step)
        entry = {"step": done.step, **entry}
        self.history.append(entry)  # type: ignore[attr-defined]
        # At its own step: CSV and TensorBoard write that step; WandbLogger logs it as
        # trainer/global_step without W&B's step=, so W&B keeps the late row.
        sink.log(metrics, step=done.step)
        self._after(trainer, pl_module, entry)  # type: ignore[attr-defined]
