"""Progress within scene tasks: from a real Dask worker's local computes to the bar."""

from __future__ import annotations

import threading
import time

import dask.array as da
import numpy as np
import pytest

from sitfuse_byol.run import scene_progress
from sitfuse_byol.run.scene_progress import (
    PROGRESS_TOPIC,
    UNFINISHED_SHARE,
    SceneShares,
    reporting_progress,
)
from sitfuse_byol.run.tasks import local_compute

# Two tasks' blocks meet here in turn (an in-process worker shares this module).
BARRIER = threading.Barrier(2)


def _blocks_computed_locally(n_blocks: int, together: bool = False) -> float:
    """A scene task's kind of work: a local threaded compute over many blocks. ``together``:
    each block waits for another task's, so two tasks compute at once."""

    def slow(block: np.ndarray) -> np.ndarray:
        if together:
            BARRIER.wait(timeout=30)
        time.sleep(0.01)
        return block + 1

    with reporting_progress(), local_compute(1):
        array = da.zeros((n_blocks * 4, 4), chunks=(4, 4)).map_blocks(slow)
        return float(array.sum().compute())


def _shares_by_task(*, tasks: int, together: bool) -> list[list[float]]:
    """Run ``tasks`` scene-like tasks on a real in-process worker with as many threads;
    the shares each one reported, in order, once every task has reported near its end."""
    from distributed import Client, LocalCluster

    events: list[tuple[float, dict]] = []
    with (
        LocalCluster(n_workers=1, threads_per_worker=tasks, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.subscribe_topic(PROGRESS_TOPIC, events.append)
        futures = [client.submit(_blocks_computed_locally, 40, together, pure=False) for _ in range(tasks)]
        assert [f.result() for f in futures] == [40 * 16] * tasks
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len({m["key"] for _, m in events if m["share"] > 0.9}) < tasks:
            time.sleep(0.05)
    assert {m["key"] for _, m in events} == {str(f.key) for f in futures}
    return [[m["share"] for _, m in events if m["key"] == str(f.key)] for f in futures]


def test_a_worker_reports_the_share_of_its_blocks_done(monkeypatch):
    monkeypatch.setattr(scene_progress, "REPORT_INTERVAL_S", 0.0)
    (shares,) = _shares_by_task(tasks=1, together=False)
    assert len(shares) > 10 and shares == sorted(shares)
    assert 0 < shares[0] < 0.5 and shares[-1] == pytest.approx(1.0, abs=0.05)


def test_two_scene_tasks_at_once_in_one_worker_count_their_own_blocks(monkeypatch):
    from dask.callbacks import Callback

    monkeypatch.setattr(scene_progress, "REPORT_INTERVAL_S", 0.0)
    for shares in _shares_by_task(tasks=2, together=True):
        # Each counted only its own blocks: its share rises steadily to 1, never past it.
        assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0, abs=0.05), shares
    assert not Callback.active  # no counter left behind


def test_outside_a_worker_nothing_is_reported():
    assert _blocks_computed_locally(3) == 3 * 16


def test_the_bar_moves_by_each_scenes_growing_share_and_completes_it():
    advances: list[float] = []
    shares = SceneShares(advances.append)
    shares.on_event((0.0, {"key": "a", "share": 0.25}))
    shares.on_event((0.0, {"key": "b", "share": 0.5}))
    # A later compute of the same task adds tasks to count: its share drops, the bar does not.
    shares.on_event((0.0, {"key": "a", "share": 0.1}))
    shares.on_event((0.0, {"key": "a", "share": 1.0}))
    assert advances == [0.25, 0.5, UNFINISHED_SHARE - 0.25]
    shares.finished("a")
    shares.finished("b")
    shares.on_event((0.0, {"key": "a", "share": 0.5}))  # late, after the end
    shares.finished("c")  # a task that never reported
    assert sum(advances) == pytest.approx(3.0)
    assert all(step > 0 for step in advances)
