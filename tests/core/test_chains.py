"""The chains: slots carry only their own coordinates, chunking never changes a number,
noise is Gaussian, and the budget is honoured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.core.budget import plan_chunks
from slt_callbacks.core.sgld import SGLDStep
from slt_callbacks.core.space import ComponentSpace

from .models import mse_half


def mlp_problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 2)).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g, dtype=dtype)
    y = torch.randn(256, 2, generator=g, dtype=dtype)
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    rows = torch.zeros(8, 8, dtype=torch.bool)
    rows[2:5] = True  # three hidden units' incoming weights: a slice of a tensor
    components = {"first": "0.*", "rows": {"2.weight": rows}, "last": ["4.weight", "4.bias"]}
    return model, data, components


CFG = dict(step_size=1e-3, n_beta=50.0, localization=10.0, num_chains=4, num_draws=20,
           num_burnin_steps=5)


def run(model, data, components, **kw):
    cfg = SGLDConfig(**{**CFG, **kw})
    return estimate_llc(model, mse_half, data, config=cfg, seed=11, components=components,
                        on_failure="ignore")


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_chunked_equals_unchunked(backend):
    """A budget too small for more than one chain per chunk runs every slot on its own, and
    still gives the unchunked numbers: batch orders and per-slot noise generators are fixed
    before any chunk runs. The loop backend runs the same per-chain arithmetic either way
    (exactly equal); vmap differs from a single-chain call only by float64 reassociation
    in the batched matmuls (far below 1e-10 relative over 25 steps)."""
    model, data, comps = mlp_problem()
    whole = run(model, data, comps, backend=backend)
    with pytest.warns(UserWarning, match="one chain at a time"):
        chunked = run(model, data, comps, backend=backend, max_memory=1)
    pairs = [(whole, chunked)] + [(whole.components[n], chunked.components[n]) for n in comps]
    for a, b in pairs:
        if backend == "loop":
            assert torch.equal(a.loss_trace, b.loss_trace)
        else:
            torch.testing.assert_close(a.loss_trace, b.loss_trace, rtol=1e-10, atol=1e-14)
        assert a.llc_mean == pytest.approx(b.llc_mean, rel=1e-9)


def test_a_budget_splits_chains_into_chunks():
    model, data, comps = mlp_problem()
    from slt_callbacks.core.llc import _prepare

    run_ = _prepare(model, mse_half, data, SGLDConfig(**CFG), comps, 0, None)
    one = plan_chunks(run_.problem, run_.spaces, 4, None)
    assert one == [(k, 0, 4) for k in range(4)]
    # Room for a few small chains at once, but not for four of the whole model.
    roomy = plan_chunks(run_.problem, run_.spaces, 4, 2 * 8 * 3 * 200 + 10**5)
    assert len(roomy) > 4 and all(stop - first >= 1 for _, first, stop in roomy)
    covered = {(k, c) for k, first, stop in roomy for c in range(first, stop)}
    assert covered == {(k, c) for k in range(4) for c in range(4)}  # every slot, once
    auto = plan_chunks(run_.problem, run_.spaces, 4, "auto")
    assert auto == one  # a machine with free memory runs this tiny problem unchunked


def test_a_component_slot_holds_only_its_coordinates():
    model, _, comps = mlp_problem()
    w_star = {n: p.detach() for n, p in model.named_parameters()}
    rows = ComponentSpace.of(w_star, {"2.weight": comps["rows"]["2.weight"]})
    assert rows.size == 3 * 8 and rows.theta0.shape == (24,)
    assert rows.scattered_numel == 64  # the one partly-owned tensor, rebuilt per step
    whole = ComponentSpace.of(w_star)
    assert whole.size == sum(p.numel() for p in model.parameters())
    # Rebuilding at theta0 gives w* exactly, and moving theta moves only the masked rows.
    theta = rows.theta0.clone()
    rebuilt = rows.tensors([theta])["2.weight"]
    assert torch.equal(rebuilt, model[2].weight)
    moved = rows.tensors([theta + 1.0])["2.weight"] - model[2].weight
    assert torch.equal(moved != 0, comps["rows"]["2.weight"])


def test_gradients_only_for_the_sampled_parameters():
    """The loss sees a tensor that requires grad only where the slot samples: a last-layer
    component's forward never builds the first layers' weight gradients."""
    model, data, _ = mlp_problem()
    calls = []

    def spy(m, batch):
        calls.append(tuple(p.requires_grad for p in (m[0].weight, m[4].weight)))
        return mse_half(m, batch)

    cfg = SGLDConfig(**{**CFG, "backend": "loop", "num_chains": 2})
    estimate_llc(model, spy, data, config=cfg, seed=0, components={"last": "4.*"},
                 on_failure="ignore")
    steps = CFG["num_draws"] + CFG["num_burnin_steps"]
    assert calls.count((True, True)) == 2 * steps  # the global chains
    assert calls.count((False, True)) == 2 * steps  # the component's chains


def test_frozen_rest_is_w_star_and_never_moves():
    """A component's chains leave every other coordinate at w*: a component that cannot
    change the loss reads λ̂ = 0 exactly (each draw is paired with w* on its own batch)."""
    model, data, _ = mlp_problem()
    with torch.no_grad():
        model[4].weight[:, 7] = 0.0
        model[2].weight[7] = 0.0
        model[2].bias[7] = 0.0
    dead_in = torch.zeros(8, 8, dtype=torch.bool)
    dead_in[7] = True  # weights into unit 7, which feeds a zero read-out column
    result = run(model, data, {"dead": {"2.weight": dead_in}})
    assert result.components["dead"].llc_mean == 0.0


def test_noise_is_standard_normal_per_chain():
    """The update's noise, recovered from a step with zero drift: mean 0, variance 1,
    no skew, kurtosis 3, and chains uncorrelated. 4 × 200k draws: the standard errors are
    about 0.002 (mean), 0.003 (variance), 0.006 (skew), 0.011 (kurtosis); 6 sigma bounds."""
    d, chains = 200_000, 4
    step = SGLDStep(step_size=1.0, n_beta=0.0, localization=0.0)
    theta = torch.zeros(chains, d)
    gens = [torch.Generator().manual_seed(s) for s in range(chains)]
    step.apply_(theta, torch.zeros(d), torch.zeros(chains, d), gens, torch.empty(3, d))
    x = theta.double()
    assert x.mean(1).abs().max() < 0.012
    assert (x.var(1) - 1).abs().max() < 0.02
    assert (x.pow(3).mean(1)).abs().max() < 0.04
    assert (x.pow(4).mean(1) - 3).abs().max() < 0.07
    corr = torch.corrcoef(x)
    assert (corr - torch.eye(chains, dtype=corr.dtype)).abs().max() < 0.015
    # The same generator state gives the same draw, whatever chunk a chain is in.
    again = torch.zeros(1, d)
    step.apply_(again, torch.zeros(d), torch.zeros(1, d),
                [torch.Generator().manual_seed(2)], torch.empty(1, d))
    assert torch.equal(again[0], theta[2])
    # Updated one chain at a time (a block of one row) or all at once: the same numbers.
    rowwise = torch.zeros(chains, d)
    step.apply_(rowwise, torch.zeros(d), torch.zeros(chains, d),
                [torch.Generator().manual_seed(s) for s in range(chains)], torch.empty(1, d))
    assert torch.equal(rowwise, theta)


@pytest.mark.parametrize("value", [0, -5, 1.5, "lots", True])
def test_max_memory_validation(value):
    with pytest.raises(ValueError, match="max_memory"):
        SGLDConfig(max_memory=value)
    assert SGLDConfig(max_memory="auto").max_memory == "auto"
    assert SGLDConfig(max_memory=2**30).max_memory == 2**30


class _Net(nn.Module):
    """Not an nn.Sequential, so auto never runs the fast path on it; dropout draws from the
    global RNG in train mode."""

    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(5, 8), nn.Dropout(0.2), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


def test_auto_runs_loop_on_a_cpu_for_a_model_of_many_flops(monkeypatch):
    """The rule: vmap below LOOP_FLOPS per forward, loop at or above. The count runs the
    loss once more but leaves the global RNG as it was, so auto's loop equals backend='loop'
    exactly even with dropout; and choosing loop is not a vmap failure (callers pin loop
    only after one)."""
    from slt_callbacks.core import backends

    torch.manual_seed(0)
    model = _Net().double()
    _, data, _ = mlp_problem()
    problem = _problem(model, data)
    assert backends.forward_flops(problem) == 2 * 64 * (5 * 8 + 8 * 2)
    assert backends.auto_backend(problem) == "vmap"
    small = run(model, data, None, backend="auto", train_mode=True)
    assert small.backend == "vmap" and not small.fell_back_to_loop
    monkeypatch.setattr(backends, "LOOP_FLOPS", 2 * 64 * (5 * 8 + 8 * 2))
    auto = run(model, data, None, backend="auto", train_mode=True)
    loop = run(model, data, None, backend="loop", train_mode=True)
    assert auto.backend == "loop" and auto.backend_reason is None
    assert not auto.vmap_failed and not auto.fell_back_to_loop
    assert torch.equal(auto.loss_trace, loop.loss_trace)


def _problem(model, data):
    from slt_callbacks.core.llc import _prepare

    return _prepare(model, mse_half, data, SGLDConfig(**CFG), None, 0, None).problem
