"""Tests of the stage detector on synthetic λ̂ curves with known change points.

The curves are piecewise linear in log10(step) on ~90 log-spaced checkpoints between step 1
and 1e5 (about 20 per decade late in training), with Gaussian noise of a few percent of the
level, as chain stds of real LLC estimates are. Every generator is seeded.
"""

from __future__ import annotations

import io
import itertools
import json
import math

import numpy as np
import pytest

from slt_callbacks.detect import (
    DetectorConfig,
    Regime,
    StageBoundary,
    StageDetector,
    StageEvent,
    StageKind,
    classify_kind,
    classify_loss_trend,
    classify_trend,
    compare_events,
    confirm_change,
    retrospective_stages,
    smooth_log_step,
    trend_threshold,
)
from slt_callbacks.synthetic import synthetic_curve

# Online detection cannot be instantaneous: the window (15 checkpoints) must see the new
# trend and it must then persist (3). Over 100 seeds of each case below the delays were 4-22
# checkpoints; 24 (about 1.2 decades of steps late in training) is the bound we promise.
MAX_DELAY = 24
# The change point itself is located by a two-piece fit: errors were 0-6 checkpoints over
# the same 100 seeds (99% within 5), i.e. within 0.3 decade.
MAX_LOCATION_ERROR = 6


make_series = synthetic_curve


def feed(detector, steps, llc, std, loss, start=0, stop=None):
    emitted = []
    for i in range(start, len(steps) if stop is None else stop):
        event = detector.update(int(steps[i]), float(llc[i]), float(std[i]), float(loss[i]))
        if event is not None:
            emitted.append(event)
    return emitted


def detect(name, seed, noise, config=None, **kw):
    steps, llc, std, loss, changes, kinds = make_series(name, seed, noise, **kw)
    detector = StageDetector(config)
    emitted = feed(detector, steps, llc, std, loss)
    assert emitted == detector.events
    return detector, changes, kinds


# ---------------------------------------------------------------------------------------
# Detection of known change points.


@pytest.mark.parametrize(
    ("name", "noise"),
    [
        # At 10% noise a rise of ~0.5 of the level per decade is near the resolution of a
        # 15-checkpoint window (benchmark: recall 0.8, delays up to ~25), so the promise for
        # rise -> plateau is made at 5%; the steeper plateau -> rise holds at 10%.
        ("rise_plateau", 0.05),
        ("plateau_rise", 0.05),
        ("plateau_rise", 0.10),
        # The fall after the peak is the weakest trend of all (≈0.4 of the level per
        # decade): at 10% noise the peak often reads as rising -> flat first (see the
        # benchmark), so the kind is only promised at 3%.
        ("rise_fall", 0.03),
        ("multi_stage", 0.03),
        ("multi_stage", 0.05),
    ],
)
@pytest.mark.parametrize("seed", range(4))
def test_each_change_point_detected_with_its_kind(name, noise, seed):
    detector, changes, kinds = detect(name, seed, noise)
    events = detector.events
    assert [e.kind.value for e in events] == kinds
    for event, change in zip(events, changes, strict=True):
        assert abs(event.checkpoint - change) <= MAX_LOCATION_ERROR
        assert 0 <= event.checkpoint + event.delay - change <= MAX_DELAY
        # The reported delay can never be shorter than the persistence that produced it.
        assert event.delay >= detector.config.persistence
        assert event.detected_at >= event.step
    assert [e.stage for e in events] == list(range(1, len(events) + 1))
    assert detector.stage == len(events)


def test_event_fields_and_message():
    detector, _, _ = detect("multi_stage", 0, 0.03)
    turn, acquire, simplify = detector.events
    assert (turn.previous_regime, turn.new_regime) == (Regime.RISING, Regime.FLAT)
    assert (acquire.previous_regime, acquire.new_regime) == (Regime.FLAT, Regime.RISING)
    assert (simplify.previous_regime, simplify.new_regime) == (Regime.RISING, Regime.FALLING)
    assert simplify.message.startswith(f"step {simplify.step}: λ̂ started falling (")
    assert "while the loss stayed flat" in simplify.message
    assert "the model is simplifying" in simplify.message
    assert "the model is acquiring structure" in acquire.message
    assert "rising -> flat" in turn.message
    assert "\n" not in simplify.message
    assert 25 < acquire.llc < 40  # the fitted λ̂ at the change point (true value: 30)
    assert acquire.loss == pytest.approx(0.8, rel=0.05)
    as_dict = simplify.to_dict()
    assert as_dict["kind"] == "simplify" and type(as_dict["kind"]) is str
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert StageEvent.from_dict(as_dict) == simplify


def test_component_and_missing_loss():
    steps, llc, std, _, _, _ = make_series("plateau_rise", 0, 0.03)
    detector = StageDetector(component="layers.0.attn")
    for step, value, s in zip(steps, llc, std, strict=True):
        detector.update(int(step), float(value), float(s))
    (event,) = detector.events
    # Without a loss, "acquire" cannot be told from any other rise.
    assert event.kind is StageKind.TURN and event.loss is None
    assert event.component == "layers.0.attn"
    assert "λ̂[layers.0.attn] started rising" in event.message
    assert "(no loss was given)" in event.message


def test_chain_std_unknown_noise_from_residuals():
    detector, changes, kinds = detect("multi_stage", 1, 0.05, std_known=False)
    assert [e.kind.value for e in detector.events] == kinds
    for event, change in zip(detector.events, changes, strict=True):
        assert abs(event.checkpoint - change) <= MAX_LOCATION_ERROR


def test_noise_free_series():
    steps = np.unique(np.geomspace(1, 1e5, 100).round().astype(int))
    x = np.log10(steps + 1)
    llc = np.interp(x, [0, 2.5, 5], [10, 10, 60])
    loss = np.interp(x, [0, 2.5, 5], [1.0, 1.0, 0.2])
    for std in (0.0, math.nan):
        detector = StageDetector()
        feed(detector, steps, llc, np.full(x.size, std), loss)
        (event,) = detector.events
        assert event.kind is StageKind.ACQUIRE
        assert abs(event.checkpoint - int(np.argmin(np.abs(x - 2.5)))) <= 1


# ---------------------------------------------------------------------------------------
# False alarms.


@pytest.mark.parametrize("noise", [0.03, 0.10])
def test_no_false_alarm_on_trendless_series(noise):
    # With the chain std given, 400 other trendless series per noise level (seeds 1000-1399,
    # ~36,000 checkpoints each) gave 0 false alarms during development: the rate is below
    # ~1 per 100 series (95% bound), so 20 clean series are the expected outcome, not luck.
    events = [e for seed in range(20) for e in detect("trendless", seed, noise)[0].events]
    assert events == []


def test_few_false_alarms_when_the_noise_is_estimated():
    # Without chain stds the noise comes from the curve's own residuals, which are uncertain
    # themselves. The thresholds are raised to the Student t quantile for that; measured on
    # seeds 1000-1399: 7 false alarms in 400 series (without the correction: 22). Expected
    # in 20 series: 0.35, so allowing 1 keeps the test meaningful and stable.
    events = [
        e for seed in range(20) for e in detect("trendless", seed, 0.10, std_known=False)[0].events
    ]
    assert len(events) <= 1


def test_non_finite_and_out_of_order_checkpoints_are_skipped():
    steps, llc, std, loss, _, _ = make_series("multi_stage", 2, 0.03)
    clean = StageDetector()
    feed(clean, steps, llc, std, loss)
    noisy = StageDetector()
    for i in range(len(steps)):
        if i % 10 == 5:
            assert noisy.update(int(steps[i]), math.nan, 1.0, 1.0) is None
            assert noisy.update(int(steps[i]), math.inf) is None
            assert noisy.update(int(steps[i]), None) is None  # type: ignore[arg-type]
        noisy.update(int(steps[i]), float(llc[i]), float(std[i]), float(loss[i]))
        if i % 10 == 7:
            assert noisy.update(int(steps[i]), float(llc[i])) is None  # replayed step
    assert noisy.events == clean.events
    assert noisy.num_ignored == 3 * len(range(5, len(steps), 10))
    assert noisy.num_out_of_order == len(range(7, len(steps), 10))
    assert noisy.num_checkpoints == len(steps)


def test_step_zero_and_invalid_steps():
    detector = StageDetector()
    assert detector.update(0, 1.0) is None
    assert detector.update(np.int64(1), 1.0) is None
    assert detector.update(2.0, 1.0) is None  # an integral float is a step
    for bad in (-1, 2.5, "3", True, math.nan):
        with pytest.raises(ValueError, match="`step`"):
            detector.update(bad, 1.0)
    assert detector.num_checkpoints == 3


# ---------------------------------------------------------------------------------------
# Cooldown.


def test_cooldown_separates_events_and_defers_them():
    steps, llc, std, loss, _, _ = make_series("multi_stage", 0, 0.03)
    free = StageDetector(DetectorConfig(cooldown=0))
    feed(free, steps, llc, std, loss)
    detected = [e.checkpoint + e.delay for e in free.events]
    gap = min(np.diff(detected))
    cooldown = gap + 4  # longer than the natural gap between two events
    held = StageDetector(DetectorConfig(cooldown=int(cooldown)))
    feed(held, steps, llc, std, loss)
    held_at = [e.checkpoint + e.delay for e in held.events]
    assert all(b - a >= cooldown for a, b in itertools.pairwise(held_at))
    # The change that fell inside the cooldown is emitted late, not dropped.
    assert [e.kind for e in held.events] == [e.kind for e in free.events]
    assert max(b - a for a, b in zip(detected, held_at, strict=True)) > 0


# ---------------------------------------------------------------------------------------
# Checkpointing.


def _plain(value):
    if isinstance(value, dict):
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return type(value) in (int, float, str, bool, type(None))


def test_state_dict_round_trip_continues_identically():
    torch = pytest.importorskip("torch")
    steps, llc, std, loss, _, _ = make_series("multi_stage", 3, 0.05)
    whole = StageDetector()
    feed(whole, steps, llc, std, loss)
    assert len(whole.events) == 3
    # Cut before any event, while candidates build up, and right after each event.
    cuts = {10, 20, 30, 40, 50, 60, 70, 80}
    cuts |= {e.checkpoint + e.delay + 1 for e in whole.events}
    for cut in sorted(cuts):
        first = StageDetector()
        before = feed(first, steps, llc, std, loss, stop=cut)
        state = first.state_dict()
        assert _plain(state)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=True)
        second = StageDetector()
        second.load_state_dict(restored)
        assert second.events == before and second.stage == len(before)
        # A resumed run may replay the checkpoint it was saved at: nothing is re-emitted.
        if cut > 0:
            i = cut - 1
            assert second.update(int(steps[i]), float(llc[i]), float(std[i])) is None
        after = feed(second, steps, llc, std, loss, start=cut)
        assert before + after == whole.events, f"cut at checkpoint {cut}"
        assert second.events == whole.events


def test_load_state_dict_rejects_bad_keys():
    detector = StageDetector()
    state = detector.state_dict()
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        detector.load_state_dict({**state, "extra": 1})
    state.pop("events")
    with pytest.raises(ValueError, match="missing \\['events'\\]"):
        detector.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        detector.load_state_dict({**StageDetector().state_dict(), "version": 99})


# ---------------------------------------------------------------------------------------
# Configuration.


@pytest.mark.parametrize(
    ("field", "value", "constraint"),
    [
        ("sensitivity", 0.0, "> 0.0"),
        ("sensitivity", math.nan, "finite"),
        ("flat_threshold", -1.0, "> 0.0"),
        ("persistence", 0, ">= 1"),
        ("persistence", 2.5, "integer"),
        ("persistence", True, "integer"),
        ("cooldown", -1, ">= 0"),
        ("window", 4, ">= 5"),
        ("flat_loss_tolerance", -0.1, ">= 0.0"),
        ("min_relative_slope", math.inf, "finite"),
        ("sensitivity", "3", "finite number"),
    ],
)
def test_config_validation(field, value, constraint):
    with pytest.raises(ValueError, match=f"`{field}`") as info:
        DetectorConfig(**{field: value})
    assert constraint in str(info.value)
    assert repr(value) in str(info.value)


def test_config_cross_field_and_plain_types():
    with pytest.raises(ValueError, match="`flat_threshold` to be at most `sensitivity`"):
        DetectorConfig(sensitivity=2.0, flat_threshold=2.5)
    with pytest.raises(TypeError):
        DetectorConfig(3.0)  # keyword-only  # type: ignore[misc]
    config = DetectorConfig(window=np.int64(20), sensitivity=np.float32(2.5), cooldown=3)
    assert type(config.window) is int and type(config.sensitivity) is float
    with pytest.raises(ValueError, match="`config`"):
        StageDetector({"window": 10})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Pure decisions.


def test_classify_trend():
    config = DetectorConfig()
    regime, reason = classify_trend(12.0, 2.0, config, level=30.0)
    assert regime is Regime.RISING and "6.0 standard errors above 0" in reason
    assert classify_trend(-12.0, 2.0, config, level=30.0)[0] is Regime.FALLING
    assert classify_trend(1.5, 2.0, config)[0] is Regime.FLAT  # |t| < flat_threshold
    regime, reason = classify_trend(4.0, 2.0, config)
    assert regime is Regime.UNCERTAIN and "neither flat" in reason  # 1 <= |t| < 3
    # Precise but practically flat: below 10% of the level per decade.
    regime, reason = classify_trend(2.0, 0.01, config, level=30.0)
    assert regime is Regime.FLAT and "practical minimum" in reason
    # Noise-free data: zero standard error.
    assert classify_trend(5.0, 0.0, config, level=30.0)[0] is Regime.RISING
    assert classify_trend(0.0, 0.0, config)[0] is Regime.FLAT
    assert classify_trend(math.nan, 1.0, config)[0] is Regime.UNCERTAIN
    # An estimated noise level raises the threshold (Student t, 10 dof: ~3.9).
    assert classify_trend(7.0, 2.0, config, dof=10)[0] is Regime.UNCERTAIN
    assert trend_threshold(3.0) == 3.0
    assert 3.7 < trend_threshold(3.0, 10) < 4.1


def test_confirm_change():
    config = DetectorConfig()
    ok, reason = confirm_change(
        Regime.FLAT, slope=0.5, stderr=1.0, slope_change=-12.0, change_stderr=2.0, config=config
    )
    assert ok and "agrees with flat" in reason
    # A dip that is not a significant change of slope.
    ok, reason = confirm_change(
        Regime.FLAT, slope=0.5, stderr=1.0, slope_change=-4.0, change_stderr=2.0, config=config
    )
    assert not ok and "only 2.0 standard errors" in reason
    # At a peak: the window reads flat, but the points after the change are falling.
    ok, reason = confirm_change(
        Regime.FLAT, slope=-8.0, stderr=2.0, slope_change=-20.0, change_stderr=3.0, config=config
    )
    assert not ok and "contradicts flat" in reason
    # A rise only 2 standard errors steep after the change still confirms "rising".
    ok, _ = confirm_change(
        Regime.RISING, slope=4.0, stderr=2.0, slope_change=9.0, change_stderr=2.0, config=config
    )
    assert ok


def test_classify_loss_and_kind():
    assert classify_loss_trend(-0.3, 0.1)[0] is Regime.FALLING
    assert classify_loss_trend(0.05, 0.1)[0] is Regime.FLAT
    assert classify_loss_trend(0.3, 0.1)[0] is Regime.RISING
    assert classify_loss_trend(math.nan, 0.1) == (Regime.UNCERTAIN, "no loss was given")
    assert classify_kind(Regime.RISING, Regime.FALLING)[0] is StageKind.ACQUIRE
    assert classify_kind(Regime.FALLING, Regime.FLAT)[0] is StageKind.SIMPLIFY
    assert classify_kind(Regime.FLAT, Regime.FLAT)[0] is StageKind.TURN
    assert classify_kind(Regime.FALLING, Regime.FALLING)[0] is StageKind.TURN
    assert classify_kind(Regime.RISING, Regime.UNCERTAIN)[0] is StageKind.TURN
    assert str(StageKind.ACQUIRE) == "acquire" and f"{Regime.FLAT}" == "flat"


# ---------------------------------------------------------------------------------------
# Retrospective analysis.


def test_smoothing_reproduces_a_line_exactly():
    # Local-linear regression is exact on a straight line: an oracle for the weights.
    steps = np.unique(np.geomspace(1, 1e5, 80).round().astype(int))
    x = np.log10(steps + 1)
    curve = smooth_log_step(steps, 3.0 + 7.0 * x, smoothing=0.3)
    np.testing.assert_allclose(curve.smoothed, 3.0 + 7.0 * x, rtol=1e-10)
    np.testing.assert_allclose(curve.slope, 7.0, rtol=1e-10)
    with pytest.raises(ValueError, match="strictly increasing"):
        smooth_log_step(steps[::-1], x)
    with pytest.raises(ValueError, match="`smoothing`"):
        smooth_log_step(steps, x, smoothing=0.0)


@pytest.mark.parametrize("name", ["rise_plateau", "plateau_rise", "rise_fall", "multi_stage"])
@pytest.mark.parametrize("seed", range(3))
def test_retrospective_boundaries_near_true_change_points(name, seed):
    steps, llc, std, loss, changes, kinds = make_series(name, seed, 0.03)
    llc[7] = math.nan  # a diverged estimate is skipped, indices still refer to the input
    boundaries = retrospective_stages(steps, llc, loss, llc_stds=std)
    assert [b.kind.value for b in boundaries] == kinds
    for boundary, change in zip(boundaries, changes, strict=True):
        # The smoothed slope crosses halfway between the stages at the kink itself.
        assert abs(boundary.checkpoint - change) <= 3
        assert boundary.step == steps[boundary.checkpoint]
        assert json.loads(json.dumps(boundary.to_dict())) == boundary.to_dict()


def test_retrospective_trendless_has_no_boundary():
    for seed in range(5):
        steps, llc, std, loss, _, _ = make_series("trendless", seed, 0.10)
        assert retrospective_stages(steps, llc, loss, llc_stds=std) == []


# ---------------------------------------------------------------------------------------
# Comparing online events with boundaries.


def _boundary(checkpoint, kind):
    return StageBoundary(
        step=10 * checkpoint,
        checkpoint=checkpoint,
        log_step=0.0,
        kind=StageKind(kind),
        previous_regime=Regime.RISING,
        new_regime=Regime.FLAT,
        llc=1.0,
        loss=None,
        slope=0.0,
        stage=1,
        message="",
    )


def _event(checkpoint, delay, kind):
    return StageEvent(
        step=10 * checkpoint,
        detected_at=10 * (checkpoint + delay),
        component=None,
        kind=StageKind(kind),
        previous_regime=Regime.RISING,
        new_regime=Regime.FLAT,
        llc=1.0,
        loss=None,
        stage=1,
        message="",
        checkpoint=checkpoint,
        delay=delay,
    )


def test_compare_events_counts():
    boundaries = [_boundary(20, "turn"), _boundary(40, "acquire"), _boundary(70, "simplify")]
    events = [
        _event(22, 8, "turn"),  # matches 20
        _event(39, 5, "turn"),  # matches 40, wrong kind
        _event(55, 6, "acquire"),  # false alarm: 15 checkpoints from any boundary
    ]
    result = compare_events(events, boundaries, tolerance_checkpoints=5)
    assert (result["matched"], result["missed"], result["false_alarms"]) == (2, 1, 1)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    # Delays: (22 + 8) - 20 = 10 and (39 + 5) - 40 = 4.
    assert result["mean_delay_checkpoints"] == pytest.approx(7.0)
    assert result["mean_location_error_checkpoints"] == pytest.approx(1.5)
    assert result["kind_agreement"] == pytest.approx(0.5)
    assert json.loads(json.dumps(result)) == result
    # Positions looked up by step give the same answer.
    steps = 10 * np.arange(100)
    assert compare_events(events, boundaries, 5, steps=steps) == result
    empty = compare_events([], [], 5)
    assert empty["precision"] is None and empty["recall"] is None


def test_online_events_match_retrospective_boundaries():
    steps, llc, std, loss, _, _ = make_series("multi_stage", 4, 0.03)
    detector = StageDetector()
    feed(detector, steps, llc, std, loss)
    boundaries = retrospective_stages(steps, llc, loss, llc_stds=std)
    result = compare_events(detector.events, boundaries, steps=steps)
    assert (result["matched"], result["missed"], result["false_alarms"]) == (3, 0, 0)
    assert result["kind_agreement"] == 1.0
    assert 0 < result["mean_delay_checkpoints"] <= MAX_DELAY
