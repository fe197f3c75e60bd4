r"""HessianTraceMonitor: curvature of the loss at scheduled steps, with its standard error."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

from slt_callbacks._checks import check_int, check_optional_int
from slt_callbacks.core.curvature import TraceEstimate, fisher_trace, hessian_trace
from slt_callbacks.core.functional import LossFn

from ._base import ScheduleLike, _ScheduledMonitor, gather, split

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

    Example:
        >>> monitor = HessianTraceMonitor(num_probes=32, schedule=1000)
    """

    default_num_batches = 1

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
    ) -> None:
        super().__init__(schedule=schedule, seed=seed, prefix=prefix, loss_fn=loss_fn, data=data)
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
        parts = gather((_cat(hessian), _cat(fisher)), trainer)
        h = TraceEstimate.from_samples(torch.cat([p[0] for p in parts]))
        values = {"hessian_trace": h.value, "hessian_trace_stderr": h.stderr}
        if self.fisher:
            f = TraceEstimate.from_samples(torch.cat([p[1] for p in parts]))
            values.update(fisher_trace=f.value, fisher_trace_stderr=f.stderr)
        return values, {self._key(k): v for k, v in values.items()}


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
