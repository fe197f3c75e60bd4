"""Synthetic λ̂ curves with known developmental stages, to test or tune a stage detector.

Each scenario is piecewise linear in log10(step), between knots, on log-spaced checkpoints
from step 1 to 1e5, with Gaussian noise of ``noise`` × the level (chain stds of real LLC
estimates are a few percent) and a reported chain std that is itself an estimate (4 chains).
The kinds of the interior knots use :class:`~slt_callbacks.detect.StageKind`'s vocabulary.
Only numpy; every draw comes from ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# name: (knots in log10 step, λ̂ at the knots, loss at the knots, kinds of the interior knots)
SCENARIOS: dict[str, tuple[list[float], list[float], list[float], list[str]]] = {
    "rise_plateau": ([0, 3, 5], [5, 45, 45], [2.0, 0.3, 0.3], ["turn"]),
    "plateau_rise": ([0, 2.5, 5], [10, 10, 60], [1.0, 1.0, 0.2], ["acquire"]),
    "rise_fall": ([0, 2.5, 5], [5, 50, 15], [2.0, 0.4, 0.4], ["simplify"]),
    "multi_stage": (
        [0, 1.8, 2.8, 3.6, 5],
        [5, 30, 30, 60, 30],
        [2.0, 0.8, 0.8, 0.3, 0.3],
        ["turn", "acquire", "simplify"],
    ),
    "trendless": ([0, 5], [20, 20], [0.5, 0.5], []),
}


class SyntheticCurve(NamedTuple):
    """One noisy curve; ``changes`` are checkpoint indices of the true change points."""

    steps: np.ndarray
    llc: np.ndarray
    llc_std: np.ndarray
    loss: np.ndarray
    changes: list[int]
    kinds: list[str]


def synthetic_curve(
    name: str, seed: int, noise: float, *, std_known: bool = True, num: int = 100
) -> SyntheticCurve:
    """The scenario ``name`` with noise ``noise`` (relative), drawn with ``seed``.

    Args:
        std_known: report the (estimated) chain std; else NaN, as when it is unknown.
        num: log-spaced checkpoints before de-duplicating integer steps (~90 remain).
    """
    if name not in SCENARIOS:
        raise ValueError(f"Expected `name` to be one of {sorted(SCENARIOS)} but got {name!r}.")
    knots, levels, losses, kinds = SCENARIOS[name]
    rng = np.random.default_rng(seed)
    steps = np.unique(np.geomspace(1, 1e5, num).round().astype(int))
    x = np.log10(steps + 1)
    true = np.interp(x, knots, levels)
    std = noise * true
    llc = true + std * rng.standard_normal(x.size)
    # The reported chain std is itself an estimate (4 chains: 3 degrees of freedom).
    reported = std * np.sqrt(rng.chisquare(3, x.size) / 3)
    if not std_known:
        reported = np.full(x.size, np.nan)
    loss = np.exp(np.interp(x, knots, np.log(losses))) * (1 + 0.01 * rng.standard_normal(x.size))
    changes = [int(np.argmin(np.abs(x - knot))) for knot in knots[1:-1]]
    return SyntheticCurve(steps, llc, reported, loss, changes, list(kinds))
