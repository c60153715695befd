"""Progress within a scene task: the share of its Dask blocks done, sent from the worker to
the command's progress bar, so a large scene does not sit at 0/1 for minutes.

A worker counts the tasks of the local computes a scene task runs (embedding blocks,
label blocks, overviews...) and publishes the share done as a Dask event at most every
:data:`REPORT_INTERVAL_S` seconds; the command subscribes to the events and moves the
stage's bar by each scene's share. The share can only grow on the bar: a later compute of
the same scene (the overviews after the labels) adds tasks to count.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dask.threaded
from dask.callbacks import Callback

#: The Dask event topic of scene-task progress.
PROGRESS_TOPIC = "sitfuse-scene-progress"

#: Seconds between two reports of one scene task.
REPORT_INTERVAL_S = 1.0

#: The most a bar shows for a scene whose task has not reported its end.
UNFINISHED_SHARE = 0.99


class _BlockCounter(Callback):
    """Counts the tasks of every local compute while active; calls ``report(share)``."""

    def __init__(self, report: Callable[[float], None]) -> None:
        super().__init__()
        self._report = report
        self._lock = threading.Lock()
        self._total = 0
        self._done = 0
        self._reported_at = time.monotonic()

    def _start(self, dsk: Any) -> None:
        with self._lock:
            self._total += len(dsk)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        with self._lock:
            self._done += 1
            now = time.monotonic()
            if now - self._reported_at < REPORT_INTERVAL_S or not self._total:
                return
            self._reported_at = now
            share = self._done / self._total
        self._report(share)


# The counter of the scene task this thread runs. Dask's global callbacks (``with
# Callback():``) are swapped out and back by every local compute, so two scene tasks
# computing at once in one worker would count each other's blocks and lose one counter.
_current = threading.local()


def counted_threads_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """Dask's threaded scheduler, its tasks counted for the scene task this thread runs
    (as :func:`sitfuse_byol.run.tasks.local_compute` sets it)."""
    counter = getattr(_current, "counter", None)
    if counter is not None and kwargs.get("callbacks") is None:
        kwargs["callbacks"] = [counter._callback]
    return dask.threaded.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def reporting_progress() -> Iterator[None]:
    """While a scene task runs on a Dask worker, publish its share done under its task key;
    elsewhere (called directly, as tests do) nothing."""
    from distributed import get_worker

    try:
        worker = get_worker()
        key = worker.get_current_task()
    except ValueError:  # not on a worker
        yield
        return

    def report(share: float) -> None:
        with contextlib.suppress(Exception):  # progress is never worth failing a scene for
            worker.log_event(PROGRESS_TOPIC, {"key": str(key), "share": share})

    _current.counter = _BlockCounter(report)
    try:
        yield
    finally:
        _current.counter = None


class SceneShares:
    """The command's side: turns progress events and finished scenes into bar advances.

    Args:
        advance: The bar's ``advance(n)``, called with each scene's growth in share.
    """

    def __init__(self, advance: Callable[[float], None]) -> None:
        self._advance = advance
        self._shown: dict[str, float] = {}
        self._lock = threading.Lock()

    def on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """A progress event as Dask hands it to a topic subscriber: ``(time, message)``."""
        message = event[1]
        self._move(str(message["key"]), min(float(message["share"]), UNFINISHED_SHARE))

    def finished(self, key: str) -> None:
        """The scene task under ``key`` reported its end (done or failed)."""
        self._move(key, 1.0, final=True)

    def _move(self, key: str, share: float, *, final: bool = False) -> None:
        with self._lock:
            shown = self._shown.get(key, 0.0)
            if shown >= 1.0 or (share <= shown and not final):
                return
            self._shown[key] = share
        self._advance(share - shown)
