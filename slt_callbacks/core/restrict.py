"""Components: which coordinates of a model a restricted estimate looks at.

A *component* is a named set of parameter coordinates (Wang et al. 2024, "Differentiation
and specialization of attention heads via the refined local learning coefficient"). A
weight-restricted LLC samples only these coordinates and keeps every other one frozen at w*;
a per-component weight norm measures only these coordinates.

A selector may be

- a glob over parameter names, ``"layers.1.*"`` (``fnmatch`` syntax);
- a list of globs (their union);
- a mapping ``{parameter_name: bool_mask}`` with one mask of the parameter's shape each, for
  slices of a tensor such as one attention head's rows of a fused QKV projection (``None``
  instead of a mask means the whole tensor).

:func:`resolve_components` turns selectors into :data:`Resolved` components: for each
parameter the component touches, ``None`` (the whole tensor) or a boolean mask.
:func:`attention_head_components` and :func:`fused_qkv_head_components` build one
component per attention head.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .._checks import check_int

Selector = str | Sequence[str] | Mapping[str, torch.Tensor]
"""A glob, a list of globs, or ``{parameter_name: bool mask}``."""

Resolved = dict[str, torch.Tensor | None]
"""``{parameter_name: None (whole tensor) or bool mask of the parameter's shape}``."""


def resolve_selector(
    selector: Selector,
    parameters: Mapping[str, torch.Tensor],
    *,
    argument: str = "components",
) -> Resolved:
    """Resolve one selector against ``parameters`` (name -> tensor).

    Raises:
        ValueError: a glob matches no parameter, a mask names an unknown parameter, has the
            wrong shape or is not boolean, or the selector is of an unknown type. The message
            names ``argument``.
    """
    if isinstance(selector, str):
        selector = [selector]
    if isinstance(selector, Mapping):
        return _resolve_masks(selector, parameters, argument)
    if isinstance(selector, Sequence) and all(isinstance(g, str) for g in selector):
        if len(selector) == 0:
            raise ValueError(f"Expected `{argument}` to list at least one glob but got [].")
        resolved: Resolved = {}
        for glob in selector:
            matched = [name for name in parameters if fnmatch.fnmatchcase(name, glob)]
            if not matched:
                raise ValueError(
                    f"`{argument}`: the glob {glob!r} matches no trainable parameter. "
                    f"Parameters are named like {_examples(parameters)}."
                )
            for name in matched:
                resolved[name] = None
        return resolved
    raise ValueError(
        f"Expected `{argument}` to be a glob string, a list of globs or a mapping from "
        f"parameter name to boolean mask, but got {type(selector).__name__}."
    )


def _resolve_masks(
    masks: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor], argument: str
) -> Resolved:
    if len(masks) == 0:
        raise ValueError(f"Expected `{argument}` to hold at least one mask but got {{}}.")
    resolved: Resolved = {}
    for name, mask in masks.items():
        if name not in parameters:
            raise ValueError(
                f"`{argument}`: the mask for {name!r} names no trainable parameter. "
                f"Parameters are named like {_examples(parameters)}."
            )
        if mask is None:  # the whole tensor, as in a resolved component
            resolved[name] = None
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"`{argument}`: expected the mask for {name!r} to be a bool tensor but got {got}."
            )
        shape = tuple(parameters[name].shape)
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"`{argument}`: expected the mask for {name!r} to have the parameter's shape "
                f"{shape} but got {tuple(mask.shape)}."
            )
        if not bool(mask.any()):
            raise ValueError(f"`{argument}`: the mask for {name!r} selects no entry.")
        resolved[name] = mask.detach()
    return resolved


def _examples(parameters: Mapping[str, torch.Tensor], k: int = 4) -> str:
    names = list(parameters)
    shown = ", ".join(repr(n) for n in names[:k])
    return f"[{shown}{', ...' if len(names) > k else ''}]"


def resolve_components(
    model: nn.Module,
    components: Mapping[str, Selector] | None,
    *,
    argument: str = "components",
) -> dict[str, Resolved]:
    """Resolve every selector in ``components`` against ``model``'s trainable parameters.

    Raises:
        ValueError: see :func:`resolve_selector`; also for a non-string component name.
    """
    if components is None:
        return {}
    if not isinstance(components, Mapping):
        raise ValueError(
            f"Expected `{argument}` to be a mapping from component name to selector but got "
            f"{type(components).__name__}."
        )
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out: dict[str, Resolved] = {}
    for name, selector in components.items():
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"Expected the keys of `{argument}` to be non-empty strings but got {name!r}."
            )
        out[name] = resolve_selector(selector, parameters, argument=f"{argument}[{name!r}]")
    return out


def component_mask(
    resolved: Resolved, parameters: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Full boolean masks for every parameter (all-False for parameters not in the component)."""
    out = {}
    for name, p in parameters.items():
        if name not in resolved:
            out[name] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        elif resolved[name] is None:
            out[name] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
        else:
            out[name] = resolved[name].to(p.device)
    return out


def attention_head_components(
    model: nn.Module, module_name: str, *, include_output: bool = True, prefix: str | None = None
) -> dict[str, Resolved]:
    """One component per head of the :class:`torch.nn.MultiheadAttention` at ``module_name``.

    Head ``h`` owns rows ``h*d:(h+1)*d`` of each of the Q, K and V blocks of
    ``in_proj_weight`` (and ``in_proj_bias``), or of ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight`` when ``kdim``/``vdim`` differ, and, with ``include_output``, columns
    ``h*d:(h+1)*d`` of ``out_proj.weight``. The output bias is shared by all heads and belongs
    to none.

    Returns:
        ``{f"{prefix}.head{h}": {parameter_name: mask}}`` with ``prefix`` defaulting to
        ``module_name``; usable directly as ``components=``.

    Example:
        >>> mha = nn.MultiheadAttention(8, num_heads=2)
        >>> model = nn.ModuleDict({"attn": mha})
        >>> sorted(attention_head_components(model, "attn"))
        ['attn.head0', 'attn.head1']
    """
    module = _get_submodule(model, module_name, nn.MultiheadAttention)
    num_heads, embed = module.num_heads, module.embed_dim
    head_dim = embed // num_heads
    prefix = module_name if prefix is None else prefix
    full = f"{module_name}." if module_name else ""
    out: dict[str, Resolved] = {}
    for h in range(num_heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        masks: Resolved = {}
        if module.in_proj_weight is not None:
            w = torch.zeros_like(module.in_proj_weight, dtype=torch.bool)
            for block in range(3):
                w[block * embed + rows.start : block * embed + rows.stop] = True
            masks[f"{full}in_proj_weight"] = w
        else:
            for which in ("q", "k", "v"):
                weight = getattr(module, f"{which}_proj_weight")
                w = torch.zeros_like(weight, dtype=torch.bool)
                w[rows] = True
                masks[f"{full}{which}_proj_weight"] = w
        if module.in_proj_bias is not None:
            b = torch.zeros_like(module.in_proj_bias, dtype=torch.bool)
            for block in range(3):
                b[block * embed + rows.start : block * embed + rows.stop] = True
            masks[f"{full}in_proj_bias"] = b
        if include_output:
            o = torch.zeros_like(module.out_proj.weight, dtype=torch.bool)
            o[:, rows] = True
            masks[f"{full}out_proj.weight"] = o
        out[f"{prefix}.head{h}"] = _keep_trainable(model, masks)
    return out


def fused_qkv_head_components(
    model: nn.Module,
    qkv_name: str,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    out_proj_name: str | None = None,
    prefix: str | None = None,
) -> dict[str, Resolved]:
    """One component per query head of a fused QKV :class:`torch.nn.Linear`.

    The fused weight's rows are laid out ``[Q (num_heads*d) | K (num_kv_heads*d) |
    V (num_kv_heads*d)]`` (GPT-2 style ``c_attn`` after transposition, Llama-style fused
    ``qkv_proj``). With grouped-query attention (``num_kv_heads < num_heads``) query head
    ``h`` shares the K/V rows of group ``h // (num_heads // num_kv_heads)``; those rows then
    belong to every head of the group. With ``out_proj_name``, head ``h`` also owns columns
    ``h*d:(h+1)*d`` of that linear layer's weight.

    Raises:
        ValueError: the module is not a Linear, or the head counts do not divide its width.
    """
    num_heads = check_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"Expected `num_kv_heads` to be a positive divisor of num_heads={num_heads} but "
            f"got {num_kv_heads!r}."
        )
    qkv = _get_submodule(model, qkv_name, nn.Linear)
    rows_total = qkv.out_features
    units = num_heads + 2 * num_kv_heads
    if rows_total % units:
        raise ValueError(
            f"`{qkv_name}` has out_features={rows_total}, which is not (num_heads + "
            f"2*num_kv_heads) * head_dim for num_heads={num_heads}, num_kv_heads={num_kv_heads}."
        )
    head_dim = rows_total // units
    group = num_heads // num_kv_heads
    k_off, v_off = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    out_proj = _get_submodule(model, out_proj_name, nn.Linear) if out_proj_name else None
    prefix = qkv_name if prefix is None else prefix
    out: dict[str, Resolved] = {}
    for h in range(num_heads):
        g = h // group
        row_sets = [
            slice(h * head_dim, (h + 1) * head_dim),
            slice(k_off + g * head_dim, k_off + (g + 1) * head_dim),
            slice(v_off + g * head_dim, v_off + (g + 1) * head_dim),
        ]
        w = torch.zeros_like(qkv.weight, dtype=torch.bool)
        for rows in row_sets:
            w[rows] = True
        masks: Resolved = {f"{qkv_name}.weight": w}
        if qkv.bias is not None:
            b = torch.zeros_like(qkv.bias, dtype=torch.bool)
            for rows in row_sets:
                b[rows] = True
            masks[f"{qkv_name}.bias"] = b
        if out_proj is not None:
            if out_proj.in_features != num_heads * head_dim:
                raise ValueError(
                    f"`{out_proj_name}` has in_features={out_proj.in_features} but "
                    f"num_heads*head_dim = {num_heads * head_dim}."
                )
            o = torch.zeros_like(out_proj.weight, dtype=torch.bool)
            o[:, h * head_dim : (h + 1) * head_dim] = True
            masks[f"{out_proj_name}.weight"] = o
        out[f"{prefix}.head{h}"] = _keep_trainable(model, masks)
    return out


def _get_submodule(model: nn.Module, name: str, kind: type[nn.Module]) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"The model has no submodule named {name!r}.") from err
    if not isinstance(module, kind):
        raise ValueError(
            f"Expected {name!r} to be a {kind.__name__} but it is a {type(module).__name__}."
        )
    return module


def _keep_trainable(model: nn.Module, masks: Resolved) -> Resolved:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kept = {name: m for name, m in masks.items() if name in trainable}
    if not kept:
        raise ValueError(f"None of {sorted(masks)} is a trainable parameter of the model.")
    return kept
