"""Per-chain-step cost of this checkout against another one, measured in one run.

Each measurement is a fresh subprocess that imports ``slt_callbacks`` from one checkout
(``PYTHONPATH`` and ``sys.path`` set to it; the measuring body is this file and the helpers of
``benchmarks/speed.py`` in *this* checkout, so both sides run the same code around the call):
it builds the problem, measures the floor (a plain forward+backward on the same batches,
:func:`speed.floor_ms`), runs one warm-up and one timed :func:`speed.ours`, and measures the
floor again. The clock is the process's CPU time with one torch thread (:func:`speed.clock`).
The two checkouts alternate, old first in even rounds and new first in odd ones, ``--repeats``
rounds per row; each side's ms/step and floor are the best of its rounds. ``spread`` is
(worst - best) / best of a side's ms/step over its rounds: a new/old ratio within the
larger spread of the two is noise.

Rows: the MLP of ``speed.py`` (784-64-64-10, batch 256) with 1, 4 and 16 chains, and the
HF GPT-2 transformer of issue #10 with 4 chains, each with backends auto, vmap and loop.

With ``--rule``, also the table behind ``backend="auto"``'s CPU rule
(:func:`slt_callbacks.core.backends.auto_backend`): vmap against loop in this checkout on
models from 1e5 to 3e9 FLOPs per forward (as counted by
:func:`~slt_callbacks.core.backends.forward_flops`), 4 and 16 chains, same clock, best of
``--repeats`` subprocesses each.

Usage: ``python benchmarks/regression.py --base /work/wt/base [--repeats 3] [--only mlp]
[--rule]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
MLP_STEPS, TRANSFORMER_STEPS = 200, 4
BACKENDS = ("auto", "vmap", "loop")


def rows(only: str | None) -> list[tuple[str, int, str]]:
    """``(problem, chains, backend)`` of every row, filtered by ``--only``."""
    table = [("mlp", c, b) for c in (1, 4, 16) for b in BACKENDS]
    table += [("transformer", 4, b) for b in BACKENDS]
    return [r for r in table if not only or only in f"{r[0]}-{r[1]}-{r[2]}"]


def measure(tree: str, problem: str, chains: int, backend: str) -> dict:
    """The subprocess body: one timed estimate from the checkout at ``tree``."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != TREE]
    sys.path.insert(0, tree)
    import speed  # this checkout's helpers; it inserts this tree into sys.path again

    sys.path[:] = [tree] + [p for p in sys.path if os.path.abspath(p or ".") != TREE]
    import torch

    import slt_callbacks

    where = os.path.abspath(slt_callbacks.__file__)
    if not where.startswith(os.path.abspath(tree) + os.sep):
        raise RuntimeError(f"Expected slt_callbacks from {tree!r} but got {where!r}.")
    torch.set_num_threads(1)
    speed.CLOCK = time.process_time
    if problem == "transformer":
        import warnings

        warnings.filterwarnings("ignore")
        model, batches = speed.make_transformer("cpu")
        steps, reps = TRANSFORMER_STEPS, 3
    else:
        model, batches = speed.make_problem("cpu")
        steps, reps = MLP_STEPS, 200
    floor = speed.floor_ms(model, batches, "cpu", reps)
    seconds = speed.ours(model, batches, chains, steps, "cpu", backend, None)
    floor = min(floor, speed.floor_ms(model, batches, "cpu", reps))
    return {"step_ms": seconds / (chains * steps) * 1e3, "floor_ms": floor,
            "ran": speed.ours.last_backend, "llc": speed.ours.last_llc}


RULE_MODELS = ("tinymlp", "smallcnn", "tinygpt", "mlp", "cnn", "midgpt", "transformer")


def rule_problem(name: str):
    """``(model, batches, loss_fn)`` of one model of the ``--rule`` table. None of them is
    an ``nn.Sequential`` of ``nn.Linear``, so auto never runs the fast path on them."""
    import speed
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Tanh3(nn.Module):  # 10-32-32-1 regression
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(10, 32), nn.Linear(32, 32), nn.Linear(32, 1)

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name in ("transformer", "mlp"):
        model, batches = (speed.make_transformer if name == "transformer"
                          else speed.make_problem)("cpu")
        if name == "mlp":  # the anchor MLP as a Module that is not an nn.Sequential
            model = nn.Sequential(nn.Sequential(*model))
        return model, batches, speed.loss_fn
    if name == "tinymlp":
        batches = [(torch.randn(64, 10, generator=g), torch.randn(64, 1, generator=g))
                   for _ in range(8)]
        return Tanh3(), batches, lambda m, b: F.mse_loss(m(b[0]), b[1])
    if name in ("smallcnn", "cnn"):
        c, side, n = (4, 12, 32) if name == "smallcnn" else (8, 28, 64)
        model = nn.Sequential(nn.Conv2d(1, c, 3), nn.ReLU(), nn.Conv2d(c, 2 * c, 3), nn.ReLU(),
                              nn.Flatten(), nn.Linear(2 * c * (side - 4) ** 2, 10))
        batches = [(torch.randn(n, 1, side, side, generator=g),
                    torch.randint(0, 10, (n,), generator=g)) for _ in range(8)]
        return model, batches, speed.loss_fn
    import transformers

    d, vocab, tokens = (64, 100, 16) if name == "tinygpt" else (128, 1000, 32)
    cfg = transformers.GPT2Config(n_layer=1, n_head=4, n_embd=d, vocab_size=vocab,
                                  n_positions=tokens, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    batches = [torch.randint(0, vocab, (8, tokens), generator=g) for _ in range(4)]
    return transformers.GPT2LMHeadModel(cfg), batches, speed.loss_fn


def measure_rule(name: str, chains: int, backend: str) -> dict:
    """The subprocess body of the ``--rule`` table (this checkout only)."""
    import warnings

    import speed
    import torch

    from slt_callbacks.core.llc import _prepare

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    speed.CLOCK = time.process_time
    model, batches, loss = rule_problem(name)
    speed.loss_fn = loss  # speed.ours and speed.floor_ms call the module's loss_fn
    from slt_callbacks import SGLDConfig
    from slt_callbacks.core.backends import forward_flops

    flops = forward_flops(_prepare(model, loss, batches, SGLDConfig(), None, 0, None).problem)
    steps = TRANSFORMER_STEPS if name == "transformer" else 50
    reps = 3 if name == "transformer" else 50
    floor = speed.floor_ms(model, batches, "cpu", reps)
    seconds = speed.ours(model, batches, chains, steps, "cpu", backend, None)
    return {"step_ms": seconds / (chains * steps) * 1e3, "floor_ms": floor, "flops": flops,
            "ran": speed.ours.last_backend, "llc": speed.ours.last_llc}


def rule_table(repeats: int) -> None:
    print("\n## auto's CPU rule: vmap against loop in this checkout (best of "
          f"{repeats} subprocesses each, alternating)\n")
    print("| model | FLOPs per forward | chains | vmap ms/step | loop ms/step | vmap/loop "
          "| spread vmap / loop | auto ran |")
    print("|---|---|---|---|---|---|---|---|")
    for name in RULE_MODELS:
        for chains in (4,) if name == "transformer" else (4, 16):
            runs: dict[str, list[dict]] = {"vmap": [], "loop": [], "auto": []}
            for r in range(repeats):
                for backend in ("vmap", "loop") if r % 2 == 0 else ("loop", "vmap"):
                    runs[backend].append(spawn(TREE, (name, chains, backend), rule=True))
            auto = spawn(TREE, (name, chains, "auto"), rule=True)
            v, lp = summary(runs["vmap"]), summary(runs["loop"])
            print(f"| {name} | {auto['flops']:.1e} | {chains} | {v['ms']:.3f} | {lp['ms']:.3f} "
                  f"| {v['ms'] / lp['ms']:.2f} | {v['spread']:.0%} / {lp['spread']:.0%} "
                  f"| {auto['ran']} |", flush=True)


def spawn(tree: str, row: tuple[str, int, str], rule: bool = False) -> dict:
    """One measurement in a fresh process importing ``slt_callbacks`` from ``tree``."""
    problem, chains, backend = row
    cmd = [sys.executable, __file__, "--rule-one" if rule else "--one", tree, problem,
           str(chains), backend]
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{row} from {tree} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    """Best ms/step and floor over the rounds, the ms/step spread, the backend that ran."""
    step = [r["step_ms"] for r in runs]
    best = min(step)
    floor = min(r["floor_ms"] for r in runs)
    return {"ms": best, "floor_ratio": best / floor, "spread": (max(step) - best) / best,
            "ran": "/".join(sorted({r["ran"] for r in runs})), "llc": runs[0]["llc"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="the other checkout (the old code)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per row (best of)")
    p.add_argument("--only", help="only rows whose 'problem-chains-backend' contains this")
    p.add_argument("--rule", action="store_true", help="also the table behind auto's rule")
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--rule-one", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rule_one:
        _, name, chains, backend = args.rule_one
        print(json.dumps(measure_rule(name, int(chains), backend)))
        return
    if args.one:
        tree, problem, chains, backend = args.one
        print(json.dumps(measure(tree, problem, int(chains), backend)))
        return
    if not args.base:
        p.error("Expected argument `--base` (a checkout path) but got none.")
    base = os.path.abspath(args.base)
    print(f"(old: {base}; new: {TREE}; clock: process CPU time, 1 thread; best of "
          f"{args.repeats}, old and new alternating; load average at start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    print(f"MLP 784-64-64-10, batch 256, {MLP_STEPS} steps; transformer HF GPT-2 2x8 heads, "
          f"d_model 256, vocab 5000, batch 8x64, {TRANSFORMER_STEPS} steps\n")
    print("| problem | chains | backend | ran old / new | old ms/step | new ms/step | new/old "
          "| old spread | new spread | old ratio to floor | new ratio to floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows(args.only):
        runs: dict[str, list[dict]] = {base: [], TREE: []}
        for r in range(args.repeats):
            for tree in (base, TREE) if r % 2 == 0 else (TREE, base):
                runs[tree].append(spawn(tree, row))
        old, new = summary(runs[base]), summary(runs[TREE])
        print(f"| {row[0]} | {row[1]} | {row[2]} | {old['ran']} / {new['ran']} "
              f"| {old['ms']:.3f} | {new['ms']:.3f} | {new['ms'] / old['ms']:.2f} "
              f"| {old['spread']:.0%} | {new['spread']:.0%} | {old['floor_ratio']:.2f}x "
              f"| {new['floor_ratio']:.2f}x |", flush=True)
    if args.rule:
        rule_table(args.repeats)
    print(f"\n(load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
