import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slt_callbacks.core.curvature import TraceEstimate, fisher_trace, hessian_trace


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(dtype)


def data(n: int = 16, dtype: torch.dtype = torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    y = torch.randn(n, 1, generator=g, dtype=dtype)
    return x, y


def exact_hessian(model: nn.Module, loss_fn, batch) -> torch.Tensor:
    """Dense Hessian over the trainable parameters, via a flat parameter vector."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(trainable)
    shapes = [trainable[n].shape for n in names]
    sizes = [trainable[n].numel() for n in names]
    flat = torch.cat([trainable[n].reshape(-1) for n in names])

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, b):
            return loss_fn(self.model, b)

    wrapped = Wrapped()

    def f(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, sizes)
        tensors = {f"model.{n}": t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return torch.func.functional_call(wrapped, tensors, (batch,), strict=False)

    was_training = model.training
    model.eval()
    try:
        return torch.autograd.functional.hessian(f, flat)
    finally:
        model.train(was_training)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Hutchinson ---------------------------------------------------------------------------


def test_hutchinson_matches_exact_trace_within_its_stderr():
    model, batch = mlp(), data()
    H = exact_hessian(model, mse, batch)
    exact = float(H.trace())
    est = hessian_trace(model, mse, batch, num_probes=2048, generator=gen())
    assert isinstance(est, TraceEstimate)
    assert est.num_samples == 2048 and est.samples.shape == (2048,)
    assert est.samples.device.type == "cpu" and est.samples.dtype == torch.float64
    # The mean of 2048 i.i.d. terms is close to normal: |error| > 4 stderr has probability
    # ~6e-5, and the seed is fixed, so this is a test of correctness, not of luck.
    assert abs(est.value - exact) < 4 * est.stderr
    # The reported stderr should match the known Rademacher variance 2 Σ_{i≠j} H_ij²
    # (Avron & Toledo 2011); with 2048 draws the sample std is within ~10% of it.
    off = H - torch.diag(torch.diag(H))
    predicted = math.sqrt(2 * float((off**2).sum()) / 2048)
    assert 0.8 * predicted < est.stderr < 1.2 * predicted


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # L(w) = ½ Σ a_j w_j²: H = diag(a), and vᵀHv = Σ a_j v_j² = Σ a_j for every ±1 probe.
    model = nn.Linear(4, 3, bias=False).double()
    a = torch.linspace(0.5, 3.0, 12, dtype=torch.float64).reshape(3, 4)

    def quadratic(m: nn.Module, batch) -> torch.Tensor:
        return 0.5 * (a * m.weight**2).sum()

    est = hessian_trace(model, quadratic, None, num_probes=5, generator=gen())
    assert torch.allclose(est.samples, torch.full((5,), float(a.sum()), dtype=torch.float64))
    assert est.value == pytest.approx(float(a.sum()), rel=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-12)


def test_every_probe_value_is_a_rademacher_quadratic_form():
    # With d = 4 trainable weights there are only 16 sign vectors: each per-probe value must
    # equal vᵀHv for one of them (a per-probe oracle that does not depend on the draw order).
    torch.manual_seed(0)
    model = nn.Linear(2, 2, bias=False).double()
    x, y = data(n=8)
    batch = (x[:, :2], y.expand(-1, 2))

    def loss_fn(m: nn.Module, b) -> torch.Tensor:
        return F.mse_loss(torch.tanh(m(b[0])), b[1])

    H = exact_hessian(model, loss_fn, batch)
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * 4)
    forms = torch.einsum("ki,ij,kj->k", signs, H, signs)  # (16,)
    assert forms.unique().numel() > 2  # the check below must be able to fail
    est = hessian_trace(model, loss_fn, batch, num_probes=64, generator=gen())
    distance = (est.samples[:, None] - forms[None, :]).abs().min(dim=1).values
    assert float(distance.max()) < 1e-10
    assert est.samples.unique().numel() > 1


def test_hutchinson_float32_close_to_float64_exact():
    model64, batch64 = mlp(torch.float64), data(dtype=torch.float64)
    exact = float(exact_hessian(model64, mse, batch64).trace())
    model32, batch32 = mlp(torch.float32), data(dtype=torch.float32)
    est = hessian_trace(model32, mse, batch32, num_probes=2048, generator=gen())
    # float32 rounding (~1e-6 relative) is negligible next to the Monte Carlo error.
    assert abs(est.value - exact) < 4 * est.stderr


def test_hutchinson_is_reproducible_and_independent_of_chunk_size():
    model, batch = mlp(), data()
    a = hessian_trace(model, mse, batch, num_probes=10, generator=gen(3))
    b = hessian_trace(model, mse, batch, num_probes=10, generator=gen(3), chunk_size=3)
    c = hessian_trace(model, mse, batch, num_probes=10, generator=gen(4))
    assert torch.allclose(a.samples, b.samples, rtol=1e-12, atol=1e-12)
    assert not torch.equal(a.samples, c.samples)


def test_hutchinson_advances_only_the_given_generator():
    model, batch = mlp(), data()
    g = gen(0)
    before = g.get_state()
    rng = torch.get_rng_state()
    hessian_trace(model, mse, batch, num_probes=4, generator=g)
    assert not torch.equal(g.get_state(), before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_single_probe_has_nan_stderr():
    est = hessian_trace(mlp(), mse, data(), num_probes=1, generator=gen())
    assert est.num_samples == 1 and math.isfinite(est.value) and math.isnan(est.stderr)


# --- Fisher -------------------------------------------------------------------------------


def loop_fisher(model: nn.Module, loss_fn, xs, ys) -> torch.Tensor:
    """Per-sample squared gradient norms with plain autograd, one sample at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(xs.shape[0]):
        loss = loss_fn(model, (xs[i : i + 1], ys[i : i + 1]))
        grads = torch.autograd.grad(loss, params)
        out.append(sum(float((g**2).sum()) for g in grads))
    return torch.tensor(out, dtype=torch.float64)


def test_fisher_matches_loop_over_samples():
    model, (x, y) = mlp(), data()
    expected = loop_fisher(model, mse, x, y)
    est = fisher_trace(model, mse, (x, y))
    assert est.num_samples == 16
    assert torch.allclose(est.samples, expected, rtol=1e-10, atol=1e-12)
    assert est.value == pytest.approx(float(expected.mean()), rel=1e-10)
    assert est.stderr == pytest.approx(float(expected.std()) / 4.0, rel=1e-10)
    chunked = fisher_trace(model, mse, (x, y), chunk_size=5)
    assert torch.allclose(chunked.samples, expected, rtol=1e-10, atol=1e-12)


def test_fisher_float32():
    model, (x, y) = mlp(torch.float32), data(dtype=torch.float32)
    expected = loop_fisher(model, mse, x, y)
    est = fisher_trace(model, mse, (x, y))
    assert torch.allclose(est.samples, expected, rtol=1e-5, atol=1e-7)


def test_fisher_dict_batch_with_non_tensor_and_scalar_leaves():
    model, (x, y) = mlp(), data(n=6)
    batch = {"inputs": [x], "target": y, "scale": 2.0, "offset": torch.tensor(0.5)}

    def loss_fn(m: nn.Module, b) -> torch.Tensor:
        assert b["inputs"][0].shape[0] == b["target"].shape[0]
        return b["scale"] * F.mse_loss(m(b["inputs"][0]) + b["offset"], b["target"])

    def plain(m, xy):
        return 2.0 * F.mse_loss(m(xy[0]) + 0.5, xy[1])

    est = fisher_trace(model, loss_fn, batch)
    assert torch.allclose(est.samples, loop_fisher(model, plain, x, y), rtol=1e-10)


# --- shared behaviour ---------------------------------------------------------------------


def rich_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 1)
    ).double()
    with torch.no_grad():  # non-trivial running statistics
        model.train()
        model(torch.randn(32, 3, dtype=torch.float64) * 3 + 1)
    return model


@pytest.mark.parametrize("which", ["hessian", "fisher"])
def test_model_is_left_untouched(which):
    model, batch = rich_model(), data()
    model.train()
    model[2].eval()  # a submodule's own flag must survive, not just the root's
    model[0].weight.grad = torch.ones_like(model[0].weight)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    if which == "hessian":
        hessian_trace(model, mse, batch, num_probes=4, generator=gen())
    else:
        fisher_trace(model, mse, batch)

    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert torch.equal(torch.get_rng_state(), rng)


def test_evaluates_in_eval_mode():
    # Dropout and batch statistics would make train-mode evaluation random and different.
    model, batch = rich_model(), data()
    exact = float(exact_hessian(model, mse, batch).trace())  # computed in eval mode
    model.train()
    est = hessian_trace(model, mse, batch, num_probes=2048, generator=gen())
    assert abs(est.value - exact) < 4 * est.stderr
    model.eval()
    again = hessian_trace(model, mse, batch, num_probes=2048, generator=gen())
    assert torch.equal(est.samples, again.samples)


def test_frozen_parameters_are_excluded():
    model, (x, y) = mlp(), data()
    model[0].requires_grad_(False)
    H = exact_hessian(model, mse, (x, y))
    assert H.shape == (7, 7)  # only the last layer's 6 weights + 1 bias
    est = hessian_trace(model, mse, (x, y), num_probes=2048, generator=gen())
    # The loss is quadratic in the last layer, so the Hessian is 2/n XᵀX-like and dense;
    # use the same 4-stderr criterion as for the full model.
    assert abs(est.value - float(H.trace())) < 4 * est.stderr
    fisher = fisher_trace(model, mse, (x, y))
    assert torch.allclose(fisher.samples, loop_fisher(model, mse, x, y), rtol=1e-10)
    assert model[0].weight.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    model, (x, y) = mlp(), data()
    exact = float(exact_hessian(model, mse, (x, y)).trace())
    model, batch = model.cuda(), (x.cuda(), y.cuda())
    est = hessian_trace(
        model, mse, batch, num_probes=2048, generator=torch.Generator("cuda").manual_seed(0)
    )
    assert abs(est.value - exact) < 4 * est.stderr
    assert est.samples.device.type == "cpu"
    fisher = fisher_trace(model, mse, batch)
    assert torch.allclose(fisher.samples, loop_fisher(model.cpu(), mse, x, y), rtol=1e-8)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_probes", [0, -3, 2.5, True, "8", None])
def test_rejects_bad_num_probes(num_probes):
    with pytest.raises(ValueError, match="`num_probes` to be a positive int"):
        hessian_trace(mlp(), mse, data(), num_probes=num_probes, generator=gen())


@pytest.mark.parametrize("generator", [None, 0, torch.Generator])
def test_rejects_bad_generator(generator):
    with pytest.raises(ValueError, match=r"`generator` to be a torch\.Generator"):
        hessian_trace(mlp(), mse, data(), generator=generator)


def test_rejects_generator_on_another_device():
    model = mlp().to("meta")  # stands in for a GPU model on a CPU-only machine
    with pytest.raises(ValueError, match=r"`generator` to be on the parameters' device meta"):
        hessian_trace(model, mse, data(), generator=gen())


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5])
def test_rejects_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="`chunk_size`"):
        hessian_trace(mlp(), mse, data(), generator=gen(), chunk_size=chunk_size)
    with pytest.raises(ValueError, match="`chunk_size`"):
        fisher_trace(mlp(), mse, data(), chunk_size=chunk_size)


def per_sample_loss(model, batch):
    return F.mse_loss(model(batch[0]), batch[1], reduction="none")


@pytest.mark.parametrize("loss_fn", [per_sample_loss, lambda m, b: 1.0])
def test_rejects_non_scalar_loss(loss_fn):
    with pytest.raises(ValueError, match="`loss_fn`"):
        hessian_trace(mlp(), loss_fn, data(), generator=gen())
    with pytest.raises(ValueError, match="`loss_fn`"):
        fisher_trace(mlp(), loss_fn, data())


def test_rejects_fully_frozen_model():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="`model`"):
        hessian_trace(model, mse, data(), generator=gen())
    with pytest.raises(ValueError, match="`model`"):
        fisher_trace(model, mse, data())


def test_fisher_rejects_bad_batches():
    x, y = data()
    with pytest.raises(ValueError, match="same size along dim 0"):
        fisher_trace(mlp(), mse, (x, y[:5]))
    with pytest.raises(ValueError, match="`batch` to contain at least one tensor"):
        fisher_trace(mlp(), lambda m, b: m(x).mean(), {"n": 3})


def test_losses_that_draw_random_numbers_work_and_keep_global_rng():
    """A training_step may use dropout-like noise from the global RNG; vmap must be told
    (randomness="different") and the caller's RNG state must survive."""
    model = nn.Linear(3, 1)

    def noisy_loss(m, b):
        return ((m(b) + 0.01 * torch.rand(b.shape[0], 1)) ** 2).mean()

    batch = torch.randn(8, 3)
    state = torch.get_rng_state()
    h = hessian_trace(model, noisy_loss, batch, num_probes=4,
                      generator=torch.Generator().manual_seed(0))
    f = fisher_trace(model, noisy_loss, batch)
    assert math.isfinite(h.value) and math.isfinite(f.value)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_loss_that_mutates_a_buffer_gets_an_actionable_error():
    model = nn.Linear(3, 1)
    model.register_buffer("calls", torch.zeros(()))

    def counting_loss(m, b):
        m.calls += 1
        return (m(b) ** 2).mean()

    with pytest.raises(RuntimeError, match="updates module state in place"):
        hessian_trace(model, counting_loss, torch.randn(8, 3), num_probes=2,
                      generator=torch.Generator().manual_seed(0))


# -- attention kernels without a double backward (issue #8) -----------------------------------


class SdpaBlock(nn.Module):
    """One causal self-attention layer through ``F.scaled_dot_product_attention``, which on a
    CPU picks the fused flash kernel: it has a backward but no double backward."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 4).unbind(2)  # (batch, seq, head, d)
        h = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(h.transpose(1, 2).reshape(*x.shape[:2], 8)).mean(1)


def test_hessian_and_fisher_run_through_fused_attention_kernels():
    # Failed before the math kernel was forced: "derivative for
    # aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented".
    torch.manual_seed(0)
    model = SdpaBlock()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 5, 8, generator=g), torch.randn(4, 1, generator=g))
    est = hessian_trace(model, mse, batch, num_probes=64, generator=gen())
    assert math.isfinite(est.value)
    # The oracle: the exact trace, whose double backward also needs the math kernel.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        exact = float(torch.diagonal(exact_hessian(model, mse, batch)).sum())
    assert abs(est.value - exact) <= 4 * est.stderr + 1e-6
    assert math.isfinite(fisher_trace(model, mse, batch).value)
    # The kernel choice is restored: training code sees the default backends again.
    assert torch.backends.cuda.flash_sdp_enabled()
