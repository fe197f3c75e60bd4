"""The config="auto" policy (slt_callbacks.core.autocal) on synthetic calibrations."""

from __future__ import annotations

import io

import pytest
import torch

from slt_callbacks import SGLDConfig, Status
from slt_callbacks.core.autocal import AutoCalibration, escaped_below
from slt_callbacks.core.calibrate import Calibration, CalibrationPoint

PROVISIONAL = SGLDConfig(num_draws=20)


def row(gamma: float, status: Status = Status.HEALTHY, *, chosen: bool = False,
        step: float = 1e-4) -> CalibrationPoint:
    return CalibrationPoint(step_size=step, n_beta=100.0, localization=gamma, llc_mean=1.0,
                            llc_std=0.1, num_chains=4, status=status,
                            healthy=status is Status.HEALTHY, chosen=chosen)


def calibration(rows: list[CalibrationPoint], *, verified: bool = True) -> Calibration:
    index = next((i for i, p in enumerate(rows) if p.chosen), None)
    chosen = rows[index] if index is not None else None
    config = None if chosen is None else SGLDConfig(step_size=chosen.step_size,
                                                    localization=chosen.localization)
    return Calibration(config=config, table=tuple(rows), chosen_index=index,
                       verified=verified, rule="r", reason="why")


AT_MINIMUM = calibration([row(1.0, chosen=True), row(1.0, step=1e-3)])
AT_SADDLE = calibration([row(1.0, Status.NOT_A_MINIMUM), row(10.0, Status.NOT_A_MINIMUM),
                         row(100.0, chosen=True)])
UNVERIFIED = calibration([row(1.0, chosen=True)], verified=False)


def test_never_at_step_zero_and_only_after_a_healthy_estimate():
    policy = AutoCalibration(PROVISIONAL)
    assert not policy.should_calibrate(0, None)
    assert not policy.should_calibrate(5, Status.NOT_A_MINIMUM)  # a saddle: defer
    assert not policy.should_calibrate(5, "not_converged")
    assert policy.should_calibrate(5, "healthy")
    # The provisional step size does not suit the model: calibrating is the fix.
    for status in ("low_acceptance", "diverged", "all_diverged"):
        assert AutoCalibration(PROVISIONAL).should_calibrate(5, status)
    # No estimate before (a schedule that starts late, a resume): calibrate.
    assert AutoCalibration(PROVISIONAL).should_calibrate(1000, None)


def test_healthy_estimates_back_off_1_2_4_8():
    policy = AutoCalibration(PROVISIONAL, max_attempts=10)
    fired = [k for k in range(1, 17) if policy.should_calibrate(k, Status.HEALTHY)]
    assert fired == [1, 2, 4, 8, 16]


def test_freezes_a_verified_calibration_at_a_minimum():
    policy = AutoCalibration(PROVISIONAL)
    decision = policy.decide(AT_MINIMUM, 40)
    assert decision.frozen and decision.status == "calibrated" and not decision.provisional
    assert decision.config == AT_MINIMUM.config and policy.frozen == AT_MINIMUM.config
    assert "step 40" in decision.reason
    assert not policy.should_calibrate(50, Status.HEALTHY)  # frozen: never again
    assert policy.decide(None, 60).config == AT_MINIMUM.config


def test_saddle_or_unverified_stays_provisional_then_falls_back_loudly():
    assert escaped_below(AT_SADDLE) == (1.0, 10.0)
    assert escaped_below(AT_MINIMUM) == ()
    policy = AutoCalibration(PROVISIONAL, max_attempts=2)
    before = policy.decide(None, 1)
    assert before.provisional and before.config == PROVISIONAL and not before.frozen
    first = policy.decide(AT_SADDLE, 10)
    # The saddle's verified choice becomes the provisional config (its ε suits the model,
    # its γ holds the chains), from this step on; still provisional, not frozen.
    assert first.provisional and first.config == AT_SADDLE.config and not first.frozen
    assert "escaped at γ = 1, 10" in first.reason
    assert policy.decide(None, 11).config == AT_SADDLE.config
    last = policy.decide(UNVERIFIED, 20)
    assert last.status == "fallback" and last.frozen and last.config == AT_SADDLE.config
    assert "gave up after 2" in last.reason and "not verified" in last.reason
    assert not policy.should_calibrate(30, None)


def test_state_roundtrip_with_weights_only():
    policy = AutoCalibration(PROVISIONAL)
    policy.should_calibrate(3, Status.HEALTHY)
    policy.decide(AT_MINIMUM, 3)
    buffer = io.BytesIO()
    torch.save(policy.state_dict(), buffer)
    buffer.seek(0)
    restored = AutoCalibration(PROVISIONAL)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.frozen == policy.frozen and restored.status == "calibrated"
    assert (restored.attempts, restored.healthy_seen, restored.frozen_at) == (1, 1, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`provisional`"):
        AutoCalibration({"step_size": 1e-3})
    with pytest.raises(ValueError, match="`max_attempts`"):
        AutoCalibration(PROVISIONAL, max_attempts=0)


def test_frozen_config_keeps_the_calibrated_chain_length():
    """The calibration's config is frozen whole: its ε, γ and the chain length its pilot
    chains were shown to mix at, not the provisional length."""
    config = SGLDConfig(step_size=1e-5, localization=1.0, num_burnin_steps=16_000,
                        num_draws=16_000)
    cal = Calibration(config=config, table=AT_MINIMUM.table, chosen_index=0, verified=True,
                      rule="r", reason="why")
    policy = AutoCalibration(PROVISIONAL)
    decision = policy.decide(cal, 10)
    assert decision.frozen and decision.config == config
    assert (decision.config.num_burnin_steps, decision.config.num_draws) == (16_000, 16_000)


def test_run_budget_for_the_chain_length_phase():
    from slt_callbacks.core.autocal import AUTO_MAX_STEPS_FACTOR, calibration_options

    provisional = SGLDConfig(num_burnin_steps=100, num_draws=200)
    assert calibration_options({}, provisional)["max_steps"] == AUTO_MAX_STEPS_FACTOR * 300
    # Never below the first pilot length (twice the screening chains).
    short = SGLDConfig(num_burnin_steps=5, num_draws=20)
    assert calibration_options({}, short)["max_steps"] == 2000
    assert calibration_options({"num_draws": 10, "num_burnin_steps": 5}, short
                               )["max_steps"] == max(AUTO_MAX_STEPS_FACTOR * 25, 30)
    # A given budget (or None: no chain-length phase) is kept.
    assert calibration_options({"max_steps": 5000}, provisional)["max_steps"] == 5000
    assert calibration_options({"max_steps": None}, provisional)["max_steps"] is None
