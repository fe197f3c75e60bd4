"""λ̂ against closed-form learning coefficients (SLT_PRIMER §5).

Settings follow the primer's reference runs: float64, n = 10,000 noise-free samples, batch
500, nβ = n/log n ≈ 1086, γ = 1. Tolerances are argued per test; every run is seeded, so a
test either always passes or always fails on a given PyTorch build.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.core.theory import (
    deep_linear_lambda,
    finite_temperature_llc_2d,
    minimal_rank_deep_linear_teacher,
    normal_crossing_lambda,
    reduced_rank_regression_lambda,
)

from .models import (
    NormalCrossing,
    TwoLayerLinear,
    minimal_rank_teacher,
    mse_half,
    normal_crossing_loss,
    regression_data,
    wbic_n_beta,
)

N = 10_000


def config(draws: int, *, chains: int = 4, burnin: int = 1000, step: float = 1e-4):
    return SGLDConfig(
        step_size=step, n_beta=wbic_n_beta(N), localization=1.0, num_chains=chains,
        num_draws=draws, num_burnin_steps=burnin,
    )


def test_closed_forms_match_primer_cases():
    assert reduced_rank_regression_lambda(2, 2, 2, 0) == 1.5
    assert reduced_rank_regression_lambda(3, 2, 4, 1) == 4.0
    # A regular model: a full-rank two-layer net with h >= ... falls back to d/2 only for
    # linear regression itself; the 3->2 linear map has d = 6.
    assert normal_crossing_lambda([1, 2]) == 0.25
    with pytest.raises(ValueError, match="`r`"):
        reduced_rank_regression_lambda(2, 2, 2, 3)


def test_deep_linear_formula_reduces_to_reduced_rank_regression_at_depth_two():
    """Aoyagi's general-depth formula against the separate case analysis of Aoyagi &
    Watanabe (2005) for every two-layer net up to width 7 and every rank: 7³ shapes, all
    four cases and both parities of the last one."""
    for m in range(1, 8):
        for h in range(1, 8):
            for n in range(1, 8):
                for r in range(min(m, h, n) + 1):
                    assert deep_linear_lambda((m, h, n), r) == pytest.approx(
                        reduced_rank_regression_lambda(m, h, n, r), abs=1e-12
                    ), (m, h, n, r)


def test_deep_linear_formula_known_small_cases():
    # One layer is a regular model: d/2 with d = m·n, whatever the rank.
    assert deep_linear_lambda((3, 4), 0) == 6.0 and deep_linear_lambda((3, 4), 2) == 6.0
    # A chain of scalars at rank 0 is the normal crossing K = (w1···wL)², λ = 1/2 at any
    # depth (the multiplicity grows with depth, λ does not).
    for depth in range(1, 8):
        assert deep_linear_lambda([1] * (depth + 1), 0) == pytest.approx(
            normal_crossing_lambda([1] * depth))
    # Rank 1 of a scalar chain: the product map w1···wL is a submersion at a non-zero
    # point, so λ = (dimension of the map) / 2 = 1/2.
    assert deep_linear_lambda((1, 1, 1, 1), 1) == 0.5
    # Full rank through square layers: the product is a submersion onto all n×n maps, n²/2.
    assert deep_linear_lambda((3, 3, 3, 3), 3) == 4.5
    # Hand-evaluated from the theorem: (4,3,3,4), r = 1 has M = (3,2,2,3); Σ = all four
    # (ℓ = 3, S = 10, a = 1): 7/2 + 2/12 − (6/4)(100/9) + 37/2 = 11/2.
    assert deep_linear_lambda((4, 3, 3, 4), 1) == 5.5
    # Wide hidden layers do not count: for (2, 9, 9, 2) at rank 0 the subset is input and
    # output (M = 2, 2 < 9), λ = 2·2/2 = m·n/2, as if the map were one free layer.
    assert deep_linear_lambda((2, 9, 9, 2), 0) == 2.0
    # λ never exceeds half the number of parameters.
    for widths, r in [((4, 3, 3, 4), 1), ((3, 3, 3, 3, 3), 1), ((5, 2, 6, 3), 2)]:
        d = sum(a * b for a, b in itertools.pairwise(widths))
        assert 0 < deep_linear_lambda(widths, r) <= d / 2


def test_deep_linear_formula_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`r`"):
        deep_linear_lambda((3, 2, 4), 3)
    with pytest.raises(ValueError, match="`widths`"):
        deep_linear_lambda((3,), 0)
    with pytest.raises(ValueError, match="widths"):
        deep_linear_lambda("342", 0)


def test_minimal_rank_deep_linear_teacher_has_rank_r_in_every_layer():
    teacher = minimal_rank_deep_linear_teacher((4, 3, 3, 3, 4), 2, seed=1)
    assert [int(torch.linalg.matrix_rank(layer.weight)) for layer in teacher.layers] == [2] * 4
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert teacher(x).shape == (5, 4)
    origin = minimal_rank_deep_linear_teacher((2, 3, 2), 0)
    assert all(not layer.weight.any() for layer in origin.layers)


def test_regular_linear_regression_is_half_the_dimension():
    """3 -> 2 linear regression, d = 6, λ = 3. The primer saw 3.07 at ε=1e-4 with 6k draws;
    the upward bias of finite ε is ~2-3% and the chain-to-chain std ~0.1 (sem ~0.05), so
    rtol 0.1 leaves >3 sem of room and still fails on a factor-of-d/2 mistake (e.g. d)."""
    g = torch.Generator().manual_seed(1)
    teacher = nn.Linear(3, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
    data = regression_data(teacher, 3, n=N)
    result = estimate_llc(teacher, mse_half, data, config=config(3000), seed=0)
    assert result.healthy, result.reasons
    assert result.llc_mean == pytest.approx(3.0, rel=0.1)
    assert result.acceptance > 0.9


def test_reduced_rank_regression_at_the_origin():
    """2-2-2, rank 0, w* = 0: λ = 1.5 (Aoyagi & Watanabe). The primer measured 1.50 with 10k
    steps; with 5k draws x 4 chains the sem is ~0.05, rtol 0.15 (the primer's tolerance for
    linear networks)."""
    model = minimal_rank_teacher(2, 2, 2, 0)
    data = regression_data(model, 2, n=N)
    result = estimate_llc(model, mse_half, data, config=config(5000), seed=0)
    assert result.llc_mean == pytest.approx(reduced_rank_regression_lambda(2, 2, 2, 0), rel=0.15)


def test_singular_point_is_below_generic_true_point():
    """Same true function (the zero map), two true parameters: the origin (local λ = 1.5)
    and A = 2I, B = 0 (local λ = 2, primer §5). At A = I with γ = 1 the chains wander
    (|δA| ~ 1/sqrt(γ)) to rank-deficient A, where the map is more singular, and the estimate
    falls to ~1.6; at 2I the singular set is out of reach. The B-curvature there is 4x, so ε
    is halved to keep ε·nβ·λ_max ≈ 0.2 (acceptance ~0.98)."""
    origin = minimal_rank_teacher(2, 2, 2, 0)
    generic = minimal_rank_teacher(2, 2, 2, 0)
    with torch.no_grad():
        generic.a.weight.copy_(2 * torch.eye(2, dtype=torch.float64))
    data = regression_data(origin, 2, n=N)
    cfg = config(4000, step=5e-5)
    low = estimate_llc(origin, mse_half, data, config=cfg, seed=0)
    high = estimate_llc(generic, mse_half, data, config=cfg, seed=0)
    # The gap (0.5) is ~5 chain stds (~0.1) of either estimate.
    assert low.llc_mean + 0.25 < high.llc_mean
    assert high.llc_mean == pytest.approx(2.0, rel=0.15)


@pytest.mark.slow
def test_reduced_rank_regression_minimal_rank_teacher_3_2_4():
    """3-2-4, rank 1, both layers rank 1: λ = 4; the primer measured 3.96 at 10k steps."""
    model = minimal_rank_teacher(3, 2, 4, 1, seed=3)
    data = regression_data(model, 3, n=N)
    result = estimate_llc(model, mse_half, data, config=config(10_000), seed=0)
    assert result.healthy, result.reasons
    assert result.llc_mean == pytest.approx(reduced_rank_regression_lambda(3, 2, 4, 1), rel=0.15)


@pytest.mark.slow
def test_regular_linear_regression_long_run():
    g = torch.Generator().manual_seed(1)
    teacher = nn.Linear(3, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
    data = regression_data(teacher, 3, n=N)
    result = estimate_llc(teacher, mse_half, data, config=config(10_000), seed=1)
    assert result.llc_mean == pytest.approx(3.0, rel=0.05)


def test_normal_crossing_matches_exact_finite_temperature_value():
    """K = w1² w2⁴, n = 1000: λ = 1/4 asymptotically, but at nβ = 1000/log 1000 ≈ 145 the
    estimator targets nβ·E[K] = 0.2095 (quadrature). Normal crossings mix slowly; 8 chains
    x 10k draws give a sem ~0.01 (5%); rtol 0.2 also absorbs the small-ε bias."""
    n_beta = 1000 / math.log(1000)
    exact = finite_temperature_llc_2d(lambda a, b: a**2 * b**4, n_beta=n_beta, localization=1.0)
    assert exact == pytest.approx(0.209, abs=0.002)  # the primer's figure
    cfg = SGLDConfig(step_size=1e-3, n_beta=n_beta, localization=1.0, num_chains=8,
                     num_draws=10_000, num_burnin_steps=1000)
    result = estimate_llc(NormalCrossing(), normal_crossing_loss, [torch.zeros(1)],
                          config=cfg, seed=0)
    assert result.llc_mean == pytest.approx(exact, rel=0.2)
    assert result.llc_mean < normal_crossing_lambda([1, 2]) * 1.35


def test_restricted_llc_equals_llc_of_the_reduced_model():
    """Sampling only layer ``b`` of a two-layer linear net (``a`` frozen at w*) is the same
    posterior as sampling the model whose ``a`` is frozen by requires_grad=False. At a
    full-rank teacher the reduced model is linear regression in b (h*n = 4 parameters,
    λ = 2); the two estimates use different noise draws, so they agree statistically: each
    within 15% of 2, and within 15% of each other."""
    teacher = minimal_rank_teacher(2, 2, 2, 2, seed=5)
    data = regression_data(teacher, 2, n=N)
    cfg = config(3000)
    restricted = estimate_llc(teacher, mse_half, data, config=cfg, seed=0,
                              components={"b": "b.*"}).components["b"]
    reduced = TwoLayerLinear(2, 2, 2)
    reduced.load_state_dict(teacher.state_dict())
    reduced.a.weight.requires_grad_(False)
    full = estimate_llc(reduced, mse_half, data, config=cfg, seed=1)
    assert restricted.llc_mean == pytest.approx(2.0, rel=0.15)
    assert full.llc_mean == pytest.approx(2.0, rel=0.15)
    assert restricted.llc_mean == pytest.approx(full.llc_mean, rel=0.15)


DLN_CASES = [((4, 3, 5), 1, 0), ((4, 3, 3, 4), 1, 0), ((4, 3, 3, 4), 1, 1),
             ((3, 3, 3, 3, 3), 1, 0), ((3, 3, 3, 3, 3), 1, 1), ((4, 3, 4, 3, 4), 1, 0)]
DLN_IDS = ["depth2", "depth3", "depth3_seed1", "depth4", "depth4_seed1", "depth4_wide"]


@functools.cache
def calibrated_dln(widths, r, seed):
    """calibrate() at its defaults (γ ladder, ε grid, chain-length phase) on a minimal-rank
    deep linear network, then the full estimate at its choice and at half its ε (same
    chain length, same seed): ``(calibration, λ̂, λ̂ at ε/2)``. Cached: the accuracy and
    the stability test share one calibration (several minutes each)."""
    from slt_callbacks.core.calibrate import calibrate

    model = minimal_rank_deep_linear_teacher(widths, r, seed=0)
    data = regression_data(model, widths[0], n=N)
    base = SGLDConfig(n_beta=wbic_n_beta(N), num_chains=4)
    cal = calibrate(model, mse_half, data, base=base, seed=seed, on_failure="ignore")
    assert cal.config is not None, cal.to_markdown()
    full = estimate_llc(model, mse_half, data, config=cal.config, seed=seed)
    half = estimate_llc(model, mse_half, data, seed=seed,
                        config=replace(cal.config, step_size=cal.config.step_size / 2))
    return cal, full, half


@pytest.mark.slow
@pytest.mark.parametrize(("widths", "r", "seed"), DLN_CASES, ids=DLN_IDS)
def test_calibrated_config_on_deep_linear_networks(widths, r, seed):
    """Within 20% of Aoyagi's λ (issue #9's target; benchmarks/results/calibration_cpu.md
    has the measured errors), with the smallest γ of the ladder, 1, since w* is a true
    minimum, and a chain length the calibration chose (burn-in = draws)."""
    cal, full, _ = calibrated_dln(widths, r, seed)
    assert cal.config.localization == 1.0, cal.to_markdown()
    assert cal.config.num_burnin_steps == cal.config.num_draws, cal.to_markdown()
    assert full.llc_mean == pytest.approx(deep_linear_lambda(widths, r), rel=0.2), (
        cal.to_markdown())


# Measured 2026-12-02/04 (benchmarks/results/calibration_cpu.md): halving the calibrated ε
# at the same chain length moves λ̂ by 1.0, 2.0, 1.1, 6.0, 4.1 and 4.4 standard errors;
# every calibration says unverified (max_steps too short for ε small enough; on depth 4 the
# chosen chains were still rising, a lower bound; issue #9, open). depth2 reads 0.98 and
# passes on this seed; over five seeds its systematic shift is 0.78.
_SHIFTS = {"depth2": 1.0, "depth3": 2.0, "depth3_seed1": 1.1, "depth4": 6.0,
           "depth4_seed1": 4.1, "depth4_wide": 4.4}
STABILITY_CASES = [
    pytest.param(*case, marks=pytest.mark.xfail(strict=False, reason=(
        f"measured shift {_SHIFTS[name]} se; calibration unverified (issue #9, open)")))
    for case, name in zip(DLN_CASES, DLN_IDS, strict=True)
]


@pytest.mark.slow
@pytest.mark.parametrize(("widths", "r", "seed"), STABILITY_CASES, ids=DLN_IDS)
def test_calibrated_config_is_stable_in_the_step_size(widths, r, seed):
    """Issue #9's stability target: halving the calibrated ε (same chain length and seed)
    moves λ̂ by less than its standard error, chain std / √chains."""
    cal, full, half = calibrated_dln(widths, r, seed)
    se = full.llc_std / math.sqrt(full.config.num_chains)
    assert abs(full.llc_mean - half.llc_mean) < se, cal.to_markdown()
