"""Quickstart: λ̂, Hessian trace and weight norm of a small network while it trains.

Three callbacks, one line in the Trainer, no change to the model (here with an explicit
schedule and config, to show where they go)::

    trainer = Trainer(callbacks=[LLCMonitor(), HessianTraceMonitor(), WeightNormMonitor()])

Runs on a CPU in about a minute, without an account or a network. Metrics go to
``./runs/quickstart`` as CSV (or, with ``--wandb``, to a W&B run in offline mode there; upload it
later with ``wandb sync``). At the end it prints a table of what was measured.

    python examples/quickstart.py [--steps 2000] [--wandb]

The task, embedded here: classify points of two interleaved spirals with a small MLP (with
dropout, to show that sampling runs with dropout off and leaves training untouched). Early
in training the weights are nowhere near a minimum and the estimates say so (status
``not_a_minimum``: λ̂ is not a complexity there); as the network fits the spirals they settle.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slt_callbacks import SGLDConfig
from slt_callbacks.callbacks import HessianTraceMonitor, LLCMonitor, WeightNormMonitor
from slt_callbacks.schedule import Schedule


def spirals(num_samples: int = 2048, *, noise: float = 0.08, seed: int = 0) -> TensorDataset:
    """Two interleaved spirals in the plane, labels 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(num_samples, generator=g).sqrt() * 3 * math.pi
    label = torch.randint(0, 2, (num_samples,), generator=g)
    angle = t + math.pi * label
    x = torch.stack([t * angle.cos(), t * angle.sin()], dim=1) / (3 * math.pi)
    x = x + noise * torch.randn(num_samples, 2, generator=g)
    return TensorDataset(x, label)


class SpiralNet(pl.LightningModule):
    """A 2-64-64-2 MLP; ``training_step`` returns the loss, which is all the monitors need."""

    def __init__(self, hidden: int = 64, dropout: float = 0.1, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout),
            nn.Linear(hidden, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict:
        # Cosine decay lets the weights settle into a minimum by the end of training, where
        # λ̂ measures the complexity of the solution found.
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def make_logger(args: argparse.Namespace) -> pl.loggers.Logger:
    out = Path(args.out)
    if args.wandb:
        import os

        os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network
        out.mkdir(parents=True, exist_ok=True)
        return pl.loggers.WandbLogger(project="slt-quickstart", save_dir=out, offline=True)
    return pl.loggers.CSVLogger(out.parent, name=out.name)


def table(llc: LLCMonitor, hessian: HessianTraceMonitor, norms: WeightNormMonitor) -> str:
    """One row per step at which the three monitors measured (the same default schedule)."""
    by_step = {h["step"]: h for h in hessian.history}
    norm_by_step = {h["step"]: h for h in norms.history}
    lines = [
        f"{'step':>6} {'loss':>8} {'λ̂ ± std':>17}  {'status':<15} {'tr H ± stderr':>19} "
        f"{'‖w‖':>7}",
    ]
    for record in llc.history:
        step = record["step"]
        h, n = by_step.get(step, {}), norm_by_step.get(step, {})
        loss = "" if record["loss"] is None else f"{record['loss']:.4f}"
        trace = h.get("hessian_trace", math.nan)
        stderr = h.get("hessian_trace_stderr", math.nan)
        lines.append(
            f"{step:>6} {loss:>8} {record['llc']:>8.2f} ± {record['llc_std']:<6.2f}  "
            f"{record['status']:<15} {trace:>9.2f} ± {stderr:<7.2f} "
            f"{n.get('weight_norm', math.nan):>7.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--out", default="runs/quickstart", help="where the logs go")
    parser.add_argument("--wandb", action="store_true", help="log to W&B (offline mode)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    # Log-spaced (8 per decade: dense early, when most development happens), plus the
    # last step. The same schedule for all three so the table lines up.
    schedule = Schedule(log_per_decade=8, steps=[args.steps])
    llc = LLCMonitor(config=SGLDConfig(), schedule=schedule)  # the default hyperparameters
    hessian = HessianTraceMonitor(num_probes=16, schedule=schedule)
    norms = WeightNormMonitor(schedule=schedule)
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[llc, hessian, norms],
        logger=make_logger(args),
        accelerator="cpu",
        log_every_n_steps=25,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    data = DataLoader(spirals(), batch_size=64, shuffle=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Each unhealthy estimate warns with its reasons; while the network is far from a
        # minimum that is most of them. The status column below summarises them instead.
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        trainer.fit(SpiralNet(), data)
    seconds = time.perf_counter() - start

    print(table(llc, hessian, norms))
    last = llc.last_result
    print(f"\nnβ = {llc.n_beta:.1f}, {llc.active_config.num_chains} chains × "
          f"{llc.active_config.num_draws} draws; {len(llc.history)} estimates; "
          f"fit took {seconds:.0f} s.")  # fmt: skip
    if last is not None and not last.healthy:
        print(f"Last estimate ({last.status.value}): {' '.join(last.reasons)}")
    if args.wandb:
        print(f"W&B offline run under {args.out}/wandb (upload it with `wandb sync`).")
    else:
        print(f"CSV logs: {trainer.logger.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
