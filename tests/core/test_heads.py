"""head_components on real architectures, proven by an oracle rather than by the layout.

The oracle is the model's own forward pass: perturb only the coordinates a head's mask
selects and watch, on the input of the attention output projection (per-head outputs
``z``), which heads' slices move. A correct query mask moves exactly its head; a correct
key/value mask moves exactly the heads that read that key/value head (the group under
grouped-query attention); perturbing everything *outside* a head's mask leaves that head
still. For the output projection: with the head's ``z`` zeroed, perturbing its mask does not
move the projection's output; with every *other* head zeroed, perturbing the complement does
not either. Together these pin a mask to exactly the coordinates that act on the head.

The per-head slices of ``z`` come from the models' own reshape (``(..., heads * d)`` in
Hugging Face, ``hook_z`` in TransformerLens, ``out_proj`` replaced by the identity for
``nn.MultiheadAttention``, whose fused forward never calls ``out_proj`` as a module).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from slt_callbacks import SGLDConfig, estimate_llc, head_components, layer_components
from slt_callbacks.core.heads import LAYOUTS, find_attention
from slt_callbacks.core.restrict import resolve_components
from tests.zoo.models import TRANSFORMERS, case

HEADS = 4
WIDTH = 8  # head width in every zoo transformer

# Unchanged means bit-for-bit in practice (the other heads' arithmetic does not depend on the
# perturbed entries); 1e-6 leaves room for a kernel that reorders sums. Moved means far
# above that: the noise (std 0.5) is 25 times the weights' init scale.
STILL = 1e-6
MOVED = 1e-3
SEQ_MHA = 5  # query length for nn.MultiheadAttention probes (keys/values: one more)


@dataclass
class Probe:
    """How to read per-head outputs ``z`` (batch, seq, heads, d) and the attention output."""

    kind: str  # "hf": pre-hook on the output projection; "tl": hook_z; "mha": identity trick
    where: str  # module path template with {} for the layer index ("" for mha: the module)
    group: int  # query heads per key/value head
    tl_out: str = ""
    attention_modules: int = 2  # how many the model has


PROBES = {
    "gpt2": Probe("hf", "transformer.h.{}.attn.c_proj", 1),
    "gpt_neox": Probe("hf", "gpt_neox.layers.{}.attention.dense", 1),
    "llama": Probe("hf", "model.layers.{}.self_attn.o_proj", 2),
    "mistral": Probe("hf", "model.layers.{}.self_attn.o_proj", 2),
    "qwen2": Probe("hf", "model.layers.{}.self_attn.o_proj", 2),
    "gemma": Probe("hf", "model.layers.{}.self_attn.o_proj", 2),
    "phi3": Probe("hf", "model.layers.{}.self_attn.o_proj", 2),
    "hooked_transformer": Probe("tl", "blocks.{}.attn.hook_z", 1, "blocks.{}.hook_attn_out"),
    "hooked_transformer_gqa": Probe("tl", "blocks.{}.attn.hook_z", 2, "blocks.{}.hook_attn_out"),
    "torch_encoder": Probe("mha", "", 1),
    "mha_kdim_vdim": Probe("mha", "", 1, attention_modules=1),
    # self-attention and cross-attention in each of 2 layers; the last one is cross-attention
    "torch_decoder_cross": Probe("mha", "", 1, attention_modules=4),
    # Not in the zoo: more users of the generic q/k/v/o_proj layout. A leading "." names the
    # output projection relative to the probed attention module.
    "opt": Probe("hf", ".out_proj", 1),
    "gptj": Probe("hf", ".out_proj", 1),
    "bart_cross": Probe("hf", ".out_proj", 1, attention_modules=3),  # encoder, decoder, cross
    "qwen3_qk_norm": Probe("hf", ".o_proj", 2),
    "llama_mqa_wide_heads": Probe("hf", ".o_proj", 4),  # 1 kv head, head_dim 16 != 32 / 4
    # GPT-2 with cross-attention (q_attn + c_attn [k|v]); the last module is cross-attention.
    "gpt2_cross": Probe("hf", ".c_proj", 1, attention_modules=4),
}


def _tl_gqa() -> nn.Module:
    pytest.importorskip("transformer_lens")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, d_head=WIDTH, n_heads=HEADS, n_key_value_heads=2, d_mlp=64,
        d_vocab=64, n_ctx=16, act_fn="gelu", normalization_type="LN", device="cpu", seed=0,
    )  # fmt: skip
    return HookedTransformer(cfg)


class KdimVdim(nn.Module):
    """MultiheadAttention with separate q/k/v weights (kdim, vdim != embed) and bias_kv."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, HEADS, kdim=12, vdim=20, add_bias_kv=True)


def _decoder() -> nn.Module:
    layer = nn.TransformerDecoderLayer(32, HEADS, dim_feedforward=64, dropout=0.0)
    return nn.TransformerDecoder(layer, num_layers=2)


def _hf(config: str, model: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        return getattr(transformers, model)(getattr(transformers, config)(**kw))

    return build


_SMALL = dict(vocab_size=64, max_position_embeddings=64)
_DECODER = dict(_SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS,
                intermediate_size=64)  # fmt: skip

class WithEncoderStates(nn.Module):
    """A decoder fed fixed encoder states, so that ``model(tokens)`` runs cross-attention."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        states = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
        self.register_buffer("states", states)

    def forward(self, tokens: torch.Tensor):
        return self.decoder(tokens, encoder_hidden_states=self.states)


def _gpt2_cross() -> nn.Module:
    build = _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=64, n_positions=64, n_embd=32,
                n_layer=2, n_head=HEADS, add_cross_attention=True, bos_token_id=0,
                eos_token_id=0)  # fmt: skip
    return WithEncoderStates(build())


EXTRA: dict[str, Callable[[], nn.Module]] = {
    "hooked_transformer_gqa": _tl_gqa,
    "mha_kdim_vdim": KdimVdim,
    "torch_decoder_cross": _decoder,
    "opt": _hf("OPTConfig", "OPTForCausalLM", **_SMALL, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=HEADS, ffn_dim=64, word_embed_proj_dim=32,
               bos_token_id=0, eos_token_id=0, pad_token_id=1),
    "gptj": _hf("GPTJConfig", "GPTJForCausalLM", vocab_size=64, n_embd=32, n_layer=2,
                n_head=HEADS, n_positions=64, rotary_dim=4, bos_token_id=0, eos_token_id=0),
    "bart_cross": _hf("BartConfig", "BartModel", **_SMALL, d_model=32, encoder_layers=1,
                      decoder_layers=1, encoder_attention_heads=HEADS,
                      decoder_attention_heads=HEADS, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2),
    "qwen3_qk_norm": _hf("Qwen3Config", "Qwen3ForCausalLM", **_DECODER, num_key_value_heads=2,
                         head_dim=WIDTH),
    "llama_mqa_wide_heads": _hf("LlamaConfig", "LlamaForCausalLM", **_DECODER,
                                num_key_value_heads=1, head_dim=16),
    "gpt2_cross": _gpt2_cross,
}  # fmt: skip


@dataclass
class Subject:
    name: str
    model: nn.Module
    probe: Probe
    batch: torch.Tensor
    layer: int  # the attention module (head_components' layer index) probed

    def run(self, zero: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """(z, attention output) at ``layer``; ``zero`` edits z before the out-projection."""
        p, layer = self.probe, self.layer
        if p.kind == "mha":
            return self._run_mha(zero)
        seen: dict[str, torch.Tensor] = {}
        where = p.where.format(layer)
        if where.startswith("."):
            where = find_attention(self.model)[layer].name + where
        module = self.model.get_submodule(where)
        if p.kind == "hf":

            def pre(mod, args):
                x = args[0]
                z = x.reshape(*x.shape[:-1], HEADS, -1)
                seen["z"] = z.detach().clone()
                if zero is not None:
                    return (zero(z.clone()).reshape(x.shape), *args[1:])
                return None

            def post(mod, args, out):
                seen["out"] = out.detach().clone()

            handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        else:

            def z_hook(mod, args, out):
                seen["z"] = out.detach().clone()
                return None if zero is None else zero(out.clone())

            def out_hook(mod, args, out):
                seen["out"] = out.detach().clone()

            out_module = self.model.get_submodule(p.tl_out.format(layer))
            handles = [
                module.register_forward_hook(z_hook),
                out_module.register_forward_hook(out_hook),
            ]
        try:
            with torch.no_grad():
                self.model(self.batch)
        finally:
            for h in handles:
                h.remove()
        return seen["z"], seen["out"]

    def _run_mha(self, zero):
        mha = find_attention(self.model)[self.layer].module
        g = torch.Generator().manual_seed(2)
        x = torch.randn(SEQ_MHA, 2, mha.embed_dim, generator=g)  # (seq, batch, embed)
        key = torch.randn(SEQ_MHA + 1, 2, mha.kdim, generator=g)
        value = torch.randn(SEQ_MHA + 1, 2, mha.vdim, generator=g)
        if mha.batch_first:
            x, key, value = (t.transpose(0, 1) for t in (x, key, value))
        # nn.MultiheadAttention applies out_proj inside its functional forward, so read z by
        # making the output projection the identity on a copy.
        ident = copy.deepcopy(mha)
        with torch.no_grad():
            ident.out_proj.weight.copy_(torch.eye(mha.embed_dim))
            ident.out_proj.bias.zero_()
            flat = ident(x, key, value, need_weights=False)[0]
            z = flat.reshape(*flat.shape[:-1], HEADS, -1)
            edited = z if zero is None else zero(z.clone())
            out = nn.functional.linear(
                edited.reshape(flat.shape), mha.out_proj.weight, mha.out_proj.bias
            )
        return z, out


def _build(name: str) -> nn.Module:
    if name in EXTRA:
        return EXTRA[name]()
    return case(name).build()


@functools.cache
def _subject(name: str) -> Subject:
    """Each model is built once for the whole module (the oracle tests restore its weights)."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _build(name).eval()
    batch = torch.randint(0, 64, (2, 8), generator=gen)
    # Probe the last attention module: layer indices past 0 exercise the numbering too.
    layer = len(find_attention(model)) - 1
    return Subject(name, model, PROBES[name], batch, layer)


@pytest.fixture(scope="module", params=[*TRANSFORMERS, *EXTRA])
def subject(request) -> Subject:
    return _subject(request.param)


@contextmanager
def perturbed(model: nn.Module, masks: dict[str, torch.Tensor], seed: int = 3) -> Iterator[None]:
    """Add N(0, 0.5^2) noise to the masked entries, restore afterwards."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in masks}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, m in masks.items():
            m = torch.ones_like(params[n], dtype=torch.bool) if m is None else m
            params[n].add_(0.5 * torch.randn(params[n].shape, generator=g) * m)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def _moved_heads(z0: torch.Tensor, z1: torch.Tensor) -> dict[int, float]:
    diff = (z1 - z0).abs().amax(dim=tuple(i for i in range(z0.dim()) if i != z0.dim() - 2))
    return {h: float(d) for h, d in enumerate(diff)}


def _assert_moves_exactly(subject: Subject, masks, expected: set[int], what: str) -> None:
    z0, _ = subject.run()
    with perturbed(subject.model, masks):
        z1, _ = subject.run()
    moved = _moved_heads(z0, z1)
    for h, d in moved.items():
        if h in expected:
            assert d > MOVED, f"{subject.name} {what}: head {h} should move, moved {d:.2e}"
        else:
            assert d < STILL, f"{subject.name} {what}: head {h} should stay, moved {d:.2e}"


def _group_of(subject: Subject, h: int) -> set[int]:
    g = subject.probe.group
    return {j for j in range(HEADS) if j // g == h // g}


def _comps(subject: Subject, parts=("q", "k", "v", "o")):
    return head_components(subject.model, layers=[subject.layer], parts=parts)


def test_the_layout_is_recognised(subject):
    found = find_attention(subject.model)
    assert len(found) == subject.probe.attention_modules
    assert all(f.num_heads == HEADS for f in found)
    expected = {
        "gpt2": "hf_gpt2", "gpt2_cross": "hf_gpt2", "gpt_neox": "hf_gpt_neox", "phi3": "hf_phi3",
        "hooked_transformer": "transformer_lens", "hooked_transformer_gqa": "transformer_lens",
    }  # fmt: skip
    layout = expected.get(subject.name, "torch_mha" if subject.probe.kind == "mha" else None)
    assert found[0].layout.name == (layout or "hf_separate_qkv")


def test_query_part_moves_only_its_head(subject):
    comps = _comps(subject, parts=("q",))
    for h in range(HEADS):
        _assert_moves_exactly(subject, comps[f"l{subject.layer}h{h}"], {h}, f"q of head {h}")


def test_key_value_part_moves_exactly_its_group(subject):
    comps = _comps(subject, parts=("k", "v"))
    for h in range(HEADS):
        _assert_moves_exactly(subject, comps[f"l{subject.layer}h{h}"], _group_of(subject, h),
                              f"k/v of head {h}")  # fmt: skip


def test_the_whole_component_moves_the_group_and_its_complement_not_the_head(subject):
    comps = _comps(subject, parts=("q", "k", "v"))
    for h in (0, HEADS - 1):
        masks = comps[f"l{subject.layer}h{h}"]
        _assert_moves_exactly(subject, masks, _group_of(subject, h), f"q/k/v of head {h}")
        # Everything else of the same tensors: nothing that acts on head h is left out.
        complement = {n: ~m for n, m in masks.items() if not m.all()}
        z0, _ = subject.run()
        with perturbed(subject.model, complement):
            z1, _ = subject.run()
        moved = _moved_heads(z0, z1)
        assert moved[h] < STILL, f"{subject.name}: the complement moved head {h}"
        assert max(moved.values()) > MOVED  # the complement is not empty of effect


def test_output_part_acts_only_through_its_head(subject):
    comps = _comps(subject, parts=("o",))
    for h in (0, HEADS - 1):
        masks = comps[f"l{subject.layer}h{h}"]

        def without_h(z, h=h):
            z[..., h, :] = 0
            return z

        def only_h(z, h=h):
            keep = z[..., h, :].clone()
            z.zero_()
            z[..., h, :] = keep
            return z

        _, plain = subject.run()
        _, zeroed = subject.run(without_h)
        _, kept = subject.run(only_h)
        with perturbed(subject.model, masks):
            _, plain1 = subject.run()
            _, zeroed1 = subject.run(without_h)
        assert (plain1 - plain).abs().max() > MOVED
        assert (zeroed1 - zeroed).abs().max() < STILL, "o mask acts through another head"
        complement = {n: ~m for n, m in masks.items()}
        with perturbed(subject.model, complement):
            _, kept1 = subject.run(only_h)
        assert (kept1 - kept).abs().max() < STILL, "o mask misses an entry acting on z_h"


def test_query_parts_are_disjoint_and_everything_is_covered(subject):
    """Query masks of different heads never overlap; K/V masks are equal within a group and
    disjoint across groups; together the heads cover every entry of the projections."""
    model = subject.model
    comps = {p: _comps(subject, parts=(p,)) for p in "qkvo"}
    names = [f"l{subject.layer}h{h}" for h in range(HEADS)]
    for part, by_head in comps.items():
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                same_group = part in "kv" and _group_of(subject, i) == _group_of(
                    subject, names.index(b)
                )
                for n in set(by_head[a]) & set(by_head[b]):
                    if same_group:
                        assert torch.equal(by_head[a][n], by_head[b][n])
                    else:
                        assert not (by_head[a][n] & by_head[b][n]).any(), (part, a, b, n)
    union: dict[str, torch.Tensor] = {}
    for by_head in comps.values():
        for masks in by_head.values():
            for n, m in masks.items():
                union[n] = union[n] | m if n in union else m
    for n, m in union.items():
        assert m.all(), f"{subject.name}: {n} has entries no head owns"
    # The output bias and everything outside attention belong to no head.
    attention = find_attention(model)[subject.layer].name
    assert all(n.startswith(attention) for n in union)
    assert not any(n.endswith(("out_proj.bias", "o_proj.bias", "dense.bias", "c_proj.bias",
                               "b_O")) for n in union)  # fmt: skip


def test_components_resolve_and_name_trainable_parameters(subject):
    comps = head_components(subject.model)
    assert len(comps) == subject.probe.attention_modules * HEADS
    resolved = resolve_components(subject.model, comps)
    assert set(resolved) == set(comps)
    # Freezing the output projection drops it from every head, nothing else changes.
    o_names = set(_comps(subject, parts=("o",))[f"l{subject.layer}h0"])
    params = dict(subject.model.named_parameters())
    for n in o_names:
        params[n].requires_grad_(False)
    try:
        frozen = head_components(subject.model, layers=subject.layer)
    finally:
        for n in o_names:
            params[n].requires_grad_(True)
    assert not any(n in o_names for masks in frozen.values() for n in masks)
    assert set(frozen) == {f"l{subject.layer}h{h}" for h in range(HEADS)}


# ------------------------------------------------------------------------------------------
# Arguments, errors, other structures (cheap, no zoo model needed).


def _encoder(layers: int = 2) -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def test_layers_heads_and_parts_select():
    model = _encoder(3)
    assert list(head_components(model, layers=[2, 0], heads=1)) == ["l0h1", "l2h1"]
    only_o = head_components(model, layers=1, parts="o")
    assert set(only_o["l1h0"]) == {"layers.1.self_attn.out_proj.weight"}
    with pytest.raises(ValueError, match=r"`layers`.*0 to 2.*\[3\]"):
        head_components(model, layers=[3])
    with pytest.raises(ValueError, match="`heads`"):
        head_components(model, heads=[2])
    with pytest.raises(ValueError, match="`layers`"):
        head_components(model, layers="0")
    with pytest.raises(ValueError, match="`parts`"):
        head_components(model, parts=("q", "x"))
    with pytest.raises(ValueError, match="`model`"):
        head_components("gpt2")


def test_an_unknown_architecture_says_what_it_found_and_how_to_pass_masks():
    class MyAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wqkv = nn.Linear(8, 24)
            self.wo = nn.Linear(8, 8)

    model = nn.Sequential(nn.Linear(8, 8), MyAttention())
    with pytest.raises(ValueError, match=r"'1' \(MyAttention\).*ROWS.*COLUMNS.*Conv1D"):
        head_components(model)
    with pytest.raises(ValueError, match=r"no attention-like module.*Linear"):
        head_components(nn.Sequential(nn.Linear(2, 2)))
    # Next to a known one, the unknown module is named in a warning, not skipped silently.
    both = nn.ModuleDict({"known": nn.MultiheadAttention(8, 2), "mine": MyAttention()})
    with pytest.warns(UserWarning, match="'mine' \\(MyAttention\\)"):
        assert list(head_components(both)) == ["l0h0", "l0h1"]


def test_a_known_layout_with_inconsistent_shapes_is_refused():
    class Attention(nn.Module):
        """q/k/v/o_proj, but the query packs a gate per head (twice the width)."""

        def __init__(self) -> None:
            super().__init__()
            self.num_heads, self.head_dim = 2, 4
            self.q_proj = nn.Linear(8, 16)
            self.k_proj, self.v_proj, self.o_proj = (
                nn.Linear(8, 8),
                nn.Linear(8, 8),
                nn.Linear(8, 8),
            )

    with pytest.raises(ValueError, match=r"'att'.*hf_separate_qkv.*q_proj.out_features=16"):
        head_components(nn.ModuleDict({"att": Attention()}))


def test_a_wrapper_prefix_and_tied_modules_keep_named_parameters_names():
    shared = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"a": shared, "b": shared})  # one module under two names
    comps = head_components(model)
    assert set(comps) == {"l0h0", "l0h1"}  # named_modules lists a shared module once
    wrapper = nn.Module()
    wrapper.net = _encoder(1)
    names = set(head_components(wrapper)["l0h0"])
    assert names <= {n for n, _ in wrapper.named_parameters()}
    assert all(n.startswith("net.layers.0.self_attn.") for n in names)


def test_no_trainable_head_is_an_error():
    model = _encoder(1)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"l0h0.*requires_grad=False"):
        head_components(model)


def test_layer_components_cover_blocks_attention_and_mlp():
    model = _encoder(2)
    comps = layer_components(model)
    assert set(comps) == {"l0", "l0.attn", "l0.mlp", "l1", "l1.attn", "l1.mlp"}
    assert set(comps["l1.mlp"]) == {f"layers.1.linear{i}.{w}" for i in (1, 2)
                                     for w in ("weight", "bias")}  # fmt: skip
    block = {n for n, _ in model.named_parameters() if n.startswith("layers.0.")}
    assert set(comps["l0"]) == block
    assert set(comps["l0.attn"]) == {n for n in block if ".self_attn." in n}
    assert list(layer_components(model, layers=1)) == ["l1", "l1.attn", "l1.mlp"]
    resolve_components(model, comps)


@pytest.mark.parametrize("name", ["gpt2", "llama", "hooked_transformer"])
def test_layer_components_on_zoo_models(name):
    c = case(name)
    with torch.random.fork_rng():
        model = c.build()
    comps = layer_components(model)
    assert {"l0", "l0.attn", "l0.mlp", "l1", "l1.attn", "l1.mlp"} == set(comps)
    assert set(comps["l0.attn"]) | set(comps["l0.mlp"]) < set(comps["l0"])


def test_every_layout_is_proven_here():
    """A new registry entry needs a zoo subject above (the oracle) before it ships."""
    proven = {"hf_gpt2", "hf_gpt_neox", "hf_separate_qkv", "hf_phi3", "transformer_lens",
              "torch_mha"}  # fmt: skip
    assert {layout.name for layout in LAYOUTS} == proven
    assert set(PROBES) == {*TRANSFORMERS, *EXTRA}


def test_head_components_run_in_estimate_llc():
    """The returned format is what estimate_llc consumes: one chain set per head."""
    c = case("gpt2")
    with torch.random.fork_rng():
        model = c.build()
    comps = head_components(model, layers=1, heads=[0, 3])
    cfg = SGLDConfig(num_chains=2, num_draws=4, num_burnin_steps=1, step_size=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = estimate_llc(model, c.loss_fn, c.batches(2), config=cfg, components=comps,
                              seed=0, on_failure="ignore")  # fmt: skip
    assert set(result.components) == {"l1h0", "l1h3"}
    for part in result.components.values():
        assert torch.isfinite(part.loss_trace).all()


# ------------------------------------------------------------------------------------------
# The oracle has teeth: the masks the old helpers gave, and hand-built masks in the wrong
# orientation, fail it.


def test_the_oracle_rejects_grouped_masks_on_the_interleaved_neox_projection():
    """What fused_qkv_head_components returned for Pythia before: head 0 got head 0's Q,
    head 1's K and head 2's V rows (the rows of a [Q|K|V] reading of a per-head layout)."""
    s = _subject("gpt_neox")
    qkv = s.model.get_submodule(f"gpt_neox.layers.{s.layer}.attention.query_key_value")
    name = f"gpt_neox.layers.{s.layer}.attention.query_key_value.weight"
    wrong = torch.zeros_like(qkv.weight, dtype=torch.bool)
    for start in (0, 4 * WIDTH, 8 * WIDTH):  # the [Q | K | V] reading's rows of head 0
        wrong[start : start + WIDTH] = True
    with pytest.raises(AssertionError, match=r"head 1 should stay"):
        _assert_moves_exactly(s, {name: wrong}, {0}, "the old head-0 mask")
    right = head_components(s.model, layers=s.layer, heads=0, parts=("q", "k", "v"))
    _assert_moves_exactly(s, right[f"l{s.layer}h0"], {0}, "head_components' head-0 mask")


def test_the_oracle_rejects_a_transposed_mask_on_the_square_gpt2_c_proj():
    """c_proj.weight is square (32, 32), so a mask in nn.Linear orientation (columns) has the
    right shape and is accepted by resolve_components; it is the wrong coordinates."""
    s = _subject("gpt2")
    name = f"transformer.h.{s.layer}.attn.c_proj.weight"
    right = head_components(s.model, layers=s.layer, heads=0, parts="o")[f"l{s.layer}h0"][name]
    transposed = right.T.contiguous()
    assert transposed.shape == right.shape and not torch.equal(transposed, right)
    resolve_components(s.model, {"wrong": {name: transposed}})  # accepted: shapes agree

    def without_0(z):
        z[..., 0, :] = 0
        return z

    _, zeroed = s.run(without_0)
    with perturbed(s.model, {name: transposed}):
        _, zeroed1 = s.run(without_0)
    assert (zeroed1 - zeroed).abs().max() > MOVED  # acts through the other heads
