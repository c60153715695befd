"""The Dask cluster a run uses: a LocalCluster sized to the machine, or an existing scheduler."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, TextIO

import dask

from sitfuse_byol.cores import usable_cores
from sitfuse_byol.errors import ConfigError

log = logging.getLogger("sitfuse_byol.run")

#: Cores per LocalCluster worker by default. A scene's blocks already run on all of its
#: worker's threads; more processes only overlap each scene's serial parts (raster
#: writing, fitting) and cost start-up and memory. On 2 cores one in-process worker beat
#: two processes by 1.3x (4 scenes of 1 or of 4 Mpx) and 1.7-1.8x on small scenes
#: (bench_pipeline, BENCHMARKS.md).
CORES_PER_WORKER = 4

#: Dask's worker profiler samples every thread's stack (``sys._current_frames``) every
#: 10 ms. On Python 3.11 that can deadlock against the garbage collector and hang a run
#: for good (CPython gh-106883; seen here in an in-process worker during export). It only
#: feeds the dashboard's profile page, so the workers a run starts go without it; workers
#: started by hand or by a queue get the same from this environment variable.
_PROFILER_KEY = "distributed.worker.profile.enabled"
NO_WORKER_PROFILER = {_PROFILER_KEY: False}
#: The same setting as Dask reads it from the environment (``DASK_``, ``__`` for each dot).
NO_WORKER_PROFILER_ENV = f"DASK_{_PROFILER_KEY.upper().replace('.', '__')}=False"


@dataclass(frozen=True)
class ClusterOptions:
    """How to reach workers (the ``dask`` config section, overridden by CLI flags)."""

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    gpus_per_worker: int = 0
    retries: int = 2

    @classmethod
    def from_config(cls, dask_config: dict[str, Any], *, workers_flag: bool = False) -> ClusterOptions:
        """The options of a config's ``dask`` section. ``workers_flag``: ``--workers`` was
        given, which a scheduler's own workers make moot (said in a warning); a
        ``dask.workers`` kept in the config for laptop runs is left out silently."""
        scheduler = dask_config["scheduler"]
        if scheduler and workers_flag:
            log.warning(
                "warning: --workers sizes a LocalCluster; the scheduler's own workers run the scenes (%s)", scheduler
            )
        return cls(
            scheduler=scheduler,
            workers=None if scheduler else dask_config["workers"],
            threads_per_worker=dask_config["threads_per_worker"],
            gpus_per_worker=dask_config["gpus_per_worker"],
            retries=dask_config["retries"],
        )

    @property
    def resources(self) -> dict[str, int] | None:
        """Annotation for GPU tasks; a task needing a resource no worker has waits forever."""
        return {"GPU": 1} if self.gpus_per_worker else None


    def sized_for(self, n_scenes: int) -> ClusterOptions:
        """Fill in a LocalCluster's shape: a worker per :data:`CORES_PER_WORKER` cores, no
        more workers than scenes, the cores shared out.

        A single scene then still uses every core, through its blocks.
        """
        if self.scheduler:
            return self
        cores = usable_cores()
        workers = self.workers or max(1, min(cores // CORES_PER_WORKER, n_scenes))
        threads = self.threads_per_worker or max(1, cores // workers)
        return replace(self, workers=workers, threads_per_worker=threads)


def worker_info(client: Any) -> dict[str, Any]:
    """Every worker's entry of the scheduler's info, by address.

    Some distributed releases list only the first few workers unless asked for all.
    """
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # releases before the argument, which list them all anyway
        info = client.scheduler_info()
    return dict(info["workers"])


def _check_gpu_workers(client: Any, options: ClusterOptions) -> None:
    """Refuse GPU tasks that no connected worker could ever run (they would wait forever).

    A cluster without workers yet (an HPC queue still starting them) is left to wait.
    """
    if not options.gpus_per_worker:
        return
    workers = worker_info(client).values()
    if workers and not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers):
        raise ConfigError(
            f"none of the {len(workers)} Dask workers offers a GPU resource; start them with "
            "`--resources GPU=1` (one per GPU) or leave out --gpus-per-worker",
            where=str(options.scheduler),
        )


@contextlib.contextmanager
def dask_client(options: ClusterOptions, *, quiet: bool = False, stream: TextIO | None = None) -> Iterator:
    """A distributed ``Client``; the dashboard address is printed to ``stream`` (default
    stdout) unless ``quiet``."""
    from distributed import Client, LocalCluster

    # The scheduler of a LocalCluster lives in this process; its INFO chatter is not for users.
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # A lone worker runs in this process; see silence_logs below.
    logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)
    if options.scheduler:
        scheduler_before = dask.config.get("scheduler", None)
        try:
            client = Client(options.scheduler, timeout="20s")
        except (OSError, ValueError, TypeError) as err:  # unreachable, or not an address at all
            # The Client made itself dask's default scheduler before it tried to connect,
            # and a failed one leaves that behind: later computes here would wait for it.
            if scheduler_before is None:
                dask.config.config.pop("scheduler", None)
            else:
                dask.config.set(scheduler=scheduler_before)
            raise ConfigError(f"cannot reach the Dask scheduler: {err}", where=options.scheduler) from err
        cluster = None
        try:
            _check_gpu_workers(client, options)
        except ConfigError:
            client.close()
            raise
    else:
        workers = options.workers or 1
        # Worker processes get the setting from the nanny, which copies this config.
        with dask.config.set(NO_WORKER_PROFILER):
            cluster = LocalCluster(
                n_workers=workers,
                # One scene at a time per worker; the scene's blocks then use the worker's
                # `threads_per_worker` threads (passed to each task), never threads x threads.
                threads_per_worker=1,
                # A lone worker gains nothing from its own process but a start-up of seconds
                # (imports) and pickled results.
                processes=workers > 1,
                dashboard_address=":0",
                resources={"GPU": options.gpus_per_worker} if options.gpus_per_worker else None,
                # A failing task's "Compute Failed" dump (ERROR) is the scene's failure, which
                # run.json and the summary already give in one line.
                silence_logs=logging.CRITICAL,
                # Worker processes leave a terminal's Ctrl-C to this process.
                **({"preload": ["sitfuse_byol.run.worker_setup"]} if workers > 1 else {}),
            )
        client = Client(cluster)
    try:
        if not quiet and client.dashboard_link:
            print(f"Dask dashboard: {client.dashboard_link}", file=stream or sys.stdout)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
