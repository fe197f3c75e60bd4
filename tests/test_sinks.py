"""MetricSink: exact logger calls, a real CSVLogger, a real Trainer, and W&B read back from disk."""

from __future__ import annotations

import csv
import io
import math
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from unittest.mock import MagicMock, call

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from slt_callbacks.sinks import MetricSink

from . import wandb_reader


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mock_logger() -> MagicMock:
    return MagicMock(spec=Logger)


def mock_wandb_logger() -> MagicMock:
    # `spec` makes `isinstance(logger, WandbLogger)` true without starting a run.
    return MagicMock(spec=WandbLogger)


# -- scalar metrics: every logger -----------------------------------------------------------


def test_log_sends_floats_to_every_logger_and_nothing_else():
    loggers = [mock_logger(), mock_logger()]
    sink = MetricSink(loggers, is_global_zero=True)
    sink.log(
        {
            "slt/llc": 1,
            "slt/tensor": torch.tensor(2.5, requires_grad=True),
            "slt/one_element": torch.tensor([[0.25]], dtype=torch.float64),
            "slt/numpy": np.float32(0.5),
            "slt/skipped": None,
        },
        step=5,
    )
    sink.log({"slt/llc": 3.0}, step=np.int64(6))
    expected = {"slt/llc": 1.0, "slt/tensor": 2.5, "slt/one_element": 0.25, "slt/numpy": 0.5}
    for logger in loggers:
        assert logger.mock_calls == [
            call.log_metrics(expected, step=5),
            call.log_metrics({"slt/llc": 3.0}, step=6),
        ]
        metrics = logger.log_metrics.call_args_list[0].args[0]
        assert all(type(value) is float for value in metrics.values())
        assert type(logger.log_metrics.call_args_list[1].kwargs["step"]) is int


def test_log_keeps_nan_and_skips_empty_rows():
    logger = mock_logger()
    sink = MetricSink([logger], is_global_zero=True)
    sink.log({"slt/llc": None}, step=1)
    sink.log({}, step=2)
    assert logger.mock_calls == []
    sink.log({"slt/llc": float("nan")}, step=3)
    (metrics,), kwargs = logger.log_metrics.call_args
    assert math.isnan(metrics["slt/llc"]) and kwargs == {"step": 3}


@pytest.mark.parametrize(
    ("metrics", "step", "match"),
    [
        ({"slt/llc": torch.ones(3)}, 1, r"metric 'slt/llc' to be a one-element tensor .* \(3,\)"),
        ({"slt/llc": "high"}, 1, r"metric 'slt/llc' to be a number, .* but got str: 'high'"),
        ({"slt/llc": [1.0]}, 1, r"metric 'slt/llc' to be a number"),
        ({"slt/llc": 1.0}, -1, r"`step` to be a non-negative int but got -1"),
        ({"slt/llc": 1.0}, 2.0, r"`step` to be a non-negative int but got 2.0"),
    ],
)
def test_log_rejects_what_is_not_a_scalar(metrics, step, match):
    logger = mock_logger()
    with pytest.raises(ValueError, match=match):
        MetricSink([logger], is_global_zero=True).log(metrics, step=step)
    assert logger.mock_calls == []


def test_only_global_rank_zero_writes(monkeypatch):
    logger, wandb_logger = mock_logger(), mock_wandb_logger()
    MetricSink([logger, wandb_logger], is_global_zero=False).log({"slt/llc": 1.0}, step=1)
    quiet = MetricSink([logger, wandb_logger], is_global_zero=False)
    quiet.define_metrics()
    quiet.alert("t", "x")
    quiet.log_table("slt/t", ["a"], [[1]], step=1)
    quiet.summary_update({"a": 1})
    assert logger.mock_calls == [] and wandb_logger.mock_calls == []

    # Without a flag, Lightning's process-global rank decides (set by the Trainer at launch).
    sink = MetricSink([logger])
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    sink.log({"slt/llc": 1.0}, step=1)
    assert logger.mock_calls == []
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    sink.log({"slt/llc": 1.0}, step=1)
    assert logger.mock_calls == [call.log_metrics({"slt/llc": 1.0}, step=1)]


def test_csv_logger_receives_the_metrics(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version=0)
    sink = MetricSink([logger], is_global_zero=True)
    sink.log({"slt/llc": 1.5, "slt/llc_std": torch.tensor(0.1)}, step=5)
    sink.log({"slt/llc": 2.5}, step=10)
    logger.finalize("success")  # the CSV is flushed every 100 rows and at the end of fit
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["step"], row["slt/llc"], row["slt/llc_std"]) for row in rows] == [
        ("5", "1.5", "0.10000000149011612"),
        ("10", "2.5", ""),
    ]


class LossModel(BoringModel):
    """The user's module, which logs its own loss."""

    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("train_loss", output["loss"])
        return output


class Probe(Callback):
    """A minimal monitor: a sink built in `setup`, fed from a hook."""

    def setup(self, trainer, pl_module, stage):
        self.sink = MetricSink.from_trainer(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sink.log({"slt/probe": 10.0 * trainer.global_step}, step=trainer.global_step)


def test_inside_a_trainer_the_sink_leaves_module_logging_alone(tmp_path):
    trainer = Trainer(
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        callbacks=[Probe()],
        max_steps=3,
        log_every_n_steps=1,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LossModel())
    # Nothing of ours reached Lightning's own metric bookkeeping (progress bar, EarlyStopping,
    # ModelCheckpoint read it).
    assert set(trainer.callback_metrics) == {"train_loss"}
    assert set(trainer.logged_metrics) == {"train_loss"}
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    probes = [(row["step"], row["slt/probe"]) for row in rows if row["slt/probe"]]
    assert probes == [("1", "10.0"), ("2", "20.0"), ("3", "30.0")]
    assert sum(bool(row["train_loss"]) for row in rows) == 3


# -- W&B extras with a mock WandbLogger: exact calls ------------------------------------------


def test_extras_are_no_ops_without_a_wandb_logger():
    logger = mock_logger()
    sink = MetricSink([logger], is_global_zero=True)
    assert not sink.has_wandb
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sink.define_metrics()
        sink.update_config({"n_beta": 1.0})
        sink.alert("title", "text")
        sink.log_table("slt/stages", ["step"], [[1]], step=1)
        sink.summary_update({"slt/x": 1.0})
        sink.log_line_series("slt/lines", [1, 2], {"a": [1.0, 2.0]}, "t", step=2)
    assert logger.mock_calls == []
    assert sink.state_dict() == {"tables": {}}  # rows nobody sees are not kept


def test_define_metrics_once_per_prefix():
    logger = mock_wandb_logger()
    sink = MetricSink([logger], is_global_zero=True)
    assert sink.has_wandb
    sink.define_metrics()
    sink.define_metrics()
    sink.define_metrics("curvature/")
    assert logger.experiment.mock_calls == [
        call.define_metric("trainer/global_step"),
        call.define_metric("slt/*", step_metric="trainer/global_step"),
        call.define_metric("trainer/global_step"),
        call.define_metric("curvature/*", step_metric="trainer/global_step"),
    ]


def test_config_and_summary_get_plain_python_values():
    logger = mock_wandb_logger()
    sink = MetricSink([logger], is_global_zero=True)
    sink.update_config({"slt/n_beta": torch.tensor(100.0), "slt/num_chains": np.int64(4)})
    sink.summary_update({"slt/num_stages": torch.tensor(2), "slt/last_kind": "B"})
    assert logger.experiment.mock_calls == [
        call.config.update({"slt/n_beta": 100.0, "slt/num_chains": 4}, allow_val_change=True),
        call.summary.update({"slt/num_stages": 2, "slt/last_kind": "B"}),
    ]
    config = logger.experiment.config.update.call_args.args[0]
    assert type(config["slt/num_chains"]) is int and type(config["slt/n_beta"]) is float


def test_alerts_are_throttled_per_title():
    logger, clock = mock_wandb_logger(), FakeClock()
    sink = MetricSink([logger], is_global_zero=True, clock=clock)
    sink.alert("LLC diverged", "chain 1", wait_duration_s=60)
    clock.now += 30
    sink.alert("LLC diverged", "chain 2 (throttled)", wait_duration_s=60)
    sink.alert("Stage detected", "stage A", level="INFO", wait_duration_s=60)
    clock.now += 31
    sink.alert("LLC diverged", "chain 3", level="ERROR", wait_duration_s=60)
    sink.alert("x" * 100, "long titles are cut")
    assert logger.experiment.alert.mock_calls == [
        call(title="LLC diverged", text="chain 1", level="WARN", wait_duration=60.0),
        call(title="Stage detected", text="stage A", level="INFO", wait_duration=60.0),
        call(title="LLC diverged", text="chain 3", level="ERROR", wait_duration=60.0),
        call(title="x" * 63, text="long titles are cut", level="WARN", wait_duration=300.0),
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"level": "warning"}, r"`level` to be one of \('INFO', 'WARN', 'ERROR'\) but got 'warn"),
        ({"wait_duration_s": 0}, r"`wait_duration_s` to be a positive number .* but got 0"),
        ({"wait_duration_s": "60"}, r"`wait_duration_s` .* but got '60'"),
    ],
)
def test_alert_arguments_are_validated_even_without_wandb(kwargs, match):
    for loggers in ([], [mock_wandb_logger()]):
        with pytest.raises(ValueError, match=match):
            MetricSink(loggers, is_global_zero=True).alert("title", "text", **kwargs)


def test_log_table_logs_all_rows_so_far():
    logger = mock_wandb_logger()
    sink = MetricSink([logger], is_global_zero=True)
    sink.log_table("slt/stages", ["step", "kind"], [[5, "A"]], step=5)
    sink.log_table("slt/stages", ("step", "kind"), [(torch.tensor(9), "B"), [12, "A"]], step=12)
    assert logger.mock_calls == [
        call.log_table("slt/stages", columns=["step", "kind"], data=[[5, "A"]], step=5),
        call.log_table(
            "slt/stages", columns=["step", "kind"], data=[[5, "A"], [9, "B"], [12, "A"]], step=12
        ),
    ]
    with pytest.raises(ValueError, match=r"`columns` of table 'slt/stages' to stay \['step', 'k"):
        sink.log_table("slt/stages", ["step"], [[1]], step=13)
    with pytest.raises(ValueError, match=r"each row of table 'slt/new' to have 2 values"):
        sink.log_table("slt/new", ["a", "b"], [[1, 2], [3]], step=13)


def test_table_rows_survive_a_checkpoint():
    sink = MetricSink([mock_wandb_logger()], is_global_zero=True)
    sink.log_table("slt/stages", ["step", "kind"], [[5, "A"]], step=5)
    state = sink.state_dict()
    # What Lightning saves must load with `torch.load(weights_only=True)`.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored_state = torch.load(buffer, weights_only=True)

    logger = mock_wandb_logger()
    resumed = MetricSink([logger], is_global_zero=True)
    resumed.load_state_dict(restored_state)
    resumed.log_table("slt/stages", ["step", "kind"], [[9, "B"]], step=9)
    assert logger.log_table.call_args == call(
        "slt/stages", columns=["step", "kind"], data=[[5, "A"], [9, "B"]], step=9
    )


def test_line_series_is_one_chart_with_a_line_per_name():
    wandb = pytest.importorskip("wandb")
    logger = mock_wandb_logger()
    sink = MetricSink([logger], is_global_zero=True)
    sink.log_line_series(
        "slt/llc_by_head", [10, 20], {"head_0": [1.0, 2.0], "head_1": [0.5, 0.7]}, "LLC", step=20
    )
    (metrics,), kwargs = logger.log_metrics.call_args
    assert kwargs == {"step": 20} and list(metrics) == ["slt/llc_by_head"]
    chart = metrics["slt/llc_by_head"]
    assert isinstance(chart, wandb.plot.CustomChart)
    assert chart.table.columns == ["step", "lineKey", "lineVal"]
    assert sorted(map(tuple, chart.table.data)) == [
        (10, "head_0", 1.0),
        (10, "head_1", 0.5),
        (20, "head_0", 2.0),
        (20, "head_1", 0.7),
    ]
    with pytest.raises(ValueError, match=r"line 'head_1' of 'slt/x' to have 2 values .* got 1"):
        sink.log_line_series("slt/x", [1, 2], {"head_0": [1, 2], "head_1": [1]})


def test_a_failing_extra_warns_once_and_never_raises():
    logger = mock_wandb_logger()
    logger.experiment.alert.side_effect = RuntimeError("service is down")
    logger.experiment.summary.update.side_effect = KeyError("summary")
    clock = FakeClock()
    sink = MetricSink([logger], is_global_zero=True, clock=clock)
    with pytest.warns(UserWarning, match=r"`MetricSink.alert` failed with RuntimeError: service"):
        sink.alert("a", "text")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure of the same extra is silent
        clock.now += 1000
        sink.alert("a", "text")
        sink.alert("b", "text")
    assert logger.experiment.alert.call_count == 3  # a failed alert is not throttled
    with pytest.warns(UserWarning, match=r"`MetricSink.summary_update` failed with KeyError"):
        sink.summary_update({"x": 1})
    # The scalar path is not guarded: a broken logger there is the user's to see.
    logger.log_metrics.side_effect = RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        sink.log({"slt/llc": 1.0}, step=1)


def test_the_module_imports_and_logs_without_wandb():
    code = (
        "import sys; sys.modules['wandb'] = None\n"  # makes `import wandb` raise ImportError
        "from unittest.mock import MagicMock, call\n"
        "from lightning.pytorch.loggers import Logger\n"
        "from slt_callbacks.sinks import MetricSink\n"
        "logger = MagicMock(spec=Logger)\n"
        "sink = MetricSink([logger], is_global_zero=True)\n"
        "sink.log({'slt/llc': 1.0}, step=1)\n"
        "sink.log_line_series('slt/x', [1], {'a': [1.0]})\n"
        "sink.alert('t', 'x')\n"
        "assert logger.mock_calls == [call.log_metrics({'slt/llc': 1.0}, step=1)]\n"
        "assert 'wandb' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr


# -- the reader on a synthetic log: block padding and records that span blocks ------------------


def _write_log(path: Path, payloads: list[bytes]) -> None:
    """A minimal writer of the LevelDB-style log, as the spec in wandb_reader describes it."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in payloads:
        first = True
        while True:
            room = 32768 - len(out) % 32768
            if room < 7:
                out += b"\0" * room
                continue
            piece, payload = payload[: room - 7], payload[room - 7 :]
            last = not payload
            kind = (1 if last else 2) if first else (4 if last else 3)
            crc = zlib.crc32(piece, zlib.crc32(bytes([kind])))
            out += struct.pack("<IHB", crc, len(piece), kind) + piece
            first = False
            if last:
                break
    path.write_bytes(bytes(out))


def test_reader_handles_block_padding_and_spanning_records(tmp_path):
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for i in range(300):  # many small records: some block ends leave < 7 bytes (padding)
        record = pb.Record(num=i + 1)
        record.alert.title, record.alert.text = f"alert {i}", "y" * (i % 50)
        records.append(record)
    big = pb.Record(num=301)
    item = big.config.update.add()
    item.key, item.value_json = "notes", '"' + "z" * 80_000 + '"'  # FIRST, MIDDLE, LAST chunks
    records.append(big)
    path = tmp_path / "run-synthetic.wandb"
    _write_log(path, [record.SerializeToString() for record in records])

    read = list(wandb_reader.iter_records(path))
    assert [record.num for record in read] == list(range(1, 302))
    run = wandb_reader.read_offline_run(tmp_path)
    assert len(run["alerts"]) == 300 and run["config"]["notes"] == "z" * 80_000

    corrupt = bytearray(path.read_bytes())
    corrupt[20] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="checksum mismatch"):
        list(wandb_reader.iter_records(path))


# -- W&B offline, end to end: write a real run, read its files back -----------------------------


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """Run every sink feature against a real offline W&B run once, and parse what it wrote."""
    wandb = pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as env:
        # Never the network, never the home directory.
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_CONSOLE", "off")
        env.setenv("WANDB_DISABLE_GIT", "true")
        env.setenv("WANDB_DISABLE_CODE", "true")
        for name in ("DIR", "CACHE_DIR", "DATA_DIR", "CONFIG_DIR", "ARTIFACT_DIR"):
            folder = root / name.lower()
            folder.mkdir()
            env.setenv(f"WANDB_{name}", str(folder))
        save_dir = root / "save"
        if wandb.run is not None:
            wandb.finish()
        logger = WandbLogger(offline=True, save_dir=save_dir, project="slt-callbacks-test")
        try:
            # A frozen clock: the throttle is tested above; here it makes the run exact.
            _exercise_sink(MetricSink([logger], is_global_zero=True, clock=FakeClock()))
        finally:
            wandb.finish()
        return wandb_reader.read_finished_run(save_dir)


def _exercise_sink(sink: MetricSink) -> None:
    sink.define_metrics()
    sink.define_metrics()
    sink.update_config({"slt/n_beta": torch.tensor(100.0), "slt/epsilon": 1e-4})
    sink.log({"slt/llc": 1.5, "slt/llc_std": 0.25}, step=5)
    sink.log({"slt/llc": 2.5, "slt/llc_std": None}, step=10)
    sink.alert("LLC diverged", "chain 2 diverged at step 10", wait_duration_s=120)
    sink.alert("LLC diverged", "throttled", wait_duration_s=120)
    sink.alert("Stage", "stage A began at step 5", level="INFO")
    sink.log_table("slt/stages", ["step", "kind"], [[5, "A"]], step=5)
    sink.log_table("slt/stages", ["step", "kind"], [[10, "B"]], step=10)
    sink.summary_update({"slt/num_stages": 2})
    sink.log_line_series(
        "slt/llc_by_head", [5, 10], {"h0": [1.0, 2.0], "h1": [0.5, 0.7]}, "LLC per head", step=10
    )


@pytest.mark.wandb
def test_wandb_history_has_the_metrics_at_the_trainer_step(offline_run):
    rows = wandb_reader.rows_with(offline_run, "slt/llc")
    assert [(r["trainer/global_step"], r["slt/llc"], r.get("slt/llc_std")) for r in rows] == [
        (5, 1.5, 0.25),
        (10, 2.5, None),
    ]
    assert offline_run["exit_code"] == 0


@pytest.mark.wandb
def test_wandb_metric_definitions_put_slt_on_the_global_step_axis(offline_run):
    definitions = [
        (m["glob_name"], m["step_metric"]) for m in offline_run["metrics"] if m["glob_name"]
    ]
    # WandbLogger's own "*" definition, then ours, once despite two calls.
    assert definitions == [("*", "trainer/global_step"), ("slt/*", "trainer/global_step")]
    assert {"name": "trainer/global_step"}.items() <= offline_run["metrics"][0].items()


@pytest.mark.wandb
def test_wandb_alerts_are_recorded_offline(offline_run):
    assert offline_run["alerts"] == [
        {
            "title": "LLC diverged",
            "text": "chain 2 diverged at step 10",
            "level": "WARN",
            "wait_duration_s": 120.0,
        },
        {
            "title": "Stage",
            "text": "stage A began at step 5",
            "level": "INFO",
            "wait_duration_s": 300.0,
        },
    ]


@pytest.mark.wandb
def test_wandb_config_and_summary(offline_run):
    config, summary = offline_run["config"], offline_run["summary"]
    assert config["slt/n_beta"] == 100.0 and config["slt/epsilon"] == 1e-4
    assert summary["slt/num_stages"] == 2
    assert summary["slt/llc"] == 2.5  # W&B's default summary: the last logged value


@pytest.mark.wandb
def test_wandb_table_snapshots_grow(offline_run):
    snapshots = wandb_reader.rows_with(offline_run, "slt/stages")
    assert [(r["trainer/global_step"], r["slt/stages"]["nrows"]) for r in snapshots] == [
        (5, 1),
        (10, 2),
    ]
    table = wandb_reader.read_table(offline_run, "slt/stages")
    assert table == {"columns": ["step", "kind"], "data": [[5, "A"], [10, "B"]]}


@pytest.mark.wandb
def test_wandb_line_series_is_a_table_and_a_panel(offline_run):
    # A custom chart is logged as a table `<key>_table` plus a panel spec in the config.
    table = wandb_reader.read_table(offline_run, "slt/llc_by_head_table")
    assert table["columns"] == ["step", "lineKey", "lineVal"]
    assert len(table["data"]) == 4
    panel = offline_run["config"]["_wandb"]["visualize"]["slt/llc_by_head"]
    assert panel["panel_config"]["stringSettings"]["title"] == "LLC per head"
