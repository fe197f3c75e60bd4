"""Real architectures from tiny configs (no downloads): the models users actually train.

Every case builds a randomly initialised model of a class users import from ``torch``,
``transformers`` or ``transformer_lens``, with a batch maker and a mean loss. The
``transformers``/``transformer_lens`` cases are skipped (``pytest.importorskip``) only where
those packages are absent; the test extra installs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VOCAB = 64
SEQ = 8
BATCH = 4


@dataclass(frozen=True)
class ZooCase:
    """One architecture: ``build()`` a seeded model, ``batch(g)`` one batch, ``loss_fn``."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Any]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    requires: str | None = None  # the optional package the case needs

    def batches(self, num: int, *, seed: int = 0) -> list[Any]:
        g = torch.Generator().manual_seed(seed)
        return [self.batch(g) for _ in range(num)]


def _tokens(g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, a mean over the batch's tokens."""
    out = model(batch)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn()

    return build


def _hf(config_name: str, model_name: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        # The default attention implementation (SDPA where the model has it), as users get it.
        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, model_name)(cfg)

    return _seeded(build)


_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per key/value head
    max_position_embeddings=64,
)


def _gpt2() -> Callable[[], nn.Module]:
    return _hf(
        "GPT2Config",
        "GPT2LMHeadModel",
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )


def _neox() -> Callable[[], nn.Module]:
    return _hf(
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )


def _hooked_transformer() -> nn.Module:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=VOCAB,
        n_ctx=64,
        act_fn="gelu",
        normalization_type="LN",
        device="cpu",
        seed=0,
    )
    return HookedTransformer(cfg)


class TorchEncoderLM(nn.Module):
    """Embedding + ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside) + head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.encoder(self.embed(tokens), mask=mask, is_causal=True))


class SmallCNN(nn.Module):
    """Conv + BatchNorm + residual block, the shape of a ResNet, for 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(h.mean(dim=(2, 3)))


def _images(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH * 2, 3, 8, 8, generator=g)
    return x, torch.randint(0, 3, (BATCH * 2,), generator=g)


def _image_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return nn.functional.cross_entropy(logits, y)


_HF = "transformers"
_LM = dict(batch=_tokens, loss_fn=_lm_loss)
_IMG = dict(batch=_images, loss_fn=_image_loss)
_IDS = dict(bos_token_id=0, eos_token_id=0)

CASES: dict[str, ZooCase] = {
    c.name: c
    for c in [
        ZooCase("gpt2", _gpt2(), **_LM, requires=_HF),
        ZooCase("gpt_neox", _neox(), **_LM, requires=_HF),
        ZooCase(
            "llama", _hf("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE), **_LM, requires=_HF
        ),
        ZooCase(
            "mistral",
            _hf("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE),
            **_LM,
            requires=_HF,
        ),
        ZooCase(
            "qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE), **_LM, requires=_HF
        ),
        ZooCase(
            "gemma",
            _hf("GemmaConfig", "GemmaForCausalLM", head_dim=8, **_LLAMA_LIKE),
            **_LM,
            requires=_HF,
        ),
        ZooCase(
            "phi3",
            _hf("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_IDS, **_LLAMA_LIKE),
            **_LM,
            requires=_HF,
        ),
        ZooCase(
            "hooked_transformer", _seeded(_hooked_transformer), **_LM, requires="transformer_lens"
        ),
        ZooCase("torch_encoder", _seeded(TorchEncoderLM), **_LM),
        ZooCase("cnn_batchnorm", _seeded(SmallCNN), **_IMG),
        ZooCase(
            "hf_resnet",
            _hf(
                "ResNetConfig",
                "ResNetForImageClassification",
                num_channels=3,
                embedding_size=8,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                num_labels=3,
            ),
            **_IMG,
            requires=_HF,
        ),
    ]
}

TRANSFORMERS = [n for n in CASES if n not in ("cnn_batchnorm", "hf_resnet")]
"""The cases with attention heads."""


def case(name: str) -> ZooCase:
    """The case ``name``, skipping the test when its optional package is missing."""
    import pytest

    c = CASES[name]
    if c.requires is not None:
        pytest.importorskip(c.requires)
    return c
