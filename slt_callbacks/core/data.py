"""The batch pool: a user's batches, materialised once, indexed by chain.

Fetching a batch through a ``DataLoader`` costs about as much as a forward+backward of a
small network (SLT_PRIMER §7), so the chains never touch the loader while they sample: the
batches are drawn once into stacked tensors of shape ``(num_batches, batch, ...)`` on the
sampling device, and each SGLD step gathers one batch per chain with a single index.

The pool also defines the data of the estimate: L_n is the mean loss over the pool and the
default nβ uses its sample count.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .config import DEFAULT_MAX_BATCHES


@dataclass
class BatchPool:
    """Stacked batches. ``leaves[i]`` has shape ``(num_batches, *leaf_shape)``.

    Non-tensor leaves (strings, ints in a dict batch) are taken from the first batch and
    passed through unchanged.
    """

    leaves: list[torch.Tensor | Any]
    is_tensor: list[bool]
    spec: pytree.TreeSpec
    num_batches: int
    batch_size: int
    num_skipped: int = 0
    num_distinct: int | None = None

    @property
    def device(self) -> torch.device:
        return next(leaf for leaf, t in self._tensors() if t).device

    @property
    def num_samples(self) -> int:
        """n: samples of distinct data in the pool (a cycled pool repeats batches).

        The leading dimension of the batch tensors is taken as the batch dimension; with
        another layout pass ``n_beta`` explicitly."""
        distinct = self.num_batches if self.num_distinct is None else self.num_distinct
        return distinct * self.batch_size

    def batch(self, index: int) -> Any:
        """Batch ``index`` as the user's loss function expects it."""
        leaves = [
            leaf[index] if is_t else leaf
            for leaf, is_t in zip(self.leaves, self.is_tensor, strict=True)
        ]
        return pytree.tree_unflatten(leaves, self.spec)

    def tensor_leaves(self, index: int) -> list[torch.Tensor]:
        """Tensor leaves of batch ``index`` (views, no copy)."""
        return [leaf[index] for leaf, t in self._tensors() if t]

    def gather(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Tensor leaves of batches ``indices`` (shape ``(slots,)``): each ``(slots, ...)``."""
        return [leaf.index_select(0, indices) for leaf, t in self._tensors() if t]

    def unflatten(self, tensor_leaves: list[Any]) -> Any:
        """Rebuild a batch from its tensor leaves (constants filled back in)."""
        it = iter(tensor_leaves)
        leaves = [next(it) if t else leaf for leaf, t in self._tensors()]
        return pytree.tree_unflatten(leaves, self.spec)

    def _tensors(self):
        return zip(self.leaves, self.is_tensor, strict=True)


def build_pool(
    data: Iterable[Any],
    *,
    num_batches: int | None,
    device: torch.device,
    float_dtype: torch.dtype | None = None,
    argument: str = "data",
) -> BatchPool:
    """Draw batches from ``data`` into a :class:`BatchPool` on ``device``.

    Args:
        data: an iterable of batches (DataLoader, list of tensors / tuples / dicts). It is
            iterated once (cycled if ``num_batches`` asks for more than one pass holds).
        num_batches: how many batches to keep; None means one pass, at most
            :data:`~slt_callbacks.core.config.DEFAULT_MAX_BATCHES`.
        device: where the pool lives (the model's device).
        float_dtype: if given, floating-point leaves are cast to it (half-precision models
            are sampled in float32).
        argument: the name used in error messages.

    Raises:
        ValueError: ``data`` is a bare tensor, is empty, or has batches without tensors.
    """
    if isinstance(data, torch.Tensor):
        raise ValueError(
            f"Expected `{argument}` to be an iterable of batches (a DataLoader or a list of "
            f"batches) but got a single Tensor of shape {tuple(data.shape)}; pass [tensor] "
            "for one batch."
        )
    try:
        iterator = iter(data)
    except TypeError as err:
        raise ValueError(
            f"Expected `{argument}` to be an iterable of batches but got "
            f"{type(data).__name__}."
        ) from err
    limit = DEFAULT_MAX_BATCHES if num_batches is None else num_batches
    batches: list[list[Any]] = []
    spec = shapes = is_tensor = None
    skipped = 0
    for batch in itertools.islice(iterator, limit if num_batches is None else None):
        leaves, this_spec = pytree.tree_flatten(batch)
        this_is_tensor = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        if spec is None:
            if not any(this_is_tensor):
                raise ValueError(
                    f"Expected the batches of `{argument}` to contain tensors but the first "
                    f"batch is {type(batch).__name__} with no tensor in it."
                )
            spec, is_tensor = this_spec, this_is_tensor
            shapes = _shapes(leaves, is_tensor)
        if this_spec != spec or _shapes(leaves, this_is_tensor) != shapes:
            # Typically the smaller last batch of an epoch: batches must stack.
            skipped += 1
            continue
        batches.append(leaves)
        if len(batches) == limit:
            break
    if not batches:
        raise ValueError(
            f"Expected `{argument}` to yield at least one batch but it was empty."
            if spec is None
            else f"No batch of `{argument}` could be used (all {skipped} differed in shape)."
        )
    distinct = len(batches)
    if num_batches is not None and distinct < num_batches:
        # Cycle what one pass gave: the pool holds num_batches batches, but only `distinct`
        # of them are different data, and only those count towards n.
        warnings.warn(
            f"`{argument}` yielded {distinct} usable batch(es) but num_batches={num_batches}; "
            "the pool repeats them, and n (the default nβ = n/log n) counts each once.",
            stacklevel=3,
        )
        batches = [batches[i % distinct] for i in range(num_batches)]
    assert spec is not None and is_tensor is not None
    stacked: list[Any] = []
    for j, t in enumerate(is_tensor):
        if not t:
            stacked.append(batches[0][j])
            continue
        leaf = torch.stack([b[j].detach() for b in batches]).to(device)
        if float_dtype is not None and leaf.is_floating_point():
            leaf = leaf.to(float_dtype)
        stacked.append(leaf)
    return BatchPool(
        leaves=stacked,
        is_tensor=is_tensor,
        spec=spec,
        num_batches=len(batches),
        batch_size=_batch_size(stacked, is_tensor),
        num_skipped=skipped,
        num_distinct=distinct,
    )


def _batch_size(stacked: list[Any], is_tensor: list[bool]) -> int:
    """Samples per batch: the most common leading dimension of the batch's tensors (a
    scalar tensor in a dict batch, a count say, has none and does not vote)."""
    sizes = [int(leaf.shape[1]) for leaf, t in zip(stacked, is_tensor, strict=True)
             if t and leaf.dim() > 1]
    return max(set(sizes), key=sizes.count) if sizes else 1


def _shapes(leaves: list[Any], is_tensor: list[bool]) -> list[tuple[int, ...] | None]:
    return [tuple(leaf.shape) if t else None for leaf, t in zip(leaves, is_tensor, strict=True)]
