r"""Estimate λ̂ after training, at every saved snapshot or checkpoint of a run.

Why: during training the monitor estimates with the config it had (often before a good step
size was known) and at the cost of the training loop. After training, the same directory of
weights can be re-estimated with one final, calibrated config, on spare hardware, and the
numbers appended to the run's W&B page on its own step axis.

From Python::

    from slt_callbacks import sweep_snapshots
    records = sweep_snapshots("runs/snapshots", config=SGLDConfig(step_size=3e-4),
                              executor="process", csv_path="llc.csv")

From a shell (see ``slt-callbacks sweep --help``)::

    slt-callbacks sweep runs/snapshots --config '{"step_size": 3e-4}' --executor process \
        --csv llc.csv --wandb-run <run id> --wandb-project <project>

Each estimate is the same function of (weights, data, config, seed) as in the monitor
(:func:`~slt_callbacks.executors.estimate_all`): with the snapshot's own config and seeds,
the sweep reproduces what the monitor logged (one training process).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.config import SGLDConfig
from .core.diagnostics import HealthCriteria
from .core.functional import LossFn
from .core.restrict import Selector
from .executors import Completed, EstimateQueue, ExecutorLike, RunContext
from .records import LLCRecord
from .seeds import derive_seed
from .snapshots import (
    DATA_FILE,
    Snapshot,
    dataset_files,
    find_snapshots,
    load_batches,
    load_run,
    load_snapshot,
)

__all__ = ["STEP_METRIC", "sweep_snapshots"]

STEP_METRIC = "trainer/global_step"
"""The x-axis of Lightning's WandbLogger; the sweep logs its rows on it."""

DEFAULT_PREFIX = "slt_sweep/"
"""Apart from the monitor's ``slt/``: a sweep with another config is another curve."""


def sweep_snapshots(
    source: str | os.PathLike[str],
    *,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    loss_fn: LossFn | None = None,
    data: Sequence[Any] | None = None,
    datasets: Mapping[str, Sequence[Any]] | None = None,
    components: Mapping[str, Selector] | None = None,
    config: SGLDConfig | None = None,
    seed: int | None = None,
    criteria: HealthCriteria | None = None,
    executor: ExecutorLike = None,
    max_pending: int = 2,
    device: str = "cpu",
    csv_path: str | os.PathLike[str] | None = None,
    wandb_run: str | None = None,
    wandb_project: str | None = None,
    wandb_entity: str | None = None,
    wandb_dir: str | os.PathLike[str] | None = None,
    prefix: str = DEFAULT_PREFIX,
    progress: bool = True,
) -> list[LLCRecord]:
    """Estimate λ̂ (global, per component, per dataset) at each snapshot under ``source``.

    Args:
        source: a ``snapshot_dir`` of :class:`~slt_callbacks.LLCMonitor`, a directory of
            Lightning checkpoints (``*.ckpt``), or one such file.
        model: the module to load each state dict into, or a factory building it. Default:
            the one saved in ``source/run.pt``.
        loss_fn: default ``run.pt``'s, else :class:`~slt_callbacks.TrainingStepLoss`.
        data: the batch pool; default ``run.pt``'s, else ``source/data.pt``.
        datasets: data-restricted estimates; default ``run.pt``'s, else every
            ``source/data-<name>.pt``. ``{}`` for none.
        components: weight-restricted estimates; default ``run.pt``'s, else none. Given, they
            *replace* the saved components (not added to them), as ``--component`` does.
        config: one config for every snapshot (e.g. a final calibrated one); default each
            snapshot's own (``SGLDConfig()`` for a Lightning checkpoint). A whole config:
            ``slt-callbacks sweep --config '{"step_size": 3e-4}'`` builds
            ``SGLDConfig(step_size=3e-4)``, every other field at the ``SGLDConfig()``
            default, *not* the snapshot's (pass every field that should match the run).
        seed: root seed, derived per step as the monitor does; default each snapshot's own
            seeds (0 for a Lightning checkpoint).
        criteria: thresholds of the health checks.
        executor: None or ``"inline"`` (in this process), ``"process"`` or a
            ``concurrent.futures.Executor`` (e.g. ``dask.distributed.Client(...).get_executor()``).
        max_pending: snapshots in flight at once (each holds its weights in memory).
        device: where the estimates run (read by the worker).
        csv_path: write one row per snapshot there (step, λ̂, per component and dataset,
            diagnostics, status, file, error).
        wandb_run: append the metrics to this existing W&B run (by id), each row with
            ``trainer/global_step`` = its step (W&B's own ``step=`` is never passed: it would
            drop rows below the run's current step).
        wandb_project, wandb_entity, wandb_dir: where that run lives.
        prefix: start of every metric name (default ``"slt_sweep/"``, apart from the
            monitor's).
        progress: show a progress bar.

    Returns:
        One :class:`~slt_callbacks.records.LLCRecord` per snapshot that was estimated, in
        step order. Failures are in the CSV's ``error`` column and raise nothing.

    Raises:
        ValueError: nothing to read at ``source``, or no model to load the weights into.
    """
    _check_batches("data", data)
    for name, value in (datasets or {}).items():
        _check_batches(f"datasets[{name!r}]", value)
    files = find_snapshots(source)
    directory = Path(source) if Path(source).is_dir() else Path(source).parent
    context = _context(directory, model, loss_fn, data, datasets, components, criteria, device)
    queue = EstimateQueue(executor, max_pending=max_pending, when_full="wait")
    queue.open(context)
    bar = _bar(len(files), progress)
    completed: list[Completed] = []
    try:
        for path in files:
            snapshot = load_snapshot(path)
            queue.submit(queue.job(
                snapshot.step, snapshot.state_dict, _config(snapshot, config),
                _seeds(snapshot, seed, context.datasets), snapshot.frozen,
            ))
            for done in queue.collect():
                completed.append(done)
                bar.update(1)
        for done in queue.wait():
            completed.append(done)
            bar.update(1)
    finally:
        bar.close()
        queue.close()
    rows = [_row(done, prefix, path) for done, path in zip(completed, files, strict=True)]
    if csv_path is not None:
        _write_csv(Path(csv_path), rows)
    if wandb_run is not None:
        _append_to_wandb(completed, prefix, wandb_run, wandb_project, wandb_entity, wandb_dir,
                         config)
    return [done.estimates.record(source=prefix) for done in completed if done.estimates]


# -- the context: given, saved with the run, or read from the directory ------------------------


def _check_batches(argument: str, value: Any) -> None:
    """None or a sequence of batches; a bare Tensor would be read row by row as batches."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        raise ValueError(
            f"Expected argument `{argument}` to be None or a list of batches but got a bare "
            f"Tensor of shape {tuple(value.shape)}; pass [batch] for one batch."
        )
    if not isinstance(value, Iterable):
        raise ValueError(
            f"Expected argument `{argument}` to be None or a list of batches but got "
            f"{type(value).__name__}."
        )


def _context(
    directory: Path,
    model: Any,
    loss_fn: LossFn | None,
    data: Sequence[Any] | None,
    datasets: Mapping[str, Sequence[Any]] | None,
    components: Mapping[str, Selector] | None,
    criteria: HealthCriteria | None,
    device: str,
) -> RunContext:
    saved: RunContext | None = load_run(directory)
    if model is None:
        if saved is None:
            raise ValueError(
                f"Expected argument `model` (an nn.Module or a factory returning one) because "
                f"{directory} has no run.pt to take the model definition from."
            )
        model = saved.model
    if not (isinstance(model, nn.Module) or callable(model)):
        raise ValueError(
            "Expected argument `model` to be an nn.Module or a factory returning one but got "
            f"{type(model).__name__}."
        )
    if loss_fn is None:
        loss_fn = saved.loss_fn if saved is not None else _training_step_loss()
    if data is None:
        data = saved.batches if saved is not None else _read_data(directory)
    if datasets is None:
        datasets = saved.datasets if saved is not None else {
            name: load_batches(path) for name, path in dataset_files(directory).items()
        }
    if components is None and saved is not None:
        components = saved.components
    return RunContext(
        model=model, loss_fn=loss_fn, batches=list(data),
        datasets={k: list(v) for k, v in datasets.items()},
        components=dict(components) if components else None,
        criteria=criteria if criteria is not None else (saved.criteria if saved else None),
        device=device,
    )


def _training_step_loss() -> LossFn:
    from .callbacks._base import TrainingStepLoss  # Lightning: only when needed

    return TrainingStepLoss()


def _read_data(directory: Path) -> list[Any]:
    path = directory / DATA_FILE
    if not path.is_file():
        raise ValueError(
            f"Expected argument `data` (a list of batches) because {directory} has no "
            f"{DATA_FILE} (LLCMonitor(snapshot_dir=...) writes it)."
        )
    return load_batches(path)


def _config(snapshot: Snapshot, config: SGLDConfig | None) -> SGLDConfig:
    return config or snapshot.config or SGLDConfig()


def _seeds(snapshot: Snapshot, seed: int | None, datasets: Iterable[str]) -> dict[str, int]:
    """The monitor's seeds of this step: ``derive_seed(seed, step, 0, tag)`` per estimate."""
    tags = ["llc", *(f"data/{name}" for name in datasets)]
    if seed is None:
        known = snapshot.seeds
        root = known.get("llc", 0)
        # Older snapshots kept only the global seed: derive the others from it.
        return {tag: known.get(tag, derive_seed(root, snapshot.step, 0, tag)) for tag in tags}
    return {tag: derive_seed(seed, snapshot.step, 0, tag) for tag in tags}


# -- outputs ------------------------------------------------------------------------------------


def _row(done: Completed, prefix: str, path: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"step": done.step}
    if done.estimates is not None:
        row.update({k.removeprefix(prefix): v for k, v in done.estimates.metrics(prefix).items()})
        row["status"] = done.estimates.result.status.value
        row["n_beta"] = done.estimates.result.n_beta
        row["num_chains"] = done.estimates.result.config.num_chains
    row["file"] = str(path)
    row["error"] = "" if done.error is None else done.error.strip().splitlines()[-1]
    return row


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:  # the union, in order of first appearance (failed rows have fewer)
        columns += [key for key in row if key not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _append_to_wandb(
    completed: list[Completed],
    prefix: str,
    run_id: str,
    project: str | None,
    entity: str | None,
    directory: str | os.PathLike[str] | None,
    config: SGLDConfig | None,
) -> None:
    import wandb  # only when asked

    run = wandb.init(id=run_id, project=project, entity=entity, resume="must",
                     dir=None if directory is None else str(directory))
    try:
        run.define_metric(STEP_METRIC)
        run.define_metric(f"{prefix}*", step_metric=STEP_METRIC)
        if config is not None:
            run.config.update({f"{prefix}sgld": config.to_dict()}, allow_val_change=True)
        for done in completed:
            if done.estimates is None:
                continue
            metrics = done.estimates.metrics(prefix)
            # No step=: W&B drops rows whose step is below the run's current one, and the
            # run already went past every snapshot. The x-axis is trainer/global_step.
            run.log({STEP_METRIC: done.step, **metrics})
    finally:
        run.finish()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, progress: bool) -> Any:
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="sweep", unit="snapshot")
