"""Set-up of the worker processes of sitfuse's LocalCluster, run as a Dask preload.

A terminal sends Ctrl-C to every process of its process group, the LocalCluster's worker
processes included. Each would print a traceback of its own; the driver, which handles
the interrupt, closes them anyway, so they ignore it.
"""

from __future__ import annotations

import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    """Called by Dask in each worker process as it starts (on its main thread)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
