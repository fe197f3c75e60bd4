"""Per-head components of real transformer architectures, recognised from the model itself.

The refined LLC of one attention head (Wang et al. 2024, "Differentiation and specialization
of attention heads via the refined local learning coefficient") samples only that head's
weights. Which coordinates those are depends on how a library lays its projections out, and a
mask that is off by a layout selects plausible-looking but wrong coordinates with no error.
So :func:`head_components` reads the layout off the model: a small registry holds one
:class:`AttentionLayout` per known layout (a detector and a mask builder), and every entry is
proven by an oracle test (``tests/core/test_heads.py``) that perturbs only a head's masked
coordinates and watches, on the input of the output projection, that only that head's slice
moves.

A head's component is

- its **query** rows (and query bias);
- the **key** and **value** rows it reads, with their biases. Under grouped-query attention
  (Ainslie et al. 2023) query head ``h`` reads key/value head ``h // (heads / kv_heads)``,
  whose rows therefore belong to every head of that group;
- its inputs of the **output** projection (the columns of an ``nn.Linear`` weight that
  multiply the head's output). The output bias is shared by all heads and belongs to none.

Nothing else: layer norms, q/k norms shared across heads, rotary tables are not per head.

Orientation matters and shapes cannot show it: an ``nn.Linear`` weight is
``(out_features, in_features)``, so a head's Q/K/V are *rows* and its output-projection
inputs *columns*; Hugging Face's GPT-2 ``Conv1D`` stores the transpose, ``(in, out)``, so
there Q/K/V are *columns* of ``c_attn.weight`` and the head's output-projection inputs *rows*
of ``c_proj.weight``. A hand-built mask on the square ``c_proj`` in the wrong orientation has
the right shape and is accepted; :func:`head_components` builds these masks from the layout.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PARTS = ("q", "k", "v", "o")
"""The parts of a head's component: query, key, value, output-projection inputs."""

HeadMasks = dict[str, dict[str, torch.Tensor]]
"""One head: ``{part: {parameter name relative to the attention module: bool mask}}``."""


HeadBuilder = tuple[int, Callable[[int], HeadMasks]]
"""A validated attention module: its number of query heads, and ``head(h) -> HeadMasks``
(built on demand: one head's masks are as large as the module's parameters)."""


class LayoutMismatch(ValueError):
    """A module looks like a known layout but its shapes or head counts disagree with it."""


@dataclass(frozen=True)
class AttentionLayout:
    """One way of laying out the weights of an attention module.

    Attributes:
        name: a short identifier, e.g. ``"hf_gpt2"``.
        description: what it covers, for messages and docs.
        detect: ``detect(module) -> bool``: is ``module`` an attention module of this layout?
            Must be specific: a false positive gives wrong masks.
        build: ``build(module) -> (num_heads, head)`` with ``head(h) -> HeadMasks``; checks
            the shapes first and raises :class:`LayoutMismatch` when they disagree with the
            layout (never guesses).
    """

    name: str
    description: str
    detect: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], HeadBuilder]


# ------------------------------------------------------------------------------------------
# Helpers shared by the builders.


def _class_names(module: nn.Module) -> set[str]:
    """The names of ``module``'s class and its bases (subclasses keep the parent's layout)."""
    return {cls.__name__ for cls in type(module).__mro__}


def _span_mask(param: torch.Tensor, dim: int, *spans: tuple[int, int]) -> torch.Tensor:
    """A bool mask of ``param``'s shape, True on index ranges ``[a, b)`` along ``dim``."""
    mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
    index: list[Any] = [slice(None)] * param.dim()
    for start, stop in spans:
        index[dim] = slice(start, stop)
        mask[tuple(index)] = True
    return mask


def _int_attr(obj: Any, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


def _count(module: nn.Module, names: Sequence[str], config_names: Sequence[str]) -> int | None:
    """An integer attribute of the module, else of its ``config``/``cfg``."""
    found = _int_attr(module, names)
    if found is not None:
        return found
    for cfg_name in ("config", "cfg"):
        cfg = getattr(module, cfg_name, None)
        if cfg is not None:
            found = _int_attr(cfg, config_names)
            if found is not None:
                return found
    return None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise LayoutMismatch(message)


def _group_size(heads: int, kv_heads: int) -> int:
    _require(
        kv_heads >= 1 and heads % kv_heads == 0,
        f"{heads} query heads do not split into groups over {kv_heads} key/value heads",
    )
    return heads // kv_heads


FUSED_LAYOUTS = ("grouped", "interleaved")
"""How a fused QKV projection orders its outputs (rows of a Linear, columns of a Conv1D).

``"grouped"``: ``[Q of all heads | K of all kv heads | V of all kv heads]`` (torch
``in_proj_weight``, GPT-2 ``c_attn``, Phi-3 ``qkv_proj``). ``"interleaved"``: per head
``[q_h, k_h, v_h]`` (GPT-NeoX/Pythia ``query_key_value``).
"""


def fused_qkv_spans(
    layout: str, head: int, heads: int, kv_heads: int, head_dim: int
) -> dict[str, tuple[int, int]]:
    """The output index ranges ``[a, b)`` of query head ``head``'s q, k and v in a fused QKV.

    Under ``"grouped"`` with grouped-query attention, query head ``h`` reads key/value head
    ``h // (heads // kv_heads)``. ``"interleaved"`` has one key/value head per query head.
    """
    d = head_dim
    if layout == "interleaved":
        assert kv_heads == heads, "interleaved layouts have no grouped-query attention"
        base = 3 * d * head
        return {
            "q": (base, base + d),
            "k": (base + d, base + 2 * d),
            "v": (base + 2 * d, base + 3 * d),
        }
    assert layout == "grouped", layout
    g = head // (heads // kv_heads)
    k_off, v_off = heads * d, (heads + kv_heads) * d
    return {
        "q": (head * d, (head + 1) * d),
        "k": (k_off + g * d, k_off + (g + 1) * d),
        "v": (v_off + g * d, v_off + (g + 1) * d),
    }


def _has_linear(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _row_head(
    masks: HeadMasks, part: str, linear: nn.Linear, prefix: str, spans: list[tuple[int, int]]
) -> None:
    """Rows ``spans`` of an ``nn.Linear`` (and its bias) go into ``masks[part]``."""
    out = masks.setdefault(part, {})
    out[f"{prefix}.weight"] = _span_mask(linear.weight, 0, *spans)
    if linear.bias is not None:
        out[f"{prefix}.bias"] = _span_mask(linear.bias, 0, *spans)


def _head_counts(module: nn.Module) -> tuple[int, int]:
    """(query heads, key/value heads) from a Hugging Face module or its config."""
    heads = _count(
        module, ("num_heads", "num_attention_heads", "n_heads"), ("num_attention_heads",)
    )
    _require(heads is not None, "found no head count (num_heads / config.num_attention_heads)")
    kv = _count(
        module,
        ("num_key_value_heads", "num_kv_heads"),
        ("num_key_value_heads", "num_kv_heads"),
    )
    return heads, heads if kv is None else kv


# ------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention (also inside nn.TransformerEncoder/Decoder layers).


def _is_torch_mha(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


def _torch_mha(module: nn.Module) -> HeadBuilder:
    assert isinstance(module, nn.MultiheadAttention)
    heads, embed, d = module.num_heads, module.embed_dim, module.head_dim
    _require(heads * d == embed, f"num_heads={heads} * head_dim={d} != embed_dim={embed}")

    def head(h: int) -> HeadMasks:
        span = (h * d, (h + 1) * d)
        masks: HeadMasks = {p: {} for p in PARTS}
        fused = fused_qkv_spans("grouped", h, heads, heads, d)
        for part in "qkv":
            shifted = fused[part]
            if module.in_proj_weight is not None:
                masks[part]["in_proj_weight"] = _span_mask(module.in_proj_weight, 0, shifted)
            else:  # kdim/vdim differ from embed_dim: three separate projections
                weight = getattr(module, f"{part}_proj_weight")
                masks[part][f"{part}_proj_weight"] = _span_mask(weight, 0, span)
            if module.in_proj_bias is not None:
                masks[part]["in_proj_bias"] = _span_mask(module.in_proj_bias, 0, shifted)
        # add_bias_kv: one extra key and value token, (1, 1, embed), split by head.
        for part, name in (("k", "bias_k"), ("v", "bias_v")):
            extra = getattr(module, name)
            if extra is not None:
                masks[part][name] = _span_mask(extra, extra.dim() - 1, span)
        masks["o"]["out_proj.weight"] = _span_mask(module.out_proj.weight, 1, span)
        return masks

    return heads, head


# ------------------------------------------------------------------------------------------
# Hugging Face GPT-2: Conv1D c_attn (in, 3*embed) with columns [q | k | v], c_proj (in, out).


def _is_conv1d(module: Any) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers.
    return isinstance(module, nn.Module) and "Conv1D" in _class_names(module)


def _is_hf_gpt2(module: nn.Module) -> bool:
    return (
        _is_conv1d(getattr(module, "c_attn", None))
        and _is_conv1d(getattr(module, "c_proj", None))
        and _int_attr(module, ("num_heads",)) is not None
    )


def _hf_gpt2(module: nn.Module) -> HeadBuilder:
    heads = _int_attr(module, ("num_heads",))
    d = _int_attr(module, ("head_dim",))
    assert heads is not None
    _require(d is not None, "found no head_dim attribute")
    width = heads * d
    c_attn, c_proj = module.c_attn.weight, module.c_proj.weight
    cross = getattr(module, "q_attn", None) is not None
    # Conv1D computes x @ W + b with W of shape (in, out): outputs are COLUMNS.
    _require(
        c_attn.shape[1] == (2 if cross else 3) * width,
        f"c_attn.weight has {c_attn.shape[1]} output columns, expected "
        f"{'2' if cross else '3'} * num_heads * head_dim = {(2 if cross else 3) * width}",
    )
    _require(
        c_proj.shape[0] == width,
        f"c_proj.weight has {c_proj.shape[0]} input rows, expected num_heads*head_dim={width}",
    )

    def head(h: int) -> HeadMasks:
        span = (h * d, (h + 1) * d)
        masks: HeadMasks = {p: {} for p in PARTS}
        if cross:  # c_attn holds [k | v]; the query is q_attn's
            fused = {"k": span, "v": (width + span[0], width + span[1])}
        else:
            fused = fused_qkv_spans("grouped", h, heads, heads, d)
        for part, shifted in fused.items():
            masks[part]["c_attn.weight"] = _span_mask(c_attn, 1, shifted)
            if module.c_attn.bias is not None:
                masks[part]["c_attn.bias"] = _span_mask(module.c_attn.bias, 0, shifted)
        if cross:
            q_attn = module.q_attn
            _require(q_attn.weight.shape[1] == width, "q_attn.weight is not (in, heads*head_dim)")
            masks["q"]["q_attn.weight"] = _span_mask(q_attn.weight, 1, span)
            if q_attn.bias is not None:
                masks["q"]["q_attn.bias"] = _span_mask(q_attn.bias, 0, span)
        masks["o"]["c_proj.weight"] = _span_mask(c_proj, 0, span)  # (in, out): inputs are ROWS
        return masks

    return heads, head


# ------------------------------------------------------------------------------------------
# GPT-NeoX / Pythia: query_key_value rows laid out per head, [h][q, k, v][head_size].


def _is_hf_gpt_neox(module: nn.Module) -> bool:
    return "GPTNeoXAttention" in _class_names(module) and _has_linear(
        module, "query_key_value", "dense"
    )


def _hf_gpt_neox(module: nn.Module) -> HeadBuilder:
    heads = _count(module, ("num_attention_heads", "num_heads"), ("num_attention_heads",))
    _require(heads is not None, "found no config.num_attention_heads")
    qkv, dense = module.query_key_value, module.dense
    d = _int_attr(module, ("head_size", "head_dim")) or qkv.out_features // (3 * heads)
    _require(
        qkv.out_features == 3 * heads * d,
        f"query_key_value has out_features={qkv.out_features}, expected 3*heads*head_size="
        f"{3 * heads * d}",
    )
    _require(dense.in_features == heads * d, "dense.in_features != num_heads * head_size")

    def head(h: int) -> HeadMasks:
        masks: HeadMasks = {
            "o": {"dense.weight": _span_mask(dense.weight, 1, (h * d, (h + 1) * d))}
        }
        for part, span in fused_qkv_spans("interleaved", h, heads, heads, d).items():
            _row_head(masks, part, qkv, "query_key_value", [span])
        return masks

    return heads, head


# ------------------------------------------------------------------------------------------
# Separate q_proj / k_proj / v_proj / o_proj (Llama, Mistral, Qwen2, Gemma, ... with GQA).


def _is_hf_separate_qkv(module: nn.Module) -> bool:
    return _has_linear(module, "q_proj", "k_proj", "v_proj") and (
        _has_linear(module, "o_proj") or _has_linear(module, "out_proj")
    )


def _hf_separate_qkv(module: nn.Module) -> HeadBuilder:
    heads, kv = _head_counts(module)
    group = _group_size(heads, kv)
    q, k, v = module.q_proj, module.k_proj, module.v_proj
    o_name = "o_proj" if _has_linear(module, "o_proj") else "out_proj"
    o = getattr(module, o_name)
    d = _int_attr(module, ("head_dim",)) or q.out_features // heads
    # Exact widths: a projection that packs more per head (a gate, an interleaved layout)
    # must be refused, not sliced as if it were plain.
    _require(q.out_features == heads * d, f"q_proj.out_features={q.out_features} != {heads}*{d}")
    _require(
        k.out_features == kv * d and v.out_features == kv * d,
        f"k_proj/v_proj out_features={k.out_features}/{v.out_features} != kv_heads {kv} * {d}",
    )
    _require(o.in_features == heads * d, f"{o_name}.in_features={o.in_features} != {heads}*{d}")
    groups = _int_attr(module, ("num_key_value_groups",))
    _require(groups in (None, group), f"num_key_value_groups={groups} != {heads}/{kv}")

    def head(h: int) -> HeadMasks:
        g = h // group
        masks: HeadMasks = {
            "o": {f"{o_name}.weight": _span_mask(o.weight, 1, (h * d, (h + 1) * d))}
        }
        _row_head(masks, "q", q, "q_proj", [(h * d, (h + 1) * d)])
        _row_head(masks, "k", k, "k_proj", [(g * d, (g + 1) * d)])
        _row_head(masks, "v", v, "v_proj", [(g * d, (g + 1) * d)])
        return masks

    return heads, head


# ------------------------------------------------------------------------------------------
# Phi-3: fused qkv_proj rows [q (heads*d) | k (kv*d) | v (kv*d)].


def _is_hf_phi3(module: nn.Module) -> bool:
    return "Phi3Attention" in _class_names(module) and _has_linear(module, "qkv_proj", "o_proj")


def _hf_phi3(module: nn.Module) -> HeadBuilder:
    heads, kv = _head_counts(module)
    _group_size(heads, kv)  # the heads must split into groups
    qkv, o = module.qkv_proj, module.o_proj
    d = _int_attr(module, ("head_dim",)) or qkv.out_features // (heads + 2 * kv)
    _require(
        qkv.out_features == (heads + 2 * kv) * d,
        f"qkv_proj.out_features={qkv.out_features} != (heads {heads} + 2*kv {kv}) * {d}",
    )
    _require(o.in_features == heads * d, f"o_proj.in_features={o.in_features} != {heads}*{d}")

    def head(h: int) -> HeadMasks:
        masks: HeadMasks = {"o": {"o_proj.weight": _span_mask(o.weight, 1, (h * d, (h + 1) * d))}}
        for part, span in fused_qkv_spans("grouped", h, heads, kv, d).items():
            _row_head(masks, part, qkv, "qkv_proj", [span])
        return masks

    return heads, head


# ------------------------------------------------------------------------------------------
# TransformerLens: W_Q (heads, d_model, d_head), W_K/W_V (or _W_K/_W_V with kv heads under
# GQA), W_O (heads, d_head, d_model), b_Q/b_K/b_V (heads or kv heads, d_head).


def _is_transformer_lens(module: nn.Module) -> bool:
    return "AbstractAttention" in _class_names(module) and isinstance(
        getattr(module, "W_Q", None), nn.Parameter
    )


def _transformer_lens(module: nn.Module) -> HeadBuilder:
    cfg = getattr(module, "cfg", None)
    heads = _int_attr(cfg, ("n_heads",))
    _require(heads is not None, "found no cfg.n_heads")
    gqa = isinstance(getattr(module, "_W_K", None), nn.Parameter)
    kv = _int_attr(cfg, ("n_key_value_heads",)) if gqa else heads
    _require(kv is not None, "grouped-query attention without cfg.n_key_value_heads")
    group = _group_size(heads, kv)
    key = "_" if gqa else ""
    params = dict(module.named_parameters(recurse=False))
    w_q, w_o = params["W_Q"], params["W_O"]
    _require(w_q.dim() == 3 and w_q.shape[0] == heads, f"W_Q has shape {tuple(w_q.shape)}")
    _require(w_o.dim() == 3 and w_o.shape[0] == heads, f"W_O has shape {tuple(w_o.shape)}")
    for name in (f"{key}W_K", f"{key}W_V"):
        _require(
            name in params and params[name].dim() == 3 and params[name].shape[0] == kv,
            f"{name} is missing or not ({kv}, d_model, d_head)",
        )

    def head(h: int) -> HeadMasks:
        g = h // group
        masks: HeadMasks = {p: {} for p in PARTS}
        for part, name, index in (
            ("q", "W_Q", h), ("q", "b_Q", h),
            ("k", f"{key}W_K", g), ("k", f"{key}b_K", g),
            ("v", f"{key}W_V", g), ("v", f"{key}b_V", g),
            ("o", "W_O", h),
        ):  # fmt: skip
            if name in params:
                masks[part][name] = _span_mask(params[name], 0, (index, index + 1))
        return masks

    return heads, head


LAYOUTS: list[AttentionLayout] = [
    AttentionLayout(
        "torch_mha",
        "torch.nn.MultiheadAttention (also inside nn.TransformerEncoder/Decoder)",
        _is_torch_mha,
        _torch_mha,
    ),
    AttentionLayout(
        "hf_gpt2",
        "Hugging Face GPT-2 (Conv1D c_attn [q|k|v] columns, c_proj)",
        _is_hf_gpt2,
        _hf_gpt2,
    ),
    AttentionLayout(
        "hf_gpt_neox",
        "Hugging Face GPT-NeoX / Pythia (query_key_value rows per head [q,k,v], dense)",
        _is_hf_gpt_neox,
        _hf_gpt_neox,
    ),
    AttentionLayout(
        "hf_separate_qkv",
        "separate q_proj/k_proj/v_proj and o_proj (or out_proj) Linears, grouped-query "
        "attention: Llama, Mistral, Qwen2, Gemma and the like",
        _is_hf_separate_qkv,
        _hf_separate_qkv,
    ),
    AttentionLayout(
        "hf_phi3",
        "Hugging Face Phi-3 (fused qkv_proj rows [q | k | v], o_proj, grouped-query)",
        _is_hf_phi3,
        _hf_phi3,
    ),
    AttentionLayout(
        "transformer_lens",
        "TransformerLens HookedTransformer attention (W_Q/W_K/W_V/W_O, grouped-query)",
        _is_transformer_lens,
        _transformer_lens,
    ),
]
"""The registry: the first layout whose ``detect`` accepts a module builds its masks."""


# ------------------------------------------------------------------------------------------
# Finding attention modules.


@dataclass(frozen=True)
class AttentionModule:
    """A recognised attention module: where it is, its layout and its heads' masks."""

    name: str
    module: nn.Module
    layout: AttentionLayout
    num_heads: int
    head: Callable[[int], HeadMasks]


def _within(name: str, prefix: str) -> bool:
    """Is module ``name`` strictly inside module ``prefix`` ("" is the root)?"""
    return name != prefix and (prefix == "" or name.startswith(f"{prefix}."))


def _looks_like_attention(name: str, module: nn.Module) -> bool:
    # A class named like attention, or a child named like one ("self_attn"); not the norms
    # and dropouts named after it ("post_attention_layernorm", "attn_dropout").
    cls = type(module).__name__.lower()
    leaf = name.rsplit(".", 1)[-1].lower()
    named = "attention" in cls or "attn" in cls or leaf.endswith(("attn", "attention"))
    return named and "norm" not in cls and any(True for _ in module.parameters())


def find_attention(model: nn.Module) -> list[AttentionModule]:
    """The attention modules of ``model`` that a registered layout recognises, in module order.

    A recognised module's descendants are not searched further.

    Raises:
        ValueError: a module looks like a known layout but its shapes disagree (the message
            names the module); this is never guessed around.
    """
    found: list[AttentionModule] = []
    for name, module in model.named_modules():
        if any(_within(name, f.name) for f in found):
            continue
        for layout in LAYOUTS:
            if layout.detect(module):
                try:
                    num_heads, head = layout.build(module)
                except LayoutMismatch as err:
                    raise ValueError(
                        f"head_components: {name!r} ({type(module).__name__}) looks like the "
                        f"{layout.name} layout ({layout.description}) but {err}. Build its "
                        f"masks by hand ({_BY_HAND})."
                    ) from None
                found.append(AttentionModule(name, module, layout, num_heads, head))
                break
    return found


_BY_HAND = (
    "pass components={'l0h0': {'<parameter name>': <bool mask of the parameter's shape>, ...}}; "
    "an nn.Linear weight is (out_features, in_features), so a head's query/key/value are ROWS "
    "and its inputs of the output projection COLUMNS; a GPT-2 Conv1D weight is (in, out), the "
    "other way round"
)


def _unrecognised(model: nn.Module, found: list[AttentionModule]) -> list[str]:
    """Attention-looking modules outside (and not enclosing) any recognised one."""
    names = [f.name for f in found]
    out = []
    for name, module in model.named_modules():
        inside = any(name == n or _within(name, n) for n in names)
        encloses = any(_within(n, name) for n in names)
        nested = any(_within(name, o) for o in out)
        if not (inside or encloses or nested) and _looks_like_attention(name, module):
            out.append(name)
    return out


def _describe(model: nn.Module, names: list[str], k: int = 6) -> str:
    shown = [f"{n!r} ({type(model.get_submodule(n)).__name__})" for n in names[:k]]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _no_attention_error(model: nn.Module, owner: str = "head_components") -> ValueError:
    suspects = _unrecognised(model, [])
    if suspects:
        what = f"attention-like modules it does not know: {_describe(model, suspects)}"
    else:
        classes = sorted({type(m).__name__ for m in model.modules()})
        what = f"no attention-like module (module classes: {', '.join(classes[:12])})"
    known = "; ".join(layout.description for layout in LAYOUTS)
    return ValueError(
        f"{owner}: found {what}. Known layouts: {known}. For another architecture "
        f"{_BY_HAND}."
    )


# ------------------------------------------------------------------------------------------
# The public functions.


def _check_indices(argument: str, value: Any, limit: int, what: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    ok = ok and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in value)
    if not ok:
        raise ValueError(
            f"Expected argument `{argument}` to be None, an int or a non-empty list of ints "
            f"but got {value!r}."
        )
    bad = [int(i) for i in value if not 0 <= i < limit]
    if bad:
        raise ValueError(
            f"Expected argument `{argument}` to index {what} (0 to {limit - 1}) but got {bad}."
        )
    return sorted({int(i) for i in value})


def _canonical_names(model: nn.Module) -> dict[int, tuple[str, torch.nn.Parameter]]:
    """id(parameter) -> (the name named_parameters gives it, parameter); tied ones once."""
    return {id(p): (n, p) for n, p in model.named_parameters()}


def head_components(
    model: nn.Module,
    *,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    parts: Sequence[str] = PARTS,
) -> dict[str, dict[str, torch.Tensor]]:
    """One component per attention head, ``{"l{layer}h{head}": {parameter_name: bool mask}}``.

    The architecture is recognised from the model (see :data:`LAYOUTS`): torch's
    ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoder``/``Decoder``), Hugging Face
    GPT-2 (``Conv1D``), GPT-NeoX/Pythia (per-head interleaved ``query_key_value``),
    Llama/Mistral/Qwen2/Gemma-style separate ``q/k/v/o_proj`` with grouped-query attention,
    Phi-3 (fused ``qkv_proj``) and TransformerLens ``HookedTransformer``. Head counts come from
    the modules and their configs, and every projection's width is checked against them.

    Head ``h``'s component holds its query rows and bias, the key/value rows (and biases) of
    the key/value head it reads (under grouped-query attention its group's, shared by the
    group's heads), and its columns of the output projection: with ``d`` the head width and
    ``z_h`` the head's output, the attention output is ``sum_h W_O[:, h*d:(h+1)*d] z_h + b_O``.
    The shared output bias belongs to no head. Masks are on trainable parameters only
    (``requires_grad``), under the names ``model.named_parameters()`` gives them.

    Each mask is a bool tensor of its parameter's full shape, so one head costs one byte per
    weight of its attention module; on a large model select ``layers``/``heads`` (each
    component is also a separate set of SGLD chains).

    The result is a ``components=`` value for :func:`~slt_callbacks.estimate_llc`,
    :class:`~slt_callbacks.LLCMonitor` and :func:`~slt_callbacks.weight_norms`. To restrict
    to the QK circuit only, ``parts=("q", "k")``; to the OV circuit, ``parts=("v", "o")``.

    Args:
        model: the model (a Lightning module wrapping a transformer works: names keep the
            wrapper's prefix).
        layers: indices of the attention modules to include, counted in
            ``model.named_modules()`` order (for decoder-only and encoder-only models, the
            layer index); ``None`` for all.
        heads: query-head indices to include in every selected layer; ``None`` for all.
        parts: any of ``"q"``, ``"k"``, ``"v"``, ``"o"``.

    Returns:
        ``{"l{layer}h{head}": {parameter_name: bool mask of that parameter's shape}}``.

    Raises:
        ValueError: no known attention layout is found (the message lists the
            attention-like modules it saw and how to pass masks by hand); a module matches a
            layout but its shapes disagree; bad ``layers``/``heads``/``parts``; a selected head
            has no trainable coordinate.

    Example:
        >>> from torch import nn
        >>> layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32)
        >>> model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        >>> comps = head_components(model)
        >>> sorted(comps)
        ['l0h0', 'l0h1', 'l1h0', 'l1h1']
        >>> sorted(comps["l1h0"])
        ['layers.1.self_attn.in_proj_bias', 'layers.1.self_attn.in_proj_weight', \
'layers.1.self_attn.out_proj.weight']
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Expected argument `model` to be an nn.Module but got {type(model)}.")
    chosen_parts = _check_parts(parts)
    found = find_attention(model)
    if not found:
        raise _no_attention_error(model)
    missed = _unrecognised(model, found)
    if missed:
        warnings.warn(
            f"head_components: no head components for {_describe(model, missed)}, an "
            f"attention-like module of no known layout; add its masks by hand ({_BY_HAND}).",
            stacklevel=2,
        )
    layer_ids = _check_indices("layers", layers, len(found), "attention modules")
    layer_ids = list(range(len(found))) if layer_ids is None else layer_ids
    fewest = min(found[i].num_heads for i in layer_ids)
    head_ids = _check_indices("heads", heads, fewest, "query heads of every selected layer")
    params = _canonical_names(model)
    out: dict[str, dict[str, torch.Tensor]] = {}
    empty = []
    for i in layer_ids:
        attention = found[i]
        for h in range(attention.num_heads) if head_ids is None else head_ids:
            masks = _merge(attention, attention.head(h), chosen_parts, params)
            if masks:
                out[f"l{i}h{h}"] = masks
            else:
                empty.append(f"l{i}h{h} ({attention.name})")
    if empty:
        raise ValueError(
            f"head_components: {', '.join(empty[:6])}{' ...' if len(empty) > 6 else ''} "
            "has no trainable coordinate (requires_grad=False); leave it out with `layers=` "
            "or `heads=`."
        )
    return out


def _check_parts(parts: Any) -> tuple[str, ...]:
    if isinstance(parts, str):
        parts = (parts,)
    ok = isinstance(parts, Sequence) and len(parts) > 0 and all(p in PARTS for p in parts)
    if not ok:
        raise ValueError(
            f"Expected argument `parts` to be a non-empty list of {list(PARTS)} but got {parts!r}."
        )
    return tuple(dict.fromkeys(parts))


def merge_parts(head: HeadMasks, parts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The union of one head's masks over ``parts``, ``{local parameter name: mask}``.

    Parts may share a tensor (q, k and v rows of one fused projection): their masks are OR-ed.
    """
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        for local, mask in head.get(part, {}).items():
            merged[local] = merged[local] | mask if local in merged else mask
    return merged


def _merge(
    attention: AttentionModule,
    head: HeadMasks,
    parts: tuple[str, ...],
    params: dict[int, tuple[str, torch.nn.Parameter]],
) -> dict[str, torch.Tensor]:
    """One head's masks of ``parts`` under canonical parameter names, trainable only."""
    merged: dict[str, torch.Tensor] = {}
    for local, mask in merge_parts(head, parts).items():
        param = attention.module.get_parameter(local)
        if param.requires_grad:
            merged[params[id(param)][0]] = mask
    return merged


_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff", "mlp_block")


def layer_components(
    model: nn.Module, *, layers: int | Sequence[int] | None = None
) -> dict[str, dict[str, None]]:
    """Whole blocks, their attention and their MLP: ``{"l{i}", "l{i}.attn", "l{i}.mlp"}``.

    A block is the module that holds a recognised attention module (see
    :func:`head_components`); its MLP is a child named ``mlp``, ``feed_forward``, ``ffn``,
    ``ff`` or ``mlp_block``, or, in ``nn.TransformerEncoderLayer``/``DecoderLayer``,
    ``linear1`` and ``linear2``. A block with no such child has no ``"l{i}.mlp"`` entry. Every
    entry holds whole trainable tensors (``None`` masks). Blocks are counted in module order;
    a block with two attention modules (a decoder layer with cross-attention) is one block.

    Args:
        model: the model.
        layers: block indices to include; ``None`` for all.

    Raises:
        ValueError: as :func:`head_components` when no attention layout is recognised; bad
            ``layers``.
    """
    found = find_attention(model)
    if not found:
        raise _no_attention_error(model, "layer_components")
    blocks: list[str] = []
    attention_of: dict[str, list[str]] = {}
    for f in found:
        parent = f.name.rsplit(".", 1)[0] if "." in f.name else ""
        if parent not in attention_of:
            blocks.append(parent)
            attention_of[parent] = []
        attention_of[parent].append(f.name)
    chosen = _check_indices("layers", layers, len(blocks), "blocks")
    params = _canonical_names(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}

    def whole(module_names: list[str]) -> dict[str, None]:
        out: dict[str, None] = {}
        for module_name in module_names:
            for p in model.get_submodule(module_name).parameters():
                if id(p) in trainable:
                    out[params[id(p)][0]] = None
        return out

    out: dict[str, dict[str, None]] = {}
    for i in range(len(blocks)) if chosen is None else chosen:
        block_name = blocks[i]
        block = model.get_submodule(block_name)
        prefix = f"{block_name}." if block_name else ""
        entries = {"": [block_name], ".attn": attention_of[block_name]}
        mlp = [f"{prefix}{n}" for n in _MLP_NAMES if isinstance(getattr(block, n, None), nn.Module)]
        if not mlp and isinstance(block, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
            mlp = [f"{prefix}linear1", f"{prefix}linear2"]
        if mlp:
            entries[".mlp"] = mlp
        for suffix, names in entries.items():
            selected = whole(names)
            if selected:
                out[f"l{i}{suffix}"] = selected
    return out
