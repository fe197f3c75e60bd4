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
:func:`~slt_callbacks.head_components` (in :mod:`.heads`) builds one component per
attention head of the architectures it recognises; :func:`attention_head_components` (one
``nn.MultiheadAttention``) and :func:`fused_qkv_head_components` (a fused QKV of your own, with
an explicit ``layout``) remain for single modules.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_int
from . import heads as _heads

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


def attention_head_components(
    model: nn.Module, module_name: str, *, include_output: bool = True, prefix: str | None = None
) -> dict[str, Resolved]:
    """One component per head of the :class:`torch.nn.MultiheadAttention` at ``module_name``.

    Prefer :func:`~slt_callbacks.head_components`, which finds every attention module of the
    model itself; this names one module and keeps its own naming. Head ``h`` owns rows
    ``h*d:(h+1)*d`` of each of the Q, K and V blocks of ``in_proj_weight`` (and
    ``in_proj_bias``), or of ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when
    ``kdim``/``vdim`` differ, its slice of ``bias_k``/``bias_v`` (``add_bias_kv``), and, with
    ``include_output``, columns ``h*d:(h+1)*d`` of ``out_proj.weight``. The output bias is
    shared by all heads and belongs to none. The masks are those of
    :func:`~slt_callbacks.head_components` (one builder, proven by its oracle test).

    Returns:
        ``{f"{prefix}.head{h}": {parameter_name: mask}}`` with ``prefix`` defaulting to
        ``module_name``; usable directly as ``components=``.

    Raises:
        ValueError: no submodule ``module_name``, or it is not an ``nn.MultiheadAttention``.

    Example:
        >>> mha = nn.MultiheadAttention(8, num_heads=2)
        >>> model = nn.ModuleDict({"attn": mha})
        >>> sorted(attention_head_components(model, "attn"))
        ['attn.head0', 'attn.head1']
    """
    module = _get_submodule(model, module_name, nn.MultiheadAttention)
    parts = ("q", "k", "v", "o") if include_output else ("q", "k", "v")
    prefix = module_name if prefix is None else prefix
    full = f"{module_name}." if module_name else ""
    out: dict[str, Resolved] = {}
    num_heads, head = _heads._torch_mha(module)
    for h in range(num_heads):
        masks: Resolved = {f"{full}{n}": m for n, m in _heads.merge_parts(head(h), parts).items()}
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
    layout: str | None = None,
) -> dict[str, Resolved]:
    """One component per query head of a fused QKV :class:`torch.nn.Linear` of your own model.

    For the architectures :func:`~slt_callbacks.head_components` recognises (GPT-2, GPT-NeoX,
    Llama-style, Phi-3, TransformerLens, torch), use that instead: it reads the layout and the
    head counts off the model. This function is for your own attention module, and it cannot
    see how your ``forward`` splits the projection's outputs, so say it with ``layout``:

    - ``"grouped"``: rows ``[Q (num_heads*d) | K (num_kv_heads*d) | V (num_kv_heads*d)]``,
      i.e. ``q, k, v = qkv(x).split(...)`` or ``.view(..., 3, heads, d)``;
    - ``"interleaved"``: rows per head ``[q_h, k_h, v_h]``, i.e. ``.view(..., heads, 3*d)``
      then ``chunk(3, dim=-1)`` (GPT-NeoX); no grouped-query attention.

    With grouped-query attention (``num_kv_heads < num_heads``) query head ``h`` shares the
    K/V rows of group ``h // (num_heads // num_kv_heads)``; those rows then belong to every
    head of the group. With ``out_proj_name``, head ``h`` also owns columns ``h*d:(h+1)*d``
    of that linear layer's weight.

    Checks that keep a wrong layout from passing silently: the module must be an
    ``nn.Linear`` whose width is ``(num_heads + 2*num_kv_heads) * d``; an unfused projection
    (``q_proj`` next to ``k_proj``/``v_proj``) and the fused projection of an architecture
    :func:`~slt_callbacks.head_components` knows with another layout are refused; head counts
    and widths that the enclosing module declares (``num_heads``, ``head_dim``, ...) must match.

    Raises:
        ValueError: any of the checks above fails, or ``layout`` is unknown.

    Warns:
        FutureWarning: ``layout`` omitted; ``"grouped"`` is assumed for now (it used to be
        implicit) and omitting it will become an error.
    """
    layout, num_heads, num_kv_heads = _check_fused_arguments(layout, num_heads, num_kv_heads)
    qkv = _get_submodule(model, qkv_name, nn.Linear)
    _refuse_known_attention(model, qkv_name, layout)
    rows_total = qkv.out_features
    units = num_heads + 2 * num_kv_heads
    if rows_total % units:
        raise ValueError(
            f"`{qkv_name}` has out_features={rows_total}, which is not (num_heads + "
            f"2*num_kv_heads) * head_dim for num_heads={num_heads}, num_kv_heads={num_kv_heads}."
        )
    head_dim = rows_total // units
    _check_declared_heads(model, qkv_name, num_heads, num_kv_heads, head_dim)
    out_proj = _get_submodule(model, out_proj_name, nn.Linear) if out_proj_name else None
    if out_proj is not None and out_proj.in_features != num_heads * head_dim:
        raise ValueError(
            f"`{out_proj_name}` has in_features={out_proj.in_features} but "
            f"num_heads*head_dim = {num_heads * head_dim}."
        )
    prefix = qkv_name if prefix is None else prefix
    out: dict[str, Resolved] = {}
    for h in range(num_heads):
        spans = _heads.fused_qkv_spans(layout, h, num_heads, num_kv_heads, head_dim).values()
        masks: Resolved = {f"{qkv_name}.weight": _heads._span_mask(qkv.weight, 0, *spans)}
        if qkv.bias is not None:
            masks[f"{qkv_name}.bias"] = _heads._span_mask(qkv.bias, 0, *spans)
        if out_proj is not None:
            cols = (h * head_dim, (h + 1) * head_dim)
            masks[f"{out_proj_name}.weight"] = _heads._span_mask(out_proj.weight, 1, cols)
        out[f"{prefix}.head{h}"] = _keep_trainable(model, masks)
    return out


def _check_fused_arguments(
    layout: str | None, num_heads: Any, num_kv_heads: Any
) -> tuple[str, int, int]:
    """``fused_qkv_head_components``' layout and head counts, checked (None layout warns)."""
    if layout is None:
        warnings.warn(
            "fused_qkv_head_components: pass layout='grouped' ([Q | K | V] rows) or "
            "layout='interleaved' (per head [q, k, v], GPT-NeoX); 'grouped' is assumed, and "
            "omitting `layout` will become an error. For Hugging Face, TransformerLens and "
            "torch models use head_components(model), which reads the layout off the model.",
            FutureWarning,
            stacklevel=3,  # the caller of fused_qkv_head_components
        )
        layout = "grouped"
    if layout not in _heads.FUSED_LAYOUTS:
        raise ValueError(
            f"Expected argument `layout` to be one of {list(_heads.FUSED_LAYOUTS)} but got "
            f"{layout!r}."
        )
    num_heads = check_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if (
        isinstance(num_kv_heads, bool)
        or not isinstance(num_kv_heads, int)
        or num_kv_heads < 1
        or num_heads % num_kv_heads
    ):
        raise ValueError(
            f"Expected `num_kv_heads` to be a positive divisor of num_heads={num_heads} but "
            f"got {num_kv_heads!r}."
        )
    if layout == "interleaved" and num_kv_heads != num_heads:
        raise ValueError(
            f"`layout='interleaved'` has one key/value head per query head, but got "
            f"num_kv_heads={num_kv_heads} != num_heads={num_heads}."
        )
    return layout, num_heads, num_kv_heads


_UNFUSED = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v")


def _parent(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    parent_name = name.rsplit(".", 1)[0] if "." in name else ""
    return parent_name, model.get_submodule(parent_name)


def _refuse_known_attention(model: nn.Module, qkv_name: str, layout: str) -> None:
    """Refuse an unfused projection, and a known architecture's projection read wrongly."""
    parent_name, parent = _parent(model, qkv_name)
    leaf = qkv_name.rsplit(".", 1)[-1]
    siblings = [
        n for n in _UNFUSED if n != leaf and isinstance(getattr(parent, n, None), nn.Linear)
    ]
    if leaf in _UNFUSED and siblings:
        raise ValueError(
            f"`{qkv_name}` is an unfused projection (next to {siblings}), not a fused QKV; "
            "use head_components(model), or build the masks by hand."
        )
    for known in _heads.LAYOUTS:
        if known.detect(parent):
            expected = {"hf_gpt_neox": "interleaved", "hf_phi3": "grouped"}.get(known.name)
            if expected != layout:
                raise ValueError(
                    f"`{qkv_name}` belongs to {parent_name!r}, a {known.description}"
                    + (f", whose layout is {expected!r}, not {layout!r}" if expected else "")
                    + "; use head_components(model), which reads the layout off the model."
                )


def _check_declared_heads(
    model: nn.Module, qkv_name: str, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """Head counts and widths the enclosing module declares must match the arguments."""
    parent_name, parent = _parent(model, qkv_name)
    heads_found = _heads._count(
        parent, ("num_heads", "num_attention_heads", "n_heads", "n_head"), ("num_attention_heads",)
    )
    kv_found = _heads._count(
        parent, ("num_key_value_heads", "num_kv_heads"), ("num_key_value_heads",)
    )
    declared = {
        "num_heads": (heads_found, num_heads),
        "num_kv_heads": (kv_found, num_kv_heads),
        "head_dim": (_heads._int_attr(parent, ("head_dim", "head_size")), head_dim),
    }
    for what, (found, given) in declared.items():
        if found is not None and found != given:
            raise ValueError(
                f"`{qkv_name}`: its module {parent_name!r} declares {what}={found}, but the "
                f"arguments give {what}={given}; check num_heads, num_kv_heads and layout."
            )


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
