"""Two CPU processes under ``strategy="ddp"`` (gloo) with ``LLCMonitor(executor=...)``.

Run by ``tests/callbacks/test_ddp.py`` as ``python ddp_executor_run.py OUT``; Lightning's
launcher starts this script again as rank 1. Each rank writes what it submitted and kept to
``OUT/rank<r>.json``; rank zero also writes the (constant: lr=0) weights to
``OUT/weights.pt`` for the test's oracle.
"""

from __future__ import annotations

import json
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402

from slt_callbacks import LLCMonitor  # noqa: E402
from tests.callbacks.helpers import FAST, TinyRegressor, loader, make_trainer  # noqa: E402

STEPS = [0, 2, 4]


class Recording(ThreadPoolExecutor):
    """A one-thread executor that records the step of every job submitted to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.steps: list[int] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.steps.append(args[0].step)  # run_job(job)
        return super().submit(fn, *args, **kwargs)


class CleanExit(TinyRegressor):
    """Destroys the gloo process group before the process exits (see test_ddp.py)."""

    def teardown(self, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def main(out: Path, config: Any) -> None:
    torch.set_num_threads(1)
    seed_everything(0, verbose=False)
    model = CleanExit(lr=0.0)
    executor = Recording()
    llc = LLCMonitor(config=config, schedule=STEPS, executor=executor)
    trainer = make_trainer(out, [llc], max_steps=4, strategy="ddp", devices=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        trainer.fit(model, loader())
    executor.shutdown()
    rank = trainer.global_rank
    record = {"rank": rank, "world_size": trainer.world_size, "submitted": executor.steps,
              "history": [h["step"] for h in llc.history],
              "llc": [h["llc"] for h in llc.history]}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save(model.state_dict(), out / "weights.pt")


if __name__ == "__main__":
    from dataclasses import replace

    main(Path(sys.argv[1]), replace(FAST, num_chains=4, num_draws=40))
