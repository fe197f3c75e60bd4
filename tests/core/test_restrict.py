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
    head_components,
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
        model, "blk.qkv", num_heads=4, num_kv_heads=2, out_proj_name="blk.out", layout="grouped"
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
    grouped = dict(layout="grouped")
    with pytest.raises(ValueError, match="num_kv_heads"):
        fused_qkv_head_components(model, "blk.qkv", num_heads=4, num_kv_heads=3, **grouped)
    with pytest.raises(ValueError, match="out_features=16"):
        fused_qkv_head_components(model, "blk.qkv", num_heads=3, num_kv_heads=3, **grouped)
    with pytest.raises(ValueError, match="no submodule"):
        fused_qkv_head_components(model, "blk.nope", num_heads=4, **grouped)
    with pytest.raises(ValueError, match="Linear"):
        fused_qkv_head_components(model, "blk", num_heads=4, **grouped)
    with pytest.raises(ValueError, match=r"`layout`.*'grouped', 'interleaved'.*'qkv'"):
        fused_qkv_head_components(model, "blk.qkv", num_heads=4, layout="qkv")
    with pytest.raises(ValueError, match=r"interleaved.*num_kv_heads=2"):
        fused_qkv_head_components(model, "blk.qkv", num_heads=4, num_kv_heads=2,
                                  layout="interleaved")  # fmt: skip


def test_fused_qkv_without_layout_warns_and_keeps_the_old_reading():
    model = nn.ModuleDict({"blk": Block()})
    with pytest.warns(FutureWarning, match=r"layout='grouped'.*head_components") as caught:
        implicit = fused_qkv_head_components(model, "blk.qkv", num_heads=4, num_kv_heads=2)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    explicit = fused_qkv_head_components(
        model, "blk.qkv", num_heads=4, num_kv_heads=2, layout="grouped"
    )
    for name in explicit:
        assert torch.equal(implicit[name]["blk.qkv.weight"], explicit[name]["blk.qkv.weight"])


def test_fused_qkv_interleaved_rows_are_per_head():
    """[h][q, k, v][d] rows: head h owns rows 3*d*h to 3*d*(h+1)."""
    model = nn.ModuleDict({"blk": nn.ModuleDict({"qkv": nn.Linear(8, 24), "out": nn.Linear(8, 8)})})
    comps = fused_qkv_head_components(model, "blk.qkv", num_heads=4, out_proj_name="blk.out",
                                      layout="interleaved")  # fmt: skip
    for h, masks in enumerate(comps.values()):
        rows = masks["blk.qkv.weight"].any(dim=1).nonzero().flatten().tolist()
        assert rows == list(range(6 * h, 6 * h + 6))


class DeclaresHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 2, 4
        self.qkv = nn.Linear(8, 24)


def test_fused_qkv_must_agree_with_the_heads_the_module_declares():
    model = nn.ModuleDict({"blk": DeclaresHeads()})
    with pytest.raises(ValueError, match=r"declares num_heads=2.*num_heads=4"):
        fused_qkv_head_components(model, "blk.qkv", num_heads=4, layout="grouped")
    assert len(fused_qkv_head_components(model, "blk.qkv", num_heads=2, layout="grouped")) == 2


def test_fused_qkv_refuses_an_unfused_projection_and_known_layouts_read_wrongly():
    from tests.zoo.models import case

    llama = case("llama").build()
    # 4 heads over 2 kv heads would slice q_proj's 32 rows into widths of 4: plausible, wrong.
    with pytest.raises(ValueError, match=r"unfused projection.*k_proj"):
        fused_qkv_head_components(llama, "model.layers.0.self_attn.q_proj", num_heads=4,
                                  num_kv_heads=2, layout="grouped")  # fmt: skip
    neox = case("gpt_neox").build()
    qkv = "gpt_neox.layers.0.attention.query_key_value"
    with pytest.raises(ValueError, match=r"GPT-NeoX.*'interleaved', not 'grouped'"):
        fused_qkv_head_components(neox, qkv, num_heads=4, layout="grouped")
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="interleaved"):
        fused_qkv_head_components(neox, qkv, num_heads=4)  # the call that used to be wrong
    # Said right, it agrees with head_components (whose masks the oracle proves).
    comps = fused_qkv_head_components(neox, qkv, num_heads=4, layout="interleaved",
                                      out_proj_name="gpt_neox.layers.0.attention.dense")
    reference = head_components(neox, layers=0)
    for h in range(4):
        ours, theirs = comps[f"{qkv}.head{h}"], reference[f"l0h{h}"]
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_multihead_attention_heads_agree_with_head_components():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, add_bias_kv=True)})
    old = attention_head_components(model, "attn")
    new = head_components(model)
    for h in range(2):
        assert set(old[f"attn.head{h}"]) == set(new[f"l0h{h}"])
        assert all(torch.equal(m, new[f"l0h{h}"][n]) for n, m in old[f"attn.head{h}"].items())
    no_out = attention_head_components(model, "attn", include_output=False)
    assert "attn.out_proj.weight" not in no_out["attn.head0"]


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
