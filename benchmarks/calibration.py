"""Automatic step-size calibration against closed-form learning coefficients.

For each linear-network case of SLT_PRIMER §5 (float64, n = 10,000 noise-free samples,
batch 500, nβ = n/log n, γ = 1): run :func:`slt_callbacks.core.calibrate.calibrate` with its
default grid and chain lengths, then a full-length estimate with the recommended config, and
the same estimate with the hand-tuned ε = 1e-4 of the primer. Prints a markdown table.

Run from the repository root (one thread, a minute or two on a CPU core)::

    python benchmarks/calibration.py            # --draws 10000 --seed 0
    python benchmarks/calibration.py --tables   # also every calibration table
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.core.calibrate import calibrate
from slt_callbacks.core.theory import (
    gaussian_nll,
    minimal_rank_teacher,
    reduced_rank_regression_lambda,
    regression_batches,
)

N = 10_000
BATCH = 500
HAND_TUNED_STEP = 1e-4


mse_half = gaussian_nll


def regression_data(teacher: nn.Module, m: int, *, seed: int = 0):
    return regression_batches(teacher, m, num_samples=N, batch_size=BATCH, seed=seed)


def linear_regression() -> nn.Module:
    g = torch.Generator().manual_seed(1)
    teacher = nn.Linear(3, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
    return teacher


CASES = [
    ("linear regression 3→2", linear_regression, 3, 3.0),
    ("RRR 2-2-2, rank 0, origin", lambda: minimal_rank_teacher(2, 2, 2, 0), 2,
     reduced_rank_regression_lambda(2, 2, 2, 0)),
    ("RRR 3-2-4, rank 1, minimal-rank teacher", lambda: minimal_rank_teacher(3, 2, 4, 1, seed=3),
     3, reduced_rank_regression_lambda(3, 2, 4, 1)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10_000, help="draws of the full estimate")
    parser.add_argument("--burnin", type=int, default=1000, help="burn-in of the full estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tables", action="store_true", help="print each calibration table")
    args = parser.parse_args()
    torch.set_num_threads(1)

    n_beta = N / math.log(N)
    base = SGLDConfig(n_beta=n_beta, localization=1.0, num_chains=4, num_draws=args.draws,
                      num_burnin_steps=args.burnin)
    print(f"torch {torch.__version__}, 1 thread, float64; n = {N}, batch {BATCH}, "
          f"nβ = n/log n = {n_beta:.1f}, γ = 1.")
    print("calibrate(): default grid and lengths (8 chains x (500 burn-in + 500 draws) per "
          "grid point, common random numbers), seed "
          f"{args.seed}; full estimates: 4 chains x ({args.burnin} burn-in + {args.draws} "
          "draws), the same seed.\n")

    rows = []
    for name, build, m, truth in CASES:
        model = build()
        data = regression_data(model, m)
        cal = calibrate(model, mse_half, data, base=base, seed=args.seed, on_failure="ignore")
        if args.tables:
            print(f"### {name}\n\n{cal.to_markdown()}\n")
        auto = (estimate_llc(model, mse_half, data, config=cal.config, seed=args.seed,
                             on_failure="ignore") if cal.config is not None else None)
        hand_config = SGLDConfig(**{**base.to_dict(), "step_size": HAND_TUNED_STEP})
        hand = estimate_llc(model, mse_half, data, config=hand_config, seed=args.seed,
                            on_failure="ignore")
        rows.append((name, truth, cal, auto, hand))

    print("| case | true λ | chosen ε | λ̂ (auto) | rel. error | hand-tuned ε=1e-4 λ̂ "
          "| rel. error | calibration s | verified |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, truth, cal, auto, hand in rows:
        chosen = "none" if cal.config is None else f"{cal.config.step_size:.2g}"
        auto_cells = ("–", "–") if auto is None else (
            f"{auto.llc_mean:.3f} ± {auto.llc_std:.3f}", f"{auto.llc_mean / truth - 1:+.1%}")
        print(f"| {name} | {truth:g} | {chosen} | {auto_cells[0]} | {auto_cells[1]} | "
              f"{hand.llc_mean:.3f} ± {hand.llc_std:.3f} | {hand.llc_mean / truth - 1:+.1%} | "
              f"{cal.seconds:.1f} | {'yes' if cal.verified else 'no'} |")
    print("\nλ̂ ± std across chains. Relative error = λ̂/λ − 1. 'verified': the chosen ε lies "
          "in a flat region of λ̂(ε) (see slt_callbacks.core.calibrate).")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")
