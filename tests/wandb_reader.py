"""Read back what an offline W&B run wrote to disk, for tests that assert on it.

An offline run lives in ``<dir>/wandb/offline-run-<time>-<id>/``; everything the SDK sent to
its service is in ``run-<id>.wandb`` (media such as tables are separate files under
``files/``). That file is the *transaction log* that ``wandb sync`` later uploads, written by
the Go service ``wandb-core`` since the Python writer (``wandb/sdk/internal/datastore.py``)
was removed; wandb 0.31 ships no Python reader, so this module implements the format.

Format (LevelDB's log format with a W&B header):

- a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (uint16, little-endian), version 0;
- then 32 KiB blocks of chunks. A chunk is a 7-byte header ``<IHB`` (CRC-32, length, type)
  and ``length`` bytes of data. The CRC is zlib's CRC-32 of the type byte followed by the
  data. Type 1 is a whole record, types 2/3/4 the first/middle/last piece of a record that
  crosses a block boundary. A block's tail shorter than a chunk header is zero padding.
- each record is a serialized ``wandb.proto.wandb_internal_pb2.Record``, whose ``oneof
  record_type`` says what it is: ``history`` (a ``wandb.log`` row), ``summary`` and
  ``config`` (incremental updates), ``metric`` (``define_metric``), ``alert``, ``run``,
  ``exit``, plus bookkeeping (``header``, ``telemetry``, ``environment``, ``stats``,
  ``output_raw``, ``files``, ``artifact``...).

Values are JSON (``value_json``); keys are either ``key`` or a path ``nested_key`` (wandb 0.31
writes ``nested_key``, e.g. ``["slt/table", "nrows"]`` for a field of a logged table).

Example (from a test module in ``tests/``; ``from ..wandb_reader import ...`` one level down)::

    from .wandb_reader import read_offline_run

    run = read_offline_run(tmp_path)
    assert run["history"][0]["slt/llc"] == 1.5
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_FILE_IDENT, _FILE_MAGIC, _FILE_VERSION = b":W&B", 0xBEE1, 0
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_BLOCK_SIZE = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_environment(root: Path, setenv: Callable[[str, str], None]) -> None:
    """W&B offline, with every directory it writes under ``root``: never the network or ``~``.

    ``setenv`` is a monkeypatch's ``setenv``, so the variables are restored afterwards.
    """
    for name, value in {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
    }.items():  # fmt: skip
        setenv(name, value)
    for name in ("DIR", "CACHE_DIR", "DATA_DIR", "CONFIG_DIR", "ARTIFACT_DIR"):
        folder = root / "wandb-env" / name.lower()
        folder.mkdir(parents=True)
        setenv(f"WANDB_{name}", str(folder))


def find_run_file(directory: str | Path) -> Path:
    """The single ``run-*.wandb`` file under ``directory`` (searched recursively).

    Raises:
        FileNotFoundError: None or several were found.
    """
    found = sorted(Path(directory).rglob("run-*.wandb"))
    if len(found) != 1:
        raise FileNotFoundError(f"Expected one run-*.wandb under {directory} but found {found}")
    return found[0]


def iter_records(path: str | Path) -> Iterator[pb.Record]:
    """Yield the protobuf records of a ``.wandb`` transaction log, in order.

    Raises:
        ValueError: The file header, a checksum or a chunk sequence is wrong. A file cut off
            mid-record (a run killed while writing) ends the iteration without error.
    """
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path}: too short for a W&B header")
    header = _FILE_HEADER.unpack_from(data)
    if header != (_FILE_IDENT, _FILE_MAGIC, _FILE_VERSION):
        raise ValueError(f"{path}: not a W&B transaction log (header {header!r})")
    pending: bytes | None = None  # pieces of a record that crosses blocks
    position = _FILE_HEADER.size
    while position < len(data):
        room = _BLOCK_SIZE - position % _BLOCK_SIZE
        if room < _CHUNK_HEADER.size:
            position += room  # zero padding at the end of a block
            continue
        if position + _CHUNK_HEADER.size > len(data):
            return
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, position)
        start = position + _CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length:
            return
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: checksum mismatch in the chunk at byte {position}")
        position = start + length
        if kind == _FULL:
            yield _parse(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += chunk
            if kind == _LAST:
                yield _parse(pending)
                pending = None
        else:
            raise ValueError(f"{path}: chunk type {kind} out of sequence at byte {position}")


def _parse(payload: bytes) -> pb.Record:
    record = pb.Record()
    record.ParseFromString(payload)
    return record


def _item_path(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def _pop_path(target: dict[str, Any], path: list[str]) -> None:
    for key in path[:-1]:
        target = target.get(key, {})
    target.pop(path[-1], None)


def _apply(target: dict[str, Any], update: Any) -> None:
    """Apply a ``SummaryRecord`` or ``ConfigRecord`` (updates, then removals)."""
    for item in update.update:
        _set_path(target, _item_path(item), json.loads(item.value_json))
    for item in update.remove:
        _pop_path(target, _item_path(item))


def read_offline_run(directory: str | Path) -> dict[str, Any]:
    """Parse the offline run under ``directory`` into plain Python data.

    Args:
        directory: The run's folder, or any folder above it holding exactly one run (e.g. the
            ``save_dir`` given to ``WandbLogger``).

    Returns:
        A dict with

        - ``"run_id"``, ``"project"``: from the run record;
        - ``"history"``: one dict per ``wandb.log`` call, nested where W&B nests (a table
          appears as ``{"_type": "table-file", "nrows": ..., "path": ...}``), with W&B's
          ``_step``, ``_runtime`` and ``_timestamp``;
        - ``"metrics"``: one dict per ``define_metric`` call: ``name`` or ``glob_name``,
          ``step_metric``, ``step_sync``, ``hidden``, ``summary``, ``goal``;
        - ``"alerts"``: ``{"title", "text", "level", "wait_duration_s"}`` per ``run.alert``;
        - ``"config"``, ``"summary"``: the final state after all incremental updates;
        - ``"exit_code"``: from the exit record (``None`` if the run did not finish);
        - ``"record_types"``: a ``Counter`` of record types, for exploring;
        - ``"path"``: the ``.wandb`` file read.
    """
    path = find_run_file(directory)
    run: dict[str, Any] = {
        "run_id": None,
        "project": None,
        "history": [],
        "metrics": [],
        "alerts": [],
        "config": {},
        "summary": {},
        "exit_code": None,
        "record_types": Counter(),
        "path": path,
    }
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        run["record_types"][kind] += 1
        body = getattr(record, kind) if kind else None
        if kind == "run":
            run["run_id"], run["project"] = body.run_id, body.project
            _apply(run["config"], body.config)
            _apply(run["summary"], body.summary)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in body.item:
                _set_path(row, _item_path(item), json.loads(item.value_json))
            run["history"].append(row)
        elif kind in ("config", "summary"):
            _apply(run[kind], body)
        elif kind == "metric":
            run["metrics"].append(_metric(body))
        elif kind == "alert":
            run["alerts"].append(
                {
                    "title": body.title,
                    "text": body.text,
                    "level": body.level,
                    "wait_duration_s": body.wait_duration / 1000,  # stored in milliseconds
                }
            )
        elif kind == "exit":
            run["exit_code"] = body.exit_code
    return run


def _metric(body: Any) -> dict[str, Any]:
    return {
        "name": body.name or None,
        "glob_name": body.glob_name or None,
        "step_metric": body.step_metric or None,
        "step_sync": body.options.step_sync,
        "hidden": body.options.hidden,
        "summary": [field.name for field, on in body.summary.ListFields() if on],
        "goal": pb.MetricRecord.MetricGoal.Name(body.goal),
    }


def rows_with(run: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The history rows that contain ``key``."""
    return [row for row in run["history"] if key in row]


def read_table(run: dict[str, Any], key: str) -> dict[str, Any]:
    """The last snapshot of table ``key``: ``{"columns": [...], "data": [[...], ...]}``.

    A logged ``wandb.Table`` is a history entry pointing to a JSON file under the run's
    ``files/`` folder; this follows the pointer of the last row that logged ``key``.
    """
    rows = rows_with(run, key)
    if not rows:
        raise KeyError(f"no history row logged {key!r}")
    entry = rows[-1][key]
    return json.loads((run["path"].parent / "files" / entry["path"]).read_text())


def read_finished_run(directory: str | Path, timeout_s: float = 30.0) -> dict[str, Any]:
    """:func:`read_offline_run`, once the run's exit record is on disk.

    ``wandb.finish()`` can return before the W&B service has flushed the last records of the
    transaction log (seen on a loaded 2-core machine: the summary, the last table and the
    exit record missing), so poll until the exit record is there.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_offline_run(directory)
        if run["exit_code"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.1)
