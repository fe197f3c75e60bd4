"""Induction heads: a stage you can see in the loss, found by the StageTransitionMonitor.

A two-layer attention-only transformer learns to continue sequences made of a random prefix
followed by its repetition. In-context copying needs two heads working together (a
previous-token head in layer 0 and an induction head in layer 1; Olsson et al. 2022, "In-
context learning and induction heads"), and it appears abruptly: after a plateau, the loss on
the repeated part falls within a few hundred steps (the "induction bump"). Hoogland et al.
2024 ("The developmental landscape of in-context learning") show that the local learning
coefficient λ̂ changes trend at such transitions.

The prefix length varies from sequence to sequence. With a fixed length L, one layer-0 head
can copy by *position* alone (always attend L - 1 positions back), and that is what a model
learns: a first version of this example found two layer-0 heads with induction scores of
0.9 and none in layer 1. With a variable offset only the content-based two-head circuit
works, and the script measures at the end that it formed (the attention scores it prints).

The run below trains the model with Lightning and watches it with

- ``LLCMonitor``: λ̂ of the whole model, and of each attention head (the head's rows of the
  fused QKV projection and its columns of the output projection; Wang et al. 2024, "Differen-
  tiation and specialization of attention heads via the refined local learning coefficient"),
  on a log-spaced schedule;
- ``WeightNormMonitor``: the L2 norm of the weights and of each head, for comparison;
- ``StageTransitionMonitor``: online stage detection on λ̂ (global and per head), and at the
  end the retrospective analysis and how λ̂ related to the weight norm and the loss.

It prints the events, where the induction bump was, and the relations, and saves a figure:
loss, λ̂, per-head λ̂ and weight norm against log(step), with the events marked.

Run (about 3.5 minutes on a shared 2-core CPU with the defaults, almost all of it in the 44
λ̂ estimates, each with 4 SGLD chains for the whole model and 4 for each of the 8 heads)::

    python examples/induction_heads.py                 # CSV logs and the PNG in runs/
    python examples/induction_heads.py --wandb         # also an offline W&B run

matplotlib is needed for the figure (``pip install slt_callbacks[plot]``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from slt_callbacks import SGLDConfig, fused_qkv_head_components
from slt_callbacks.callbacks import LLCMonitor, WeightNormMonitor
from slt_callbacks.callbacks.stages import StageTransitionMonitor
from slt_callbacks.detect import DetectorConfig, StageEvent, StageKind

# ------------------------------------------------------------------------------------------
# Data: a random prefix, then the same tokens again.


def repeated_sequences(
    num: int,
    *,
    vocab: int,
    seq_len: int,
    zipf: float,
    generator: torch.Generator,
    min_prefix: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` sequences of ``seq_len`` tokens: a random prefix, then its repetition.

    The prefix length P is drawn per sequence from ``[min_prefix, seq_len // 2]``; token
    ``t >= P`` repeats token ``t - P``. Prefix tokens follow a Zipf-like unigram
    distribution (probability ∝ 1/rank^zipf) rather than a uniform one: the model can then
    first learn the unigram frequencies (an early, small drop of the loss), plateau, and
    only later learn to copy, which is the induction bump.

    Returns:
        ``(tokens, prefix_lengths)`` of shapes ``(num, seq_len)`` and ``(num,)``.
    """
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** zipf
    fresh = torch.multinomial(
        probs / probs.sum(), num * seq_len, replacement=True, generator=generator
    ).view(num, seq_len)
    prefix = torch.randint(min_prefix, seq_len // 2 + 1, (num,), generator=generator)
    position = torch.arange(seq_len)[None, :]
    source = torch.where(position >= prefix[:, None], position - prefix[:, None], position)
    return fresh.gather(1, source), prefix


# ------------------------------------------------------------------------------------------
# Model: token + positional embedding, attention-only layers, unembedding.


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection.

    The fused weight's rows are ``[Q | K | V]``, each ``num_heads * head_dim`` long, which is
    the layout :func:`~slt_callbacks.fused_qkv_head_components` expects.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(
                f"Expected `d_model` ({d_model}) to be a multiple of `num_heads` but got "
                f"{num_heads}."
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.keep_weights = False  # set to inspect the attention pattern after a forward
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        # (3, batch, head, position, head_dim)
        q, k, v = (
            self.qkv(x).view(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        )
        # Written out rather than F.scaled_dot_product_attention: the SGLD chains run under
        # torch.func.vmap, which has no batching rule for the fused CPU attention kernel.
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        if self.keep_weights:
            self.weights = weights.detach()  # (batch, head, query, key)
        mixed = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        return self.out(mixed)


class InductionTransformer(pl.LightningModule):
    """An attention-only transformer (no MLPs, no layer norm) trained on next-token loss.

    Logs ``train/loss`` (all positions), ``train/loss_repeat`` (the repeated part, where
    induction heads help) and ``train/loss_prefix`` (the prefix, unigram statistics at
    best), and keeps them in :attr:`losses` for the figure.
    """

    def __init__(
        self,
        *,
        vocab: int,
        seq_len: int,
        d_model: int,
        num_heads: int,
        num_layers: int = 2,
        lr: float = 5e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.layers = nn.ModuleList(
            [CausalSelfAttention(d_model, num_heads) for _ in range(num_layers)]
        )
        self.unembed = nn.Linear(d_model, vocab)
        self.losses: list[tuple[int, float, float, float]] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.embed(tokens) + self.pos(positions)
        for layer in self.layers:
            h = h + layer(h)  # residual stream
        return self.unembed(h)

    def _token_losses(self, batch: Any) -> torch.Tensor:
        logits = self(batch[0][:, :-1])
        targets = batch[0][:, 1:]
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (b, t-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        per_token = self._token_losses(batch)  # entry j is the loss of predicting token j + 1
        target = torch.arange(1, per_token.shape[1] + 1, device=per_token.device)
        repeated = target[None, :] >= batch[1][:, None]  # predictable by copying
        loss = per_token.mean()
        repeat, prefix = per_token[repeated].mean(), per_token[~repeated].mean()
        self.log_dict(
            {"train/loss": loss, "train/loss_prefix": prefix, "train/loss_repeat": repeat}
        )
        self.losses.append((self.global_step, loss.item(), prefix.item(), repeat.item()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)


def next_token_loss(model: InductionTransformer, batch: Any) -> torch.Tensor:
    """The mean next-token loss of ``batch``: the loss the λ̂ estimates sample.

    Passed to the monitor as ``loss_fn`` instead of the default (``training_step``), which
    here also records losses for the figure, something the SGLD chains must not do.
    """
    return model._token_losses(batch).mean()


def head_components(model: InductionTransformer) -> dict[str, Any]:
    """One component per attention head, named ``L<layer>.head<h>``."""
    components: dict[str, Any] = {}
    for index in range(len(model.layers)):
        components.update(
            fused_qkv_head_components(
                model,
                f"layers.{index}.qkv",
                num_heads=model.hparams.num_heads,
                layout="grouped",
                out_proj_name=f"layers.{index}.out",
                prefix=f"L{index}",
            )
        )
    return components


# ------------------------------------------------------------------------------------------
# Reading the run.


@torch.no_grad()
def head_scores(
    model: InductionTransformer, tokens: torch.Tensor, prefix: torch.Tensor
) -> dict[str, tuple[float, float]]:
    """``{head: (previous-token score, induction score)}`` from the attention patterns.

    The previous-token score is the mean attention from each position to the one before it;
    the induction score is the mean attention, from a position ``t`` in the repeated part,
    to the position right after the earlier occurrence of its token (``t - P + 1``): the
    token to copy. Scores near 1 mark a head that does that one thing.
    """
    for layer in model.layers:
        layer.keep_weights = True
    try:
        model(tokens[:, :-1])
    finally:
        for layer in model.layers:
            layer.keep_weights = False
    length = tokens.shape[1] - 1
    query = torch.arange(1, length)
    out = {}
    for index, layer in enumerate(model.layers):
        weights = layer.weights  # (batch, head, query, key)
        assert weights is not None
        previous = weights[:, :, query, query - 1].mean(dim=(0, 2))
        induction = torch.stack(
            [
                weights[b, :, repeat, repeat - p + 1].mean(dim=-1)
                for b, p in enumerate(prefix.tolist())
                for repeat in [torch.arange(p, length)]
            ]
        ).mean(dim=0)
        for head in range(weights.shape[1]):
            out[f"L{index}.head{head}"] = (float(previous[head]), float(induction[head]))
        layer.weights = None
    return out


def smooth(values: np.ndarray, width: int) -> np.ndarray:
    """A centred moving average (shorter at the ends)."""
    kernel = np.ones(width)
    return np.convolve(values, kernel, "same") / np.convolve(np.ones_like(values), kernel, "same")


def induction_bump(
    losses: list[tuple[int, float, float, float]], fraction: float = 0.2
) -> tuple[int, int, int]:
    """Where the loss on the repeated part falls fast, per decade of steps.

    Returns ``(first, steepest, last)``: the stretch around the steepest fall where the
    smoothed fall per decade stays above ``fraction`` of its maximum, and the steepest step.
    """
    steps = np.array([s for s, *_ in losses], dtype=float)
    repeat = smooth(np.array([r for *_, r in losses]), 25)
    grid = np.linspace(1.0, np.log10(steps[-1]), 200)  # from step 10 on
    fall = -np.gradient(np.interp(grid, np.log10(steps + 1.0), repeat), grid)  # per decade
    top = int(np.argmax(fall))
    fast = fall >= fraction * fall[top]
    lo = hi = top
    while lo > 0 and fast[lo - 1]:
        lo -= 1
    while hi < grid.size - 1 and fast[hi + 1]:
        hi += 1
    return round(10 ** grid[lo]), round(10 ** grid[top]), round(10 ** grid[hi])


def plot(
    path: Path,
    model: InductionTransformer,
    llc: LLCMonitor,
    norms: WeightNormMonitor,
    stages: StageTransitionMonitor,
    bump: tuple[int, int, int],
) -> None:
    """Loss, λ̂, per-head λ̂ and weight norms against log(step), events marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 11), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    steps = np.array([s for s, *_ in model.losses])
    for column, label in ((1, "all positions"), (2, "prefix"), (3, "repeated part")):
        values = np.array([row[column] for row in model.losses])
        axes[0].plot(steps, smooth(values, 25), label=label)
    axes[0].set_ylabel("training loss")

    records = stages.records
    healthy = np.array([r.healthy for r in records])
    x = np.array([r.step for r in records])
    y = np.array([r.llc for r in records])
    sem = np.array([r.llc_std for r in records]) / math.sqrt(llc.active_config.num_chains)
    axes[1].errorbar(x[healthy], y[healthy], sem[healthy], fmt="o-", ms=3, label="λ̂ (healthy)")
    if (~healthy).any():
        axes[1].plot(x[~healthy], y[~healthy], "x", color="tab:red", label="λ̂ (unhealthy)")
    axes[1].set_ylabel("λ̂ (whole model)")

    names = sorted({name for r in records for name in r.components})
    for name in names:
        values = [
            r.components[name][0] if r.components[name][2] == "healthy" else np.nan for r in records
        ]
        axes[2].plot(x, values, ".-", ms=2, label=name)
    axes[2].set_ylabel("λ̂ per head")

    norm_steps = [h["step"] for h in norms.history]
    axes[3].plot(norm_steps, [h["weight_norm"] for h in norms.history], label="all weights")
    ax_heads = axes[3].twinx()
    for name in names:
        ax_heads.plot(norm_steps, [h[f"weight_norm/{name}"] for h in norms.history], ":", lw=1)
    axes[3].set_ylabel("weight norm (solid)")
    ax_heads.set_ylabel("per head (dotted)")
    axes[3].set_xlabel("training step")

    kind_colors = {
        StageKind.ACQUIRE: "tab:green",
        StageKind.SIMPLIFY: "tab:purple",
        StageKind.TURN: "tab:gray",
    }
    head_colors = {name: f"C{i}" for i, name in enumerate(names)}
    for ax in axes:
        ax.set_xscale("log")
        ax.axvspan(bump[0], bump[2], color="gold", alpha=0.25, lw=0)
    for event in stages.events:
        if event.component is not None:
            # In the head's own colour: solid at the change point, dotted at the detection.
            color = head_colors[event.component]
            axes[2].axvline(event.step, color=color, lw=1)
            axes[2].axvline(event.detected_at, color=color, lw=1, ls=":")
            continue
        color = kind_colors[StageKind(event.kind)]
        for ax in axes[:2]:
            ax.axvline(event.step, color=color, lw=1.5)
            ax.axvline(event.detected_at, color=color, lw=1, ls=":")
        axes[1].annotate(
            f"{StageKind(event.kind).value} (step {event.step})",
            (event.step, 0.98),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            color=color,
        )
    for boundary in stages.boundaries.get(None, []):
        axes[1].axvline(boundary.step, color="black", ls="--", lw=0.8)
    for ax in axes[:3]:
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(
        "Shaded: induction bump. Solid lines: change points of online stage events (top two\n"
        "panels: λ̂, green acquire / grey turn / purple simplify; third panel: per head, in the\n"
        "head's colour); dotted: when each was detected. Dashed: retrospective λ̂ boundaries.",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)


def describe(event: StageEvent, bump: tuple[int, int, int]) -> str:
    """One line per event, placed relative to the induction bump."""

    def where(step: int) -> str:
        return "before" if step < bump[0] else "after" if step > bump[2] else "inside"

    who = "λ̂" if event.component is None else f"λ̂[{event.component}]"
    return (
        f"  {who:<14} {StageKind(event.kind).value:<8} {event.previous_regime.value:>7} -> "
        f"{event.new_regime.value:<7}  change point step {event.step:>4} ({where(event.step)} "
        f"the bump), detected at step {event.detected_at:>4} ({where(event.detected_at)})"
    )


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4, help="heads per layer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--per-decade", type=int, default=16, help="λ̂ estimates per decade")
    parser.add_argument("--window", type=int, default=15, help="detector window (estimates)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/induction_heads"))
    parser.add_argument("--wandb", action="store_true", help="also log to an offline W&B run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    args.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    train = TensorDataset(
        *repeated_sequences(
            65_536, vocab=args.vocab, seq_len=args.seq_len, zipf=args.zipf, generator=generator
        )
    )
    # The λ̂ estimates use their own small fixed batches: the same data at every checkpoint
    # keeps the curve comparable, and small batches keep the chains cheap on a CPU (4 for the
    # whole model and 4 for each head, all in one batched call).
    estimate_data = [
        repeated_sequences(
            16, vocab=args.vocab, seq_len=args.seq_len, zipf=args.zipf, generator=generator
        )
        for _ in range(8)
    ]
    model = InductionTransformer(
        vocab=args.vocab,
        seq_len=args.seq_len,
        d_model=args.d_model,
        num_heads=args.heads,
        lr=args.lr,
    )
    heads = head_components(model)
    schedule = sorted(
        {int(s) for s in np.geomspace(1, args.steps, int(args.per_decade * math.log10(args.steps)))}
    )
    sgld = SGLDConfig(
        num_chains=4,
        num_draws=40,
        num_burnin_steps=20,
        step_size=1e-3,
        localization=300.0,
        n_beta=30.0,
    )
    llc = LLCMonitor(
        config=sgld,
        schedule=schedule,
        components=heads,
        data=estimate_data,
        loss_fn=next_token_loss,
    )
    norms = WeightNormMonitor(schedule=schedule, components=heads)
    # The detector searches change points among the last `window` estimates (15 here, about
    # one decade at this schedule; the default 30 suits ~20 estimates per decade); a jump
    # must exceed `sensitivity`, a change of trend `kink_sensitivity` standard errors (4.5
    # each), and persist for 3 estimates. `min_relative_slope` sets how slow a drift of λ̂
    # still counts as flat (default: 10% of its level per decade). λ̂ here turns up before the
    # total loss falls: that event is an "acquire" whose loss "has not fallen yet".
    detector = DetectorConfig(window=args.window)
    stages = StageTransitionMonitor(config=detector, components=True)

    loggers: list[Logger] = [CSVLogger(args.out, name="csv")]
    if args.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(offline=True, save_dir=args.out, project="induction-heads"))
    trainer = pl.Trainer(
        max_steps=args.steps,
        logger=loggers,
        callbacks=[llc, norms, stages],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        # One warning per unhealthy estimate; the record keeps the status and the figure
        # shows those points as red crosses.
        warnings.filterwarnings("ignore", message=".*LLCMonitor at step")
        warnings.filterwarnings("ignore", message=".*does not have many workers")
        trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True))
    seconds = time.perf_counter() - start

    bump = induction_bump(model.losses)
    before = [r for s, _, _, r in model.losses if s < bump[0]]
    print(f"\nTrained {args.steps} steps with {len(schedule)} λ̂ estimates in {seconds:.0f} s.")
    print(
        f"Induction bump: the loss on the repeated part fell fastest between steps {bump[0]} "
        f"and {bump[2]} (steepest at {bump[1]}), from {np.mean(before[-50:]):.2f} to "
        f"{np.mean([r for *_, r in model.losses[-100:]]):.2f}."
    )
    records = stages.records
    # Every record the detector saw (λ̂, its chain std, the loss it was named by), so the
    # stages can be recomputed offline with other thresholds.
    (args.out / "records.json").write_text(json.dumps([r.to_dict() for r in records]))
    print(f"Healthy λ̂ estimates (whole model): {sum(r.healthy for r in records)} of {len(records)}")
    print(f"Stage events ({len(stages.events)}):")
    for event in stages.events:
        print(describe(event, bump))
    # What each head ended up doing, to read the per-head λ̂ against.
    scores = head_scores(model, *estimate_data[0])
    print("Per head: λ̂ (healthy estimates) first, peak, last; attention scores at the end")
    for name in sorted({n for r in records for n in r.components}):
        points = [
            (r.step, r.components[name][0]) for r in records if r.components[name][2] == "healthy"
        ]
        peak = max(points, key=lambda p: p[1])
        previous, induction = scores[name]
        print(
            f"  {name:<9} {points[0][1]:5.2f} (step {points[0][0]:>4})  {peak[1]:5.2f} "
            f"(step {peak[0]:>4})  {points[-1][1]:5.2f} (step {points[-1][0]:>4})   "
            f"previous-token {previous:.2f}  induction {induction:.2f}"
        )
    print("How λ̂ related to the weight norm and the loss:")
    for relation in stages.relations_found.get(None, []):
        print(f"  {relation.message}")
    try:
        path = args.out / "induction_heads.png"
        plot(path, model, llc, norms, stages, bump)
        print(f"\nFigure: {path}")
    except ImportError:
        print("\nmatplotlib is not installed: no figure (pip install slt_callbacks[plot]).")


if __name__ == "__main__":
    main()
