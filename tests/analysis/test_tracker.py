"""StageTracker: typed records in, events out, in step order, one noise model."""

from __future__ import annotations

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
