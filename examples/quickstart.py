"""Quickstart: watch a network develop in stages, and get told when each stage starts.

Four callbacks, one line in the Trainer, no change to the model::

    trainer = Trainer(callbacks=[LLCMonitor(config="auto"), StageTransitionMonitor(),
                                 WeightNormMonitor(), HessianTraceMonitor()])

(``config="auto"``: no hand tuning. The monitor estimates with the provisional
``SGLDConfig()`` until its first healthy estimate, then calibrates ε, γ and the chain length
once and keeps that config; :data:`CONFIGS` holds the alternatives for comparison.)

The network is the textbook case of stagewise development: a deep linear network (6-5-6,
60 weights) trained by SGD from a tiny initialisation on a teacher with singular values
10, 3 and 1 (:class:`slt_callbacks.reference.SaddleProblem`). It learns one teacher mode
at a time: the loss drops three times, and between the drops the weights sit near a saddle of
the loss, where λ̂ reads large and negative (status ``not_a_minimum``: not a complexity, but
its jump when a mode is learned *is* the stage transition). After the last drop the network
is at a true minimum whose learning coefficient is known in closed form (16, Aoyagi &
Watanabe 2005), so the final λ̂ can be checked.

Runs on a CPU in one to two minutes, without an account or a network. Metrics go to
``./runs/quickstart`` as CSV (or, with ``--wandb``, to a W&B run in offline mode there; upload it
later with ``wandb sync``). At the end it prints a table (loss drops, stage events, λ̂) and
writes ``runs/quickstart/quickstart.png``: loss, λ̂, weight norm and Hessian trace against
log(step) with the stages marked (:func:`slt_callbacks.plots.plot_run`, which works on any
run's ``metrics.csv``).

    python examples/quickstart.py [--steps 2000] [--wandb] [--seed 0] [--config auto|gamma1|default]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from slt_callbacks import SGLDConfig, StageTransitionMonitor
from slt_callbacks.callbacks import HessianTraceMonitor, LLCMonitor, WeightNormMonitor
from slt_callbacks.core.theory import gaussian_nll
from slt_callbacks.plots import plot_run, read_metrics_csv
from slt_callbacks.reference import SaddleProblem, loss_drop_steps
from slt_callbacks.schedule import Schedule

CONFIGS: dict[str, SGLDConfig | str | None] = {
    # Weak localization, a step small for this curvature, longer chains: at the final minimum
    # λ̂ reads within a few percent of the closed-form value and every saddle shows clearly.
    # The defaults miss here: γ = 100 restrains the chains at a singular point (λ̂ ~25% low
    # at ε = 1e-4) and ε = 1e-3 is coarse for this model (ε·nβ·λ_max ≈ 3 where ≈ 0.1 is
    # safe: λ̂ ~19% high). Each estimate costs 1000 chain-steps, 3.3x the default's 300.
    "gamma1": SGLDConfig(step_size=2e-4, localization=1.0, num_burnin_steps=200, num_draws=800),
    "default": None,  # LLCMonitor's default, SGLDConfig()
    "auto": "auto",  # LLCMonitor(config="auto") calibrates during the run: the demo's default
}


class SaddleNet(pl.LightningModule):
    """The student of a :class:`SaddleProblem`, trained by plain SGD on ½‖y − f(x)‖².

    ``training_step`` returns the minibatch's Gaussian negative log-likelihood (unit
    variance), the loss the closed-form learning coefficient refers to; it is all the monitors
    need (they call it
    as their loss, so it has no side effects besides ``self.log``, which they silence). The
    loss on the whole training set after every step is logged (``dataset_loss``) and kept in
    :attr:`losses`, to locate the drops afterwards.
    """

    def __init__(self, problem: SaddleProblem) -> None:
        super().__init__()
        self.problem = problem
        self.net = problem.model()
        self.data = problem.data()
        self.losses: list[tuple[int, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = gaussian_nll(self.net, batch)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Here, not in training_step: the monitors call training_step as their loss. The loss
        # on the whole training set (L_n) after this step's update, i.e. at the weights the
        # monitors see at `global_step`: a minibatch's loss scatters by ~20% on the last
        # plateau, enough to fake a drop.
        with torch.no_grad():
            x, y = self.data
            full = gaussian_nll(self.net, (x.to(self.device), y.to(self.device)))
        self.log("dataset_loss", full)
        self.losses.append((self.global_step, float(full)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.problem.lr)


def make_logger(out: Path, wandb: bool) -> pl.loggers.Logger:
    if wandb:
        import os

        os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network
        out.mkdir(parents=True, exist_ok=True)
        return pl.loggers.WandbLogger(project="slt-quickstart", save_dir=out, offline=True)
    return pl.loggers.CSVLogger(out.parent, name=out.name)


def run(
    problem: SaddleProblem,
    *,
    steps: int,
    out: str | Path = "runs/quickstart",
    config: SGLDConfig | str | None = None,
    per_decade: int = 16,
    wandb: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train the saddle-to-saddle problem with the four monitors; returns what they saw.

    Returns:
        ``{"model", "trainer", "llc", "stages", "norms", "hessian", "drop_steps",
        "seconds"}``: the monitors (with their ``history`` / ``events``), the true loss-drop
        steps (:func:`~slt_callbacks.reference.loss_drop_steps` on the loss over the whole
        training set) and the wall time of ``fit``.
    """
    out = Path(out)
    # Dense and log-spaced (16 per decade): stages in log(step) are a few checkpoints long,
    # and the detector needs several estimates on each side of a change. The same schedule
    # for every monitor so their rows line up; the last step is where λ̂ can be checked.
    schedule = Schedule(log_per_decade=per_decade, steps=[steps])
    llc = LLCMonitor(config=config, schedule=schedule)
    stages = StageTransitionMonitor(verbose=verbose)
    norms = WeightNormMonitor(schedule=schedule)
    hessian = HessianTraceMonitor(schedule=schedule)
    model = SaddleNet(problem)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[llc, stages, norms, hessian],
        logger=make_logger(out, wandb),
        accelerator="cpu",
        log_every_n_steps=1,  # the loss of every step: the drops are steep
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    x, y = problem.data()
    loader = DataLoader(
        TensorDataset(x, y), batch_size=problem.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(problem.seed + 3),
    )  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():
        # On every plateau the estimate says "w* is not a local minimum" (it is a saddle);
        # that is expected here, and the plateau table and the plot show the statuses instead.
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    loss_steps, losses = zip(*model.losses, strict=True)
    drops = loss_drop_steps(loss_steps, losses, problem.plateau_losses)
    return {
        "model": model, "trainer": trainer, "llc": llc, "stages": stages, "norms": norms,
        "hessian": hessian, "drop_steps": drops, "seconds": seconds,
    }  # fmt: skip


def summary(problem: SaddleProblem, result: dict[str, Any]) -> str:
    """A table of the loss drops, the stage events next to them, and λ̂ around them."""
    history = result["llc"].history
    events = [e for e in result["stages"].events if e.component is None]
    lines = [f"{'drop':>4} {'true step':>9} {'event step':>10} {'kind':<9} "
             f"{'λ̂ before':>10} {'λ̂ after':>10}"]  # fmt: skip
    for k, drop in enumerate(result["drop_steps"]):
        if drop is None:
            lines.append(f"{k + 1:>4} {'(none)':>9}")
            continue
        near = [e for e in events if drop / 1.3 <= e.step <= drop * 1.3]
        event = ", ".join(str(e.step) for e in near) or "-"
        kind = ", ".join(str(getattr(e.kind, "value", e.kind)) for e in near) or "-"
        before = [r for r in history if r["step"] <= drop / 1.3]
        after = [r for r in history if r["step"] >= drop * 1.3]
        lines.append(
            f"{k + 1:>4} {drop:>9} {event:>10} {kind:<9} "
            f"{_fmt(before[-1]['llc'] if before else math.nan):>10} "
            f"{_fmt(after[0]['llc'] if after else math.nan):>10}"
        )
    # λ̂ on each plateau of the loss: away from the drops (a factor 1.3 on either side).
    bounds = [0, *[d for d in result["drop_steps"] if d is not None], math.inf]
    lines.append(f"\n{'plateau':>7} {'steps':>13} {'mean λ̂':>9} {'statuses':<28} {'true λ':>6}")
    for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        rows = [r for r in history if lo * 1.3 <= r["step"] <= hi / 1.3]
        if not rows:
            continue
        # Only after every drop is the network at the minimum the closed form refers to.
        final = hi == math.inf and None not in result["drop_steps"]
        mean = sum(r["llc"] for r in rows) / len(rows)
        statuses = ", ".join(sorted({r["status"] for r in rows}))
        true = f"{problem.true_lambda:g}" if final else "saddle"
        span = f"{rows[0]['step']}-{rows[-1]['step']}"
        lines.append(f"{k:>7} {span:>13} {_fmt(mean):>9} {statuses:<28} {true:>6}"
                     + (f"  ({mean / problem.true_lambda - 1:+.0%})" if final else ""))  # fmt: skip
    events_text = ", ".join(f"{e.step} {getattr(e.kind, 'value', e.kind)}" for e in events)
    lines.append(
        f"\n{len(events)} stage events for {sum(d is not None for d in result['drop_steps'])} "
        f"loss drops{': ' + events_text if events else ''}."
    )
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "nan"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of teacher, data and student")
    parser.add_argument("--out", default="runs/quickstart", help="where the logs go")
    parser.add_argument("--wandb", action="store_true", help="log to W&B (offline mode)")
    parser.add_argument("--widths", default=None,
                        help="the student's widths, e.g. 6,5,6 (default: the SaddleProblem's)")
    parser.add_argument("--singular-values", default=None,
                        help="the teacher's singular values, comma-separated (default: the "
                             "SaddleProblem's)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="auto",
                        help="SGLD hyperparameters: auto (LLCMonitor(config='auto'), no hand "
                             "tuning), gamma1 (weak localization chosen by hand, 2x faster) or "
                             "default (SGLDConfig() throughout, reads the last plateau ~19%% "
                             "high)")
    parser.add_argument("--per-decade", type=int, default=16, help="estimates per decade")
    parser.add_argument("--json", help="also write the λ̂ curve and the loss drops there")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    problem = SaddleProblem(seed=args.seed)
    if args.widths:
        widths = tuple(int(v) for v in args.widths.split(","))
        problem = dataclasses.replace(problem, widths=widths)
    if args.singular_values:
        values = tuple(float(v) for v in args.singular_values.split(","))
        problem = dataclasses.replace(problem, singular_values=values)
    result = run(problem, steps=args.steps, out=args.out, wandb=args.wandb,
                 per_decade=args.per_decade, config=CONFIGS[args.config])
    llc, trainer = result["llc"], result["trainer"]
    print(summary(problem, result))
    print(f"\nnβ = {llc.n_beta:.1f}, {llc.active_config.num_chains} chains × "
          f"{llc.active_config.num_draws} draws; {len(llc.history)} estimates; "
          f"fit took {result['seconds']:.0f} s.")  # fmt: skip
    out = Path(args.out)
    png = out / "quickstart.png"
    if args.wandb:
        print(f"W&B offline run under {out}/wandb (upload it with `wandb sync`).")
        rows = _rows_from_monitors(result)
    else:
        csv = Path(trainer.logger.log_dir) / "metrics.csv"
        print(f"CSV logs: {csv}")
        rows = read_metrics_csv(csv)
    widths = "-".join(map(str, problem.widths))
    values = ", ".join(f"{s:g}" for s in problem.singular_values)
    plot_run(rows, result["stages"].events, png, loss_key="dataset_loss",
             title=f"Saddle-to-saddle: deep linear network {widths}, teacher singular values "
                   f"{values}\ndotted: loss drops (one per mode); solid: stage events",
             true_lambda=problem.true_lambda,
             reference_steps=[d for d in result["drop_steps"] if d is not None])  # fmt: skip
    print(f"Plot: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps(curves(problem, result), indent=1))
        print(f"Curves: {args.json}")


def curves(problem: SaddleProblem, result: dict[str, Any]) -> dict[str, Any]:
    """The λ̂ curve as plain lists (e.g. to benchmark a stage detector on real development)."""
    history = result["llc"].history
    by_step = dict(result["model"].losses)
    return {
        "problem": {k: v for k, v in vars(problem).items()},
        "steps": [r["step"] for r in history],
        "llc": [r["llc"] for r in history],
        "llc_std": [r["llc_std"] for r in history],
        "num_chains": [r["num_chains"] for r in history],
        "status": [r["status"] for r in history],
        "loss": [r["loss"] for r in history],  # the monitor's moving average
        "dataset_loss": [by_step.get(r["step"]) for r in history],  # L_n at that step
        "drop_steps": list(result["drop_steps"]),
        "plateau_losses": list(problem.plateau_losses),
        "final_true_lambda": problem.true_lambda,
        "config": {k: v for k, v in vars(result["llc"].active_config).items()},
        "n_beta": result["llc"].n_beta,
        "events": [{"step": e.step, "detected_at": e.detected_at, "kind": str(e.kind)}
                   for e in result["stages"].events if e.component is None],
    }  # fmt: skip


def _rows_from_monitors(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows a CSV logger would have written, from the monitors' histories (W&B case)."""
    rows: list[dict[str, Any]] = [
        {"step": s, "dataset_loss": v} for s, v in result["model"].losses
    ]
    for r in result["llc"].history:
        rows.append({"step": r["step"], "slt/llc": r["llc"], "slt/llc_std": r["llc_std"],
                     "status": r["status"]})  # fmt: skip
    for h in result["norms"].history:
        rows.append({"step": h["step"], "slt/weight_norm": h["weight_norm"]})
    for h in result["hessian"].history:
        rows.append({"step": h["step"], "slt/hessian_trace": h["hessian_trace"],
                     "slt/hessian_trace_stderr": h["hessian_trace_stderr"]})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
