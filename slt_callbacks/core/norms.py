"""Weight norms: the L2 norm of all (trainable) parameters, and of each component.

A component is a :data:`~slt_callbacks.core.restrict.Resolved` set of coordinates, as
returned by :func:`~slt_callbacks.core.restrict.resolve_components` or the attention-head
helpers there; its norm counts only the coordinates its masks select.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from slt_callbacks.core.functional import trainable_parameters
from slt_callbacks.core.restrict import Resolved, resolve_selector

__all__ = ["squared_norm", "weight_norms"]


def squared_norm(tensor: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of squares of ``tensor`` (of the entries where ``mask`` is True), as a 0-dim tensor
    on ``tensor``'s device; no host synchronisation.

    Half-precision inputs are accumulated in float32 (a bf16 sum of squares of a large layer
    loses most of its digits); float32 and float64 keep their dtype.
    """
    values = tensor.detach()
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    if mask is not None:
        # torch.where instead of values[mask]: boolean indexing needs the count of True
        # entries on the host, i.e. a device sync per tensor.
        values = torch.where(mask.to(values.device), values, values.new_zeros(()))
    return values.square().sum()


def weight_norms(
    model: nn.Module,
    components: Mapping[str, Resolved] | None = None,
    *,
    trainable_only: bool = True,
) -> dict[str, float]:
    """L2 norms of the model's weights, in total and per component.

    .. math::

        \\lVert w \\rVert_2 = \\Big(\\sum_{p} \\sum_{j} w_{p,j}^2\\Big)^{1/2}, \\qquad
        \\lVert w_C \\rVert_2 = \\Big(\\sum_{p \\in C} \\sum_{j \\in M_{C,p}} w_{p,j}^2\\Big)^{1/2}

    where :math:`M_{C,p}` is the mask component :math:`C` holds for parameter :math:`p` (all
    of it for ``None``). Tied parameters are counted once. All squared sums are computed on
    the parameters' devices and brought to the host together (one transfer per device).

    Args:
        model: the network; not modified.
        components: ``{component name: Resolved}``, already resolved (see
            :func:`~slt_callbacks.core.restrict.resolve_components`); ``None`` for the total
            only.
        trainable_only: count only parameters with ``requires_grad=True`` (the coordinates an
            LLC is defined over); ``False`` counts frozen ones too.

    Returns:
        ``{"total": ‖w‖, <component name>: ‖w_C‖, ...}`` as Python floats.

    Raises:
        ValueError: ``trainable_only`` is not a bool; ``components`` is not a mapping, uses
            the reserved name ``"total"``, or names a parameter that is not counted (e.g.
            a frozen one with ``trainable_only=True``) or holds a mask of the wrong shape.

    Example:
        >>> from slt_callbacks.core.restrict import resolve_components
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> comps = resolve_components(model, {"first": "0.*"})
        >>> sorted(weight_norms(model, comps))
        ['first', 'total']
    """
    if not isinstance(trainable_only, bool):
        raise ValueError(
            f"Expected `trainable_only` to be a bool but got {type(trainable_only).__name__}."
        )
    params = trainable_parameters(model) if trainable_only else dict(model.named_parameters())
    components = _validate_components(components, params)

    full = {name: squared_norm(p) for name, p in params.items()}
    entries: list[tuple[str, torch.Tensor]] = [("total", s) for s in full.values()]
    for component, resolved in components.items():
        for name, mask in resolved.items():
            # An unmasked parameter's squared sum is already computed; reuse it.
            part = full[name] if mask is None else squared_norm(params[name], mask)
            entries.append((component, part))

    parts: dict[str, list[float]] = {"total": [], **{c: [] for c in components}}
    for (component, _), value in zip(entries, _to_host([e[1] for e in entries]), strict=True):
        parts[component].append(value)
    return {component: math.sqrt(math.fsum(values)) for component, values in parts.items()}


def _validate_components(
    components: Mapping[str, Resolved] | None, params: Mapping[str, torch.Tensor]
) -> dict[str, Resolved]:
    if components is None:
        return {}
    if not isinstance(components, Mapping):
        raise ValueError(
            "Expected `components` to be a mapping from component name to resolved masks but "
            f"got {type(components).__name__}."
        )
    out: dict[str, Resolved] = {}
    for component, resolved in components.items():
        if component == "total":
            raise ValueError(
                "`components` may not contain a component named 'total': that key holds the "
                "norm of all parameters."
            )
        argument = f"components[{component!r}]"
        if not isinstance(resolved, Mapping):
            raise ValueError(
                f"Expected `{argument}` to be resolved ({{parameter_name: None or bool mask}}, "
                "see slt_callbacks.core.restrict.resolve_components) but got "
                f"{type(resolved).__name__}."
            )
        out[component] = resolve_selector(resolved, params, argument=argument)
    return out


def _to_host(values: list[torch.Tensor]) -> list[float]:
    """Scalars to Python floats with one transfer per device rather than one per scalar."""
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    out: dict[int, float] = {}
    for device, indices in by_device.items():
        # float64 where the device has it, so that fsum of the parts matches one big sum.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        stacked = torch.stack([values[i].to(dtype) for i in indices])
        out.update(zip(indices, stacked.tolist(), strict=True))
    return [out[i] for i in range(len(values))]
