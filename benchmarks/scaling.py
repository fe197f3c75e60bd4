"""Per-head LLCs at scale (issue #10): time and peak memory of global + per-head estimates.

Two Hugging Face GPT-2 shapes built from configs (random weights, no downloads):

- ``small3m``: 2 layers x 8 heads, d_model 256, vocab 5,000 (2.88M parameters), the
  restricted-LLC paper's size. Rows: the global estimate alone, and the global estimate with
  all 16 heads in one call. The batched call is compared with 17 separate global runs
  (17 x the global row, measured in the same process) and its extra peak memory with the
  global call's.
- ``gpt2small``: 12 layers x 12 heads, d_model 768, vocab 50,257 (124M parameters). A full
  per-head estimate (145 components x 4 chains x hundreds of steps) takes hours on one CPU
  thread, so two steps of the global chains and of a head in the first and in the last
  layer are measured (batch 2 x 64 tokens), and the full run is extrapolated from them:
  chunks run one after another and a chunk's chains exist only while it runs, so the peak
  of the full run is the peak of its largest chunk, which these rows include.

Batch 8 x 64 tokens, 4 chains, fp32, ``torch.set_num_threads(1)``. Each row runs in its own
subprocess so that its peak memory (``ru_maxrss`` above the baseline after building the model
and the data) is its own. Heads come from :func:`slt_callbacks.head_components` (GPT-2:
head h owns columns ``h*d_head:(h+1)*d_head`` of each of q, k, v in the Conv1D ``c_attn``,
those bias entries, and rows ``h*d_head:(h+1)*d_head`` of ``c_proj``).

Usage: ``python benchmarks/scaling.py [--steps 2] [--backend loop] [--skip-gpt2small]
[--only-gpt2small] [--out FILE]``; writes ``benchmarks/results/scaling_cpu.md`` by default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import torch

# Measure the checkout this file is in, not whatever copy of the package is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "small3m": dict(n_layer=2, n_head=8, n_embd=256, vocab_size=5000),
    "gpt2small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257),
}
BATCH, SEQ, CHAINS, NUM_BATCHES = 8, 64, 4, 4
BATCH_GPT2SMALL = 2  # 2 x 64 tokens: one chain-step of the 124M model is ~20 s on one thread
OUT = os.path.join(os.path.dirname(__file__), "results", "scaling_cpu.md")


def build(shape: str):
    import transformers

    cfg = transformers.GPT2Config(n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  **SHAPES[shape])
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    batch = BATCH if shape == "small3m" else BATCH_GPT2SMALL
    data = [torch.randint(0, cfg.vocab_size, (batch, SEQ), generator=g)
            for _ in range(NUM_BATCHES)]
    return model, data


def loss_fn(model, batch):
    logits = model(batch).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )


def heads_of(model, which: str) -> dict[str, dict[str, torch.Tensor]]:
    from slt_callbacks import head_components

    if which == "none":
        return {}
    if which == "all":
        return head_components(model)
    # "sample": head 0 of the first and of the last layer (the dearest, the cheapest)
    return head_components(model, layers=[0, model.config.n_layer - 1], heads=[0])


def one(args) -> dict:
    """One measurement in this process: its wall time and its peak memory."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from slt_callbacks import SGLDConfig, estimate_llc

    model, data = build(args.shape)
    components = heads_of(model, args.heads)
    cfg = SGLDConfig(step_size=1e-6, n_beta=10.0, localization=100.0, num_chains=CHAINS,
                     num_draws=args.steps, num_burnin_steps=0, backend=args.backend,
                     max_memory=args.max_memory)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = estimate_llc(model, loss_fn, data, config=cfg, seed=0, components=components,
                          on_failure="ignore")
    seconds = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    finite = all(torch.isfinite(r.loss_trace).all() for r in [result,
                                                                *result.components.values()])
    return {"seconds": seconds, "peak_bytes": peak, "components": 1 + len(components),
            "slots": CHAINS * (1 + len(components)), "finite": bool(finite),
            "params": sum(p.numel() for p in model.parameters()), "backend": result.backend}


def run(shape: str, heads: str, steps: int, backend: str, max_memory=None) -> dict:
    cmd = [sys.executable, __file__, "--one", "--shape", shape, "--heads", heads,
           "--steps", str(steps), "--backend", backend]
    if max_memory is not None:
        cmd += ["--max-memory", str(max_memory)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(label: str, r: dict, steps: int, ratio: str, mem_ratio: str) -> str:
    per = r["seconds"] / (r["slots"] * steps)
    return (f"| {label} | {r['components']} | {r['slots']} | {r['peak_bytes'] / 2**30:.2f} | "
            f"{mem_ratio} | {per:.3f} | {r['seconds']:.1f} | {ratio} |")


HEADER = ("| call | components | slots | extra peak GiB | memory ratio | s / chain-step | "
          "wall s | time ratio |\n|---|---|---|---|---|---|---|---|")


def small3m(args, lines: list[str]) -> None:
    glob = min((run("small3m", "none", args.steps, args.backend) for _ in range(2)),
               key=lambda r: r["seconds"])
    heads = run("small3m", "all", args.steps, args.backend)
    lines += [f"\n## GPT-2 2 layers x 8 heads, d_model 256, vocab 5,000 "
              f"({glob['params'] / 1e6:.2f}M parameters), backend {heads['backend']}, "
              f"{args.steps} steps\n", HEADER]
    lines.append(row("global only (best of 2)", glob, args.steps, "1/17 of the budget", "1.00x"))
    lines.append(row("global + 16 heads, one call", heads, args.steps,
                     f"{heads['seconds'] / (17 * glob['seconds']):.2f}x 17 global runs",
                     f"{heads['peak_bytes'] / glob['peak_bytes']:.2f}x"))
    lines.append(f"\nAll traces finite: {glob['finite'] and heads['finite']}.")


def gpt2small(args, lines: list[str]) -> None:
    steps = 2
    glob = run("gpt2small", "none", steps, args.backend)
    sample = run("gpt2small", "sample", steps, args.backend)
    per_global = glob["seconds"] / (CHAINS * steps)
    heads_in_sample = sample["components"] - 1
    per_head = (sample["seconds"] - glob["seconds"]) / (CHAINS * steps * heads_in_sample)
    total_steps = 300  # the default 100 burn-in + 200 draws
    full = CHAINS * total_steps * (per_global + 144 * per_head)
    lines += [f"\n## GPT-2-small shape: 12 layers x 12 heads, d_model 768, vocab 50,257 "
              f"({glob['params'] / 1e6:.1f}M parameters), backend {sample['backend']}, "
              f"{steps} steps\n", HEADER]
    lines.append(row("global only", glob, steps, "", "1.00x"))
    lines.append(row("global + heads l0h0, l11h0", sample, steps, "",
                     f"{sample['peak_bytes'] / glob['peak_bytes']:.2f}x"))
    lines.append(
        f"\nBatch {BATCH_GPT2SMALL} x {SEQ} tokens. Per chain-step: global {per_global:.2f} s, "
        f"one head (mean of layers 0 and 11) "
        f"{per_head:.2f} s. Extrapolated full per-head estimate (global + 144 heads, "
        f"{CHAINS} chains x {total_steps} steps, one CPU thread): "
        f"{full / 3600:.1f} h; peak memory is the largest chunk's, the global chains' "
        f"{glob['peak_bytes'] / 2**30:.2f} GiB above the model (fits in 16 GB)."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--backend", default="loop")
    p.add_argument("--skip-gpt2small", action="store_true")
    p.add_argument("--only-gpt2small", action="store_true")
    p.add_argument("--out", default=OUT, help="where the markdown table goes")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="small3m", help=argparse.SUPPRESS)
    p.add_argument("--heads", default="none", help=argparse.SUPPRESS)
    p.add_argument("--max-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        if args.max_memory is not None and args.max_memory != "auto":
            args.max_memory = int(args.max_memory)
        print(json.dumps(one(args)))
        return
    lines = [f"# Per-head LLC scaling, CPU, 1 thread, torch {torch.__version__}, batch "
             f"{BATCH} x {SEQ} tokens, {CHAINS} chains, fp32 (machine shared with other jobs)"]
    if not args.only_gpt2small:
        small3m(args, lines)
    if not args.skip_gpt2small:
        gpt2small(args, lines)
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
