"""One writing command at a time per output folder.

Two commands writing into one OUTDIR would delete each other's temporaries (each clears
what a killed run left), replace each other's outputs and rewrite each other's run.json.
The lock is an advisory ``flock`` on ``OUTDIR/.sitfuse.lock``: the system drops it when
its process ends, however it ends, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from sitfuse_byol.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("sitfuse_byol.run")

LOCK_NAME = ".sitfuse.lock"


def _owner(fd: int) -> str:
    """What the holder wrote into the lock file: its pid, host, command and start time."""
    with contextlib.suppress(OSError):
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if text:
            return f" ({text})"
    return ""


@contextlib.contextmanager
def output_folder_lock(out: Path, *, command: str) -> Iterator[None]:
    """Hold the output folder ``out`` (which exists) for one writing command.

    Args:
        out: The output folder.
        command: The holder's command (``sitfuse run``), recorded for whoever is refused.

    Raises:
        InputError: Another command holds the folder.
    """
    if fcntl is None:
        yield
        return
    # No O_TRUNC: a refused command must not wipe the holder's record.
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        unsupported = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another sitfuse command is writing to this output folder{_owner(fd)}; "
                "wait for it to end, or give this one another --out",
                where=str(out),
            ) from None
        except OSError as err:
            unsupported = err.strerror
        if unsupported is not None:
            # Some network file systems (NFS without lockd, Lustre without flock) refuse
            # locks; the run goes on, as it would have without this guard. (Outside the
            # handler, so that the command's own errors do not carry this one.)
            log.warning(
                "warning: cannot lock the output folder (%s): make sure no other sitfuse command writes there (%s)",
                unsupported, out,
            )
        else:
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            record = f"{command}, pid {os.getpid()} on {socket.gethostname()}, since {started}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(fd)
