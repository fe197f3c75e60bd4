"""Wall-time overhead of each monitor on a small training run, at its default schedule.

For each configuration (no monitor, each monitor alone, all three) the same training run is
timed ``--repeats`` times, round-robin so that a slow patch of a shared machine hits every
configuration alike; the table reports the median and the overhead relative to the median
of the baseline measured in the same invocation. One thread (``torch.set_num_threads(1)``).

    python benchmarks/overhead.py [--steps 1000] [--repeats 3]
    python benchmarks/overhead.py --executors [--steps 3000 10000] [--repeats 2]


The run: an MLP 32-128-128-10 (22k parameters) on a synthetic 10-class task, batch 128,
Adam, ``--steps`` optimizer steps. Monitors use their defaults: the log-spaced schedule
(8 measurements per decade of steps, so about 25 by step 1000), ``SGLDConfig()`` (4 chains
× 300 SGLD steps, 16 batches) for the LLC, 16 probes plus the Fisher on one batch for the
Hessian. The overhead therefore depends on the length of the run: the schedule measures
O(log steps) times, so the percentage falls as training gets longer.

``--executors`` compares where the LLC estimates run instead: no monitor, ``LLCMonitor()``
inline, and ``LLCMonitor(executor="process")`` (one background worker process with one
thread, ``max_pending`` estimates in flight). It reports the *training loop* (from the call
to ``fit`` until the last training batch ended) separately from the whole ``fit`` (which, in
the background case, ends by waiting for the estimates still running), and checks that every
scheduled estimate was logged by the time ``fit`` returned. Best of ``--repeats`` runs,
round-robin.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slt_callbacks.callbacks import HessianTraceMonitor, LLCMonitor, WeightNormMonitor


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def dataset(num_samples: int = 8192) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_samples, 32, generator=g)
    teacher = torch.randn(32, 10, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "none (baseline)": lambda: [],
    "LLCMonitor": lambda: [LLCMonitor()],
    "HessianTraceMonitor": lambda: [HessianTraceMonitor()],
    "WeightNormMonitor": lambda: [WeightNormMonitor()],
    "all three": lambda: [LLCMonitor(), HessianTraceMonitor(), WeightNormMonitor()],
}


def time_fit(
    callbacks: list[pl.Callback], steps: int, data: TensorDataset
) -> tuple[float, float, int]:
    """Wall and CPU seconds spent in ``trainer.fit``, and the number of measurements taken."""
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            max_steps=steps,
            callbacks=callbacks,
            logger=pl.loggers.CSVLogger(logs),
            accelerator="cpu",
            log_every_n_steps=50,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
        )
        loader = DataLoader(data, batch_size=128, shuffle=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # health warnings of estimates mid-training
            trainer.fit(Classifier(), loader)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    measured = max((len(cb.history) for cb in callbacks if hasattr(cb, "history")), default=0)
    return seconds, cpu, measured


class LoopClock(pl.Callback):
    """When the last training batch ended (after every other callback's batch-end work)."""

    def __init__(self) -> None:
        self.last_batch_end = float("nan")
        self.last_batch_end_cpu = float("nan")

    def on_train_batch_end(self, *args: object) -> None:
        self.last_batch_end = time.perf_counter()
        self.last_batch_end_cpu = time.process_time()


EXECUTOR_CONFIGS: dict[str, Callable[[int], list[pl.Callback]]] = {
    "none (baseline)": lambda pending: [],
    "LLCMonitor() inline": lambda pending: [LLCMonitor()],
    "LLCMonitor(executor='process')": lambda pending: [
        LLCMonitor(executor="process", max_pending=pending)
    ],
}


class HookClock:
    """Wall time the training thread spends in a monitor's hooks (what training pays), split
    into the steps where an estimate was due and the others."""

    def __init__(self, callback: pl.Callback) -> None:
        self.callback = callback
        self.start = 0.0  # on_train_start: data, checks, the worker's start (once per fit)
        self.due = 0.0  # seconds in hooks at steps where an estimate was due
        self.other = 0.0
        self.num_due = self.num_other = 0
        start = callback.on_train_start

        def timed_start(*args: object) -> None:
            begin = time.perf_counter()
            start(*args)
            self.start += time.perf_counter() - begin

        callback.on_train_start = timed_start  # type: ignore[method-assign]
        callback.on_train_batch_end = self._timed(callback.on_train_batch_end)  # type: ignore[method-assign]

    @property
    def seconds(self) -> float:
        return self.start + self.due + self.other

    def _timed(self, hook: Callable[..., None]) -> Callable[..., None]:
        def timed(trainer: pl.Trainer, *args: object, **kwargs: object) -> None:
            before = self.callback._next_due
            start = time.perf_counter()
            hook(trainer, *args, **kwargs)
            elapsed = time.perf_counter() - start
            if self.callback._next_due != before:
                self.due, self.num_due = self.due + elapsed, self.num_due + 1
            else:
                self.other, self.num_other = self.other + elapsed, self.num_other + 1

        return timed


def time_loop(
    callbacks: list[pl.Callback], steps: int, data: TensorDataset
) -> dict[str, float]:
    """Seconds of the training loop and of the whole fit, the training process's CPU
    seconds during the loop (all its threads), the seconds spent in the monitor's hooks,
    estimates logged and scheduled."""
    clock = LoopClock()
    hooks = [HookClock(cb) for cb in callbacks if isinstance(cb, LLCMonitor)]
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            max_steps=steps, callbacks=[*callbacks, clock], logger=pl.loggers.CSVLogger(logs),
            accelerator="cpu", log_every_n_steps=50, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False,
        )
        loader = DataLoader(data, batch_size=128, shuffle=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Classifier(), loader)
        total = time.perf_counter() - start
    monitors = [cb for cb in callbacks if isinstance(cb, LLCMonitor)]
    logged = len(monitors[0].history) if monitors else 0
    scheduled = sum(monitors[0].schedule.should_run(s) for s in range(steps + 1)) if monitors else 0
    return {
        "loop": clock.last_batch_end - start, "fit": total,
        "cpu": clock.last_batch_end_cpu - cpu_start,
        "hooks": sum(h.seconds for h in hooks), "logged": logged, "scheduled": scheduled,
        "start_s": hooks[0].start if hooks else 0.0,
        "per_due_ms": 1000 * hooks[0].due / max(hooks[0].num_due, 1) if hooks else 0.0,
        "per_other_us": 1e6 * hooks[0].other / max(hooks[0].num_other, 1) if hooks else 0.0,
    }


def compare_executors(step_counts: list[int], repeats: int, max_pending: int) -> str:
    data = dataset()
    time_loop([], 50, data)  # warm-up
    load_start = os.getloadavg()
    lines = [
        f"Where the estimates run: training-loop time (best of {repeats}, round-robin), 1 "
        f"training thread, worker process with 1 thread, max_pending={max_pending}, "
        f"{torch.__version__}, CPU ({os.cpu_count()} cores, shared with other jobs)\n",
        "| steps | monitor | estimates logged / scheduled | training loop (s) | "
        "× no monitor | whole fit, incl. the wait at the end (s) | × no monitor | "
        "training process CPU in the loop (s) | × no monitor (CPU) | "
        "in the monitor's hooks (ms per estimate) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rounds: list[str] = []
    for steps in step_counts:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in EXECUTOR_CONFIGS}
        for _ in range(repeats):
            for name, make in EXECUTOR_CONFIGS.items():
                run = time_loop(make(max_pending), steps, data)
                runs[name].append(run)
                print(f"  {steps} steps, {name}: loop {run['loop']:.2f} s, fit {run['fit']:.2f} s, "
                      f"cpu {run['cpu']:.2f} s, hooks {run['hooks']:.2f} s, "
                      f"{run['logged']}/{run['scheduled']} estimates, "
                      f"train start {run['start_s']:.2f} s, "
                      f"{run['per_due_ms']:.1f} ms per due step, "
                      f"{run['per_other_us']:.0f} µs per other step, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        base = min(runs["none (baseline)"], key=lambda r: r["loop"])
        base_fit = min(r["fit"] for r in runs["none (baseline)"])
        base_cpu = min(r["cpu"] for r in runs["none (baseline)"])
        for name, done in runs.items():
            best = min(done, key=lambda r: r["loop"])  # the run least disturbed by others
            fit = min(r["fit"] for r in done)
            baseline = name.startswith("none")
            estimates = "–" if baseline else f"{best['logged']} / {best['scheduled']}"
            per = "–" if baseline else f"{1000 * best['hooks'] / max(best['scheduled'], 1):.1f}"
            lines.append(
                f"| {steps} | {name} | {estimates} | {best['loop']:.2f} | "
                f"{best['loop'] / base['loop']:.2f}× | {fit:.2f} | {fit / base_fit:.2f}× | "
                f"{best['cpu']:.2f} | {best['cpu'] / base_cpu:.2f}× | {per} |"
            )
        # Each round's monitor runs against that round's baseline, a minute apart at most: on
        # a shared machine the load drifts less within a round than across the whole run.
        for name, done in runs.items():
            if name.startswith("none"):
                continue
            paired = [r["loop"] / b["loop"] for r, b in zip(done, runs["none (baseline)"],
                                                             strict=True)]  # fmt: skip
            rounds.append(f"{steps} steps, {name}: " + ", ".join(f"{x:.2f}×" for x in paired))
    load_end = os.getloadavg()
    lines.append("\nTraining loop ÷ the same round's baseline, round by round:\n\n"
                 + "\n".join(f"- {line}" for line in rounds))
    lines.append(
        f"\nLoad average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in load_start)}; "
        f"at the end: {', '.join(f'{x:.2f}' for x in load_end)}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--executors", action="store_true",
                        help="compare inline and background LLC estimates instead")
    parser.add_argument("--max-pending", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.executors:
        table = compare_executors(args.steps or [3000, 10000], args.repeats or 2,
                                  args.max_pending)
        print("\n" + table)
        return
    args.steps = (args.steps or [1000])[0]
    args.repeats = args.repeats or 3
    data = dataset()

    time_fit([], 50, data)  # warm-up: first-call costs (imports, allocator) are nobody's
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu_times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    counts: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, make in CONFIGS.items():
            seconds, cpu, counts[name] = time_fit(make(), args.steps, data)
            times[name].append(seconds)
            cpu_times[name].append(cpu)

    base = statistics.median(times["none (baseline)"])
    cpu_base = statistics.median(cpu_times["none (baseline)"])
    print(f"Overhead on {args.steps} training steps (median of {args.repeats} runs, "
          f"1 thread, {torch.__version__}, CPU)\n")  # fmt: skip
    print("| monitor | measurements | wall time (s) | overhead (wall) | per measurement (ms) "
          "| overhead (CPU time) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        extra = median - base
        cpu_extra = statistics.median(cpu_times[name]) - cpu_base
        per = f"{1000 * extra / counts[name]:.0f}" if counts[name] else "–"
        baseline = name.startswith("none")
        overhead = "–" if baseline else f"{100 * extra / base:+.1f}%"
        cpu_overhead = "–" if baseline else f"{100 * cpu_extra / cpu_base:+.1f}%"
        print(f"| {name} | {counts[name]} | {median:.2f} | {overhead} | {per} | {cpu_overhead} |")
    print("\nCPU time (this process only) is the check against other load on a shared machine.")


if __name__ == "__main__":
    main()
