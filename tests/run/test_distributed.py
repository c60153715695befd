"""Real processes: a dask scheduler and workers, a killed worker, and SIGTERM mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sitfuse_byol.run.cluster_client import NO_WORKER_PROFILER_ENV
from tests.run.conftest import labels_of, write_config

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def dask_cluster(tmp_path):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # Workers started by hand, as the README says: without the profiler (CPython gh-106883).
    env = {**os.environ, "OMP_NUM_THREADS": "1", **dict([NO_WORKER_PROFILER_ENV.split("=")])}
    logs = open(tmp_path / "dask.log", "w")  # noqa: SIM115  (closed in the teardown)
    scheduler = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
        stdout=logs, stderr=logs, env=env,
    )
    workers = [
        subprocess.Popen(
            [BIN / "dask", "worker", address, "--nthreads", "1", "--no-dashboard", "--name", f"w{i}"],
            stdout=logs, stderr=logs, env=env,
        )
        for i in range(2)
    ]
    try:
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address, workers
    finally:
        for proc in [*workers, scheduler]:
            proc.kill()
            proc.wait()
        logs.close()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "sitfuse", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_same_labels(left: Path, right: Path, names) -> None:
    for name in names:
        a, b = labels_of(left / "labels" / f"{name}.tif"), labels_of(right / "labels" / f"{name}.tif")
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_existing_scheduler_gives_the_same_labels_as_a_local_run(tmp_path, crop_scenes, base_run, dask_cluster):
    address, _ = dask_cluster
    local_folder, *_ = base_run
    config = write_config(tmp_path, crop_scenes.values())
    # GPU tasks on workers without a GPU resource would wait forever: refused at once.
    proc = run_cli("run", "-c", str(config), "--scheduler", address, "--gpus-per-worker", "1", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: none of the 2 Dask workers offers a GPU resource; start them with `--resources GPU=1` "
        f"(one per GPU) or leave out --gpus-per-worker ({address})"
    )
    proc = run_cli("run", "-c", str(config), "--scheduler", address, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_labels(tmp_path / "out", local_folder / "out", crop_scenes)
    assert not (tmp_path / "out" / ".work").exists()


@pytest.mark.slow
def test_a_worker_killed_mid_run_does_not_change_the_outputs(tmp_path, crop_scenes, base_run, dask_cluster):
    address, workers = dask_cluster
    local_folder, *_ = base_run
    config = write_config(tmp_path, crop_scenes.values())
    run = subprocess.Popen(
        [BIN / "sitfuse", "run", "-c", str(config), "--scheduler", address, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    manifest = tmp_path / "out" / "run.json"

    def training_done() -> bool:
        return manifest.exists() and "train" in json.loads(manifest.read_text() or "{}").get("stages", {})

    # Training runs in this client; the per-scene tasks start right after it.
    wait_for(training_done, timeout=120, what="training to finish")
    workers[0].send_signal(signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-2000:]
    assert workers[0].poll() is not None
    assert_same_labels(tmp_path / "out", local_folder / "out", crop_scenes)
    # Whatever the killed worker left half-written is gone once the run ends.
    out = tmp_path / "out"
    assert not [*out.rglob(".*.tmp-*"), *out.rglob(".*.staging-*")] and not (out / ".work").exists()


@pytest.mark.slow
def test_sigterm_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, crop_scenes):
    names = list(crop_scenes)
    two_epochs = {"epochs": 2, "steps_per_epoch": 6}
    straight = write_config(tmp_path, crop_scenes.values(), out="straight", train=two_epochs)
    assert run_cli("run", "-c", str(straight), "--quiet", cwd=tmp_path).returncode == 0

    config = write_config(tmp_path, crop_scenes.values(), out="stopped", train=two_epochs)
    out = tmp_path / "stopped"
    run = subprocess.Popen(
        [BIN / "sitfuse", "run", "-c", str(config), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    # Stop it after the first epoch's checkpoint, in the middle of training.
    wait_for(lambda: (out / "checkpoints" / "epoch_000.pt").exists(), timeout=120, what="epoch 0")
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=120)
    assert run.returncode == 130
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name or ".staging-" in p.name]
    assert not leftovers
    assert not (out / "labels").exists() or not any((out / "labels").glob("*.tif"))

    proc = run_cli("run", "-c", str(config), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_labels(out, tmp_path / "straight", names)


@pytest.mark.slow
def test_an_interrupt_stops_a_training_that_runs_on_a_worker(tmp_path, crop_scenes):
    """With --gpus-per-worker the training is a Dask task, which its client's exit would
    not stop: it must end with the run, not write checkpoints after it."""
    config = write_config(
        tmp_path, [crop_scenes["olinda_a"]], out="gpu", train={"epochs": 4, "steps_per_epoch": 100},
        dask={"workers": 1, "gpus_per_worker": 1},
    )
    out = tmp_path / "gpu"
    run = subprocess.Popen(
        [BIN / "sitfuse", "run", "-c", str(config), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        wait_for(
            lambda: (out / "checkpoints" / "epoch_000.pt").exists() or run.poll() is not None,
            timeout=600, what="epoch 0",
        )
        assert run.poll() is None, run.communicate()[1][-2000:]
        run.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()  # a failed wait must not leave a training behind
    # Stopped between steps, not after the run gave up waiting for it.
    assert run.returncode == 130 and time.monotonic() - stopped < 25, stderr[-2000:]
    assert stderr.strip() == "interrupted"
    time.sleep(5)  # a training that outlived the run would write epoch_001.pt
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_000.pt", "last.pt"]
