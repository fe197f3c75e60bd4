"""Step-size calibration: the rule on synthetic tables, and calibrate() against closed forms.

The closed-form cases follow tests/core/test_accuracy.py (float64, n = 10,000 noise-free
samples, batch 500, nβ = n/log n, γ = 1). Calibration grids here are small (four or five
step sizes around the plateau, plus one that diverges) to keep the default run short; the
default grid is exercised under ``-m slow``.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from slt_callbacks import SGLDConfig, Status, estimate_llc
from slt_callbacks.core.calibrate import (
    DEFAULT_LOCALIZATIONS,
    DEFAULT_STEP_SIZES,
    Calibration,
    CalibrationError,
    CalibrationPoint,
    calibrate,
    choose,
    difference_std_error,
    top_hessian_eigenvalue,
)
from slt_callbacks.core.theory import reduced_rank_regression_lambda

from .models import minimal_rank_teacher, mse_half, regression_data, wbic_n_beta

N = 10_000


def base_config(draws: int, *, burnin: int = 1000) -> SGLDConfig:
    """The full-length estimate a calibration recommends for (its step size is replaced)."""
    return SGLDConfig(n_beta=wbic_n_beta(N), localization=1.0, num_chains=4,
                      num_draws=draws, num_burnin_steps=burnin)


def linear_regression():
    g = torch.Generator().manual_seed(1)
    teacher = nn.Linear(3, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
    return teacher, regression_data(teacher, 3, n=N)


@pytest.fixture(scope="module")
def linear_case():
    """3 -> 2 linear regression (λ = 3), calibrated on a grid that brackets the plateau
    (3e-5..3e-4), a coarse step (1e-3: acceptance ~0.8) and a diverging one (1e-1)."""
    torch.set_num_threads(1)
    model, data = linear_regression()
    cal = calibrate(model, mse_half, data, base=base_config(3000),
                    step_sizes=[3e-5, 1e-4, 3e-4, 1e-3, 1e-1], seed=0, max_steps=None)
    return model, data, cal


# --------------------------------------------------------------------------- closed forms


def test_linear_regression_auto_config_matches_closed_form(linear_case):
    """The hand-tuned ε = 1e-4 lands within 10% of λ = 3 (test_accuracy); the calibrated
    config must land within the primer's rtol 0.15 with the same chain length."""
    model, data, cal = linear_case
    assert cal.verified, cal.reason
    assert cal.config is not None
    assert cal.config.step_size in (1e-4, 3e-4)
    # Everything but the step size comes from `base`.
    assert cal.config == SGLDConfig(**{**base_config(3000).to_dict(),
                                       "step_size": cal.config.step_size})
    result = estimate_llc(model, mse_half, data, config=cal.config, seed=0)
    assert result.healthy, result.reasons
    assert result.llc_mean == pytest.approx(3.0, rel=0.15)


def test_reduced_rank_regression_origin_auto_config_matches_closed_form():
    """2-2-2 at the origin (λ = 1.5). The Hessian vanishes there, so only the chains can
    tell the plateau: under-mixed below 1e-4, biased (+25%, acceptance < 0.9) at 1e-3."""
    model = minimal_rank_teacher(2, 2, 2, 0)
    data = regression_data(model, 2, n=N)
    cal = calibrate(model, mse_half, data, base=base_config(5000),
                    step_sizes=[1e-4, 3e-4, 1e-3, 1e-1], seed=0, on_failure="ignore",
                    max_steps=None)
    # γ = 1 chains stay local, so the ladder stops there. λ̂ at 1e-4 is too noisy (chain
    # std 0.5) to *show* agreement with 3e-4, so the choice, the largest healthy step, is
    # unverified; the full estimate is what must be right.
    assert {p.localization for p in cal.table} == {1.0}
    assert cal.config is not None and cal.config.step_size == 3e-4, cal.to_markdown()
    result = estimate_llc(model, mse_half, data, config=cal.config, seed=0)
    expected = reduced_rank_regression_lambda(2, 2, 2, 0)
    assert result.llc_mean == pytest.approx(expected, rel=0.15)


def test_top_hessian_eigenvalue_matches_exact_eigenvalue():
    """For ½‖y − Wx‖² the Hessian is (XᵀX/n) ⊗ I: its top eigenvalue is that of the sample
    second-moment matrix of the batch."""
    model, data = linear_regression()
    x = data[0][0]
    exact = float(torch.linalg.eigvalsh(x.T @ x / x.shape[0]).max())
    value = top_hessian_eigenvalue(model, mse_half, data[0],
                                   generator=torch.Generator().manual_seed(0),
                                   num_iterations=100, rtol=1e-10)
    assert value == pytest.approx(exact, rel=1e-6)
    # At the origin of a two-layer linear net every second derivative vanishes.
    origin = minimal_rank_teacher(2, 2, 2, 0)
    batch = regression_data(origin, 2, n=500)[0]
    assert top_hessian_eigenvalue(origin, mse_half, batch,
                                  generator=torch.Generator().manual_seed(0)) == 0.0


def test_default_grid_is_centred_on_curvature_or_falls_back():
    """Default grid: ε·nβ·λ_max from 1e-3 to 3 where the Hessian sets a scale; the fixed
    1e-7..1e-2 grid at the origin of a linear network, where it vanishes. (Chains are
    kept tiny: only the grid is checked here.)"""
    short = dict(num_draws=4, num_burnin_steps=0, num_chains=2, on_failure="ignore",
                 localizations=[1.0], max_steps=None)
    model, data = linear_regression()
    cal = calibrate(model, mse_half, data[:2], base=base_config(10), **short)
    products = [p.step_curvature for p in cal.table]
    assert min(products) == pytest.approx(1e-3, rel=0.1)
    assert max(products) == pytest.approx(10**0.5, rel=0.1)
    assert len(cal.table) == 8 and "centred" in cal.grid
    origin = minimal_rank_teacher(2, 2, 2, 0)
    data = regression_data(origin, 2, n=1000)
    cal = calibrate(origin, mse_half, data, base=base_config(10), **short)
    assert [p.step_size for p in cal.table] == list(DEFAULT_STEP_SIZES)
    assert "fixed log grid" in cal.grid and cal.top_eigenvalue == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["linear", "rrr_origin", "rrr_3_2_4"])
def test_default_calibration_matches_closed_forms(case):
    """Default grid and chain lengths on the three linear-network cases of the primer."""
    if case == "linear":
        model, data = linear_regression()
        expected = 3.0
    elif case == "rrr_origin":
        model = minimal_rank_teacher(2, 2, 2, 0)
        data = regression_data(model, 2, n=N)
        expected = reduced_rank_regression_lambda(2, 2, 2, 0)
    else:
        model = minimal_rank_teacher(3, 2, 4, 1, seed=3)
        data = regression_data(model, 3, n=N)
        expected = reduced_rank_regression_lambda(3, 2, 4, 1)
    cal = calibrate(model, mse_half, data, base=base_config(10_000), seed=0, on_failure="ignore")
    # Not `cal.verified`: the equivalence test for flatness (change + 2 paired standard
    # errors within 20% per decade) rarely verifies on the short calibration chains (see
    # the README's calibration table); what must hold is the full estimate at the choice.
    assert cal.config is not None, cal.to_markdown()
    result = estimate_llc(model, mse_half, data, config=cal.config, seed=0)
    assert result.healthy, result.reasons
    assert result.llc_mean == pytest.approx(expected, rel=0.15)


def test_chain_length_phase_returns_the_length_its_pilots_ran():
    """The default path: after the screen, pilot chains from w* choose the chain length
    (burn-in = draws = T/2) and ε by halving at equal length (3 -> 2 linear regression;
    a small budget keeps it fast, so the choice may be unverified: the reason says which).
    The rule's decisions are tested on synthetic traces in test_mixing.py."""
    model, data = linear_regression()
    cal = calibrate(model, mse_half, data, base=base_config(10), localizations=[1.0],
                    step_sizes=[1e-4, 3e-4, 1e-3], num_draws=250, num_burnin_steps=250,
                    num_chains=4, max_steps=4000, seed=0, on_failure="ignore")
    assert cal.pilots, cal.to_markdown()
    config = cal.config
    assert config is not None and config.localization == 1.0 and config.num_chains == 4
    steps = config.num_burnin_steps + config.num_draws
    assert config.num_burnin_steps == steps // 2 and 1000 <= steps <= 4000
    # The chosen ε ran at that length, stationary, and so did ε/2.
    runs = {(p.step_size, p.num_steps): p for p in cal.pilots}
    for eps in (config.step_size, config.step_size / 2):
        assert runs[(eps, steps)].mixing.stationary, cal.to_markdown()
    assert "Chain length" in cal.to_markdown() and "halving ε" in cal.reason
    assert ("Not verified" in cal.reason) is (not cal.verified)
    # Accuracy: within the primer's 15%.
    result = estimate_llc(model, mse_half, data, config=config, seed=0)
    assert result.llc_mean == pytest.approx(3.0, rel=0.15)


# --------------------------------------------------------------------------- too large


def test_diverging_step_is_never_chosen_and_is_reported_unhealthy(linear_case):
    model, data, cal = linear_case
    big = next(p for p in cal.table if p.step_size == 1e-1)
    assert not big.healthy and big.status is Status.ALL_DIVERGED and not big.chosen
    coarse = next(p for p in cal.table if p.step_size == 1e-3)
    assert not coarse.healthy and coarse.status is Status.LOW_ACCEPTANCE
    assert cal.config is not None and cal.config.step_size < 1e-3
    # Forced to use it, the estimator says the chains are unhealthy, not a clean number.
    forced = estimate_llc(model, mse_half, data, seed=0, on_failure="ignore",
                          config=SGLDConfig(**{**cal.config.to_dict(), "step_size": 1e-1,
                                               "num_draws": 200, "num_burnin_steps": 50}))
    assert forced.status is not Status.HEALTHY
    assert forced.reasons and "step_size" in forced.reasons[0]
    assert math.isnan(forced.llc_mean)


def test_all_diverged_gives_no_config_and_says_why():
    model, data = linear_regression()
    # Over 300 steps even ε = 0.1 (ε·nβ·λ_max ≈ 110) overflows to inf.
    kwargs = dict(base=base_config(10), step_sizes=[0.1, 1.0], num_draws=300,
                  num_burnin_steps=0, num_chains=2, localizations=[1.0], max_steps=None)
    with pytest.warns(UserWarning, match="Every grid point diverged"):
        cal = calibrate(model, mse_half, data[:2], **kwargs)
    assert cal.config is None and cal.chosen is None and not cal.verified
    assert all(p.status is Status.ALL_DIVERGED for p in cal.table)
    with pytest.raises(CalibrationError, match="smaller step sizes") as err:
        calibrate(model, mse_half, data[:2], on_failure="raise", **kwargs)
    assert err.value.calibration.config is None


# --------------------------------------------------------------------------- the pure rule


def point(step: float, llc: float, *, healthy: bool = True, std: float = 0.05,
          gamma: float = 1.0, n_beta: float = 100.0, per_chain=(), seed=None,
          status: Status | None = None) -> CalibrationPoint:
    """A synthetic table row (4 chains); unhealthy rows default to low acceptance."""
    if status is None:
        status = Status.HEALTHY if healthy else Status.LOW_ACCEPTANCE
    return CalibrationPoint(step_size=step, n_beta=n_beta, localization=gamma,
                            llc_mean=llc, llc_std=std, num_chains=4, healthy=healthy,
                            status=status, llc_per_chain=tuple(per_chain), seed=seed)


def test_rule_picks_largest_step_of_flat_region():
    # under-mixed | plateau (within 20%/decade) | biased | diverged
    table = [point(1e-6, 0.5), point(1e-5, 2.0), point(1e-4, 2.9), point(3e-4, 3.0),
             point(1e-3, 3.1), point(3e-3, 4.5), point(1e-2, math.nan, healthy=False,
                                                         status=Status.ALL_DIVERGED)]
    index, reason, verified = choose(table)
    assert (index, verified) == (4, True)
    assert "0.0001–0.001" in reason and "3 agreeing" in reason


def test_rule_unhealthy_point_breaks_flat_region_and_wins_nothing():
    # The largest step agrees with its neighbour but fails a health check.
    table = [point(1e-5, 3.0), point(1e-4, 3.0), point(1e-3, 3.0, healthy=False)]
    assert choose(table).index == 1
    # An unhealthy point in the middle splits the plateau; the longer run wins.
    table = [point(1e-6, 3.0), point(1e-5, 3.0), point(3e-5, 3.0),
             point(1e-4, 3.0, healthy=False), point(3e-4, 3.0), point(1e-3, 3.0)]
    assert choose(table).index == 2
    # Equal runs: the one at larger steps.
    table = table[1:]
    assert choose(table).index == 4


def test_rule_is_an_equivalence_test_with_pairing():
    # A 30% change over a decade exceeds max_slope = 0.2 ...
    lo = point(1e-4, 1.0, std=0.01)
    hi = point(1e-3, 1.3, std=0.01)
    assert choose([lo, hi]).verified is False
    # ... a 10% change with precise chains is within it ...
    assert choose([point(1e-4, 1.0, std=0.01), point(1e-3, 1.1, std=0.01)]).verified
    # ... but noise cannot make points agree: flatness must be shown, and two standard
    # errors of the same 10% change (unpaired, 4 chains of std 0.2) exceed the tolerance.
    assert not choose([point(1e-4, 1.0, std=0.2), point(1e-3, 1.1, std=0.2)]).verified
    # Paired chains (same seed) measure the difference itself: per-chain differences all
    # +0.1, so the paired standard error is ~0 and the 10% change is shown to be small.
    chains_lo = (0.5, 1.5, 0.7, 1.3)
    chains_hi = tuple(c + 0.1 for c in chains_lo)
    lo = point(1e-4, 1.0, std=0.5, per_chain=chains_lo, seed=0)
    hi = point(1e-3, 1.1, std=0.5, per_chain=chains_hi, seed=0)
    assert difference_std_error(lo, hi) == pytest.approx(0.0, abs=1e-12)
    assert choose([lo, hi]).verified
    assert difference_std_error(lo, point(1e-3, 1.1, std=0.5, per_chain=chains_hi, seed=1)
                                ) == pytest.approx(math.sqrt(2 * 0.5**2 / 4), rel=1e-9)


def test_rule_no_healthy_point():
    table = [point(1e-4, -2.0, healthy=False, status=Status.NOT_A_MINIMUM),
             point(1e-3, 0.5, healthy=False, status=Status.LOW_ACCEPTANCE)]
    index, reason, verified = choose(table)
    assert index is None and not verified
    assert "No grid point was healthy" in reason
    assert "localizations" in reason and "min_acceptance" in reason
    assert choose([]).index is None


def test_rule_one_healthy_point_is_chosen_unverified():
    table = [point(1e-4, 1.0, healthy=False, status=Status.NOT_CONVERGED),
             point(1e-3, 2.0), point(1e-2, math.nan, healthy=False,
                                     status=Status.ALL_DIVERGED)]
    index, reason, verified = choose(table)
    assert (index, verified) == (1, False)
    assert "not verified" in reason
    single = choose([point(1e-3, 2.0)])
    assert (single.index, single.verified) == (0, False)
    assert "Only one healthy point" in single.reason


def test_rule_fallback_is_the_largest_healthy_point():
    """No neighbours agree: λ̂ rises with ε (short chains under-mix at small steps); the
    coarse 1e-2 failed a health check, so the largest healthy step, 3e-3, is chosen."""
    table = [point(1e-4, 1.0), point(3e-4, 1.5), point(1e-3, 2.0), point(3e-3, 4.0),
             point(1e-2, 9.0, healthy=False)]
    index, reason, verified = choose(table)
    assert (index, verified) == (3, False)
    assert "largest healthy step" in reason


def test_rule_prefers_smallest_localization_with_a_flat_region():
    steps = (1e-4, 3e-4, 1e-3)
    escaped = [point(e, v, gamma=1.0, healthy=False, status=Status.NOT_A_MINIMUM)
               for e, v in zip(steps, (-1.0, -2.0, -4.0), strict=True)]
    flat_10 = [point(e, 2.0, gamma=10.0) for e in steps]
    flat_100 = [point(e, 1.0, gamma=100.0) for e in steps]
    table = flat_100 + flat_10 + escaped
    index, reason, verified = choose(table)
    assert verified and table[index].localization == 10.0 and table[index].step_size == 1e-3
    assert "γ = 1)" in reason  # says which series was skipped


def test_rule_does_not_climb_past_local_chains_that_are_not_flat():
    """γ = 1 chains stay local (healthy, none escaped) but λ̂ still rises with ε (short
    chains): a larger γ would look flat only because it restrains the chains (λ̂ 1.0, the
    biased value). The rule stays at γ = 1, unverified, and says so."""
    steps = (1e-4, 3e-4, 1e-3)
    rising = [point(e, v, gamma=1.0) for e, v in zip(steps, (2.0, 3.0, 4.0), strict=True)]
    flat_100 = [point(e, 1.0, gamma=100.0) for e in steps]
    index, _, verified = choose(flat_100 + rising)
    assert not verified
    assert ((flat_100 + rising)[index].localization, (flat_100 + rising)[index].step_size) == (
        1.0, 1e-3)


def test_rule_saddle_needs_a_larger_localization():
    """Near a saddle the small-γ chains escape (λ̂ < 0) and a middle γ is healthy only at
    some step sizes without agreeing neighbours: the rule takes the first γ whose series is
    flat, here γ = 100, and not the larger γ = 1000 that is flat too (more bias)."""
    steps = (1e-5, 3e-5, 1e-4)
    escaped = [point(e, -50.0 * (k + 1), healthy=False, gamma=1.0,
                     status=Status.NOT_A_MINIMUM) for k, e in enumerate(steps)]
    ragged = [point(1e-5, 2.0, gamma=10.0, std=0.01),
              point(3e-5, -1.0, healthy=False, gamma=10.0, status=Status.NOT_A_MINIMUM),
              point(1e-4, 6.0, gamma=10.0, std=0.01)]
    flat_100 = [point(e, 3.0, gamma=100.0) for e in steps]
    flat_1000 = [point(e, 1.0, gamma=1000.0) for e in steps]
    table = escaped + ragged + flat_100 + flat_1000
    index, reason, verified = choose(table)
    assert verified and (table[index].localization, table[index].step_size) == (100.0, 1e-4)
    assert "γ = 1)" in reason and "γ = 10)" in reason
    # At a true minimum the smallest γ is flat already and wins.
    at_minimum = [point(e, 4.0, gamma=1.0) for e in steps] + flat_100
    assert at_minimum[choose(at_minimum).index].localization == 1.0


def test_ladder_stops_at_the_first_flat_localization():
    """With `localizations` unset, calibrate walks DEFAULT_LOCALIZATIONS upward and stops at
    the first γ whose chains stay local: on 3 -> 2 linear regression (a regular minimum)
    γ = 1 already does, so only its series is run and recommended. (Whether these short
    chains also *verify* flatness depends on the noise stream; that is tested on the pure
    rule above.)"""
    model, data = linear_regression()
    cal = calibrate(model, mse_half, data, base=base_config(500),
                    step_sizes=[3e-5, 1e-4, 3e-4], num_draws=300, num_burnin_steps=200,
                    num_chains=4, seed=0, on_failure="ignore", max_steps=None)
    assert DEFAULT_LOCALIZATIONS[0] == 1.0
    assert {p.localization for p in cal.table} == {1.0}, cal.to_markdown()
    assert cal.config is not None and cal.config.localization == 1.0
    assert "γ ladder" in cal.grid and "stopped at γ = 1" in cal.grid


def test_ladder_climbs_at_a_saddle():
    """w* = 0 of K(w) = 5 w1² − w2² + w2⁴ is a saddle: at nβ = 100 the wells at w2² = ½ are
    25 units of nβK deep, so chains held by γ = 1, 10 or 100 fall in (λ̂ ≈ −20, status
    not_a_minimum); from γ = 1000 on the pull beats the negative curvature (2·100 − γ < 0)
    and the ladder stops there, not before."""

    class Saddle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self) -> torch.Tensor:
            return 5 * self.w[0] ** 2 - self.w[1] ** 2 + self.w[1] ** 4

    cal = calibrate(Saddle(), lambda m, b: m(), [torch.zeros(1)],
                    base=SGLDConfig(n_beta=100.0, num_chains=4), step_sizes=[1e-4, 3e-4, 1e-3],
                    num_draws=300, num_burnin_steps=200, num_chains=4, seed=0,
                    on_failure="ignore", max_steps=None)
    assert all(p.status is Status.NOT_A_MINIMUM for p in cal.table if p.localization <= 100)
    # γ = 1000 is the first rung whose chains stay local: the ladder stops there (λ̂ ≈ 0.1
    # is too small against its noise for these short chains to verify a flat region).
    assert cal.config is not None and cal.config.localization == 1000.0, cal.to_markdown()
    assert sorted({p.localization for p in cal.table}) == [1.0, 10.0, 100.0, 1000.0]


def test_estimator_failure_is_an_unhealthy_point_not_an_exception():
    """A NaN loss at w*, or a backward the kernel cannot do, must not stop a calibration
    (it may run inside a training run): each grid point says what failed."""
    model, data = small_case()

    def nan_loss(m, batch):
        return mse_half(m, batch) * float("nan")

    cal = calibrate(model, nan_loss, data, seed=0, **SMALL)
    assert cal.config is None and not cal.verified
    assert all(not p.healthy and p.status is Status.ALL_DIVERGED for p in cal.table)
    assert all("estimator failed" in p.reasons[0] for p in cal.table)

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("derivative not implemented (test kernel)")

    def broken_loss(m, batch):
        return NoBackward.apply(mse_half(m, batch))

    cal = calibrate(model, broken_loss, data, seed=0, **SMALL)
    assert cal.config is None
    assert "power iteration failed" in cal.grid
    assert all("derivative not implemented" in p.reasons[0] for p in cal.table)
    with pytest.raises(CalibrationError):
        calibrate(model, broken_loss, data, seed=0, **{**SMALL, "on_failure": "raise"})


def test_rule_validates_its_parameters():
    with pytest.raises(ValueError, match="`max_slope`"):
        choose([], max_slope=-0.1)
    with pytest.raises(ValueError, match="`num_std_errors`"):
        choose([], num_std_errors=float("nan"))


# --------------------------------------------------------------------------- hygiene


def small_case():
    model = minimal_rank_teacher(2, 2, 2, 2, seed=5)
    return model, regression_data(model, 2, n=400, batch=100)


SMALL = dict(base=SGLDConfig(localization=1.0, num_chains=2, num_draws=20),
             step_sizes=[1e-5, 1e-4, 1e-3], num_draws=20, num_burnin_steps=10,
             num_chains=2, on_failure="ignore", localizations=[1.0], max_steps=None)


def test_model_and_global_rng_untouched_and_deterministic():
    model, data = small_case()
    model.a.train(False)  # a mixed train/eval state must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    first = calibrate(model, mse_half, data, seed=3, **SMALL)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    second = calibrate(model, mse_half, data, seed=3, **SMALL)
    assert [p.llc_per_chain for p in first.table] == [p.llc_per_chain for p in second.table]
    assert first.config == second.config and first.reason == second.reason
    other = calibrate(model, mse_half, data, seed=4, **SMALL)
    assert [p.llc_per_chain for p in other.table] != [p.llc_per_chain for p in first.table]


def test_seeds_common_or_one_per_point():
    model, data = small_case()
    common = calibrate(model, mse_half, data, seed=7, **SMALL)
    assert {p.seed for p in common.table} == {7}
    distinct = calibrate(model, mse_half, data, seed=7, common_random_numbers=False, **SMALL)
    seeds = [p.seed for p in distinct.table]
    assert len(set(seeds)) == len(seeds)
    again = calibrate(model, mse_half, data, seed=7, common_random_numbers=False, **SMALL)
    assert [p.seed for p in again.table] == seeds


def test_sweep_over_n_beta_and_localization_and_markdown():
    model, data = small_case()
    cal = calibrate(model, mse_half, data, n_betas=[50.0, 100.0], seed=0,
                    **{**SMALL, "localizations": [10.0, 1.0]})
    assert len(cal.table) == 3 * 2 * 2
    keys = [(p.localization, p.n_beta) for p in cal.table]
    assert keys == sorted(keys, key=lambda k: (k[0], [50.0, 100.0].index(k[1])))
    assert sum(p.chosen for p in cal.table) == (cal.chosen_index is not None)
    if cal.config is not None:
        assert cal.config.n_beta == cal.chosen.n_beta
        assert cal.config.localization == cal.chosen.localization
    text = cal.to_markdown()
    assert text.count("\n| ") == len(cal.table)  # one row per point after the header
    assert "Rule:" in text and "Choice:" in text and cal.rule in text
    assert cal.table[0].to_dict()["status"] == cal.table[0].status.value


# --------------------------------------------------------------------------- the picture


def test_plot_writes_png_and_marks_unhealthy_points(linear_case, tmp_path):
    from slt_callbacks.plots import plot_calibration

    _, _, cal = linear_case
    path = tmp_path / "calibration.png"
    fig = plot_calibration(cal, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artists = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}
    marked = [*artists["unhealthy"].get_xdata(), *artists["unhealthy-nonfinite"].get_xdata()]
    assert sorted(marked) == sorted(p.step_size for p in cal.table if not p.healthy)
    assert list(artists["chosen"].get_xdata()) == [cal.config.step_size]
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"all_diverged", "low_acceptance"} <= texts


def test_plot_without_matplotlib_says_how_to_install(linear_case, monkeypatch):
    from slt_callbacks.plots import plot_calibration

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install slt_callbacks\[plot\]"):
        plot_calibration(linear_case[2])


def test_plot_rejects_other_objects():
    from slt_callbacks.plots import plot_calibration

    with pytest.raises(ValueError, match="`calibration`"):
        plot_calibration({"table": []})


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"step_sizes": []}, "step_sizes"),
        ({"step_sizes": [1e-4, -1e-3]}, "step_sizes"),
        ({"step_sizes": [1e-4, 1e-4]}, "step_sizes"),
        ({"step_sizes": 1e-4}, "step_sizes"),
        ({"n_betas": [0.0]}, "n_betas"),
        ({"localizations": [-1.0]}, "localizations"),
        ({"num_chains": 1}, "num_chains"),
        ({"num_draws": 1}, "num_draws"),
        ({"num_burnin_steps": -1}, "num_burnin_steps"),
        ({"seed": 1.5}, "seed"),
        ({"base": {"step_size": 1e-4}}, "base"),
        ({"criteria": 0.9}, "criteria"),
        ({"max_slope": -1.0}, "max_slope"),
        ({"num_power_iterations": -1}, "num_power_iterations"),
        ({"common_random_numbers": 1}, "common_random_numbers"),
        ({"on_failure": "explode"}, "on_failure"),
        ({"max_steps": 100}, "max_steps"),
        ({"max_steps": 2.5}, "max_steps"),
        ({"max_halvings": -1}, "max_halvings"),
        ({"max_trend": -0.1}, "max_trend"),
        ({"min_ess": float("nan")}, "min_ess"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    model, data = small_case()
    with pytest.raises(ValueError, match=f"`{argument}`") as err:
        calibrate(model, mse_half, data, **kwargs)
    assert "but got" in str(err.value)


def test_bad_model_and_loss():
    _, data = small_case()
    with pytest.raises(ValueError, match="`model`"):
        calibrate("model", mse_half, data)
    with pytest.raises(ValueError, match="`loss_fn`"):
        calibrate(nn.Linear(2, 2), "mse", data)


def test_calibration_is_frozen(linear_case):
    cal = linear_case[2]
    assert isinstance(cal, Calibration)
    with pytest.raises(AttributeError):
        cal.config = None  # type: ignore[misc]
