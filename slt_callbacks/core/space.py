"""The coordinates one component samples, and how they re-enter the model.

A weight-restricted LLC (Wang et al. 2024) samples a component's coordinates with every other
coordinate frozen at w*. A chain of such a component carries only its own coordinates: a
flat vector θ_k of length d_k (the number of entries its masks select), not a copy of all D
parameters. The frozen rest is shared by every chain, once: it is w* itself.

To evaluate the loss, each sampled parameter is rebuilt from θ_k:

- a parameter the component owns entirely is a view of θ_k (no copy);
- a parameter it owns in part (an attention head's columns of a fused QKV weight) is w* with
  the component's entries scattered in (``index_copy``, differentiable w.r.t. the entries),
  so autograd returns gradients for exactly the sampled entries;
- a parameter it does not touch is w*, unbatched and without gradient: autograd computes no
  weight gradient for it at all.

Component 0 is the whole model: every trainable parameter, entirely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """One parameter's share of a component's vector.

    Attributes:
        name: the parameter (model-relative name).
        shape: the parameter's shape.
        offset: where its entries start in the component's vector.
        size: how many entries it contributes.
        index: ``(size,)`` positions in the flattened parameter, or None for all of them.
    """

    name: str
    shape: torch.Size
    offset: int
    size: int
    index: torch.Tensor | None


@dataclass
class ComponentSpace:
    """A component's sampled coordinates: ``theta0`` (``(size,)``) is w* restricted to them."""

    segments: list[Segment]
    size: int
    theta0: torch.Tensor
    w_star: Mapping[str, torch.Tensor]

    @classmethod
    def of(
        cls,
        w_star: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor | None] | None = None,
    ) -> ComponentSpace:
        """The space of ``masks`` (``{name: bool mask or None for all}``; None: every
        parameter of ``w_star`` entirely), in the order of ``w_star``."""
        segments, pieces, offset = [], [], 0
        for name, w in w_star.items():
            if masks is not None and name not in masks:
                continue
            mask = None if masks is None else masks[name]
            index = None
            if mask is not None and not bool(mask.all()):
                index = mask.to(w.device).reshape(-1).nonzero().squeeze(1)
            flat = w.reshape(-1)
            piece = flat if index is None else flat.index_select(0, index)
            segments.append(Segment(name, w.shape, offset, piece.numel(), index))
            pieces.append(piece)
            offset += piece.numel()
        theta0 = torch.cat(pieces) if pieces else torch.empty(0)
        return cls(segments=segments, size=offset, theta0=theta0, w_star=w_star)

    @property
    def scattered_numel(self) -> int:
        """Entries of the partly-owned parameters, which each chain rebuilds per step."""
        return sum(s.shape.numel() for s in self.segments if s.index is not None)

    def leaves(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """Fresh autograd leaves, one per segment, sharing ``theta``'s storage (``theta``
        is ``(size,)``, or ``(slots, size)`` for a batched call). A parameter the component
        owns entirely is a leaf of the parameter's shape (after the slot dimension), so it
        goes into the model as it is; a partly-owned one is a leaf of its flat entries.

        The leaves follow ``theta`` as it is updated in place, so a chunk builds them once
        and reuses them at every step (each step's graph is a new one)."""
        out = []
        for s in self.segments:
            piece = theta[..., s.offset : s.offset + s.size]
            if s.index is None:
                piece = piece.view(*theta.shape[:-1], *s.shape)
            out.append(piece.detach().requires_grad_(True))
        return out

    @property
    def has_scattered(self) -> bool:
        """Whether a parameter is owned in part (rebuilt from w* at every step)."""
        return any(s.index is not None for s in self.segments)

    def tensors(self, leaves: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sampled parameters at the leaves' values (from :meth:`leaves`), each of the
        parameter's shape (with the leaves' leading slot dimension, if any)."""
        out = {}
        for s, leaf in zip(self.segments, leaves, strict=True):
            if s.index is None:
                out[s.name] = leaf
                continue
            lead = leaf.shape[:-1]
            base = self.w_star[s.name].reshape(-1).expand(*lead, -1)
            out[s.name] = base.index_copy(base.dim() - 1, s.index, leaf).view(*lead, *s.shape)
        return out

    def write_grads(
        self, grads: list[torch.Tensor | None], out: torch.Tensor
    ) -> None:
        """Lay the per-segment gradients out flat in ``out`` (``(..., size)``); a segment
        the loss does not depend on gets zeros."""
        for s, g in zip(self.segments, grads, strict=True):
            view = out[..., s.offset : s.offset + s.size]
            if g is None:
                view.zero_()
            else:
                view.copy_(g.reshape(view.shape))
