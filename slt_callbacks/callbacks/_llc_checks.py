"""The argument checks of :class:`~slt_callbacks.LLCMonitor`, made before any training."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.core.diagnostics import HealthCriteria

from ._calibration import check_config
from ._data import check_data_argument

__all__ = ["check_default_n_beta", "check_llc_arguments"]


def check_llc_arguments(
    *,
    config: Any,
    calibration: Any,
    components: Any,
    datasets: Any,
    criteria: Any,
    snapshot_dir: Any,
) -> None:
    """``ValueError`` naming the argument, what was expected and what arrived."""
    check_config(config, calibration)
    _check_mapping("components", components)
    _check_mapping("datasets", datasets)
    for name, value in (datasets or {}).items():
        check_data_argument(f"datasets[{name!r}]", value, optional=False)
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


def check_default_n_beta(config: SGLDConfig, batches: list[Any], *, owner: str) -> None:
    """The default nβ = n/log n needs n >= 2 samples; say so now, not at the first
    estimate (where it would be logged as a failed step, step after step)."""
    if config.n_beta is not None:
        return
    num_samples = sum(_batch_len(b) for b in batches)
    if num_samples < 2:
        raise ValueError(
            f"{owner}: `data` holds {num_samples} sample(s), too few "
            "for the default n_beta = n/log n. Pass more data, or SGLDConfig(n_beta=...)."
        )


def _batch_len(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first batched tensor."""
    leaves = [x for x in torch.utils._pytree.tree_leaves(batch)
              if isinstance(x, torch.Tensor) and x.dim()]  # fmt: skip
    return int(leaves[0].shape[0]) if leaves else 1
