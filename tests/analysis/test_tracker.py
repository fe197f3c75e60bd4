"""StageTracker: typed records in, events out, in step order, one noise model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slt_callbacks.analysis.noise import standard_error
from slt_callbacks.analysis.online import StageDetector
from slt_callbacks.analysis.tracker import StageTracker
from slt_callbacks.records import LLCRecord


def staircase(num_chains=4):
    """A saddle at -600 until step 300, then a minimum at 12; the loss drops there."""
    out = []
    for i, step in enumerate(range(10, 800, 20)):
        saddle = step < 300
        llc = (-600.0 if saddle else 12.0) * (1 + 0.02 * ((-1) ** i))
        out.append(LLCRecord(step, llc, 0.04 * abs(llc), "not_a_minimum" if saddle else
                             "healthy", loss=1.0 if saddle else 0.2, num_chains=num_chains))
    return out


def test_saddle_estimates_feed_the_detector_with_the_standard_error():
    records = staircase()
    tracker = StageTracker()
    for record in records:
        tracker.add(record)
    reference = StageDetector()
    for r in records:
        reference.update(r.step, r.llc, standard_error(r.llc_std, r.num_chains), r.loss)
    assert tracker.events == reference.events and len(tracker.events) == 1
    assert tracker.events[0].kind.value == "acquire"
    assert tracker.num_saddle == {None: sum(r.status != "healthy" for r in records)}
    # Relations see complexities only; the detector's series has every estimate.
    assert len(tracker.series(healthy_only=True)) == sum(r.llc > 0 for r in records)
    assert len(tracker.series()) == len(records)


def test_diverged_kept_out_late_records_counted_and_bad_input_refused():
    tracker = StageTracker(components=["a"])
    with pytest.raises(ValueError, match="`record`"):
        tracker.add({"step": 1})
    with pytest.raises(ValueError, match="`components`"):
        tracker.add(LLCRecord(1, 1.0, 0.1, "healthy"))
    part = {"a": (2.0, 0.1, "healthy")}
    tracker.add(LLCRecord(5, 1e9, 0.1, "diverged", components=part))
    tracker.add(LLCRecord(4, 1.0, 0.1, "healthy", components=part))
    assert tracker.num_rejected == {None: 1} and tracker.num_late == 1


def test_reorder_window_and_state_round_trip(tmp_path):
    records = staircase()
    swapped = [records[i ^ 1] for i in range(len(records))]  # neighbours swapped
    tracker = StageTracker(reorder_window=1)
    for record in swapped[:20]:
        tracker.add(record)
    torch.save(tracker.state_dict(), tmp_path / "t.pt")
    resumed = StageTracker(reorder_window=1)
    resumed.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True))
    for record in swapped[20:]:
        resumed.add(record)
    resumed.flush()
    assert [r.step for r in resumed.records] == [r.step for r in records]
    straight = StageTracker()
    for record in records:
        straight.add(record)
    assert resumed.events == straight.events and resumed.num_late == 0


def calibrated_midway(sampler=True, jump_at=None):
    """λ̂ at a minimum, flat (loss flat too), read 11.7 under a provisional sampler and 16 after
    the calibration froze at step 1000 (the bias of γ = 100 vs γ = 1 in issue #9); with
    ``jump_at`` a real jump to 30 later. Noise ±2%, alternating, chain std 4% of λ̂."""
    out = []
    steps = np.unique(np.geomspace(10, 1e5, 80).round().astype(int)).tolist()
    for i, step in enumerate(steps):
        level = 11.7 if step < 1000 else 16.0
        if jump_at is not None and step >= jump_at:
            level = 30.0
        llc = level * (1 + 0.02 * ((-1) ** i))
        name = ("provisional" if step < 1000 else "calibrated") if sampler else None
        out.append(LLCRecord(step, llc, 0.04 * llc, "healthy", loss=0.5, num_chains=4,
                             sampler=name))
    return out


def test_an_event_at_a_sampler_change_says_so():
    first_calibrated = next(r.step for r in calibrated_midway() if r.step >= 1000)
    # The change of bias alone reads as development: one `acquire` jump there. Without
    # samplers nothing tells it apart.
    blind = StageTracker()
    for record in calibrated_midway(sampler=False):
        blind.add(record)
    assert [(e.step, e.kind.value) for e in blind.events] == [(first_calibrated, "acquire")]
    assert blind.sampler_changes == [] and "sampler" not in blind.events[0].message
    # With them the event is kept (a real transition often comes right there) and flagged.
    tracker = StageTracker()
    for record in calibrated_midway():
        tracker.add(record)
    assert tracker.sampler_changes == [first_calibrated]
    assert [e.step for e in tracker.events] == [first_calibrated]
    assert f"the LLC sampler changed at step {first_calibrated}" in tracker.events[0].message
    # A real jump far from the change is not flagged.
    later, records = StageTracker(), calibrated_midway(jump_at=10_000)
    for record in records:
        later.add(record)
    jumped = next(r.step for r in records if r.step >= 10_000)
    assert [e.step for e in later.events] == [first_calibrated, jumped]
    assert "sampler" not in later.events[1].message


def tracker_of(records):
    tracker = StageTracker()
    for record in records:
        tracker.add(record)
    return tracker


def test_the_sampler_survives_a_resume_and_old_states_load(tmp_path):
    records = calibrated_midway()
    cut = next(i for i, r in enumerate(records) if r.step >= 1000)
    tracker = StageTracker()
    for record in records[:cut]:
        tracker.add(record)
    torch.save(tracker.state_dict(), tmp_path / "t.pt")
    resumed = StageTracker()
    resumed.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True))
    for record in records[cut:]:
        resumed.add(record)
    # The first record after the resume changes the sampler: still seen as a change.
    assert resumed.sampler_changes == [records[cut].step]
    assert [e.message for e in resumed.events] == [e.message for e in tracker_of(records).events]
    # A state written before records named their sampler loads, knowing none.
    old = tracker.state_dict()
    for record in old["records"]:
        del record["sampler"]
    again = StageTracker()
    again.load_state_dict(old)
    assert again.sampler_changes == [] and len(again.records) == cut
