"""The end-of-run analysis: jumps by binary segmentation, trend changes by the smoothed curve
between them (Hoogland et al. 2024). Synthetic curves with known change points, fixed seeds;
the accuracy over 20 seeds per scenario is in ``benchmarks/results/detector.md``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slt_callbacks.analysis.noise import standard_error
from slt_callbacks.analysis.online import Regime, StageKind, log_step
from slt_callbacks.analysis.retrospective import find_jumps, retrospective_stages
from slt_callbacks.analysis.synthetic import synthetic_curve


def boundaries_of(name: str, seed: int, noise: float):
    curve = synthetic_curve(name, seed, noise)
    found = retrospective_stages(
        curve.steps, curve.llc, curve.loss, scale=1.0,
        stderrs=standard_error(curve.llc_std, curve.num_chains),
    )  # fmt: skip
    return curve, found


@pytest.mark.parametrize("noise", [0.03, 0.10])
@pytest.mark.parametrize(("name", "seed"), [("staircase", 0), ("close_stages", 1), ("drop", 2)])
def test_every_jump_is_one_boundary_of_its_kind(name, seed, noise):
    curve, found = boundaries_of(name, seed, noise)
    # Jumps are sharp: the boundary is the first checkpoint at the new level, give or take
    # one (a ramp's first point); nothing else is found on these curves.
    assert len(found) == len(curve.changes), [(b.checkpoint, b.message) for b in found]
    for boundary, at, kind in zip(found, curve.changes, curve.kinds, strict=True):
        assert abs(boundary.checkpoint - at) <= 1, (boundary.checkpoint, at)
        assert StageKind(boundary.kind).value == kind
        assert "jumped" in boundary.message


@pytest.mark.parametrize(("name", "seed"), [("plateau_rise", 0), ("rise_fall", 1)])
def test_trend_change_found_near_its_kink(name, seed):
    curve, found = boundaries_of(name, seed, 0.03)
    assert len(found) == 1
    # The smoothed curve's critical point; within 3 checkpoints (0.15 decade) at 3% noise.
    assert abs(found[0].checkpoint - curve.changes[0]) <= 3
    assert StageKind(found[0].kind).value == curve.kinds[0]


@pytest.mark.parametrize("seed", range(3))
def test_no_boundary_on_a_trendless_curve(seed):
    assert boundaries_of("trendless", seed, 0.10)[1] == []


def test_find_jumps_tells_a_jump_from_a_kink():
    x = log_step(np.unique(np.geomspace(1, 1e4, 80).round()))
    var = np.full(x.size, 0.03**2)
    step = np.where(x < 2.0, 1.0, 2.0)  # a jump of 1 on the signed-log scale
    hinge = 1.0 + 2.0 * np.maximum(x - 2.0, 0.0)  # the same rise, continuous
    jumps = find_jumps(x, step, var)
    assert [(j.begin, round(j.size, 6)) for j in jumps] == [(int(np.argmax(x >= 2.0)), 1.0)]
    assert find_jumps(x, hinge, var) == []


def test_a_boundary_needs_the_jump_on_both_scales():
    """A λ̂ rising linearly in log-step bends on the signed-log scale; that bend is no jump."""
    x = log_step(np.unique(np.geomspace(1, 1e4, 80).round()))
    raw = 5.0 + 10.0 * x
    z = np.log1p(raw)
    var = np.full(x.size, 0.01**2)
    assert find_jumps(x, z, var, raw=(raw, var * (1 + raw) ** 2)) == []


def test_messages_kinds_and_inputs():
    curve, found = boundaries_of("staircase", 0, 0.03)
    first = found[0]
    assert first.new_regime is Regime.RISING and first.kind is StageKind.ACQUIRE
    assert first.llc < -300 and first.loss is not None and math.isfinite(first.slope)
    assert first.to_dict()["kind"] == "acquire"
    with pytest.raises(ValueError, match="`losses`"):
        retrospective_stages(curve.steps, curve.llc, curve.loss[:-1])
    with pytest.raises(ValueError, match="at least 5"):
        retrospective_stages(curve.steps[:4], curve.llc[:4])
