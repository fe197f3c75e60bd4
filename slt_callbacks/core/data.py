"""The batch pool: a user's batches, materialised once, indexed by chain.

Fetching a batch through a ``DataLoader`` costs about as much as a forward+backward of a
small network (SLT_PRIMER §7), so the chains never touch the loader while they sample: the
batches are drawn once onto the sampling device, and each SGLD step picks one batch per chain
by index.

Batches need not share a shape. Language-model loaders pad each batch to its own longest
sequence, and an epoch usually ends on a smaller batch; every one of them is kept. Batches of
one shape are stacked into a :class:`ShapeGroup` of shape ``(batches_in_group, *leaf_shape)``
so that a batched backend can gather all the chains that drew batches of one shape with a
single index; a pool of one shape is one group.

The pool also defines the data of the estimate: L_n is the mean of the pool's batch losses
and the default nβ uses its sample count, which counts every distinct batch's samples.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .config import DEFAULT_MAX_BATCHES


@dataclass
class ShapeGroup:
    """The pool's batches of one shape: ``leaves[j]`` is ``(len(members), *shape_j)``."""

    leaves: list[torch.Tensor]
    members: list[int]


@dataclass
class BatchPool:
    """The batches the chains sample from, grouped by shape.

    Non-tensor leaves (strings, ints in a dict batch) are taken from the first batch and
    passed through unchanged.

    Attributes:
        groups: batches stacked by shape.
        group_of: ``group_of[i]`` is the group of pool batch ``i``.
        position: ``position[i]`` is batch ``i``'s index inside its group.
        num_samples: n, the samples of distinct data in the pool (a cycled pool repeats
            batches, and repeats are not counted). The leading dimension of a batch's
            tensors is its batch dimension; with another layout pass ``n_beta`` explicitly.
    """

    groups: list[ShapeGroup]
    group_of: list[int]
    position: list[int]
    constants: list[Any]
    is_tensor: list[bool]
    spec: pytree.TreeSpec
    num_samples: int
    num_distinct: int

    @property
    def num_batches(self) -> int:
        return len(self.group_of)

    @property
    def device(self) -> torch.device:
        return self.groups[0].leaves[0].device

    def tensor_leaves(self, index: int) -> list[torch.Tensor]:
        """Tensor leaves of batch ``index`` (views, no copy)."""
        group = self.groups[self.group_of[index]]
        return [leaf[self.position[index]] for leaf in group.leaves]

    def batch(self, index: int) -> Any:
        """Batch ``index`` as the user's loss function expects it."""
        return self.unflatten(self.tensor_leaves(index))

    def gather(self, group: int, positions: torch.Tensor) -> list[torch.Tensor]:
        """Tensor leaves of the batches at ``positions`` (``(slots,)``, on the pool's device)
        of shape group ``group``: each ``(slots, ...)``."""
        return [leaf.index_select(0, positions) for leaf in self.groups[group].leaves]

    def split_by_shape(self, indices: Sequence[int]) -> list[tuple[int, list[int]]]:
        """``[(group, rows)]``: which entries of ``indices`` (pool indices) share a shape."""
        rows: dict[int, list[int]] = {}
        for row, index in enumerate(indices):
            rows.setdefault(self.group_of[index], []).append(row)
        return list(rows.items())

    def unflatten(self, tensor_leaves: Sequence[Any]) -> Any:
        """Rebuild a batch from its tensor leaves (constants filled back in)."""
        it = iter(tensor_leaves)
        leaves = [next(it) if t else c for c, t in zip(self.constants, self.is_tensor,
                                                        strict=True)]
        return pytree.tree_unflatten(leaves, self.spec)


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
            Batches may differ in shape (a smaller last batch, per-batch padding).
        num_batches: how many batches to keep; None means one pass, at most
            :data:`~slt_callbacks.core.config.DEFAULT_MAX_BATCHES`.
        device: where the pool lives (the model's device).
        float_dtype: if given, floating-point leaves are cast to it (half-precision models
            are sampled in float32).
        argument: the name used in error messages.

    Raises:
        ValueError: ``data`` is a bare tensor, is empty, has batches without tensors, or
            batches of different structure (another nesting, other keys).
    """
    batches, spec, is_tensor = _draw(data, num_batches, argument)
    distinct = len(batches)
    sizes = [_batch_size(leaves, is_tensor) for leaves in batches]
    if num_batches is not None and distinct < num_batches:
        # Cycle what one pass gave: the pool holds num_batches batches, but only `distinct`
        # of them are different data, and only those count towards n.
        warnings.warn(
            f"`{argument}` yielded {distinct} usable batch(es) but num_batches={num_batches}; "
            "the pool repeats them, and n (the default nβ = n/log n) counts each once.",
            stacklevel=3,
        )
        batches = [batches[i % distinct] for i in range(num_batches)]
    groups, group_of, position = _group_by_shape(batches, is_tensor, device, float_dtype)
    return BatchPool(
        groups=groups,
        group_of=group_of,
        position=position,
        constants=[None if t else leaf for leaf, t in zip(batches[0], is_tensor, strict=True)],
        is_tensor=is_tensor,
        spec=spec,
        num_samples=sum(sizes),
        num_distinct=distinct,
    )


def _draw(
    data: Iterable[Any], num_batches: int | None, argument: str
) -> tuple[list[list[Any]], pytree.TreeSpec, list[bool]]:
    """Flattened batches of one pass (or ``num_batches`` of them), structure checked."""
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
    spec = is_tensor = None
    for i, batch in enumerate(itertools.islice(iterator, limit)):
        leaves, this_spec = pytree.tree_flatten(batch)
        this_is_tensor = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        if spec is None:
            if not any(this_is_tensor):
                raise ValueError(
                    f"Expected the batches of `{argument}` to contain tensors but the first "
                    f"batch is {type(batch).__name__} with no tensor in it."
                )
            spec, is_tensor = this_spec, this_is_tensor
        elif this_spec != spec or this_is_tensor != is_tensor:
            raise ValueError(
                f"Expected every batch of `{argument}` to have the structure of the first "
                f"({spec}) but batch {i} is {this_spec}."
            )
        batches.append([leaf.detach() if t else leaf
                        for leaf, t in zip(leaves, this_is_tensor, strict=True)])
    if spec is None or is_tensor is None:
        raise ValueError(f"Expected `{argument}` to yield at least one batch but it was empty.")
    return batches, spec, is_tensor


def _group_by_shape(
    batches: list[list[Any]],
    is_tensor: list[bool],
    device: torch.device,
    float_dtype: torch.dtype | None,
) -> tuple[list[ShapeGroup], list[int], list[int]]:
    keys: dict[tuple, int] = {}
    members: list[list[int]] = []
    group_of, position = [], []
    for i, leaves in enumerate(batches):
        key = tuple(tuple(leaf.shape) for leaf, t in zip(leaves, is_tensor, strict=True) if t)
        g = keys.setdefault(key, len(keys))
        if g == len(members):
            members.append([])
        group_of.append(g)
        position.append(len(members[g]))
        members[g].append(i)
    groups = []
    for rows in members:
        stacked = []
        for j, t in enumerate(is_tensor):
            if not t:
                continue
            leaf = torch.stack([batches[i][j] for i in rows]).to(device)
            if float_dtype is not None and leaf.is_floating_point():
                leaf = leaf.to(float_dtype)
            stacked.append(leaf)
        groups.append(ShapeGroup(leaves=stacked, members=rows))
    return groups, group_of, position


def _batch_size(leaves: list[Any], is_tensor: list[bool]) -> int:
    """Samples in one batch: the most common leading dimension of its tensors (a scalar
    tensor in a dict batch, a count say, has none and does not vote)."""
    sizes = [int(leaf.shape[0]) for leaf, t in zip(leaves, is_tensor, strict=True)
             if t and leaf.dim() > 0]
    return max(set(sizes), key=sizes.count) if sizes else 1
