"""How many CPU cores this process may use."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on.

    Batch schedulers (SLURM, PBS with cgroups) give a job a subset of a node's cores
    through the CPU affinity mask, while ``os.cpu_count()`` counts the whole node:
    sizing thread pools by it would oversubscribe the job's cores.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
