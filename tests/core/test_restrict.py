"""Component selectors and head masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slt_callbacks import (
    SGLDConfig,
    attention_head_components,
    estimate_llc,
    fused_qkv_head_components,
    resolve_components,
)


class Block(nn.Module):
    def __init__(self, d=8, heads=4, kv_heads=2) -> None:
        super().__init__()
        hd = d // heads
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * hd)
        self.out = nn.Linear(heads * hd, d)


def test_fused_qkv_heads_with_grouped_query_attention():
    """4 query heads of width 2 sharing 2 K/V groups: head h owns its own Q rows, the K/V
    rows of group h // 2, and its output columns."""
    model = nn.ModuleDict({"blk": Block()})
    comps = fused_qkv_head_components(
        model, "blk.qkv", num_heads=4, num_kv_heads=2, out_proj_name="blk.out"
    )
    assert list(comps) == [f"blk.qkv.head{h}" for h in range(4)]
    for h, mask in enumerate(comps.values()):
        rows = mask["blk.qkv.weight"].any(dim=1).nonzero().flatten().tolist()
        g = h // 2
        assert rows == [2 * h, 2 * h + 1, 8 + 2 * g, 8 + 2 * g + 1, 12 + 2 * g, 12 + 2 * g + 1]
        cols = mask["blk.out.weight"].any(dim=0).nonzero().flatten().tolist()
        assert cols == [2 * h, 2 * h + 1]
        assert torch.equal(mask["blk.qkv.bias"], mask["blk.qkv.weight"].any(dim=1))
    # Query rows are disjoint between heads; K/V rows are shared within a group.
    q = [m["blk.qkv.weight"][:8].any(1) for m in comps.values()]
    assert not (q[0] & q[1]).any()
    kv = [m["blk.qkv.weight"][8:].any(1) for m in comps.values()]
    assert torch.equal(kv[0], kv[1]) and not (kv[0] & kv[2]).any()


def test_fused_qkv_bad_head_counts():
    model = nn.ModuleDict({"blk": Block()})
    with pytest.raises(ValueError, match="num_kv_heads"):
        fused_qkv_head_components(model, "blk.qkv", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="out_features=16"):
        fused_qkv_head_components(model, "blk.qkv", num_heads=3, num_kv_heads=3)
    with pytest.raises(ValueError, match="no submodule"):
        fused_qkv_head_components(model, "blk.nope", num_heads=4)
    with pytest.raises(ValueError, match="Linear"):
        fused_qkv_head_components(model, "blk", num_heads=4)


def test_multihead_attention_heads_partition_the_projection_rows():
    mha = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"attn": mha})
    comps = attention_head_components(model, "attn")
    union = comps["attn.head0"]["attn.in_proj_weight"] | comps["attn.head1"]["attn.in_proj_weight"]
    overlap = (
        comps["attn.head0"]["attn.in_proj_weight"] & comps["attn.head1"]["attn.in_proj_weight"]
    )
    assert union.all() and not overlap.any()
    assert "attn.out_proj.bias" not in comps["attn.head0"]


def test_globs_lists_and_masks_resolve():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    resolved = resolve_components(
        model,
        {
            "first": "0.*",
            "weights": ["0.weight", "2.weight"],
            "slice": {"2.weight": torch.tensor([[True, False, False]])},
        },
    )
    assert resolved["first"] == {"0.weight": None, "0.bias": None}
    assert set(resolved["weights"]) == {"0.weight", "2.weight"}
    with pytest.raises(ValueError, match="bool tensor"):
        resolve_components(model, {"x": {"2.weight": torch.ones(1, 3)}})
    with pytest.raises(ValueError, match="selects no entry"):
        resolve_components(model, {"x": {"2.weight": torch.zeros(1, 3, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="names no trainable"):
        resolve_components(model, {"x": {"9.weight": torch.ones(1, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="mapping"):
        resolve_components(model, ["0.*"])
    with pytest.raises(ValueError, match="glob string"):
        resolve_components(model, {"x": 3})


class Tied(nn.Module):
    """Input and output embeddings share one matrix (as in many language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(self.emb(tokens))


def test_tied_weights_are_one_sampled_tensor_seen_under_both_names():
    torch.manual_seed(0)
    model = Tied()
    tokens = torch.randint(0, 6, (4, 16))
    seen = []

    def loss(m, b):
        seen.append(torch.equal(m.emb.weight, m.out.weight))
        return nn.functional.cross_entropy(m(b), b)

    cfg = SGLDConfig(
        step_size=1e-4, n_beta=10.0, num_chains=2, num_draws=10, num_burnin_steps=0, backend="loop"
    )
    result = estimate_llc(model, loss, list(tokens), config=cfg, seed=0, on_failure="ignore")
    assert all(seen) and len(seen) > 10
    assert torch.isfinite(result.loss_trace).all()
