"""The files of ``LLCMonitor(snapshot_dir=...)``: what a sweep after training reads.

A snapshot directory holds (format version 1)::

    step_00000100.pt   {"format": "slt_callbacks.snapshot", "version": 1, "step": 100,
                        "state_dict": {...}, "config": SGLDConfig.to_dict(),
                        "seed": <seed of the global estimate>,
                        "seeds": {"llc": ..., "data/<name>": ...}, "frozen": [names]}
    data.pt            the batch pool of the global estimate (a list of batches)
    data-<name>.pt     the batches of each data-restricted estimate
    run.pt             {"format": "slt_callbacks.run", "version": 1, "context": bytes}: the
                       model definition, loss and components, pickled (written only when
                       they pickle; a sweep can be given them instead)

With one training process, ``estimate_llc(model, loss_fn, data, config=config, seed=seed)``
on a snapshot's weights and ``data.pt`` reproduces the ``slt/llc`` the monitor logged at that
step. Snapshots written before version 1 (no ``"format"`` key, only ``"seed"``) and Lightning
checkpoints (``*.ckpt``: ``"state_dict"`` and ``"global_step"``) are read too.

Loading ``run.pt`` and Lightning checkpoints unpickles arbitrary objects: read only
directories you trust (your own runs). Snapshots and data files load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .core.config import SGLDConfig

__all__ = [
    "SNAPSHOT_VERSION",
    "Snapshot",
    "atomic_save",
    "find_snapshots",
    "load_run",
    "load_snapshot",
    "save_batches",
    "save_run",
    "save_snapshot",
]

SNAPSHOT_VERSION = 1
_SNAPSHOT_FORMAT = "slt_callbacks.snapshot"
_RUN_FORMAT = "slt_callbacks.run"
RUN_FILE = "run.pt"
DATA_FILE = "data.pt"
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")
_CKPT_STEP = re.compile(r"step=(\d+)")


@dataclass(frozen=True)
class Snapshot:
    """One set of weights to estimate at.

    Attributes:
        path: the file.
        step: the training step.
        state_dict: the module's weights (CPU).
        config: the SGLD config the monitor used (None for a Lightning checkpoint).
        seeds: ``{"llc": ..., "data/<name>": ...}`` (empty when the file does not say).
        frozen: parameters that were not training at that step.
    """

    path: Path
    step: int
    state_dict: dict[str, torch.Tensor]
    config: SGLDConfig | None
    seeds: dict[str, int]
    frozen: tuple[str, ...] = ()


def snapshot_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def save_snapshot(
    directory: str | os.PathLike[str],
    *,
    step: int,
    state_dict: Mapping[str, torch.Tensor],
    config: SGLDConfig,
    seeds: Mapping[str, int],
    frozen: tuple[str, ...] = (),
) -> Path:
    """Write ``step_<step:08d>.pt`` (format version 1) and return its path."""
    path = Path(directory) / snapshot_name(step)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
    atomic_save(
        {
            "format": _SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "step": int(step),
            "state_dict": weights,
            "config": config.to_dict(),
            "seed": int(seeds["llc"]),
            "seeds": {k: int(v) for k, v in seeds.items()},
            "frozen": list(frozen),
        },
        path,
    )
    return path


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary name in the same directory, then :func:`os.replace`.

    A run killed mid-write (preemption, out of disk) then leaves either the previous file or
    the complete new one under ``path``, never a truncated file that does not load; the
    rename is atomic because both names are on one filesystem.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_batches(
    directory: str | os.PathLike[str],
    batches: list[Any],
    datasets: Mapping[str, list[Any]],
) -> None:
    """``data.pt`` and one ``data-<name>.pt`` per dataset (move the batches to the CPU
    first: they are loaded back with ``map_location="cpu"`` but saved as they are)."""
    directory = Path(directory)
    atomic_save(batches, directory / DATA_FILE)
    for name, data in datasets.items():
        atomic_save(data, directory / f"data-{name}.pt")


def load_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read a snapshot (any version) or a Lightning checkpoint.

    Raises:
        ValueError: the file is neither, or of a newer format version.
    """
    path = Path(path)
    if path.suffix == ".ckpt":
        # Lightning checkpoints hold hyperparameters and callback states of any type.
        content = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(content, Mapping) or "state_dict" not in content:
            raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict').")
        step = content.get("global_step")
        if not isinstance(step, int):
            match = _CKPT_STEP.search(path.name)
            if match is None:
                raise ValueError(f"{path}: no 'global_step' in the checkpoint or its name.")
            step = int(match.group(1))
        return Snapshot(path, step, dict(content["state_dict"]), None, {})
    content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, Mapping) or "state_dict" not in content or "step" not in content:
        raise ValueError(f"{path}: not an LLCMonitor snapshot (expected 'step' and 'state_dict').")
    version = content.get("version", 0) if content.get("format") == _SNAPSHOT_FORMAT else 0
    if version > SNAPSHOT_VERSION:
        raise ValueError(
            f"{path}: snapshot format version {version}, but this slt_callbacks reads up to "
            f"{SNAPSHOT_VERSION}; upgrade slt_callbacks."
        )
    seeds = dict(content.get("seeds") or {})
    if "llc" not in seeds and "seed" in content:
        seeds["llc"] = int(content["seed"])  # version 0 kept the global estimate's seed only
    config = content.get("config")
    return Snapshot(
        path=path,
        step=int(content["step"]),
        state_dict=dict(content["state_dict"]),
        config=None if config is None else SGLDConfig.from_dict(dict(config)),
        seeds=seeds,
        frozen=tuple(content.get("frozen", ())),
    )


def find_snapshots(source: str | os.PathLike[str]) -> list[Path]:
    """Snapshot files (``step_*.pt``) and Lightning checkpoints (``*.ckpt``) in ``source``
    (searched recursively), ordered by step; ``source`` may also be a single file.

    Raises:
        ValueError: nothing to read there.
    """
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ValueError(
            f"Expected argument `source` to be a directory or a file but got {source}."
        )
    found = [p for p in source.rglob("*") if _STEP_FILE.search(p.name) or p.suffix == ".ckpt"]
    if not found:
        raise ValueError(
            f"No snapshots (step_*.pt) or Lightning checkpoints (*.ckpt) under {source}."
        )

    def order(path: Path) -> tuple[int, str]:
        match = _STEP_FILE.search(path.name) or _CKPT_STEP.search(path.name)
        return (int(match.group(1)) if match else -1, str(path))

    return sorted(found, key=order)


def save_run(directory: str | os.PathLike[str], context_bytes: bytes) -> Path:
    """Write ``run.pt``: the serialized run context (see :func:`~slt_callbacks.executors.
    dump_context`)."""
    path = Path(directory) / RUN_FILE
    atomic_save({"format": _RUN_FORMAT, "version": SNAPSHOT_VERSION, "context": context_bytes},
               path)
    return path


def load_run(directory: str | os.PathLike[str]) -> Any | None:
    """The :class:`~slt_callbacks.executors.RunContext` saved in ``directory``, or None."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, Mapping) or content.get("format") != _RUN_FORMAT:
        raise ValueError(f"{path}: not an slt_callbacks run file.")
    from .executors import load_context

    return load_context(content["context"])


def load_batches(path: str | os.PathLike[str]) -> list[Any]:
    """A list of batches saved by the monitor (``data.pt``, ``data-<name>.pt``)."""
    batches = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(batches, list) or not batches:
        raise ValueError(f"{path}: expected a non-empty list of batches.")
    return batches


def dataset_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """``{name: path}`` of the ``data-<name>.pt`` files in ``directory``."""
    return {
        p.name.removeprefix("data-").removesuffix(".pt"): p
        for p in sorted(Path(directory).glob("data-*.pt"))
    }
