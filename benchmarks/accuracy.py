"""λ̂ against closed-form learning coefficients, printed as a table.

The primer's reference settings (SLT_PRIMER §5): float64, n = 10,000 noise-free samples,
batch 500, nβ = n/log n ≈ 1086, γ = 1, 4 chains, 1,000 burn-in steps, ε = 1e-4, and
``--draws`` draws (default 10,000). The normal crossing uses n = 1,000 and is compared with
both its asymptotic λ and the exact value at this finite nβ (quadrature).

    python benchmarks/accuracy.py [--draws 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from slt_callbacks import SGLDConfig, estimate_llc
from slt_callbacks.core.theory import (
    NormalCrossing,
    finite_temperature_llc_2d,
    gaussian_nll,
    minimal_rank_teacher,
    normal_crossing_lambda,
    reduced_rank_regression_lambda,
    regression_batches,
)

N = 10_000


def cases():
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(3, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
    generic = minimal_rank_teacher(2, 2, 2, 0)
    with torch.no_grad():
        generic.a.weight.copy_(2 * torch.eye(2, dtype=torch.float64))
    yield "linear regression 3→2 (regular, d = 6)", linear, 3, 3.0, 1e-4
    yield (
        "RRR 2-2-2, rank 0, at the origin",
        minimal_rank_teacher(2, 2, 2, 0),
        2,
        reduced_rank_regression_lambda(2, 2, 2, 0),
        1e-4,
    )
    yield (
        "RRR 3-2-4, rank 1, minimal-rank teacher",
        minimal_rank_teacher(3, 2, 4, 1, seed=3),
        3,
        reduced_rank_regression_lambda(3, 2, 4, 1),
        1e-4,
    )
    yield "RRR 2-2-2 at A = 2I, B = 0 (generic true point)", generic, 2, 2.0, 5e-5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, float64, 1 thread; 4 chains x (1000 burn-in + "
        f"{args.draws} draws), seed {args.seed}\n"
    )
    print("| case | true λ | ε | λ̂ ± std (chains) | rel. error | status | acceptance | s |")
    print("|---|---|---|---|---|---|---|---|")
    n_beta = N / math.log(N)
    for name, model, m, lam, eps in cases():
        data = regression_batches(model, m, num_samples=N, batch_size=500)
        cfg = SGLDConfig(
            step_size=eps,
            n_beta=n_beta,
            localization=1.0,
            num_chains=4,
            num_draws=args.draws,
            num_burnin_steps=1000,
        )
        start = time.perf_counter()
        r = estimate_llc(model, gaussian_nll, data, config=cfg, seed=args.seed, on_failure="ignore")
        print(
            f"| {name} | {lam:g} | {eps:g} | {r.llc_mean:.3f} ± {r.llc_std:.3f} | "
            f"{r.llc_mean / lam - 1:+.1%} | {r.status.value} | {r.acceptance:.3f} | "
            f"{time.perf_counter() - start:.1f} |"
        )
    nb = 1000 / math.log(1000)
    exact = finite_temperature_llc_2d(lambda a, b: a**2 * b**4, n_beta=nb, localization=1.0)
    cfg = SGLDConfig(
        step_size=1e-3,
        n_beta=nb,
        localization=1.0,
        num_chains=8,
        num_draws=args.draws,
        num_burnin_steps=1000,
    )
    start = time.perf_counter()
    r = estimate_llc(
        NormalCrossing(),
        lambda mdl, b: mdl(),
        [torch.zeros(1)],
        config=cfg,
        seed=args.seed,
        on_failure="ignore",
    )
    lam = normal_crossing_lambda([1, 2])
    print(
        f"| normal crossing w1²w2⁴, n = 1000 (8 chains) | {lam:g} (finite nβ: {exact:.4f}) | "
        f"1e-3 | {r.llc_mean:.3f} ± {r.llc_std:.3f} | {r.llc_mean / lam - 1:+.1%} "
        f"({r.llc_mean / exact - 1:+.1%} vs finite nβ) | {r.status.value} | "
        f"{r.acceptance:.3f} | {time.perf_counter() - start:.1f} |"
    )


if __name__ == "__main__":
    main()
