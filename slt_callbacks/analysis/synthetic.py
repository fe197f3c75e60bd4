"""Synthetic λ̂ curves with known developmental stages, to test or tune a stage detector.

Each scenario is piecewise linear in log10(step + 1) between knots, on log-spaced checkpoints
from step 1 to 1e5 (~20 per decade late in training). A *jump* is two knots a hair apart;
the true change points and their kinds are listed with each scenario. Every estimate gets
Gaussian noise of ``noise`` × |level| (its standard error), and the record reports the std
*across* ``num_chains = 4`` chains, ``√4 × se × √(χ²₃/3)``: itself an estimate, as in a real
record, whose :func:`~slt_callbacks.analysis.noise.standard_error` is the noise actually
added. Only numpy; every draw comes from ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["NUM_CHAINS", "SCENARIOS", "Scenario", "SyntheticCurve", "synthetic_curve"]

NUM_CHAINS = 4
_HAIR = 1e-6  # the width of a jump, in decades


class Scenario(NamedTuple):
    """Knots in log10(step + 1), λ̂ and the loss at the knots, and the true changes as
    ``(log10 step, kind)``."""

    knots: list[float]
    levels: list[float]
    losses: list[float]
    changes: list[tuple[float, str]]
    description: str


def _kinks(knots, levels, losses, kinds, description) -> Scenario:
    return Scenario(knots, levels, losses, list(zip(knots[1:-1], kinds, strict=True)),
                    description)


def _steps(at: list[float], levels: list[float], losses: list[float], kinds: list[str],
           description: str, *, drift: float = 0.0) -> Scenario:
    """Plateaus between jumps at ``at``; λ̂ on each plateau drifts by ``drift`` (relative)
    from its start to its end, as estimates at a saddle do."""
    knots, ys, ls = [0.0], [levels[0]], [losses[0]]
    for i, x in enumerate(at):
        knots += [x, x + _HAIR]
        ys += [levels[i] * (1 + drift), levels[i + 1]]
        ls += [losses[i], losses[i + 1]]
    knots.append(5.0)
    ys.append(levels[-1] * (1 + drift))
    ls.append(losses[-1])
    return Scenario(knots, ys, ls, list(zip(at, kinds, strict=True)), description)


SCENARIOS: dict[str, Scenario] = {
    # Trend changes of λ̂ near minima (Hoogland et al. 2024).
    "rise_plateau": _kinks([0, 3, 5], [5, 45, 45], [2.0, 0.3, 0.3], ["turn"],
                           "λ̂ 5 -> 45 until 1e3, then flat"),
    "plateau_rise": _kinks([0, 2.5, 5], [10, 10, 60], [1.0, 1.0, 0.2], ["acquire"],
                           "λ̂ flat at 10, rises to 60 from ~300 while the loss falls"),
    "rise_fall": _kinks([0, 2.5, 5], [5, 50, 15], [2.0, 0.4, 0.4], ["simplify"],
                        "λ̂ rises to 50 at ~300, then falls to 15, loss flat"),
    "multi_stage": _kinks(
        [0, 1.8, 2.8, 3.6, 5],
        [5, 30, 30, 60, 30],
        [2.0, 0.8, 0.8, 0.3, 0.3],
        ["turn", "acquire", "simplify"],
        "rise, plateau, rise, fall",
    ),
    # Saddle-to-saddle learning of a deep linear network: λ̂ at saddles is large and negative
    # and jumps up at each loss drop; the last plateau is a minimum.
    "staircase": _steps(
        [2.0, 2.5, 3.0],
        [-5800, -600, -30, 12],
        [1.0, 0.45, 0.15, 0.02],
        ["acquire"] * 3,
        "saddles at -5800, -600, -30, then a minimum at 12; a loss drop at each jump",
        drift=0.1,
    ),
    # Four stages 8-10 checkpoints apart (0.45 decade), each about doubling λ̂.
    "close_stages": _steps(
        [1.8, 2.25, 2.7, 3.15],
        [5, 12, 25, 50, 100],
        [2.0, 1.2, 0.7, 0.4, 0.25],
        ["acquire"] * 4,
        "λ̂ steps 5 -> 12 -> 25 -> 50 -> 100, 9 checkpoints apart, with loss drops",
    ),
    "drop": _steps([3.0], [40, 20], [0.3, 0.3], ["simplify"],
                   "λ̂ falls 40 -> 20 at 1e3 while the loss stays flat"),
    "trendless": Scenario([0, 5], [20, 20], [0.5, 0.5], [], "λ̂ constant at 20"),
}


class SyntheticCurve(NamedTuple):
    """One noisy curve; ``changes`` are checkpoint indices of the true change points."""

    steps: np.ndarray
    llc: np.ndarray
    llc_std: np.ndarray
    loss: np.ndarray
    changes: list[int]
    kinds: list[str]
    num_chains: int = NUM_CHAINS


def synthetic_curve(
    name: str, seed: int, noise: float, *, std_known: bool = True, num: int = 100
) -> SyntheticCurve:
    """The scenario ``name`` with relative noise ``noise``, drawn with ``seed``.

    Args:
        std_known: report the (estimated) chain std; else NaN, as when it is unknown.
        num: log-spaced checkpoints before de-duplicating integer steps (~90 remain).
    """
    if name not in SCENARIOS:
        raise ValueError(f"Expected `name` to be one of {sorted(SCENARIOS)} but got {name!r}.")
    scenario = SCENARIOS[name]
    rng = np.random.default_rng(seed)
    steps = np.unique(np.geomspace(1, 1e5, num).round().astype(int))
    x = np.log10(steps + 1)
    true = np.interp(x, scenario.knots, scenario.levels)
    se = noise * np.abs(true)
    llc = true + se * rng.standard_normal(x.size)
    # The chain std of 4 chains is itself an estimate (3 degrees of freedom).
    reported = np.sqrt(NUM_CHAINS) * se * np.sqrt(rng.chisquare(NUM_CHAINS - 1, x.size) / 3)
    if not std_known:
        reported = np.full(x.size, np.nan)
    log_loss = np.interp(x, scenario.knots, np.log(scenario.losses))
    loss = np.exp(log_loss) * (1 + 0.01 * rng.standard_normal(x.size))
    # A change at a jump is the first checkpoint after it; at a kink the nearest one.
    changes = [
        int(np.searchsorted(x, at)) if _is_jump(scenario, at) else int(np.argmin(np.abs(x - at)))
        for at, _ in scenario.changes
    ]
    kinds = [kind for _, kind in scenario.changes]
    return SyntheticCurve(steps, llc, reported, loss, changes, kinds)


def _is_jump(scenario: Scenario, at: float) -> bool:
    return any(abs(k - at - _HAIR) < _HAIR / 10 for k in scenario.knots)
