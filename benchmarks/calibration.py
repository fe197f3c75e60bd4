"""Automatic calibration of ε and γ against closed-form learning coefficients.

For deep linear networks of depth 2, 3 and 4 at minimal-rank teachers (every layer of rank
exactly r, :func:`slt_callbacks.core.theory.minimal_rank_deep_linear_teacher`; true λ from
Aoyagi's formula, :func:`~slt_callbacks.core.theory.deep_linear_lambda`), and the regular
3 → 2 linear regression: float64, n = 10,000 noise-free samples, batch 500, nβ = n/log n.

Each case runs :func:`slt_callbacks.core.calibrate.calibrate` at its defaults (γ ladder,
curvature-centred ε grid, 8 chains × (500 + 500) steps per point; then the chain-length
phase: pilot chains whose length doubles until stationary, ε halved until halving moves λ̂
by less than the full estimate's standard error, at most 64,000 steps per chain), then a
full estimate with the recommended config (4 chains, the calibrated ε, γ, burn-in and
draws), and the same estimate at half the chosen ε and otherwise the same config: the
stability check of issue #9 (halving ε should move λ̂ by less than its standard error).
Prints a markdown table.

Run from the repository root (one thread)::

    python benchmarks/calibration.py                 # every case, seed 0
    python benchmarks/calibration.py --tables        # also every calibration table
    python benchmarks/calibration.py --cases depth3 --seed 1
    python benchmarks/calibration.py --cases depth3 --repeats 5   # the shift over 5 seeds
    python benchmarks/calibration.py --cases depth3 --given 1.35e-5,1,16000,16000 --repeats 5

One pair of runs is one draw of the shift: had its two runs independent chains, they would
differ by more than one standard error about half the time (|N(0, 2 se²)| > se) with no
dependence on ε at all. The shared seed correlates them, by how much depends on the case.
``--repeats K`` runs the pair (ε, ε/2) with K seeds and prints the mean shift over seeds
with its standard error (the systematic dependence on ε that the stability target is about)
and the spread of the shifts against that of independent runs. ``--given``
skips the calibration and takes ε, γ, burn-in and draws as given (a config an earlier run
chose).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.analysis.noise import standard_error
from slt_callbacks.core.calibrate import calibrate
from slt_callbacks.core.theory import (
    deep_linear_lambda,
    gaussian_nll,
    minimal_rank_deep_linear_teacher,
    regression_batches,
)

N = 10_000
BATCH = 500


def linear_regression() -> nn.Module:
    g = torch.Generator().manual_seed(1)
    teacher = nn.Linear(3, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
    return teacher


def dln(widths: tuple[int, ...], r: int):
    return (f"DLN {'-'.join(map(str, widths))}, rank {r}",
            lambda: minimal_rank_deep_linear_teacher(widths, r, seed=0),
            widths[0], deep_linear_lambda(widths, r))


CASES = {
    "linear": ("linear regression 3→2 (regular)", linear_regression, 3, 3.0),
    "depth2": dln((4, 3, 5), 1),
    "depth3": dln((4, 3, 3, 4), 1),
    "depth4": dln((3, 3, 3, 3, 3), 1),
    "depth3_rank2": dln((4, 3, 3, 4), 2),
    "depth3_wide": dln((5, 3, 4, 3), 1),
    "depth4_wide": dln((4, 3, 4, 3, 4), 1),
    "rrr": dln((3, 2, 4), 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the calibration and of the full estimates")
    parser.add_argument("--max-steps", type=int, default=64_000,
                        help="calibrate(max_steps=...): longest pilot chain")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case keys")
    parser.add_argument("--tables", action="store_true", help="print each calibration table")
    parser.add_argument("--repeats", type=int, default=1,
                        help="seeds of the (ε, ε/2) pair, from --seed on (see the docstring)")
    parser.add_argument("--given", type=_given, default=None, metavar="EPS,GAMMA,BURNIN,DRAWS",
                        help="skip the calibration and use this config")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"Expected argument `--repeats` to be at least 1 but got {args.repeats}.")
    torch.set_num_threads(1)

    n_beta = N / math.log(N)
    base = SGLDConfig(n_beta=n_beta, num_chains=4)
    print(f"torch {torch.__version__}, 1 thread, float64; n = {N}, batch {BATCH}, "
          f"nβ = n/log n = {n_beta:.1f}.")
    if args.given is not None:
        print("calibrate() skipped: the config is given (ε, γ, burn-in, draws = "
              f"{args.given}); full estimates: 4 chains at that config, seed {args.seed}.\n")
    else:
        print("calibrate(): defaults (γ ladder 1, 10, 100, ... smallest first; ε grid centred on "
              "ε·nβ·λ_max = 0.1; 8 chains x (500 burn-in + 500 draws) per grid point; then 8 "
              f"pilot chains, length doubled from 2000 up to max_steps = {args.max_steps}, ε "
              f"halved at most 3 times; common random numbers), seed {args.seed}; full "
              "estimates: 4 chains at the calibrated ε, γ, burn-in and draws, the same seed.\n")

    print("| case | true λ | chosen ε | chosen γ | burn-in + draws | verified | λ̂ ± se "
          "| error | λ̂ at ε/2 ± se | shift / se | status | calibration s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    tables, repeats = [], []
    for key in args.cases.split(","):
        name, build, m, truth = CASES[key]
        model = build()
        data = regression_batches(model, m, num_samples=N, batch_size=BATCH)
        if args.given is not None:
            eps, gamma, burnin, draws = args.given
            config = SGLDConfig(**{**base.to_dict(), "step_size": eps, "localization": gamma,
                                   "num_burnin_steps": burnin, "num_draws": draws})
            cal = None
        else:
            cal = calibrate(model, gaussian_nll, data, base=base, seed=args.seed,
                            max_steps=args.max_steps, on_failure="ignore")
            tables.append(f"### {name}, seed {args.seed}\n\n{cal.to_markdown()}\n")
            config = cal.config
        if config is None:
            print(f"| {name}, seed {args.seed} | {truth:g} | none | – | – | no | – | – | – "
                  f"| – | – | {cal.seconds:.0f} |", flush=True)
            continue
        pairs = [_pair(model, data, config, args.seed + i) for i in range(args.repeats)]
        print(_row(f"{name}, seed {args.seed}", truth, config, cal, *pairs[0]), flush=True)
        if args.repeats > 1:
            repeats.append(_repeat_row(name, truth, config, pairs, args.seed))
    print("\nse = chain std / √chains. error = λ̂/λ − 1. shift / se = |λ̂(ε) − λ̂(ε/2)| / se(ε), "
          "ε/2 with the same burn-in and draws: below 1 is the stability target. 'verified': "
          "the calibration's own halving test passed with stationary chains (see "
          "slt_callbacks.core.calibrate).")
    if repeats:
        print(f"\nThe pair (ε, ε/2) over {args.repeats} seeds from {args.seed} on, the config "
              "above (ε/2 with the same burn-in and draws and the same seed as its ε run):\n")
        print("| case | ε | burn-in + draws | seeds | mean λ̂ | error | mean se | shift "
              "λ̂(ε) − λ̂(ε/2), mean ± se | systematic shift / se | spread of shifts / (√2 se) "
              "| runs within 1 se |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(repeats))
        print("\nsystematic shift / se = |mean shift| / mean se: below 1 is the stability "
              "target, measured without the scatter of one pair. spread of shifts / (√2 se): "
              "1 when the two runs of a pair are independent, below 1 when the shared seed "
              "correlates them.")
    if args.tables:
        print("\n" + "\n".join(tables))


def _given(text: str) -> tuple[float, float, int, int]:
    try:
        eps, gamma, burnin, draws = text.split(",")
        return float(eps), float(gamma), int(burnin), int(draws)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"Expected argument `--given` to be EPS,GAMMA,BURNIN,DRAWS (e.g. "
            f"1.35e-5,1,16000,16000) but got {text!r}."
        ) from None


def _pair(model, data, config: SGLDConfig, seed: int):
    """Full estimates at ε and at ε/2 (the same burn-in, draws and seed)."""
    full = estimate_llc(model, gaussian_nll, data, config=config, seed=seed,
                        on_failure="ignore")
    half_config = SGLDConfig(**{**config.to_dict(), "step_size": config.step_size / 2})
    half = estimate_llc(model, gaussian_nll, data, config=half_config, seed=seed,
                        on_failure="ignore")
    return full, half


def _se(result) -> float:
    """The package's one noise model (chain std / √chains)."""
    return standard_error(result.llc_std, result.config.num_chains)


def _row(name: str, truth: float, config: SGLDConfig, cal, full, half) -> str:
    se, half_se = _se(full), _se(half)
    shift = abs(full.llc_mean - half.llc_mean) / se
    verified = "given" if cal is None else ("yes" if cal.verified else "no")
    seconds = "–" if cal is None else f"{cal.seconds:.0f}"
    return (f"| {name} | {truth:g} | {config.step_size:.3g} | {config.localization:g} | "
            f"{config.num_burnin_steps} + {config.num_draws} | "
            f"{verified} | {full.llc_mean:.3f} ± {se:.3f} | "
            f"{full.llc_mean / truth - 1:+.1%} | {half.llc_mean:.3f} ± {half_se:.3f} | "
            f"{shift:.1f} | {full.status.value} | {seconds} |")


def _repeat_row(name: str, truth: float, config: SGLDConfig, pairs, seed: int) -> str:
    shifts = np.array([full.llc_mean - half.llc_mean for full, half in pairs])
    ses = np.array([_se(full) for full, _ in pairs])
    llc = float(np.mean([full.llc_mean for full, _ in pairs]))
    k = len(pairs)
    mean, spread = float(shifts.mean()), float(shifts.std(ddof=1))
    within = int((np.abs(shifts) < ses).sum())
    return (f"| {name} | {config.step_size:.3g} | {config.num_burnin_steps} + "
            f"{config.num_draws} | {seed}–{seed + k - 1} | {llc:.3f} | {llc / truth - 1:+.1%} "
            f"| {ses.mean():.3f} | {mean:+.3f} ± {spread / math.sqrt(k):.3f} | "
            f"{abs(mean) / ses.mean():.2f} | {spread / (math.sqrt(2) * ses.mean()):.2f} | "
            f"{within} of {k} |")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")
