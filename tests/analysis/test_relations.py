"""relations: correlations against independent formulas, opposite moves on built series."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slt_callbacks.analysis.relations import (
    Move,
    Relation,
    align_by_step,
    estimate_noise,
    format_relations,
    opposite_moves,
    pearson,
    rank,
    relate,
    spearman,
)


def naive_rank(values):
    """1 + (number smaller) + half of the other ties: the mean rank, by its definition."""
    v = np.asarray(values, dtype=float)
    return np.array([1 + (v < x).sum() + 0.5 * ((v == x).sum() - 1) for x in v])


def test_rank_gives_ties_their_mean_rank():
    assert rank([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert rank([]).tolist() == []
    rng = np.random.default_rng(0)
    values = rng.integers(0, 6, size=40).astype(float)  # many ties
    np.testing.assert_array_equal(rank(values), naive_rank(values))


def test_pearson_matches_numpy_corrcoef():
    rng = np.random.default_rng(1)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson(x, -3 * x + 1) == pytest.approx(-1.0)


def test_spearman_matches_the_formula_without_ties_and_mean_ranks_with_ties():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=30), rng.normal(size=30)
    d = naive_rank(x) - naive_rank(y)
    n = x.size
    assert spearman(x, y) == pytest.approx(1 - 6 * (d @ d) / (n * (n * n - 1)), abs=1e-12)
    # Monotone but not linear: Spearman is exactly 1, Pearson is not.
    z = np.exp(3 * x)
    assert spearman(x, z) == pytest.approx(1.0) and pearson(x, z) < 0.95
    ties_x, ties_y = [1, 2, 2, 3, 4, 4, 4], [1, 1, 2, 3, 3, 5, 4]
    expected = np.corrcoef(naive_rank(ties_x), naive_rank(ties_y))[0, 1]
    assert spearman(ties_x, ties_y) == pytest.approx(expected, abs=1e-12)


def test_correlations_skip_non_finite_pairs_and_are_nan_when_undefined():
    x = [1.0, 2.0, math.nan, 4.0, 5.0]
    y = [2.0, 4.0, 6.0, math.inf, 10.0]
    assert pearson(x, y) == pytest.approx(1.0)  # pairs 0, 1, 4
    assert math.isnan(pearson([1.0, 2.0], [3.0, 4.0]))
    assert math.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))  # constant
    with pytest.raises(ValueError, match="`y` to have 3 values"):
        pearson([1, 2, 3], [1, 2])


def test_estimate_noise_recovers_the_noise_about_a_trend():
    rng = np.random.default_rng(3)
    steps = np.unique(np.geomspace(1, 1e4, 300).round())
    x = np.log10(steps + 1)
    values = 5 + 3 * x + 2 * np.sin(x) + rng.normal(0, 0.2, size=x.size)
    assert estimate_noise(steps, values) == pytest.approx(0.2, rel=0.15)
    assert math.isnan(estimate_noise([1, 2, 3], [1.0, 2.0, 3.0]))


def test_opposite_moves_against_their_noise():
    steps = [10, 20, 40, 80, 160, 320]
    llc = [5.0, 6.0, 6.05, 5.0, 4.0, 4.02]  # up, within noise, down, down, within noise
    norm = [1.0, 1.1, 1.2, 1.3, 1.3, 1.4]  # up, up, up, unchanged, up
    moves, opposite = opposite_moves(
        steps, llc, norm, x_noise=[0.1] * 6, y_noise=[0.0] * 6, sensitivity=2.0
    )
    assert [(m.step_from, m.step_to) for m in moves] == [(10, 20), (40, 80)]
    assert opposite == [Move(40, 80, pytest.approx(-1.05), pytest.approx(0.1))]
    # A larger sensitivity asks for more: a change of 1 is 7 standard errors of 0.14.
    assert opposite_moves(
        steps, llc, norm, x_noise=[0.1] * 6, y_noise=[0.0] * 6, sensitivity=8.0
    ) == ([], [])
    # Unknown noise for a noise-free zig-zag: the scatter estimate makes every change small.
    zigzag = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert opposite_moves(steps, zigzag, norm, y_noise=[0.0] * 6)[0] == []


def test_opposite_moves_validation():
    with pytest.raises(ValueError, match="strictly increasing"):
        opposite_moves([1, 1, 2], [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="`sensitivity`"):
        opposite_moves([1, 2, 3], [1, 2, 3], [1, 2, 3], sensitivity=-1)
    with pytest.raises(ValueError, match="`x_noise`"):
        opposite_moves([1, 2, 3], [1, 2, 3], [1, 2, 3], x_noise=[-1.0, 0.0, 0.0])


def test_relate_lambda_falls_while_the_norm_grows():
    """The case users do not expect: a simpler solution (lower λ̂) with larger weights."""
    steps = np.unique(np.geomspace(10, 1e4, 40).round()).astype(int)
    x = np.log10(steps)
    rng = np.random.default_rng(4)
    llc = np.where(x < 2.5, 10 + 20 * (x - 1), 40 - 15 * (x - 2.5)) + rng.normal(0, 0.3, x.size)
    norm = 3 + 2 * x  # grows throughout
    relation = relate(
        steps,
        llc,
        norm,
        x_name="llc",
        y_name="weight_norm",
        x_noise=np.full(x.size, 0.3),
        y_noise=np.zeros(x.size),
    )
    assert relation.name == "llc_vs_weight_norm" and relation.num_points == steps.size
    assert relation.num_opposite > 0
    assert all(m.step_from >= 300 for m in relation.opposite)  # only after λ̂ turned
    summary = relation.to_dict()
    assert set(summary) == {
        "num_points",
        "pearson",
        "spearman",
        "num_moves",
        "num_opposite",
        "opposite_steps",
    }
    assert summary["opposite_steps"][0] == [
        relation.opposite[0].step_from,
        relation.opposite[0].step_to,
    ]
    assert all(type(v) in (int, float, list) for v in summary.values())
    assert "opposite directions in" in relation.message and "steps" in relation.message


def test_relation_undefined_values_are_none_and_explained():
    relation = relate([1, 2], [1.0, 2.0], [3.0, 4.0], x_name="llc", y_name="loss")
    assert relation.to_dict()["pearson"] is None
    assert "too few" in relation.message
    empty = Relation("llc", "loss", 0, math.nan, math.nan)
    assert empty.to_dict()["num_moves"] == 0


def test_align_by_step_keeps_shared_steps_only():
    steps, (a, b) = align_by_step({1: (1.0, 0.1), 2: (2.0, 0.2), 4: (4.0, 0.4)}, {4: 40.0, 2: 20.0})
    assert steps.tolist() == [2, 4]
    assert a.tolist() == [[2.0, 0.2], [4.0, 0.4]] and b.tolist() == [20.0, 40.0]
    assert align_by_step()[0].size == 0


def test_format_relations_is_a_table():
    relation = relate(
        [1, 2, 3, 4],
        [1.0, 2.0, 3.0, 4.0],
        [4.0, 3.0, 2.0, 1.0],
        x_name="llc",
        y_name="loss",
        x_noise=[0.0] * 4,
        y_noise=[0.0] * 4,
    )
    lines = format_relations([relation]).splitlines()
    assert lines[0].split() == ["relation", "points", "pearson", "spearman", "moves", "opp."]
    assert lines[2].split() == ["llc_vs_loss", "4", "-1.00", "-1.00", "3", "3"]
