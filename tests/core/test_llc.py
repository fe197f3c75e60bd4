"""Behaviour of estimate_llc: reproducibility, isolation, backends, inputs, health."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slt_callbacks import (
    LLCEstimationError,
    SGLDConfig,
    Status,
    attention_head_components,
    estimate_llc,
    merge_results,
)
from slt_callbacks.core.diagnostics import HealthCriteria
from slt_callbacks.core.llc import summarize

from .models import minimal_rank_teacher, mse_half, regression_data

SHORT = SGLDConfig(step_size=1e-4, n_beta=100.0, localization=1.0, num_chains=3,
                   num_draws=40, num_burnin_steps=10)


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.ReLU())
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.bn(self.body(x)))


def classification_data(num_batches=4, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_batches * batch, 4, generator=g)
    y = torch.randint(0, 3, (num_batches * batch,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def trained_net(seed=0):
    torch.manual_seed(seed)
    return DropoutNet()


def test_same_seed_same_numbers_and_other_seed_differs():
    model, data = trained_net(), classification_data()
    a = estimate_llc(model, ce, data, config=SHORT, seed=7, on_failure="ignore")
    b = estimate_llc(model, ce, data, config=SHORT, seed=7, on_failure="ignore")
    c = estimate_llc(model, ce, data, config=SHORT, seed=8, on_failure="ignore")
    assert torch.equal(a.loss_trace, b.loss_trace)
    assert a.llc_mean == b.llc_mean
    assert not torch.equal(a.loss_trace, c.loss_trace)


def test_model_and_global_state_untouched():
    model, data = trained_net(), classification_data()
    model.train()
    model.body[1].eval()  # a submodule mode the user chose must survive, too
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.head.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    grad_enabled = torch.is_grad_enabled()
    with torch.no_grad():  # callers may be in no_grad; sampling must still work
        estimate_llc(model, ce, data, config=SHORT, seed=0, on_failure="ignore")
    assert torch.is_grad_enabled() == grad_enabled
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert not model.head.bias.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)


def test_frozen_parameters_are_not_sampled():
    """Only ``requires_grad`` parameters move: the loss function sees the frozen weights
    unchanged at every call and the trainable bias moving (loop backend, so the tensors it
    sees are plain per-chain tensors)."""
    model, data = trained_net(), classification_data()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "head.bias")
    frozen_w = model.head.weight.detach().clone()
    bias0 = model.head.bias.detach().clone()
    seen = {"weight": 0.0, "bias": 0.0}

    def spy(m, batch):
        seen["weight"] = max(seen["weight"], float((m.head.weight - frozen_w).detach().abs().max()))
        seen["bias"] = max(seen["bias"], float((m.head.bias - bias0).detach().abs().max()))
        return ce(m, batch)

    cfg = SGLDConfig(**{**SHORT.to_dict(), "backend": "loop"})
    result = estimate_llc(model, spy, data, config=cfg, seed=0, on_failure="ignore")
    assert torch.isfinite(result.loss_trace).all()
    assert seen["weight"] == 0.0
    assert seen["bias"] > 0.0
    model.head.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable parameters"):
        estimate_llc(model, ce, data, config=SHORT, seed=0)


def test_vmap_and_loop_backends_agree():
    """Same seed, same arithmetic: the backends differ only by float reassociation in the
    batched matmuls. In float64 over 50 steps that stays far below 1e-8 relative."""
    model = minimal_rank_teacher(3, 2, 4, 1)
    data = regression_data(model, 3, n=2000, batch=200)
    cfg = SGLDConfig(step_size=1e-4, n_beta=200.0, localization=1.0, num_chains=2,
                     num_draws=40, num_burnin_steps=10)
    comps = {"a": "a.*"}
    v = estimate_llc(model, mse_half, data, config=cfg.__class__(**{**cfg.to_dict(),
                     "backend": "vmap"}), seed=3, components=comps, on_failure="ignore")
    loop = estimate_llc(model, mse_half, data, config=cfg.__class__(**{**cfg.to_dict(),
                        "backend": "loop"}), seed=3, components=comps, on_failure="ignore")
    assert v.backend == "vmap" and loop.backend == "loop"
    torch.testing.assert_close(v.loss_trace, loop.loss_trace, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(v.components["a"].loss_trace, loop.components["a"].loss_trace,
                               rtol=1e-8, atol=1e-12)


def test_auto_falls_back_to_loop_for_batchnorm_in_train_mode():
    """BatchNorm in train mode updates running statistics in place, which vmap cannot do
    on unbatched buffers: auto must fall back, say why, and match the loop backend."""
    model, data = trained_net(), classification_data()
    cfg = SGLDConfig(**{**SHORT.to_dict(), "train_mode": True})
    with pytest.warns(UserWarning, match="backend='loop'"):
        auto = estimate_llc(model, ce, data, config=cfg, seed=1, on_failure="ignore")
    loop = estimate_llc(model, ce, data, config=SGLDConfig(**{**cfg.to_dict(),
                        "backend": "loop"}), seed=1, on_failure="ignore")
    assert auto.backend == "loop" and auto.backend_reason
    assert auto.fell_back_to_loop
    assert not replace(auto, backend="fast+vmap").fell_back_to_loop
    assert replace(auto, backend="fast+loop").fell_back_to_loop  # callers pin loop then too
    torch.testing.assert_close(auto.loss_trace, loop.loss_trace)
    assert model.bn.running_mean.abs().max() == 0  # the user's buffers were never written


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
def test_batch_structures(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    model = nn.Linear(3, 3)
    if kind == "tensor":  # an autoencoder-style loss on a bare tensor batch
        data = [x[:32], x[32:]]

        def loss(m, b):
            return ((m(b) - b) ** 2).mean()
    elif kind == "tuple":
        data = [(x[:32], x[:32]), (x[32:], x[32:])]

        def loss(m, b):
            return ((m(b[0]) - b[1]) ** 2).mean()
    else:
        data = [{"x": x[:32], "name": "a"}, {"x": x[32:], "name": "a"}]

        def loss(m, b):
            assert b["name"] == "a"  # non-tensor leaves pass through
            return ((m(b["x"]) - b["x"]) ** 2).mean()
    result = estimate_llc(model, loss, data, config=SHORT, seed=0, on_failure="ignore")
    assert result.loss_trace.shape == (3, 40)
    assert result.num_samples == 64
    assert torch.isfinite(result.loss_trace).all()


def test_init_loss_is_the_pool_mean_and_data_restriction_changes_it():
    model, data = trained_net(), classification_data()
    model.eval()
    with torch.no_grad():
        expected = sum(float(ce(model, b)) for b in data) / len(data)
    result = estimate_llc(model, ce, data, config=SHORT, seed=0, on_failure="ignore")
    assert result.init_loss == pytest.approx(expected, rel=1e-6)
    subset = estimate_llc(model, ce, data[:1], config=SHORT, seed=0, on_failure="ignore")
    with torch.no_grad():
        assert subset.init_loss == pytest.approx(float(ce(model, data[0])), rel=1e-6)


def test_default_n_beta_is_wbic_of_the_pool():
    model, data = trained_net(), classification_data(num_batches=4, batch=32)
    cfg = SGLDConfig(**{**SHORT.to_dict(), "n_beta": None})
    result = estimate_llc(model, ce, data, config=cfg, seed=0, on_failure="ignore")
    assert result.n_beta == pytest.approx(128 / math.log(128))


def test_partial_last_batch_is_kept_and_pool_can_cycle():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 3, generator=g)
    data = [x[i : i + 32] for i in range(0, 70, 32)]  # 32, 32, 6

    def loss(m, b):
        return (m(b) ** 2).mean()

    cfg = SGLDConfig(**{**SHORT.to_dict(), "num_batches": 5})
    with pytest.warns(UserWarning, match="repeats them"):
        result = estimate_llc(nn.Linear(3, 1), loss, data, config=cfg, seed=0,
                              on_failure="ignore")
    # Five pool batches cycled from three distinct ones; the short last batch is data too,
    # so n counts all 70 samples once (it used to be dropped silently, issue #8).
    assert result.num_samples == 70
    assert torch.isfinite(result.loss_trace).all()


def test_batch_size_ignores_scalar_leaves():
    """A dict batch with a 0-d tensor (a count, a temperature) must not be taken for a
    batch of one: n (and the default nβ) comes from the tensors that have a batch axis."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    data = [{"n": torch.tensor(16), "x": x[i : i + 16]} for i in range(0, 64, 16)]

    def loss(m, b):
        return (m(b["x"]) ** 2).mean()

    cfg = SGLDConfig(**{**SHORT.to_dict(), "n_beta": None})
    result = estimate_llc(nn.Linear(3, 1), loss, data, config=cfg, seed=0, on_failure="ignore")
    assert result.num_samples == 64
    assert result.n_beta == pytest.approx(64 / math.log(64))


def test_half_precision_model_is_sampled_in_float32():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    x = torch.randn(64, 3).to(torch.bfloat16)
    data = [(x[:32], x[:32, :2]), (x[32:], x[32:, :2])]
    result = estimate_llc(model, mse_half, data, config=SHORT, seed=0, on_failure="ignore")
    assert result.loss_trace.dtype == torch.float32
    assert model.weight.dtype == torch.bfloat16


def test_attention_head_components_run_batched():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True),
                           "out": nn.Linear(8, 1)})
    x = torch.randn(4, 16, 5, 8)

    def loss(m, b):
        h, _ = m["attn"](b, b, b, need_weights=False)
        return (m["out"](h) ** 2).mean()

    comps = {**attention_head_components(model, "attn"), "readout": "out.*"}
    result = estimate_llc(model, loss, list(x), config=SHORT, seed=0, components=comps,
                          on_failure="ignore")
    assert set(result.components) == {"attn.head0", "attn.head1", "readout"}
    for part in result.components.values():
        assert part.loss_trace.shape == (3, 40)
        assert math.isfinite(part.llc_mean)
        assert part.init_loss == result.init_loss


def test_frozen_coordinates_of_a_component_do_not_move():
    """Restricting to a mask that selects nothing the loss depends on leaves the loss
    exactly at its initial value: the other coordinates are frozen at w*."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with torch.no_grad():
        model[1].weight[0, 2] = 0.0  # hidden unit 2 is not read out
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[2] = True  # the weights into hidden unit 2
    data = [torch.randn(16, 3) for _ in range(3)]

    def loss(m, b):
        return (m(b) ** 2).mean()

    # The loop backend runs the plain matmuls that evaluate the loss at w*; a batched (vmap)
    # matmul may round differently, by an ulp that depends on the buffers' alignment, which
    # made this exact comparison flaky (about half the runs failed on main).
    cfg = SGLDConfig(**{**SHORT.to_dict(), "backend": "loop"})
    result = estimate_llc(model, loss, data, config=cfg, seed=0,
                          components={"dead": {"0.weight": mask}}, on_failure="ignore")
    dead = result.components["dead"]
    pool_losses = torch.stack([loss(model, b).detach() for b in data])
    assert set(dead.loss_trace.flatten().tolist()) <= set(pool_losses.tolist())
    # Each draw is paired with the loss at w* on its own batch, so a component that cannot
    # move the loss has λ̂ = 0 exactly, not 0 ± the batch-to-batch spread of the loss.
    assert dead.llc_mean == 0.0


# ---- health --------------------------------------------------------------------------


def test_huge_step_size_diverges_and_is_reported():
    model, data = trained_net(), classification_data()
    cfg = SGLDConfig(**{**SHORT.to_dict(), "step_size": 10.0, "n_beta": 1e4})
    with pytest.warns(UserWarning, match="diverged"):
        result = estimate_llc(model, ce, data, config=cfg, seed=0)
    assert result.status is Status.ALL_DIVERGED
    assert math.isnan(result.llc_mean)
    assert result.num_diverged == 3
    with pytest.raises(LLCEstimationError, match="diverged") as err:
        estimate_llc(model, ce, data, config=cfg, seed=0, on_failure="raise")
    assert err.value.result.status is Status.ALL_DIVERGED


def _synthetic(loss, init=1.0, n_beta=10.0, burnin=2):
    cfg = SGLDConfig(step_size=1e-3, n_beta=n_beta, num_chains=loss.shape[0],
                     num_draws=loss.shape[1] - burnin, num_burnin_steps=burnin)
    chains = loss.shape[0]
    baseline = torch.full((chains, loss.shape[1] - burnin), init, dtype=torch.float64)
    return summarize(loss.double(), baseline, torch.full((chains,), 0.95), torch.zeros(chains),
                     init_loss=init, n_beta=n_beta, num_samples=100, config=cfg,
                     criteria=HealthCriteria())


def test_partially_diverged_chain_is_excluded_not_averaged():
    loss = torch.full((3, 12), 1.1)
    loss[1, 5:] = float("nan")  # chain 1 diverges at step 5; its first draws looked fine
    loss[1, 2:5] = 50.0
    result = _synthetic(loss)
    assert result.status is Status.DIVERGED
    assert result.llc_mean == pytest.approx(1.0)  # 10 * (1.1 - 1.0), chains 0 and 2 only
    assert math.isnan(float(result.llc_per_chain[1]))
    assert "chain 1 at step 5" in result.reasons[0]


def test_negative_llc_says_not_a_minimum():
    loss = torch.full((3, 12), 0.8)  # every draw below the initial loss 1.0
    result = _synthetic(loss)
    assert result.status is Status.NOT_A_MINIMUM
    assert "not a local minimum" in result.reasons[0]
    assert result.frac_below_init == 1.0


def test_drift_after_burnin_is_flagged():
    loss = torch.linspace(1.0, 2.0, 40).repeat(3, 1) + 0.001 * torch.arange(3)[:, None]
    result = _synthetic(loss)
    assert result.status is Status.NOT_CONVERGED
    assert "rising" in result.reasons[0]


def test_not_a_minimum_on_a_real_model_away_from_the_optimum():
    """w* displaced from the least-squares solution: chains slide downhill, λ̂ < 0."""
    model = minimal_rank_teacher(2, 2, 2, 2, seed=1)
    data = regression_data(model, 2, n=2000, batch=200)
    with torch.no_grad():
        model.b.weight.add_(0.5)
    cfg = SGLDConfig(step_size=1e-4, n_beta=300.0, localization=1.0, num_chains=3,
                     num_draws=200, num_burnin_steps=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = estimate_llc(model, mse_half, data, config=cfg, seed=0)
    assert result.status is Status.NOT_A_MINIMUM
    assert result.llc_mean < 0
    assert any("not a local minimum" in str(w.message) for w in caught)


def test_merge_results_is_the_run_with_all_chains():
    model, data = trained_net(), classification_data()
    a = estimate_llc(model, ce, data, config=SHORT, seed=1, on_failure="ignore",
                     components={"head": "head.*"})
    b = estimate_llc(model, ce, data, config=SHORT, seed=2, on_failure="ignore",
                     components={"head": "head.*"})
    merged = merge_results([a, b])
    per_chain = torch.cat([a.llc_per_chain, b.llc_per_chain])
    assert merged.config.num_chains == 6
    assert merged.llc_mean == pytest.approx(float(per_chain.mean()))
    assert merged.llc_std == pytest.approx(float(per_chain.std()))
    assert merged.components["head"].loss_trace.shape == (6, 40)


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("step_size", -1.0, "step_size"),
        ("step_size", float("nan"), "step_size"),
        ("num_chains", 0, "num_chains"),
        ("num_draws", 1, "num_draws"),
        ("num_burnin_steps", -1, "num_burnin_steps"),
        ("localization", -0.1, "localization"),
        ("n_beta", 0.0, "n_beta"),
        ("dtype", "float16", "dtype"),
        ("backend", "jax", "backend"),
        ("num_batches", 0, "num_batches"),
        ("train_mode", "yes", "train_mode"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        SGLDConfig(**{field: value})


def test_config_round_trip_and_unknown_keys():
    cfg = SGLDConfig(step_size=1e-3, n_beta=5.0)
    assert SGLDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="nbeta"):
        SGLDConfig.from_dict({"nbeta": 3.0})


def test_bad_inputs_name_the_argument():
    model, data = trained_net(), classification_data()
    with pytest.raises(ValueError, match=r"scalar loss.*shape \(32,\)"):
        estimate_llc(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
                     data, config=SHORT, seed=0)
    with pytest.raises(ValueError, match=r"`data`.*empty"):
        estimate_llc(model, ce, [], config=SHORT, seed=0)
    with pytest.raises(ValueError, match="single Tensor"):
        estimate_llc(model, ce, torch.randn(4, 4), config=SHORT, seed=0)
    with pytest.raises(ValueError, match=r"glob 'layers.\*' matches no"):
        estimate_llc(model, ce, data, config=SHORT, seed=0, components={"x": "layers.*"})
    with pytest.raises(ValueError, match=r"shape \(3,\) but got \(2,\)"):
        estimate_llc(model, ce, data, config=SHORT, seed=0,
                     components={"x": {"head.bias": torch.ones(2, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="`config`"):
        estimate_llc(model, ce, data, config={"step_size": 1e-3}, seed=0)
    with pytest.raises(ValueError, match="`on_failure`"):
        estimate_llc(model, ce, data, config=SHORT, seed=0, on_failure="explode")
    with pytest.raises(ValueError, match="`seed`"):
        estimate_llc(model, ce, data, config=SHORT, seed="zero")


def test_bf16_autocast_keeps_lambda_within_the_chain_spread():
    """bf16 matmuls with fp32 master weights: the same seed gives the same batch orders and
    noise, so the two estimates differ only by bf16 rounding of the losses; on this MLP that
    stays well inside the chain-to-chain spread (the noise the user sees anyway)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=g)
    y = torch.randint(0, 5, (512,), generator=g)
    data = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    base = dict(step_size=1e-4, n_beta=100.0, localization=100.0, num_chains=4,
                num_draws=100, num_burnin_steps=20)
    fp32 = estimate_llc(model, ce, data, config=SGLDConfig(**base), seed=0, on_failure="ignore")
    bf16 = estimate_llc(model, ce, data, config=SGLDConfig(**base, autocast="bfloat16"), seed=0,
                        on_failure="ignore")
    assert bf16.loss_trace.dtype == torch.float32
    assert abs(bf16.llc_mean - fp32.llc_mean) < fp32.llc_std
    assert not torch.equal(bf16.loss_trace, fp32.loss_trace)  # autocast really was on


def test_detached_loss_and_odd_seeds_get_clear_answers():
    import numpy as np

    model, data = trained_net(), classification_data()
    with pytest.raises(ValueError, match="does not depend on any trainable parameter"):
        estimate_llc(model, lambda m, b: ce(m, b).detach(), data, config=SHORT, seed=0)
    a = estimate_llc(model, ce, data, config=SHORT, seed=np.int64(3), on_failure="ignore")
    b = estimate_llc(model, ce, data, config=SHORT, seed=3, on_failure="ignore")
    assert torch.equal(a.loss_trace, b.loss_trace)
    with pytest.raises(ValueError, match=r"`seed`.*2\*\*63"):
        estimate_llc(model, ce, data, config=SHORT, seed=2**70)
