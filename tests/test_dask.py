"""A real distributed engine: dask.distributed worker processes run the estimates."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("dask.distributed")

from dask.distributed import Client, LocalCluster

from slt_callbacks import LLCMonitor, sweep_snapshots
from slt_callbacks.executors import EstimateQueue

from .callbacks.helpers import FAST, TinyRegressor, loader, make_trainer
from .test_executors import CONFIG, SEEDS, assert_same, direct, make_context, weights_at

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """One worker process, one thread: a cluster of one node, as on a laptop."""
    with (
        LocalCluster(n_workers=1, processes=True, threads_per_worker=1,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


def test_dask_worker_gives_the_direct_estimate(client: Client) -> None:
    queue = EstimateQueue(client.get_executor(), max_pending=2)
    queue.open(make_context())
    for step in (0, 5):
        queue.submit(queue.job(step, weights_at(step), CONFIG, SEEDS))
    done = queue.wait()
    queue.close()
    assert [d.step for d in done] == [0, 5] and [d.error for d in done] == [None, None]
    for d in done:
        assert_same(d.estimates, direct(d.step))


def test_monitor_on_dask_end_to_end(client: Client, tmp_path: Any) -> None:
    """Training on this process, estimates on the Dask worker, numbers back at their steps;
    then a sweep of the run's snapshots on the same cluster reproduces them."""
    monitor = LLCMonitor(config=FAST, schedule=[0, 3, 6], executor=client.get_executor(),
                         snapshot_dir=tmp_path / "snapshots")
    trainer = make_trainer(tmp_path, [monitor], max_steps=6)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LLCMonitor at step")
        trainer.fit(TinyRegressor(), loader())
    assert [entry["step"] for entry in monitor.history] == [0, 3, 6]
    # The module, loss and data come from the run's files (run.pt, data.pt).
    records = sweep_snapshots(tmp_path / "snapshots", executor=client.get_executor(),
                              progress=False)
    assert [r.llc for r in records] == pytest.approx(
        [entry["llc"] for entry in monitor.history], rel=1e-5, abs=1e-6)
