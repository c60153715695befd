"""The LocalCluster shape a run picks."""

from __future__ import annotations

import pytest

from sitfuse_byol.run.cluster_client import ClusterOptions


@pytest.mark.parametrize(
    ("cores", "scenes", "asked", "shape"),
    [
        (2, 10, None, (1, 2)),  # small machine: one in-process worker, blocks on both cores
        (16, 10, None, (4, 4)),  # a worker per 4 cores
        (16, 2, None, (2, 8)),  # never more workers than scenes
        (16, 10, 3, (3, 5)),  # --workers wins; the cores shared out
    ],
)
def test_local_cluster_shape(monkeypatch, cores, scenes, asked, shape):
    monkeypatch.setattr("sitfuse_byol.run.cluster_client.usable_cores", lambda: cores)
    sized = ClusterOptions(workers=asked).sized_for(scenes)
    assert (sized.workers, sized.threads_per_worker) == shape
    assert ClusterOptions(scheduler="tcp://127.0.0.1:8786").sized_for(scenes).workers is None


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_of_a_local_cluster_run_without_the_profiler(workers):
    # Its stack sampling can deadlock Python 3.11 (CPython gh-106883): a run hung for good.
    from sitfuse_byol.run.cluster_client import dask_client

    options = ClusterOptions(workers=workers, threads_per_worker=1)
    with dask_client(options, quiet=True) as client:
        profiling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
    assert list(profiling.values()) == [False] * workers


def test_the_profiler_variable_for_hand_started_workers_is_the_same_setting():
    import dask

    from sitfuse_byol.run.cluster_client import NO_WORKER_PROFILER, NO_WORKER_PROFILER_ENV

    name, value = NO_WORKER_PROFILER_ENV.split("=")
    (key, setting), = NO_WORKER_PROFILER.items()
    collected = dask.config.collect_env({name: value})
    for part in key.split("."):
        collected = collected[part]
    assert collected is setting is False


@pytest.mark.parametrize("flag", [False, True])
def test_workers_asked_of_an_existing_scheduler_are_warned_of(caplog, flag):
    section = {"scheduler": "tcp://10.0.0.1:8786", "workers": 2, "threads_per_worker": None, "gpus_per_worker": 0,
               "retries": 2}
    with caplog.at_level("WARNING", logger="sitfuse_byol"):
        options = ClusterOptions.from_config(section, workers_flag=flag)
    assert options.workers is None and options.scheduler == "tcp://10.0.0.1:8786"
    warned = [r.getMessage() for r in caplog.records]
    expected = "warning: --workers sizes a LocalCluster; the scheduler's own workers run the scenes (tcp://10.0.0.1:8786)"
    assert warned == ([expected] if flag else [])
    assert ClusterOptions.from_config(section | {"scheduler": None}).workers == 2
