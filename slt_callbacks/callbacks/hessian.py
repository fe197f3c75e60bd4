r"""HessianTraceMonitor: curvature of the loss at scheduled steps, with its standard error."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

from slt_callbacks._checks import check_int, check_optional_int
from slt_callbacks.core.curvature import TraceEstimate, fisher_trace, hessian_trace
from slt_callbacks.core.functional import LossFn, NonFiniteLossError

from ._base import ScheduleLike, _ScheduledMonitor
from ._distributed import gather, split
from ._guard import Failure, OnFailure, attempt, raise_if_any_failed

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["HessianTraceMonitor"]


class HessianTraceMonitor(_ScheduledMonitor):
    r"""Log the trace of the Hessian of the loss (Hutchinson) and of the empirical Fisher.

    .. math::

        \operatorname{tr} H \approx \frac{1}{m}\sum_{k=1}^{m} v_k^\top H v_k, \qquad
        \operatorname{tr}\hat F = \frac{1}{n}\sum_{i=1}^{n} \lVert \nabla \ell_i \rVert^2

    with Rademacher probes :math:`v_k` (Hutchinson 1989; Hessian-vector products vectorised
    over the probes, see :func:`~slt_callbacks.core.curvature.hessian_trace`) and per-sample
    gradients :math:`\nabla \ell_i` (see :func:`~slt_callbacks.core.curvature.fisher_trace`).
    Curvature is not the LLC: flat directions lower both, but a degenerate (singular) minimum
    can have a large trace and a small λ̂. Logging them side by side is the point.

    Metrics (keys with the default ``prefix="slt/"``), at ``trainer.global_step``:

    - ``slt/hessian_trace``: the Hutchinson estimate of tr H of the mean loss, averaged over
      the monitor's batches.
    - ``slt/hessian_trace_stderr``: its standard error over probes (relative error falls as
      1/√num_probes; NaN with a single probe).
    - ``slt/fisher_trace``: tr of the empirical Fisher, the mean squared per-sample gradient
      norm (comparable in scale to tr H near a well-specified minimum).
    - ``slt/fisher_trace_stderr``: its standard error over samples.

    :attr:`history` holds ``{"step", "hessian_trace", "hessian_trace_stderr",
    "fisher_trace", "fisher_trace_stderr"}`` per measurement. Under DDP the probes (and the
    Fisher's samples) are split across processes and gathered.

    Args:
        schedule: when to measure (see :class:`~slt_callbacks.Schedule`); default
            log-spaced.
        num_probes: Rademacher probes per batch (on all processes together).
        fisher: also compute the empirical Fisher trace.
        num_batches: batches the traces are averaged over, drawn once from the training set
            (or taken from ``data``) and reused at every step.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss; default ``training_step``.
            The Fisher calls it on one-sample batches.
        data: a DataLoader or a list of batches instead of the training set.
        chunk_size: probes (and samples) per vectorised chunk, to bound memory; None: all.
        seed: root of the probes' seeds (derived from seed, step, rank).
        prefix: start of every metric key; distinct per instance.
        on_failure: a measurement that fails (a non-finite trace because the loss at w* is
            NaN, an operation without a second derivative, out of memory) is, with
            ``"warn"`` (default), logged as NaN with ``slt/failures/hessian`` counting the
            failures and ``status="failed"`` in the history, with one warning per kind, and
            training goes on; ``"ignore"``: no warning; ``"raise"``: the error ends the run.

    The Hessian-vector products and per-sample gradients run under PyTorch's math attention
    kernel (:func:`~slt_callbacks.core.curvature.math_attention`): the fused kernels have no
    double backward. A loss that does not depend on the trainable parameters is refused
    before the first training step (its traces would be a silent 0).

    Example:
        >>> monitor = HessianTraceMonitor(num_probes=32, schedule=1000)
    """

    default_num_batches = 1
    failure_tag = "hessian"

    def __init__(
        self,
        *,
        schedule: ScheduleLike = None,
        num_probes: int = 16,
        fisher: bool = True,
        num_batches: int = 1,
        loss_fn: LossFn | None = None,
        data: Iterable[Any] | None = None,
        chunk_size: int | None = None,
        seed: int = 0,
        prefix: str = "slt/",
        on_failure: OnFailure = "warn",
    ) -> None:
        super().__init__(schedule=schedule, seed=seed, prefix=prefix, loss_fn=loss_fn, data=data,
                         on_failure=on_failure)
        num_probes, num_batches = check_int("num_probes", num_probes), check_int(
            "num_batches", num_batches
        )
        chunk_size = check_optional_int("chunk_size", chunk_size)
        if not isinstance(fisher, bool):
            raise ValueError(f"Expected argument `fisher` to be a bool but got {fisher!r}.")
        self.num_probes = num_probes
        self.fisher = fisher
        self.num_batches = num_batches
        self.chunk_size = chunk_size

    def _num_batches(self) -> int:
        return self.num_batches

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._sink is not None
        # Like the SGLD settings: a trace is only comparable at equal probes and data.
        settings = {"num_probes": self.num_probes, "num_batches": self.num_batches,
                    "fisher": self.fisher, "seed": self.seed}  # fmt: skip
        self._sink.update_config({self._key("hessian"): settings})

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[dict[str, Any], dict[str, float]]:
        rank = trainer.global_rank
        # Every rank reaches the gather, failed or not (see slt_callbacks.callbacks._guard).
        local = attempt(self._local_samples, trainer, pl_module, step, rank=rank)
        parts = gather(local, trainer)
        raise_if_any_failed(parts)
        h = TraceEstimate.from_samples(torch.cat([p[0] for p in parts]))
        values = {"hessian_trace": h.value, "hessian_trace_stderr": h.stderr}
        if self.fisher:
            f = TraceEstimate.from_samples(torch.cat([p[1] for p in parts]))
            values.update(fisher_trace=f.value, fisher_trace_stderr=f.stderr)
        bad = [k for k in ("hessian_trace", "fisher_trace") if k in values
               and not torch.isfinite(torch.tensor(values[k]))]  # fmt: skip
        if bad:
            raise NonFiniteLossError(
                f"{' and '.join(bad)} = {', '.join(str(values[k]) for k in bad)} at step {step}: "
                "the loss or its derivatives are not finite at the current weights"
            )
        return values, {self._key(k): v for k, v in values.items()}

    def _local_samples(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's probe values and squared per-sample gradient norms."""
        world, rank = trainer.world_size, trainer.global_rank
        probes = split(self.num_probes, world, rank)
        generator = torch.Generator(pl_module.device)
        generator.manual_seed(self._seed(trainer, step, "hessian"))
        assert self._loss_fn is not None
        hessian = [
            hessian_trace(pl_module, self._loss_fn, batch, num_probes=probes,
                          generator=generator, chunk_size=self.chunk_size).samples
            for batch in self._batches
            if probes
        ]
        fisher = [
            fisher_trace(pl_module, self._loss_fn, rows, chunk_size=self.chunk_size).samples
            for rows in (_rows(batch, rank, world) for batch in self._batches)
            if self.fisher and rows is not None
        ]
        return _cat(hessian), _cat(fisher)

    def _failed(self, failure: Failure) -> tuple[dict[str, Any], dict[str, float]]:
        entry, _ = super()._failed(failure)
        keys = ["hessian_trace", "hessian_trace_stderr"]
        keys += ["fisher_trace", "fisher_trace_stderr"] if self.fisher else []
        values = dict.fromkeys(keys, float("nan"))
        return {**values, **entry}, {self._key(k): v for k, v in values.items()}


def _cat(samples: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(samples).cpu() if samples else torch.zeros(0, dtype=torch.float64)


def _rows(batch: Any, rank: int, world: int) -> Any | None:
    """This rank's samples of ``batch`` (every ``world``-th row from ``rank``), or None if it
    gets none. The Fisher's terms are per sample, so splitting rows splits the work exactly."""
    if world == 1:
        return batch
    leaves = [x for x in pytree.tree_leaves(batch) if isinstance(x, torch.Tensor) and x.dim()]
    if not leaves or rank >= leaves[0].shape[0]:
        return None
    return pytree.tree_map(
        lambda x: x[rank::world] if isinstance(x, torch.Tensor) and x.dim() else x, batch
    )
