"""Distributed training: Lightning's DDP family only, and how monitors split their work.

Each DDP rank holds the whole model, so a measurement made of independent parts (SGLD
chains, Hutchinson probes) splits them across ranks: rank r runs :func:`split` of them, the
parts are gathered with :func:`gather` and merged, and every rank holds the merged result
(rank zero logs it). Sharded strategies (FSDP, DeepSpeed, model parallel) are refused by
:func:`check_strategy`: the estimators need every parameter on every process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.core.diagnostics import HealthCriteria
from slt_callbacks.core.functional import LossFn
from slt_callbacks.core.llc import LLCResult, estimate_llc, merge_results
from slt_callbacks.core.restrict import Selector
from slt_callbacks.seeds import derive_seed

from ._guard import Failure, attempt, raise_if_any_failed

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "RankedEstimator",
    "check_chain_split",
    "check_strategy",
    "estimate_on_ranks",
    "gather",
    "split",
]

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


def check_chain_split(config: SGLDConfig, world_size: int, owner: str) -> None:
    """Every rank runs at least one chain."""
    if config.num_chains < world_size:
        raise MisconfigurationException(
            f"{owner}: SGLDConfig.num_chains={config.num_chains} cannot be split across "
            f"{world_size} processes (each runs at least one chain). Use num_chains >= "
            f"{world_size}, ideally a multiple of it."
        )


def estimate_on_ranks(
    trainer: pl.Trainer,
    run: Callable[[SGLDConfig], LLCResult | Failure],
    config: SGLDConfig,
    criteria: HealthCriteria | None,
) -> LLCResult:
    """``run(config with this rank's share of the chains)`` on every rank, merged.

    ``run`` returns a :class:`~slt_callbacks.callbacks._guard.Failure` instead of raising
    (see ``attempt``): every rank reaches the gather, failed or not, so that one rank's
    failure cannot leave the others waiting in a collective; then all ranks raise it alike.
    """
    world, rank = trainer.world_size, trainer.global_rank
    outcome = run(replace(config, num_chains=split(config.num_chains, world, rank)))
    if world == 1:
        raise_if_any_failed([outcome])
        assert isinstance(outcome, LLCResult)
        return outcome
    parts = gather(outcome if isinstance(outcome, Failure) else to_cpu(outcome), trainer)
    raise_if_any_failed(parts)
    merged = merge_results(parts, criteria=criteria)
    return replace(merged, config=replace(merged.config, backend=config.backend))


def to_cpu(result: LLCResult) -> LLCResult:
    """The result with every tensor on the CPU, so that it pickles across ranks whatever the
    device of the chains."""
    summary = result.summary
    summary = replace(summary, **{f.name: getattr(summary, f.name).cpu() for f in fields(summary)})
    tensors = {
        f.name: value.cpu()
        for f in fields(result)
        if isinstance(value := getattr(result, f.name), torch.Tensor)
    }
    components = {name: to_cpu(part) for name, part in result.components.items()}
    return replace(result, **tensors, summary=summary, components=components)


class RankedEstimator:
    """``estimate_llc`` as an inline monitor runs it: this rank's share of the chains, with
    this rank's seed, merged over ranks (:func:`estimate_on_ranks`).

    The signature is that of the ``estimate=`` hook of
    :func:`~slt_callbacks.executors.estimate_all`. Once the vmap backend failed for the model
    (``backend="auto"`` fell back to the loop, and the core warned), later estimates go to
    the loop backend directly instead of failing over at every step.

    """

    def __init__(self) -> None:
        self.backend: str | None = None  # "loop" once vmap failed

    def bind(self, trainer: pl.Trainer, root_seed: int, step: int) -> Callable[..., LLCResult]:
        """The estimator of ``step`` (for ``estimate_all(..., estimate=...)``); each rank's
        seed is derived from (``root_seed``, step, rank, tag), not the ``seed`` it is given
        (rank zero's, the one a sweep of the snapshot uses)."""

        def estimate(model: Any, loss_fn: LossFn, batches: list[Any], *, config: SGLDConfig,
                     components: Mapping[str, Selector] | None, seed: int, tag: str,
                     criteria: HealthCriteria | None) -> LLCResult:  # fmt: skip
            if self.backend is not None:
                config = replace(config, backend=self.backend)

            def run(local: SGLDConfig) -> LLCResult | Failure:
                outcome = attempt(
                    estimate_llc, model, loss_fn, batches, config=local, components=components,
                    seed=derive_seed(root_seed, step, trainer.global_rank, tag),
                    on_failure="ignore",  # the monitor reports health, once a step
                    criteria=criteria, rank=trainer.global_rank,
                )
                if (isinstance(outcome, LLCResult) and local.backend == "auto"
                        and outcome.fell_back_to_loop):  # fmt: skip
                    self.backend = "loop"
                return outcome

            return estimate_on_ranks(trainer, run, config, criteria)

        return estimate
