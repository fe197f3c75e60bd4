"""plot_run and read_metrics_csv: what a user draws from a run's metrics.csv."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("matplotlib")

from slt_callbacks.plots import plot_run, read_metrics_csv


def _rows() -> list[dict[str, float]]:
    """A run as a CSVLogger writes it: loss rows every step, monitor rows on a schedule, λ̂
    and its status in the same row, the other monitors in rows of their own."""
    rows: list[dict[str, float]] = [{"step": s, "train_loss": 50.0 / (1 + s)} for s in range(200)]
    for step, llc, code in [(1, -5000.0, 3), (10, -4000.0, 3), (40, -300.0, 3), (100, 12.0, 0),
                            (150, 11.0, 0), (199, float("nan"), 4)]:  # fmt: skip
        rows.append({"step": step, "slt/llc": llc, "slt/llc_std": 1.0,
                     "slt/diag/status_code": code})  # fmt: skip
        rows.append({"step": step, "slt/weight_norm": step / 100})
        rows.append({"step": step, "slt/hessian_trace": 3.0, "slt/hessian_trace_stderr": 0.1})
    return rows


def _lines(fig, gid: str) -> list:
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == gid]


def test_plot_run_draws_saddle_estimates_hollow_and_marks_events(tmp_path) -> None:
    events = [{"step": 40, "kind": "acquire", "component": None},
              {"step": 100, "kind": "turn", "component": "head0"}]  # fmt: skip
    path = tmp_path / "run.png"
    fig = plot_run(_rows(), events, path, true_lambda=16.0, title="t")
    assert path.stat().st_size > 10_000
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "training loss", "λ̂ (symlog)", "weight norm ‖w‖", "Hessian trace tr H",
    ]  # fmt: skip
    (saddle,) = _lines(fig, "llc-saddle")
    assert list(saddle.get_xdata()) == [1, 10, 40]  # not_a_minimum (status code 3)
    assert saddle.get_markerfacecolor() == "none"  # hollow
    # errorbar gives its caps the gid too; the data line is the one with dots.
    (healthy,) = [line for line in _lines(fig, "llc-healthy") if line.get_marker() == "o"]
    assert list(healthy.get_xdata()) == [100, 150]
    (other,) = _lines(fig, "llc-unhealthy")
    assert list(other.get_xdata()) == [199]  # diverged
    assert fig.axes[1].get_yscale() == "symlog"
    # The global event crosses all four panels; the component's event is not drawn.
    assert len(_lines(fig, "event-acquire")) == 4
    assert _lines(fig, "event-turn") == []
    assert "acquire" in [t.get_text() for t in fig.axes[0].texts]


def test_plot_run_accepts_event_objects_and_partial_rows() -> None:
    class Event:
        step, kind, component = 40, "simplify", None

    fig = plot_run([{"step": 5, "slt/llc": 3.0}], [Event()])
    assert len(fig.axes) == 1  # only λ̂ was logged
    assert len(_lines(fig, "event-simplify")) == 1


def test_plot_run_rejects_rows_without_step_or_without_anything_to_plot() -> None:
    with pytest.raises(ValueError, match="'step'"):
        plot_run([{"train_loss": 1.0}])
    with pytest.raises(ValueError, match="at least one of"):
        plot_run([{"step": 1, "epoch": 0}])


def test_read_metrics_csv_skips_empty_cells(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", "slt/llc", "train_loss"])
        writer.writeheader()
        writer.writerow({"epoch": 0, "step": 3, "slt/llc": "", "train_loss": 0.5})
        writer.writerow({"epoch": 0, "step": 3, "slt/llc": -12.5, "train_loss": ""})
    assert read_metrics_csv(path) == [
        {"epoch": 0.0, "step": 3.0, "train_loss": 0.5},
        {"epoch": 0.0, "step": 3.0, "slt/llc": -12.5},
    ]


def test_plot_run_reads_a_metrics_csv_path_and_rejects_a_path_as_events(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,train_loss,slt/llc\n0,1.0,\n5,0.5,3.0\n")
    fig = plot_run(str(metrics), path=tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) >= 2  # a loss panel and a λ̂ panel
    with pytest.raises(ValueError, match="`events`"):
        plot_run(metrics, str(tmp_path / "x.png"))
