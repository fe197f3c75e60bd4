"""The fast path for stacks of nn.Linear: the generic path's numbers, chosen only where it
applies, and left (with the reason said) whenever the loss does something it cannot
reproduce."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.core.backends import LoopBackend
from slt_callbacks.core.fastpath import FastLinearBackend, fast_path_applies, linear_stack
from slt_callbacks.core.llc import _prepare

from .models import mse_half

CFG = dict(step_size=1e-3, n_beta=50.0, localization=10.0, num_chains=3, num_draws=15,
           num_burnin_steps=5)


def stack(dtype=torch.float64) -> nn.Sequential:
    """Every supported op: ReLU, Tanh, Sigmoid, both GELUs, Identity, a bias-free layer."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.Tanh(),
        nn.Linear(8, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 6), nn.Sigmoid(),
        nn.Identity(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2),
    ).to(dtype)


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g, dtype=dtype)
    y = torch.randn(96, 2, generator=g, dtype=dtype)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]


def run(model, loss=mse_half, components=None, dtype=torch.float64, **kw):
    cfg = SGLDConfig(**{**CFG, **kw})
    return estimate_llc(model, loss, data(dtype), config=cfg, seed=3, components=components,
                        on_failure="ignore")


def test_one_step_gradients_equal_autograd():
    """Oracle: the hand-written backward against autograd through the real model, every
    chain at its own (perturbed) coordinates, float64."""
    model = stack()
    problem_run = _prepare(model, mse_half, data(), SGLDConfig(**CFG), None, 0, None)
    space, problem = problem_run.spaces[0], problem_run.problem
    theta = space.theta0 + 0.1 * torch.randn(3, space.size, dtype=torch.float64,
                                             generator=torch.Generator().manual_seed(1))
    fast_grad, loop_grad = torch.empty_like(theta), torch.empty_like(theta)
    fast, loop = FastLinearBackend(), LoopBackend()
    fast.bind(problem, space, theta, fast_grad)
    loop.bind(problem, space, theta, loop_grad)
    with torch.enable_grad():
        a = fast.forward_backward([0, 2, 1], must_depend=True)
        b = loop.forward_backward([0, 2, 1], must_depend=True)
    # Same kernels in the same order: equal to float64 reassociation at most.
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    torch.testing.assert_close(fast_grad, loop_grad, rtol=1e-12, atol=1e-15)
    assert fast_grad.abs().min(dim=1).values.lt(1.0).all()  # a real gradient, not zeros
    assert not torch.equal(fast_grad[0], fast_grad[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_auto_runs_the_fast_path_with_the_loop_numbers(dtype):
    """Whole run, global and whole-parameter components on the fast path, a masked component
    on vmap: every trace equals the loop backend's (float64: to 1e-12; float32: the same
    kernels give the same bits here, allowed a few ulps)."""
    rows = torch.zeros(8, 8, dtype=torch.bool)
    rows[2:5] = True
    comps = {"first": "0.*", "bias_free": ["2.weight"], "rows": {"4.weight": rows}}
    fast = run(stack(dtype), components=comps, dtype=dtype, backend="auto")
    loop = run(stack(dtype), components=comps, dtype=dtype, backend="loop")
    assert fast.backend == "fast+vmap" and fast.backend_reason is None
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for name in [None, *comps]:
        a = fast if name is None else fast.components[name]
        b = loop if name is None else loop.components[name]
        torch.testing.assert_close(a.loss_trace, b.loss_trace, rtol=tol, atol=0)
        assert a.llc_mean == pytest.approx(b.llc_mean, rel=1e-6, abs=1e-9)


def test_frozen_layers_are_read_at_w_star():
    """A frozen layer is w*, still backpropagated through, never sampled."""
    model = stack()
    model[4].weight.requires_grad_(False)
    fast, loop = run(model, backend="auto"), run(model, backend="loop")
    assert fast.backend == "fast"
    torch.testing.assert_close(fast.loss_trace, loop.loss_trace, rtol=1e-12, atol=0)


def weight_decay(m, batch):
    return mse_half(m, batch) + 1e-3 * sum(p.square().sum() for p in m.parameters())


def twice(m, batch):
    x, y = batch
    return 0.5 * (F.mse_loss(m(x), y) + F.mse_loss(m(x + 1.0), y))


@pytest.mark.parametrize(("loss", "why"), [(weight_decay, "reads `model.parameters`"),
                                           (twice, "more than once")])
def test_a_loss_that_uses_the_model_otherwise_runs_on_vmap(loss, why):
    """The loss gets a stand-in that can only be called once: reading the parameters (their
    gradient would be lost) or a second call sends the run to vmap, same numbers as loop,
    and the result says why."""
    auto, loop = run(stack(), loss=loss, backend="auto"), run(stack(), loss=loss,
                                                              backend="loop")
    assert auto.backend == "vmap"
    assert "fast path not used" in auto.backend_reason and why in auto.backend_reason
    torch.testing.assert_close(auto.loss_trace, loop.loss_trace, rtol=1e-12, atol=0)


def test_a_later_surprise_continues_on_the_generic_path():
    """A loss that passes the first-step check and only later reads the model: the chunk
    goes on with the generic backend from that step, with the loop numbers."""
    calls = []

    def late(m, batch):
        calls.append(1)
        if len(calls) > 3 * 4:  # from the fifth step of the three chains on
            _ = m.training
        return mse_half(m, batch)

    auto = run(stack(), loss=late, backend="auto")
    calls.clear()
    loop = run(stack(), loss=late, backend="loop")
    assert auto.backend == "vmap" and "model.training" in auto.backend_reason
    torch.testing.assert_close(auto.loss_trace, loop.loss_trace, rtol=1e-12, atol=0)


class Custom(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_applies_only_to_plain_stacks_on_a_cpu_without_autocast_or_hooks():
    plain = stack()
    assert linear_stack(plain) is not None
    assert linear_stack(Custom(*stack())) is None  # a subclass may change forward
    assert linear_stack(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))) is None
    hooked = stack()
    hooked[1].register_forward_hook(lambda *a: None)
    assert linear_stack(hooked) is None
    cfg = SGLDConfig(**CFG)
    run_ = _prepare(plain, mse_half, data(), cfg, {"rows": {"0.weight": torch.eye(8, 5) > 0}},
                    0, None)
    assert fast_path_applies(run_.problem, run_.spaces[0])
    assert not fast_path_applies(run_.problem, run_.spaces[1])  # a masked parameter
    bf16 = SGLDConfig(**{**CFG, "autocast": "bfloat16"})
    run_ = _prepare(stack(torch.float32), mse_half, data(torch.float32), bf16, None, 0, None)
    assert not fast_path_applies(run_.problem, run_.spaces[0])
    assert run(Custom(*stack()), backend="auto").backend == "vmap"
