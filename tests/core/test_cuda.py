"""The estimator on a CUDA device. CI has no GPU, so these run only where one is present
(they were run on an H100 before release; see the CHANGELOG / issue notes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.core.curvature import hessian_trace

from .models import minimal_rank_teacher, mse_half, regression_data, wbic_n_beta

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_mlp_on_cuda_leaves_model_and_rngs_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 5)).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 20, device="cuda", generator=g)
    y = torch.randint(0, 5, (256,), device="cuda", generator=g)
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    cfg = SGLDConfig(step_size=1e-4, n_beta=50.0, num_chains=4, num_draws=50, num_burnin_steps=10)
    def estimate():
        return estimate_llc(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), data,
                            config=cfg, seed=0, on_failure="ignore",
                            components={"first": "0.*"})

    result = estimate()
    assert torch.isfinite(result.loss_trace).all()
    assert result.backend == "vmap"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    again = estimate()
    assert torch.equal(result.loss_trace, again.loss_trace)


@cuda
def test_vmap_and_loop_agree_on_cuda():
    model = minimal_rank_teacher(3, 2, 4, 1).cuda()
    data = [(x.cuda(), y.cuda()) for x, y in regression_data(model.cpu(), 3, n=2000, batch=200)]
    model.cuda()
    base = dict(
        step_size=1e-4,
        n_beta=200.0,
        localization=1.0,
        num_chains=2,
        num_draws=40,
        num_burnin_steps=10,
    )
    v = estimate_llc(model, mse_half, data, config=SGLDConfig(**base, backend="vmap"), seed=3)
    loop = estimate_llc(model, mse_half, data, config=SGLDConfig(**base, backend="loop"), seed=3)
    torch.testing.assert_close(v.loss_trace, loop.loss_trace, rtol=1e-8, atol=1e-12)


@cuda
def test_linear_regression_llc_on_cuda():
    """Same case and tolerance as the CPU accuracy test (λ = 3, rtol 0.1)."""
    g = torch.Generator().manual_seed(1)
    teacher = nn.Linear(3, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
    data = [(x.cuda(), y.cuda()) for x, y in regression_data(teacher, 3, n=10_000)]
    cfg = SGLDConfig(
        step_size=1e-4,
        n_beta=wbic_n_beta(10_000),
        localization=1.0,
        num_chains=4,
        num_draws=3000,
        num_burnin_steps=1000,
    )
    result = estimate_llc(teacher.cuda(), mse_half, data, config=cfg, seed=0)
    assert result.llc_mean == pytest.approx(3.0, rel=0.1)


@cuda
def test_hessian_trace_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    batch = (x, x.sum(1, keepdim=True))

    def loss(m, b):
        return F.mse_loss(m(b[0]), b[1])

    cpu = hessian_trace(
        model, loss, batch, num_probes=64, generator=torch.Generator().manual_seed(0)
    )
    gpu = hessian_trace(
        model.cuda(),
        loss,
        (batch[0].cuda(), batch[1].cuda()),
        num_probes=64,
        generator=torch.Generator(device="cuda").manual_seed(0),
    )
    assert gpu.value == pytest.approx(cpu.value, abs=4 * (cpu.stderr + gpu.stderr))
