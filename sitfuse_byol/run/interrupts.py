"""Ctrl-C and SIGTERM for the commands that write into an output folder, and what a
command killed harder leaves there."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sitfuse_byol.export.atomic import remove_path


class Interrupts:
    """SIGINT and SIGTERM as Ctrl-C, remembered: the KeyboardInterrupt a signal raises can
    land in a finalizer (``__del__``), where Python prints and drops it, so the run checks
    the flag again where it waits (between stages, scene tasks and training steps)."""

    requested = False
    deferred = False

    @classmethod
    def check(cls) -> None:
        if cls.requested:
            raise KeyboardInterrupt

    @classmethod
    @contextmanager
    def defer(cls) -> Iterator[None]:
        """Hold an interrupt back until the block is over: one that lands inside Dask's
        cluster start-up leaves a half-made cluster, whose clean-up at exit fails with a
        traceback."""
        cls.deferred = True
        try:
            yield
        finally:
            cls.deferred = False
        cls.check()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so temporary files are cleaned up on the way out."""

    def handler(signum: int, frame: object) -> None:
        Interrupts.requested = True
        if not Interrupts.deferred:
            raise KeyboardInterrupt

    Interrupts.requested = Interrupts.deferred = False
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def remove_stale_temporaries(out: Path) -> None:
    """Leftovers of a run killed too hard to clean up after itself (SIGKILL, power loss)."""
    if not out.is_dir():
        return
    for path in list(out.rglob(".*.tmp-*")) + list(out.rglob(".*.staging-*")):
        remove_path(path)
    remove_path(out / ".work")
