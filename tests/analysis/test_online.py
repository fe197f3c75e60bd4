"""The online stage detector: jumps and trend changes of λ̂ on the signed-log scale.

Synthetic curves (:mod:`slt_callbacks.analysis.synthetic`) with known change points and a
fixed seed each; the accuracy over many seeds is measured in ``benchmarks/detector.py``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from slt_callbacks.analysis.noise import standard_error
from slt_callbacks.analysis.online import (
    DetectorConfig,
    Regime,
    StageDetector,
    StageEvent,
    StageKind,
    classify_kind,
    classify_loss_change,
    classify_trend,
    judge_change,
)
from slt_callbacks.analysis.synthetic import synthetic_curve

FIXTURE = Path(__file__).parents[1] / "data" / "dln_saddle_to_saddle.json"


def feed(detector, curve, start=0, stop=None):
    emitted = []
    for i in range(start, len(curve.steps) if stop is None else stop):
        se = standard_error(float(curve.llc_std[i]), curve.num_chains)
        event = detector.update(int(curve.steps[i]), float(curve.llc[i]), se,
                                float(curve.loss[i]))
        if event is not None:
            emitted.append(event)
    return emitted


@pytest.mark.parametrize(
    ("name", "seed"),
    [("staircase", 0), ("staircase", 1), ("close_stages", 0), ("drop", 0)],
)
def test_each_jump_found_once_with_its_kind_within_three_checkpoints(name, seed):
    curve = synthetic_curve(name, seed, 0.10)
    events = feed(StageDetector(), curve)
    assert [e.checkpoint for e in events] == curve.changes
    assert [StageKind(e.kind).value for e in events] == curve.kinds
    # A jump is announced persistence - 1 = 2 checkpoints after it (over 30 seeds the
    # benchmark's median delay is 2).
    assert all(e.shape == "jump" and e.delay <= 3 for e in events)


def test_trend_change_found_as_a_kink():
    curve = synthetic_curve("plateau_rise", 0, 0.03)
    events = feed(StageDetector(), curve)
    assert len(events) >= 1
    first = events[0]
    # The change at 10^2.5 is located within 5 checkpoints; a kink builds up slowly.
    assert abs(first.checkpoint - curve.changes[0]) <= 5
    assert (first.kind, first.new_regime) == (StageKind.ACQUIRE, Regime.RISING)


@pytest.mark.parametrize("seed", range(3))
def test_no_false_alarm_on_trendless_series(seed):
    assert feed(StageDetector(), synthetic_curve("trendless", seed, 0.10)) == []


def test_recorded_saddle_to_saddle_curve_gives_one_acquire_per_loss_drop():
    """A real LLCMonitor curve of a deep linear network: λ̂ from -7,900 at the first saddle
    to +12 at the minimum, three loss drops. Each drop gives exactly one event, of kind
    acquire, within a factor 1.3 of the drop's step, and nothing else."""
    data = json.loads(FIXTURE.read_text())
    detector = StageDetector()
    for step, llc, std, chains, status, loss in zip(
        data["steps"], data["llc"], data["llc_std"], data["num_chains"], data["status"],
        data["loss"], strict=True,
    ):
        assert status != "diverged"
        detector.update(step, llc, standard_error(std, chains), loss)
    events = detector.events
    assert len(events) == len(data["drop_steps"]) == 3
    for event, drop in zip(events, data["drop_steps"], strict=True):
        assert event.kind is StageKind.ACQUIRE and event.shape == "jump"
        assert drop / 1.3 <= event.step <= drop * 1.3, (event.step, drop)
    assert events[0].llc_before < -5000 and events[-1].llc > 5


def test_event_fields_message_and_round_trip():
    curve = synthetic_curve("staircase", 0, 0.10)
    event = feed(StageDetector(), curve)[0]
    assert event.detected_at > event.step and event.stage == 1 and event.component is None
    assert event.llc_before < -4000 < -1000 < event.llc < -300
    assert "jumped" in event.message and "acquiring structure" in event.message
    assert StageEvent.from_dict(event.to_dict()) == event
    json.dumps(event.to_dict())  # plain types only


def test_noise_free_jump_and_unknown_stderr():
    steps = np.unique(np.geomspace(1, 1e5, 100).astype(int))
    x = np.log10(steps + 1)
    llc = np.where(x < 2.5, -600.0, 12.0)
    loss = np.where(x < 2.5, 1.0, 0.2)
    detector = StageDetector()
    for s, v, f in zip(steps, llc, loss, strict=True):
        detector.update(int(s), float(v), math.nan, float(f))
    assert [(e.kind, e.shape, e.delay) for e in detector.events] == [
        (StageKind.ACQUIRE, "jump", 2)
    ]


def test_noise_free_steps_raise_no_numpy_warning():
    # Exactly flat stages with a zero chain std: every candidate jump inside a stage fits a
    # coefficient of exactly 0, and placing a ramp on it used to divide by that 0.
    steps = np.unique(np.geomspace(1, 1e4, 80).round().astype(int))
    detector = StageDetector()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for s in steps:
            detector.update(int(s), 10.0 if s < 300 else 20.0, 0.0, 1.0)
    (event,) = detector.events
    assert event.shape == "jump" and event.step == int(steps[steps >= 300][0])
    # Fitted levels of a least-squares fit: exact up to rounding.
    assert (event.llc_before, event.llc) == (pytest.approx(10.0), pytest.approx(20.0))


def test_non_finite_out_of_order_and_invalid_steps():
    detector = StageDetector()
    assert detector.update(5, math.nan) is None and detector.num_ignored == 1
    detector.update(5, 1.0)
    detector.update(5, 2.0)
    detector.update(3, 2.0)
    assert detector.num_out_of_order == 2 and detector.num_checkpoints == 1
    for bad in (-1, 2.5, "3", True):
        with pytest.raises(ValueError, match="`step`"):
            detector.update(bad, 1.0)


def test_state_dict_round_trip_continues_identically(tmp_path):
    curve = synthetic_curve("close_stages", 0, 0.10)
    whole = StageDetector()
    feed(whole, curve)
    first = StageDetector()
    feed(first, curve, stop=40)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = StageDetector()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    feed(resumed, curve, start=40)
    assert resumed.events == whole.events and resumed.stage == whole.stage == 4
    with pytest.raises(ValueError, match="missing"):
        StageDetector().load_state_dict({"version": 2})


@pytest.mark.parametrize(
    ("field", "value"),
    [("scale", 0.0), ("sensitivity", -1.0), ("persistence", 0), ("cooldown", 2),
     ("window", 4), ("min_jump", -0.1), ("min_noise", math.nan), ("flat_threshold", 9.0)],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        DetectorConfig(**{field: value})


def test_pure_decisions_say_why():
    cfg = DetectorConfig()
    ok, why = judge_change(2.0, 0.1, np.array([3.0, 5.0, 4.0]), shape="jump", config=cfg)
    assert ok and "20.0 standard errors" in why
    ok, why = judge_change(2.0, 0.1, np.array([3.0, 0.2, 4.0]), shape="jump", config=cfg)
    assert not ok and "only 2 of the 3 points" in why
    ok, why = judge_change(0.05, 0.001, np.array([3.0] * 3), shape="jump", config=cfg)
    assert not ok and "below the minimum" in why
    ok, why = judge_change(2.0, 0.1, np.array([3.0] * 3), shape="kink", config=cfg, misfit=9.0)
    assert not ok and "does not explain" in why
    assert classify_trend(1.0, 0.1, cfg)[0] is Regime.RISING
    assert classify_trend(0.05, 0.1, cfg)[0] is Regime.FLAT  # below the practical floor
    assert classify_loss_change(-0.5, 0.1)[0] is Regime.FALLING
    assert classify_loss_change(-0.05, 0.1)[0] is Regime.FLAT
    assert classify_kind(Regime.RISING, Regime.FALLING)[0] is StageKind.ACQUIRE
    assert classify_kind(Regime.FALLING, Regime.FLAT)[0] is StageKind.SIMPLIFY
    assert classify_kind(Regime.RISING, Regime.UNCERTAIN)[0] is StageKind.TURN


def test_a_concave_ramp_at_the_last_saddle_is_one_jump():
    """The λ̂ curve of ``examples/quickstart.py --config auto`` (recorded 2026-12-02, its
    provisional config until step 365, then the calibrated one): the last transition runs
    −24 -> 2.8 -> 15 (concave on the signed-log scale, so no straight ramp fits it within
    the noise). Before ramps had free points in transit, the detector missed it and later
    announced a false ``simplify`` from the extrapolated ramp. Loss drops at 40, 112, 295."""
    steps = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13, 15, 18, 21, 24, 27, 32, 37, 42, 49, 56, 65,
        75, 87, 100, 115, 133, 154, 178, 205, 237, 274, 316, 365, 422, 487, 562, 649, 750, 866,
        1000, 1155, 1334, 1540, 1778]
    llc = [-8154.2, -8151.1, -8154.1, -8145.1, -8146.1, -8155, -8148.1, -8151.8, -8165.9,
        -8156.7, -8150, -8153.2, -8146.1, -8164.5, -8134.9, -8140.4, -8109.5, -7903.2, -6626.4,
        -2609.5, -681.91, -662.67, -665.22, -661.76, -641.63, -567.71, -279.66, -37.769,
        -25.326, -21.756, -30.551, -30.937, -24.36, 2.8035, 15.419, 16.249, 15.92, 15.93,
        16.043, 16.63, 16.506, 15.541, 16.282, 16.79, 16.609, 16.115]
    stderr = [5.97, 10.9, 14.4, 6.74, 4.95, 7.47, 6.1, 13.7, 10.3, 4.15, 9.84, 6.76, 16.1,
        8.49, 9.75, 10.1, 2.52, 6.01, 6.03, 2.61, 1.67, 2.84, 1.55, 1.18, 2.18, 1.74, 2.32,
        3.95, 0.669, 3.24, 0.636, 0.634, 0.837, 0.101, 0.64, 0.208, 0.27, 0.244, 0.369, 0.553,
        0.352, 0.164, 0.833, 0.449, 0.49, 0.339]
    loss = [56.018, 56.018, 56.018, 56.018, 56.018, 56.018, 56.018, 56.018, 56.018, 56.018,
        56.017, 56.016, 56.013, 56.001, 55.968, 55.865, 55.539, 53.321, 42.237, 14.011, 5.131,
        5.0926, 5.0641, 5.0143, 4.8615, 4.2033, 2.1188, 0.59614, 0.51298, 0.50987, 0.50003,
        0.47083, 0.35787, 0.11815, 0.0065192, 0.00017363, 9.0488e-06, 4.4734e-07, 1.3799e-08,
        2.4831e-10, 8.9316e-12, 5.9548e-12, 5.3993e-12, 5.2419e-12, 5.1241e-12, 5.0583e-12]
    detector = StageDetector()
    for args in zip(steps, llc, stderr, loss, strict=True):
        detector.update(*args)
    found = [(e.step, StageKind(e.kind).value, e.shape) for e in detector.events]
    assert found == [(42, "acquire", "jump"), (115, "acquire", "jump"), (316, "acquire", "jump")]


def _kink_passages_and_events(curve, steps):
    """Feed ``curve`` (stderr 0.3, loss flat); the checkpoints at which the kink test alone
    passed without an event, and the events as (index, change point, shape)."""
    det = StageDetector()
    passed, events = [], []
    for i, (step, value) in enumerate(zip(steps, curve, strict=True)):
        event = det.update(int(step), float(value), 0.3, 1.0)
        start = max(0, det._stage_start - det._dropped)
        seen = det._decide(start, len(det._steps))[0]
        if event is None and seen is not None and seen.shape == "kink":
            passed.append(i)
        if event is not None:
            events.append((i, event.checkpoint, event.shape))
    return passed, events


def test_a_kink_is_announced_when_it_passes_twice_in_a_row():
    # Noise-free line (se 0.3), then either a lasting change of slope at checkpoint 50, or
    # five estimates bending away from the line that then return to it. The bend passes the
    # kink test at checkpoint 54 in both; only the lasting one may become an event, one
    # checkpoint later.
    steps = np.unique(np.geomspace(1, 1e4, 80).round().astype(int))
    x = np.log10(steps + 1)
    line = 10 + 10 * x
    with np.errstate(invalid="ignore", divide="ignore"):
        lasting = line - np.where(np.arange(x.size) >= 50, 25 * (x - x[50]), 0.0)
        passed, events = _kink_passages_and_events(lasting, steps)
        assert passed == [54] and events == [(55, 50, "kink")]
        fluke = line.copy()
        fluke[50:55] -= [0.5, 1.2, 2.2, 3.4, 4.8]
        passed, events = _kink_passages_and_events(fluke, steps)
        assert passed == [54] and events == []
