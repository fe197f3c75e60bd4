"""StageTransitionMonitor: real Trainer runs with W&B (read back from disk), CSV and no logger.

A synthetic λ̂ series with known change points is played through ``on_llc_record`` by a
tiny callback, the way :class:`LLCMonitor` hands its records over; the end-to-end test at
the bottom uses the real LLCMonitor.
"""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slt_callbacks import SGLDConfig
from slt_callbacks.analysis.noise import signed_log, standard_error
from slt_callbacks.analysis.tracker import StageTracker
from slt_callbacks.callbacks import HessianTraceMonitor, LLCMonitor, WeightNormMonitor
from slt_callbacks.callbacks._stage_views import estimate_metrics, publish_events
from slt_callbacks.callbacks.stages import BOUNDARY_COLUMNS, EVENT_COLUMNS, StageTransitionMonitor
from slt_callbacks.detect import DetectorConfig, StageDetector, StageKind
from slt_callbacks.records import LLCRecord

from ..wandb_reader import read_finished_run, read_table, rows_with

# ~17 checkpoints per decade from step 1 to 2000, as a log-spaced schedule gives.
STEPS = [int(s) for s in np.unique(np.geomspace(1, 2000, 80).round())]
NUM_CHAINS = 4
# Saddle-to-saddle: λ̂ at a saddle (-500, not a minimum) until 10^1.4 ~ step 25, then 10 at a
# minimum until 10^2.4 ~ step 250, then 40; the loss drops at both jumps: two "acquire" events.
EPS = 1e-6
ACQUIRE = ([0.0, 1.4, 1.4 + EPS, 2.4, 2.4 + EPS, 3.4], [-500.0, -500.0, 10.0, 10.0, 40.0, 40.0])
FLAT = ([0.0, 3.4], [20.0, 20.0])
LOSS = ([0.0, 1.4, 1.4 + EPS, 2.4, 2.4 + EPS, 3.4], [2.0, 2.0, 1.0, 1.0, 0.3, 0.3])


def noisy(shape: tuple[list[float], list[float]], seed: int, noise: float = 0.03):
    """λ̂ with Gaussian noise of ``noise`` x level, and the chain std of 4 chains (so the
    standard error of the mean, std / 2, matches the noise actually added)."""
    rng = np.random.default_rng(seed)
    x = np.log10(np.array(STEPS) + 1.0)
    true = np.interp(x, *shape)
    std = 2 * noise * np.abs(true) * np.sqrt(rng.chisquare(3, x.size) / 3)
    return true + rng.normal(0.0, noise * np.abs(true)), std


def make_records(
    *,
    seed: int = 0,
    shape: tuple[list[float], list[float]] = ACQUIRE,
    components: dict[str, tuple[list[float], list[float]]] | None = None,
    diverged: dict[int, float] | None = None,
) -> dict[int, LLCRecord]:
    """One record per step of STEPS (λ̂ < 0 marked not_a_minimum); ``diverged``: {step: wild
    λ̂} marked diverged."""
    llc, std = noisy(shape, seed)
    x = np.log10(np.array(STEPS) + 1.0)
    loss = np.interp(x, *LOSS) * (1 + 0.01 * np.random.default_rng(seed + 1).normal(size=x.size))
    parts = {
        name: noisy(part, seed + 10 + i)
        for i, (name, part) in enumerate((components or {}).items())
    }
    records = {}
    for i, step in enumerate(STEPS):
        value = float(llc[i])
        status = "healthy" if value > 0 else "not_a_minimum"
        if diverged and step in diverged:
            value, status = diverged[step], "diverged"
        records[step] = LLCRecord(
            step=step,
            llc=value,
            llc_std=float(std[i]),
            status=status,
            loss=float(loss[i]),
            components={n: (float(v[i]), float(s[i]), "healthy") for n, (v, s) in parts.items()},
        )
    return records


class Feeder(Callback):
    """Plays records through ``on_llc_record`` at their steps, as LLCMonitor does."""

    def __init__(self, records: dict[int, LLCRecord]) -> None:
        self.records = records

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = self.records.get(trainer.global_step)
        if record is None:
            return
        for cb in trainer.callbacks:
            if callable(getattr(cb, "on_llc_record", None)):
                cb.on_llc_record(trainer, pl_module, record)


class Tiny(LightningModule):
    """A linear regression: ~1 ms per training step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4096, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def fit(callbacks: list[Callback], *, max_steps: int = STEPS[-1], **kwargs: Any) -> Trainer:
    options: dict[str, Any] = dict(
        max_steps=max_steps,
        logger=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    options.update(kwargs)
    trainer = Trainer(callbacks=callbacks, **options)
    trainer.fit(Tiny())
    return trainer


def feed_directly(monitor: StageTransitionMonitor, records: dict[int, LLCRecord], steps):
    """Unit-level feeding with a stand-in trainer: no loggers, no callbacks."""
    trainer = SimpleNamespace(loggers=[], is_global_zero=True, callbacks=[], global_step=0)
    for step in steps:
        monitor.on_llc_record(trainer, None, records[step])


def summary_of(events):
    return [(e.step, e.detected_at, e.component, StageKind(e.kind).value) for e in events]


# -- a W&B run, read back from disk -----------------------------------------------------------


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    wandb = pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as env:
        for name, value in (
            ("MODE", "offline"),
            ("SILENT", "true"),
            ("CONSOLE", "off"),
            ("DISABLE_GIT", "true"),
            ("DISABLE_CODE", "true"),
        ):
            env.setenv(f"WANDB_{name}", value)
        for name in ("DIR", "CACHE_DIR", "DATA_DIR", "CONFIG_DIR", "ARTIFACT_DIR"):
            folder = root / name.lower()
            folder.mkdir()
            env.setenv(f"WANDB_{name}", str(folder))
        if wandb.run is not None:
            wandb.finish()
        received = []
        monitor = StageTransitionMonitor(
            components=True, num_chains=NUM_CHAINS, on_event=received.append, chart_every=30
        )
        logger = WandbLogger(offline=True, save_dir=root / "save", project="slt-stages-test")
        records = make_records(components={"a": ACQUIRE, "b": FLAT})
        try:
            fit(
                [
                    Feeder(records),
                    WeightNormMonitor(schedule=STEPS, components={"a": "layer.weight"}),
                    HessianTraceMonitor(schedule=STEPS, num_probes=2, fisher=False),
                    monitor,
                ],
                logger=logger,
            )
        finally:
            wandb.finish()
        return read_finished_run(root / "save"), monitor, received


@pytest.mark.wandb
def test_wandb_events_and_stage_rows(wandb_run):
    run, monitor, received = wandb_run
    assert run["exit_code"] == 0
    events = monitor.events
    assert received == events
    kinds = [(e.component, StageKind(e.kind).value) for e in events]
    assert kinds == [(None, "acquire"), ("a", "acquire"), (None, "acquire"), ("a", "acquire")]
    first = events[0]
    assert 15 <= first.step <= 35 and first.detected_at > first.step
    # slt/stage: one row per record, at the record's step; it steps up where events fire.
    rows = rows_with(run, "slt/stage")
    assert [r["trainer/global_step"] for r in rows] == STEPS
    stage_at = {r["trainer/global_step"]: r["slt/stage"] for r in rows}
    global_events = [e for e in events if e.component is None]
    for step, stage in stage_at.items():
        assert stage == sum(e.detected_at <= step for e in global_events)
    assert [r["slt/stage/b"] for r in rows_with(run, "slt/stage/b")] == [0] * len(STEPS)
    assert rows_with(run, "slt/stage/a")[-1]["slt/stage/a"] == 2


@pytest.mark.wandb
def test_wandb_metric_definitions_alerts_and_tables(wandb_run):
    run, monitor, _ = wandb_run
    definitions = {(m["glob_name"], m["step_metric"]) for m in run["metrics"] if m["glob_name"]}
    assert ("slt/*", "trainer/global_step") in definitions
    # Two events of the global λ̂ and two of component "a" within seconds: the throttle lets
    # one alert through per key.
    assert [(a["title"], a["level"], a["wait_duration_s"]) for a in run["alerts"]] == [
        ("Stage transition (slt/llc)", "INFO", 600.0),
        ("Stage transition (slt/components)", "INFO", 600.0),
    ]
    assert "acquire" in run["alerts"][0]["text"] and "step" in run["alerts"][0]["text"]
    table = read_table(run, "slt/stage_events")
    assert table["columns"] == EVENT_COLUMNS
    assert [row[:4] for row in table["data"]] == [
        [e.step, e.detected_at, e.component, StageKind(e.kind).value] for e in monitor.events
    ]
    boundaries = read_table(run, "slt/stage_boundaries")
    assert boundaries["columns"] == BOUNDARY_COLUMNS
    assert {row[0] for row in boundaries["data"]} >= {None, "a"}
    chart = read_table(run, "slt/llc_by_component_table")
    assert {row[1] for row in chart["data"]} == {"a", "b"}
    assert len(chart["data"]) == 2 * len(STEPS)
    # Every 30 records, and once at the end.
    snapshots = rows_with(run, "slt/llc_by_component_table")
    assert [r["trainer/global_step"] for r in snapshots] == [STEPS[29], STEPS[59], STEPS[-1]]


@pytest.mark.wandb
def test_wandb_summary_retrospective_and_relations(wandb_run):
    run, monitor, _ = wandb_run
    summary = run["summary"]
    assert summary["slt/retrospective/num_checkpoints"] == len(STEPS)
    assert summary["slt/retrospective/num_events"] == 2
    assert summary["slt/retrospective/matched"] >= 1
    assert summary["slt/retrospective/b/num_boundaries"] == 0
    for quantity in ("weight_norm", "hessian_trace", "loss"):
        key = f"slt/relation/llc_vs_{quantity}"
        # Healthy estimates only (λ̂ at the saddle is no complexity).
        assert summary[f"{key}/num_points"] == sum(r.llc > 0 for r in monitor.records)
        assert -1 <= summary[f"{key}/pearson"] <= 1 and -1 <= summary[f"{key}/spearman"] <= 1
    # λ̂ rises while the loss falls: strongly anti-correlated by construction.
    assert summary["slt/relation/llc_vs_loss/spearman"] < -0.8
    assert summary["slt/relation/a/llc_vs_weight_norm/num_points"] > 0
    assert summary == {**summary, **monitor.summary}


# -- other loggers and no logger --------------------------------------------------------------


def test_csv_logger_run(tmp_path):
    monitor = StageTransitionMonitor(num_chains=NUM_CHAINS)
    trainer = fit([Feeder(make_records()), monitor], logger=CSVLogger(tmp_path, name="csv"))
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("slt/stage")]
    assert [int(row["step"]) for row in rows] == STEPS
    assert int(float(rows[-1]["slt/stage"])) == len(monitor.events) == 2
    assert int(float(rows[-1]["slt/num_stage_events"])) == 2
    # The saddle estimates are flagged as no complexity; the detector saw them all.
    flags = [int(float(row["slt/llc_is_complexity"])) for row in rows]
    assert flags == [int(s >= 26) for s in STEPS]


def test_no_logger_run_prints_and_calls_back(caplog):
    received = []
    monitor = StageTransitionMonitor(num_chains=NUM_CHAINS, on_event=received.append)
    with caplog.at_level(logging.INFO):
        fit([Feeder(make_records()), monitor])
    assert summary_of(received) == summary_of(monitor.events)
    assert [StageKind(e.kind).value for e in received] == ["acquire", "acquire"]
    printed = [r.getMessage() for r in caplog.records if "StageTransitionMonitor" in r.getMessage()]
    # Each event once, then the end-of-training report with the relations.
    assert sum(received[0].message in line for line in printed) == 2  # event line + report
    report = printed[-1]
    assert "Retrospective λ̂:" in report and "llc_vs_loss" in report


def test_no_false_alarm_on_noisy_trendless_series():
    names = [f"c{i}" for i in range(6)]
    records = make_records(seed=7, shape=FLAT, components={n: FLAT for n in names})
    monitor = StageTransitionMonitor(components=True, num_chains=NUM_CHAINS, verbose=False)
    fit([Feeder(records), monitor])
    assert monitor.events == []
    assert all(stage == 0 for stage in monitor.stages.values()) and len(monitor.stages) == 7
    assert monitor.summary["slt/retrospective/num_boundaries"] == 0


def test_diverged_estimates_never_reach_the_detector_saddles_do():
    wild = {STEPS[30]: -8e4, STEPS[31]: 7e4, STEPS[50]: 500.0}
    records = make_records(diverged=wild)
    monitor = StageTransitionMonitor(num_chains=NUM_CHAINS, verbose=False)
    feed_directly(monitor, records, STEPS)
    # The same events as a detector that never saw the diverged checkpoints at all, and
    # that saw the saddle estimates with the standard error of the chain mean.
    reference = StageDetector()
    for step in STEPS:
        r = records[step]
        if step not in wild:
            reference.update(step, r.llc, standard_error(r.llc_std, NUM_CHAINS), r.loss)
    assert summary_of(monitor.events) == summary_of(reference.events)
    assert len(reference.events) == 2
    assert monitor.num_rejected == {None: 3}
    assert monitor.tracker.num_saddle == {
        None: sum(r.status == "not_a_minimum" for r in records.values())
    }
    assert len(monitor.records) == len(STEPS)


def test_records_out_of_order_are_processed_in_step_order():
    records = make_records()
    in_order = StageTransitionMonitor(num_chains=NUM_CHAINS, verbose=False)
    feed_directly(in_order, records, STEPS)
    shuffled = list(STEPS)
    for i in range(0, len(shuffled) - 1, 2):  # swap neighbours, as two workers would
        shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
    reordered = StageTransitionMonitor(num_chains=NUM_CHAINS, verbose=False, reorder_window=1)
    feed_directly(reordered, records, shuffled)
    reordered.tracker.flush()
    assert summary_of(reordered.events) == summary_of(in_order.events)
    assert [r.step for r in reordered.records] == STEPS and reordered.tracker.num_late == 0


# -- checkpoints ------------------------------------------------------------------------------


def test_state_round_trip_through_torch_save_mid_series(tmp_path):
    records = make_records(components={"a": ACQUIRE})
    whole = StageTransitionMonitor(components=["a"], num_chains=NUM_CHAINS, verbose=False)
    feed_directly(whole, records, STEPS)
    assert len(whole.events) == 4

    first = StageTransitionMonitor(components=["a"], num_chains=NUM_CHAINS, verbose=False)
    half = int(np.searchsorted(STEPS, 200))  # after the first jump, before the second
    feed_directly(first, records, STEPS[: half + 1])
    assert len(first.events) == 2
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = StageTransitionMonitor(components=["a"], num_chains=NUM_CHAINS, verbose=False)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    feed_directly(resumed, records, STEPS[half - 3 :])  # replayed records are ignored
    assert summary_of(resumed.events) == summary_of(whole.events)
    assert resumed.stages == whole.stages == {None: 2, "a": 2}
    assert [(r.step, r.llc) for r in resumed.records] == [(r.step, r.llc) for r in whole.records]


def test_resume_with_trainer_ckpt_path_neither_forgets_nor_repeats(tmp_path):
    records = make_records()
    uninterrupted = StageTransitionMonitor(num_chains=NUM_CHAINS, verbose=False)
    feed_directly(uninterrupted, records, STEPS)

    first = StageTransitionMonitor(num_chains=NUM_CHAINS, verbose=False)
    trainer = fit([Feeder(records), first], max_steps=150)
    assert len(first.events) == 1
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    second = StageTransitionMonitor(num_chains=NUM_CHAINS, verbose=False)
    trainer = Trainer(
        callbacks=[Feeder(records), second],
        max_steps=STEPS[-1],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), ckpt_path=tmp_path / "mid.ckpt")
    assert summary_of(second.events) == summary_of(uninterrupted.events)
    assert [r.step for r in second.records] == STEPS


# -- W&B wiring without a run, and arguments ---------------------------------------------------


def test_setup_defines_the_step_axis_even_when_alone():
    logger = MagicMock(spec=WandbLogger)
    monitor = StageTransitionMonitor()
    trainer = SimpleNamespace(
        loggers=[logger], is_global_zero=True, callbacks=[monitor], global_step=0
    )
    monitor.setup(trainer, None, "fit")
    calls = logger.experiment.define_metric.call_args_list
    assert [(c.args, c.kwargs) for c in calls] == [
        (("trainer/global_step",), {}),
        (("slt/*",), {"step_metric": "trainer/global_step"}),
    ]


def test_setup_warns_without_an_llc_monitor():
    monitor = StageTransitionMonitor()
    trainer = SimpleNamespace(loggers=[], is_global_zero=True, callbacks=[monitor], global_step=0)
    with pytest.warns(UserWarning, match="no LLCMonitor"):
        monitor.setup(trainer, None, "fit")


def test_setup_warns_with_two_llc_monitors_and_rejects_unknown_components():
    llcs = [LLCMonitor(components={"w": "layer.weight"}) for _ in range(2)]
    monitor = StageTransitionMonitor(components=["w"])
    trainer = SimpleNamespace(loggers=[], is_global_zero=True, callbacks=[*llcs, monitor],
                              global_step=0)
    with pytest.warns(UserWarning, match="2 LLCMonitors"):
        monitor.setup(trainer, None, "fit")
    unknown = StageTransitionMonitor(components=["w", "head0"])
    trainer.callbacks = [llcs[0], unknown]
    with pytest.raises(ValueError, match=r"`components`.*\['w'\].*unknown \['head0'\]"):
        unknown.setup(trainer, None, "fit")


def test_estimate_metrics_and_event_fan_out_in_order():
    tracker = StageTracker(num_chains=NUM_CHAINS, reorder_window=1)
    records = make_records()
    tracker.add(records[STEPS[0]])
    assert estimate_metrics("slt/", tracker) == {}  # the first record waits in the window
    events = []
    for step in STEPS[1:]:
        events += tracker.add(records[step])
    latest = tracker.records[-1]
    assert estimate_metrics("p/", tracker) == {
        "p/stage": 2, "p/num_stage_events": 2, "p/num_sampler_changes": 0,
        "p/llc_is_complexity": 1,
        "p/stage_signal": pytest.approx(float(signed_log(latest.llc, tracker.config.scale))),
    }
    sink, calls = MagicMock(), []
    sink.log_table.side_effect = lambda name, *a, **k: calls.append(("table", name))
    sink.alert.side_effect = lambda title, *a, **k: calls.append(("alert", title))
    options = dict(step=9, alert_level="WARN", alert_wait_s=60.0,
                   say=lambda line: calls.append(("say", line)),
                   on_event=lambda e: calls.append(("on_event", e.step)))
    publish_events(sink, "p/", events[1:], unlogged=events, **options)
    assert calls == [("table", "p/stage_events"), ("alert", "Stage transition (p/llc)"),
                     ("say", f"StageTransitionMonitor: {events[1].message}"),
                     ("on_event", events[1].step)]
    assert len(sink.log_table.call_args.args[2]) == 2  # both unlogged events are rows
    calls.clear()
    publish_events(sink, "p/", [], unlogged=events, **options)  # nothing new: nothing sent
    assert calls == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"config": {"sensitivity": 3}}, "`config`"),
        ({"components": "head0"}, "`components`"),
        ({"components": []}, "`components`"),
        ({"num_chains": 0}, "`num_chains`"),
        ({"on_event": 3}, "`on_event`"),
        ({"alert_level": "LOUD"}, "`alert_level`"),
        ({"alert_wait_s": 0}, "`alert_wait_s`"),
        ({"relations": "yes"}, "`relations`"),
        ({"relation_sensitivity": -1.0}, "`relation_sensitivity`"),
        ({"chart_every": 0}, "`chart_every`"),
        ({"reorder_window": -1}, "`reorder_window`"),
        ({"prefix": ""}, "`prefix`"),
    ],
)
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StageTransitionMonitor(**kwargs)


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match="missing"):
        StageTransitionMonitor().load_state_dict({"history": []})


def test_config_thresholds_reach_the_detectors():
    config = DetectorConfig(persistence=5, cooldown=8)
    monitor = StageTransitionMonitor(config=config, num_chains=NUM_CHAINS, verbose=False)
    feed_directly(monitor, make_records(), STEPS)
    reference = StageDetector(config)
    for step in STEPS:
        r = make_records()[step]
        reference.update(step, r.llc, standard_error(r.llc_std, NUM_CHAINS), r.loss)
    assert summary_of(monitor.events) == summary_of(reference.events)


# -- end to end with the real LLCMonitor -------------------------------------------------------


def test_end_to_end_with_the_real_llc_monitor(tmp_path):
    llc = LLCMonitor(
        config=SGLDConfig(num_chains=2, num_draws=10, num_burnin_steps=5),
        schedule=[0, 2, 4, 8, 16, 32],
        components={"w": "layer.weight"},
    )
    norms = WeightNormMonitor(schedule=[0, 2, 4, 8, 16, 32])
    stages = StageTransitionMonitor(components=["w"], verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "no LLCMonitor tells num_chains"
        warnings.filterwarnings("ignore", message=".*LLCMonitor at step")  # chain health
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers)")
        trainer = fit([llc, norms, stages], max_steps=32, logger=CSVLogger(tmp_path, name="csv"))
    assert [r.step for r in stages.records] == [h["step"] for h in llc.history]
    assert [r.to_dict() for r in stages.records] == [
        LLCRecord.from_dict(h).to_dict() for h in llc.history
    ]
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("slt/stage/w")]
    assert [int(row["step"]) for row in rows] == [0, 2, 4, 8, 16, 32]
    assert "slt/relation/llc_vs_weight_norm/num_points" in stages.summary


def test_configurable_from_yaml():
    """LightningCLI builds the monitor, DetectorConfig included, from plain YAML."""
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--stages", type=StageTransitionMonitor)
    config = parser.parse_string(
        "stages:\n"
        "  class_path: slt_callbacks.callbacks.stages.StageTransitionMonitor\n"
        "  init_args:\n"
        "    config: {sensitivity: 2.5, persistence: 4, cooldown: 3, window: 10}\n"
        "    components: [L0.head0, L1.head1]\n"
        "    alert_level: WARN\n"
        "    alert_wait_s: 3600\n"
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    monitor = instantiate(config).stages
    assert monitor.config == DetectorConfig(sensitivity=2.5, persistence=4, cooldown=3, window=10)
    assert monitor.components == ["L0.head0", "L1.head1"]
    assert (monitor.alert_level, monitor.alert_wait_s) == ("WARN", 3600.0)
