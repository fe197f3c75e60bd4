"""The batch pool keeps batches of every shape (issue #8): dynamic padding, a short last
batch. n counts every sample, every batch is drawn, and the backends agree on them."""

from __future__ import annotations

import math

import pytest
import torch

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.core.data import build_pool

from ..zoo.models import CASES


def token_batches(lengths=(8, 12, 16, 12, 8, 16), batch=3, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, n), generator=g) for n in lengths]


def test_pool_groups_batches_by_shape_and_counts_every_sample():
    data = [*token_batches(), torch.randint(0, 64, (2, 8))]  # and a short last batch
    pool = build_pool(data, num_batches=None, device=torch.device("cpu"))
    assert pool.num_batches == 7
    assert pool.num_samples == 6 * 3 + 2
    assert len(pool.groups) == 4  # (3, 8), (3, 12), (3, 16), (2, 8)
    for i, batch in enumerate(data):
        assert torch.equal(pool.batch(i), batch)  # every batch, in its own shape
    split = pool.split_by_shape([0, 1, 4, 6])
    assert split == [(0, [0, 2]), (1, [1]), (3, [3])]


def test_batches_of_another_structure_are_an_error_not_dropped():
    data = [(torch.zeros(2, 3), torch.zeros(2)), {"x": torch.zeros(2, 3)}]
    with pytest.raises(ValueError, match="batch 1"):
        build_pool(data, num_batches=None, device=torch.device("cpu"))


def test_ragged_token_pool_on_gpt2_uses_every_batch_and_backends_agree():
    """GPT-2 on token batches of lengths 8, 12 and 16: all are drawn, n counts all, λ̂ is
    finite, and vmap (which splits each step's chains by shape) matches the loop backend.
    float64 sampling, so the backends differ only by reassociation (rtol 1e-8)."""
    case = CASES["gpt2"]
    pytest.importorskip("transformers")
    model = case.build()
    data = token_batches()
    base = dict(step_size=1e-5, n_beta=20.0, localization=100.0, num_chains=2,
                num_draws=8, num_burnin_steps=0, dtype="float64")
    head = {"c_attn": torch.zeros(32, 96, dtype=torch.bool)}
    head["c_attn"][:, [*range(8), *range(32, 40), *range(64, 72)]] = True  # head 0's q, k, v
    comps = {"l0h0": {"transformer.h.0.attn.c_attn.weight": head["c_attn"]}}
    out = {}
    for backend in ("vmap", "loop"):
        cfg = SGLDConfig(**base, backend=backend)
        out[backend] = estimate_llc(model, case.loss_fn, data, config=cfg, seed=0,
                                    components=comps, on_failure="ignore")
    v, loop = out["vmap"], out["loop"]
    assert v.backend == "vmap" and v.num_samples == 18  # 6 batches x 3 sequences
    assert math.isfinite(v.llc_mean) and math.isfinite(v.components["l0h0"].llc_mean)
    torch.testing.assert_close(v.loss_trace, loop.loss_trace, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(v.components["l0h0"].loss_trace,
                               loop.components["l0h0"].loss_trace, rtol=1e-8, atol=1e-12)
    # 2 chains x 8 steps over 6 batches: each chain walks its own reshuffle of the pool, so
    # every batch (every length) is drawn at least once by every chain.
    with torch.no_grad():
        at_w_star = torch.stack([case.loss_fn(model, b).double() for b in data])
    baseline = v.baseline_trace
    for i in range(len(data)):
        assert ((baseline - at_w_star[i]).abs() < 1e-6).sum() >= 2
