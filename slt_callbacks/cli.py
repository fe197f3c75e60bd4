"""The ``slt-callbacks`` console script.

``slt-callbacks sweep SOURCE ...``: estimate λ̂ at every snapshot of a run (see
:func:`slt_callbacks.sweep.sweep_snapshots`), write a CSV, optionally append to a W&B run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0: every snapshot estimated, 1: some failed)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args, parser)
    except ValueError as error:  # a bad argument (named in the message), not a crash
        parser.error(str(error))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slt-callbacks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser(
        "sweep",
        help="estimate λ̂ at every snapshot or checkpoint in a directory",
        description="Estimate λ̂ (global, per component, per dataset) at every snapshot "
        "(LLCMonitor(snapshot_dir=...)) or Lightning checkpoint under SOURCE, write a CSV "
        "and optionally append the numbers to an existing W&B run on trainer/global_step.",
    )
    sweep.add_argument("source", type=Path, help="a snapshot directory, checkpoints, or a file")
    sweep.add_argument("--model", metavar="MODULE:NAME",
                       help="a module class or factory called with no arguments, or an "
                       "nn.Module instance (default: the run.pt saved with the snapshots)")
    sweep.add_argument("--loss", metavar="MODULE:NAME",
                       help="loss_fn(model, batch) (default: run.pt's, else training_step)")
    sweep.add_argument("--config", metavar="JSON",
                       help="SGLDConfig fields as JSON, or a .json file, used for every "
                       "snapshot; fields not given take the SGLDConfig() defaults, not the "
                       "snapshot's (default: each snapshot's own config)")
    sweep.add_argument("--seed", type=int, help="root seed (default: each snapshot's seeds)")
    sweep.add_argument("--component", action="append", default=[], metavar="NAME=GLOB",
                       help="a weight-restricted estimate (repeatable); replaces the "
                       "components saved in run.pt")
    sweep.add_argument("--no-datasets", action="store_true",
                       help="skip the data-restricted estimates (data-<name>.pt)")
    sweep.add_argument("--executor", choices=("inline", "process", "dask"), default="inline",
                       help="where estimates run: this process, one background process, or "
                       "Dask (--scheduler ADDRESS, else a local cluster of --workers)")
    sweep.add_argument("--scheduler", metavar="ADDRESS", help="a Dask scheduler, tcp://...")
    sweep.add_argument("--workers", type=int, default=1, help="local Dask worker processes")
    sweep.add_argument("--max-pending", type=int, default=2, help="snapshots in flight")
    sweep.add_argument("--device", default="cpu", help="where the estimates run")
    sweep.add_argument("--csv", type=Path, help="output CSV (default: SOURCE/llc_sweep.csv)")
    sweep.add_argument("--prefix", default="slt_sweep/", help="metric name prefix")
    sweep.add_argument("--wandb-run", metavar="ID", help="append to this W&B run")
    sweep.add_argument("--wandb-project")
    sweep.add_argument("--wandb-entity")
    sweep.add_argument("--wandb-dir", type=Path)
    sweep.add_argument("--no-progress", action="store_true")
    sweep.set_defaults(run=_sweep)
    return parser


def _sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .core.config import SGLDConfig
    from .sweep import sweep_snapshots

    try:
        components = dict(_pair(text) for text in args.component) or None
        config = None if args.config is None else SGLDConfig.from_dict(_json(args.config))
        model = None if args.model is None else _load(args.model, "--model")
        loss_fn = None if args.loss is None else _load(args.loss, "--loss")
    except ValueError as error:
        parser.error(str(error))
    csv_path = args.csv or (args.source if args.source.is_dir() else args.source.parent)
    if args.csv is None:
        csv_path = csv_path / "llc_sweep.csv"
    with _executor(args) as executor:
        records = sweep_snapshots(
            args.source, model=model, loss_fn=loss_fn, components=components, config=config,
            seed=args.seed, datasets={} if args.no_datasets else None, executor=executor,
            max_pending=args.max_pending, device=args.device, csv_path=csv_path,
            wandb_run=args.wandb_run, wandb_project=args.wandb_project,
            wandb_entity=args.wandb_entity, wandb_dir=args.wandb_dir, prefix=args.prefix,
            progress=not args.no_progress,
        )
    print(f"{len(records)} estimate(s) written to {csv_path}")
    for record in records:
        print(f"step {record.step:>8}: llc {record.llc:.4g} ± {record.llc_std:.3g} "
              f"({record.status})")
    total = sum(1 for _ in _rows(csv_path))
    return 0 if len(records) == total else 1


class _executor:
    """The executor the flags ask for, shut down afterwards."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.close: list[Any] = []

    def __enter__(self) -> Any:
        kind = self.args.executor
        if kind != "dask":
            return kind  # "inline" (== None) or "process"
        from dask.distributed import Client, LocalCluster

        if self.args.scheduler:
            client = Client(self.args.scheduler)
        else:
            cluster = LocalCluster(n_workers=self.args.workers, threads_per_worker=1,
                                   processes=True)
            self.close.append(cluster)
            client = Client(cluster)
        self.close.insert(0, client)
        return client.get_executor()

    def __exit__(self, *exc: Any) -> None:
        for item in self.close:
            item.close()


def _pair(text: str) -> tuple[str, str]:
    name, sep, glob = text.partition("=")
    if not sep or not name or not glob:
        raise ValueError(f"Expected --component NAME=GLOB but got {text!r}.")
    return name, glob


def _json(text: str) -> dict[str, Any]:
    path = Path(text)
    raw = path.read_text() if text.endswith(".json") and path.is_file() else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"Expected --config to be JSON or a .json file but got {text!r}: "
                         f"{error}.") from error
    if not isinstance(value, dict):
        raise ValueError(f"Expected --config to be a JSON object but got {text!r}.")
    return value


def _load(path: str, flag: str) -> Any:
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"Expected {flag} MODULE:NAME (e.g. mypkg.models:Net) but got {path!r}.")
    sys.path.insert(0, str(Path.cwd()))  # modules next to where the command runs
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{flag} {path}: cannot import {module_name!r}: {error}.") from error
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ValueError(f"{flag} {path}: {module_name!r} has no attribute {attribute!r}.")
        value = getattr(value, part)
    return value


def _rows(path: Path) -> Any:
    import csv

    with open(path, newline="") as file:
        yield from csv.DictReader(file)


if __name__ == "__main__":
    raise SystemExit(main())
