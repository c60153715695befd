"""The dask-jobqueue launcher: real SLURMCluster/PBSCluster job scripts, one-line errors, a real run.

No batch system exists here, so the run tests put two-line stand-ins for ``sbatch`` and
``scancel`` on ``PATH``; everything else (the scheduler, the job script, submission and
cancellation through dask-jobqueue, the subcommand) is real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import launch_hpc

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pipelines" / "launch_hpc.py"
SLURM_YAML = REPO / "pipelines" / "slurm.yaml"
PBS_YAML = REPO / "pipelines" / "pbs.yaml"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """dask-jobqueue creates ``log_directory`` (relative) when a cluster is built."""
    monkeypatch.chdir(tmp_path)


def render(capsys, path: Path) -> str:
    code = launch_hpc.main(["--cluster", str(path), "--print-job-script"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def write_variant(tmp_path: Path, base: Path, **changes) -> Path:
    data = yaml.safe_load(base.read_text())
    data.update(changes)
    path = tmp_path / f"variant-{base.name}"
    path.write_text(yaml.safe_dump(data))
    return path


def worker_line(script: str) -> str:
    (line,) = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    return line


def test_slurm_example_renders_partition_account_time_gpu_and_prologue(capsys):
    settings = yaml.safe_load(SLURM_YAML.read_text())
    script = render(capsys, SLURM_YAML)
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for directive in (
        f"#SBATCH -p {settings['queue']}",
        f"#SBATCH -A {settings['account']}",
        f"#SBATCH -t {settings['walltime']}",
        f"#SBATCH -J {settings['job_name']}",
        f"#SBATCH --cpus-per-task={settings['cores']}",
        "#SBATCH --qos=normal",
    ):
        assert directive in lines
    # The YAML names no --gres; the launcher adds exactly one for gpus_per_job: 1.
    assert not any("--gres" in d for d in settings["job_extra_directives"])
    assert [line for line in lines if "--gres" in line] == ["#SBATCH --gres=gpu:1"]
    worker = worker_line(script)
    assert worker.endswith("--resources GPU=1")
    assert worker.count("--resources") == 1
    assert "--nworkers" not in worker  # one GPU, one worker process
    assert f"--nthreads {settings['cores']}" in worker
    assert "--lifetime 3h50m" in worker
    prologue = settings["job_script_prologue"]
    positions = [lines.index(line) for line in prologue]
    assert positions == sorted(positions)
    assert max(positions) < lines.index(worker)


def test_two_gpus_per_job_give_two_worker_processes(tmp_path, capsys):
    settings = yaml.safe_load(SLURM_YAML.read_text())
    script = render(capsys, write_variant(tmp_path, SLURM_YAML, gpus_per_job=2))
    assert "#SBATCH --gres=gpu:2" in script.splitlines()
    worker = worker_line(script)
    assert "--nworkers 2" in worker
    assert f"--nthreads {settings['cores'] // 2}" in worker
    assert worker.count("--resources GPU=1") == 1


def test_a_gpu_directive_already_in_the_yaml_is_kept(tmp_path, capsys):
    path = write_variant(tmp_path, SLURM_YAML, job_extra_directives=["--gres=gpu:a100:1"])
    script = render(capsys, path)
    assert [line for line in script.splitlines() if "--gres" in line] == ["#SBATCH --gres=gpu:a100:1"]


def test_pbs_example_renders_pbs_directives_without_gpus(capsys):
    settings = yaml.safe_load(PBS_YAML.read_text())
    script = render(capsys, PBS_YAML)
    lines = script.splitlines()
    assert "#SBATCH" not in script
    for directive in (
        f"#PBS -q {settings['queue']}",
        f"#PBS -A {settings['account']}",
        f"#PBS -l walltime={settings['walltime']}",
        f"#PBS -N {settings['job_name']}",
    ):
        assert directive in lines
    (select,) = [line for line in lines if line.startswith("#PBS -l select=")]
    assert f"ncpus={settings['cores']}" in select
    assert "ngpus" not in select
    worker = worker_line(script)
    assert f"--nworkers {settings['processes']}" in worker
    assert f"--nthreads {settings['cores'] // settings['processes']}" in worker
    assert "--resources" not in worker
    for line in settings["job_script_prologue"]:
        assert line in lines


@pytest.mark.parametrize("example", [SLURM_YAML, PBS_YAML])
def test_workers_of_a_job_start_without_the_dask_profiler(capsys, example):
    # Its stack sampling can deadlock Python 3.11 workers (CPython gh-106883).
    lines = render(capsys, example).splitlines()
    export = lines.index("export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False")
    assert export < lines.index(worker_line("\n".join(lines)))
    assert lines.count(lines[export]) == 1


def test_a_file_without_a_prologue_keeps_the_sites_from_the_jobqueue_config(tmp_path, capsys):
    import dask

    site = ["module load site-python", "source /site/venv/bin/activate"]
    variant = write_variant(tmp_path, SLURM_YAML, job_script_prologue=None)
    with dask.config.set({"jobqueue.slurm.job-script-prologue": site}):
        lines = render(capsys, variant).splitlines()
    start = lines.index("export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False")
    assert lines[start + 1 : start + 3] == site


def test_pbs_gpus_go_into_the_resource_spec(tmp_path, capsys):
    path = write_variant(tmp_path, PBS_YAML, gpus_per_job=4, processes=None)
    script = render(capsys, path)
    (select,) = [line for line in script.splitlines() if line.startswith("#PBS -l select=")]
    assert select.endswith(":ngpus=4")
    worker = worker_line(script)
    assert "--nworkers 4" in worker
    assert "--resources GPU=1" in worker


def assert_one_line_error(result: subprocess.CompletedProcess | tuple[int, str, str], *fragments: str):
    code, out, err = result if isinstance(result, tuple) else (result.returncode, result.stdout, result.stderr)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def run_script(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, **kwargs
    )


def test_unknown_key_is_a_one_line_error_naming_key_and_file(tmp_path):
    path = write_variant(tmp_path, SLURM_YAML, partition="gpu")
    result = run_script("--cluster", str(path), "--print-job-script", cwd=tmp_path)
    assert_one_line_error(result, "unknown key 'partition'", f"({path})")


def test_missing_command_is_a_one_line_error(tmp_path):
    result = run_script("--cluster", str(SLURM_YAML), cwd=tmp_path)
    assert_one_line_error(result, "no command to run", "'--'")
    result = run_script("--cluster", str(SLURM_YAML), "--", cwd=tmp_path)
    assert_one_line_error(result, "no command to run")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("kind: slurm\ncores: 8\nmemory: 64GB\nwalltime: 12:00:00\n", ["'walltime' must be a string", "43200", "quote"]),
        ("kind: slurm\ncores: '8'\nmemory: 64GB\n", ["'cores' must be an integer"]),
        ("kind: slurm\ncores: 8\nmemory: 64GB\njob_script_prologue: module load cuda\n", ["'job_script_prologue' must be a list of strings"]),
        ("kind: slurm\ncores: 8\nmemory: 64GB\ngpus_per_job: true\n", ["'gpus_per_job' must be an integer"]),
        ("kind: lsf\ncores: 8\nmemory: 64GB\n", ["'kind' must be one of slurm, pbs", "lsf"]),
        ("kind: slurm\ncores: 8\n", ["missing required key 'memory'"]),
        ("kind: slurm\ncores: 8\nmemory: 64 gigs\n", ["'memory' must be a size like 64GB", "64 gigs"]),
        ("kind: slurm\ncores: 8\nmemory: -8GB\n", ["'memory' must be a positive size", "-8GB"]),
        ("kind: slurm\ncores: 8\nmemory: 8GB\ninterface: bogus0\n", ["cannot start the slurm cluster", "'bogus0'"]),
        ("kind: slurm\ncores: 8\nmemory: 8GB\nlog_directory: /proc/nope\n", ["cannot start the slurm cluster", "/proc/nope"]),
        ("kind: slurm\ncores: 8\nmemory: 64GB\ngpus_per_job: -1\n", ["'gpus_per_job' must be 0 or more"]),
        ("kind: slurm\ncores: 8\nmemory: 64GB\ngpus_per_job: 2\nprocesses: 1\n", ["'processes' (1) must equal 'gpus_per_job' (2)"]),
        ("kind: slurm\ncores: 6\nmemory: 64GB\ngpus_per_job: 4\n", ["cores (6) must be divisible by the 4"]),
        ("kind: slurm\ncores: 8\nmemory: 64GB\nresource_spec: select=1\n", ["'resource_spec' is only for kind: pbs"]),
        ("kind: slurm\ncores: 8\nmemory: 64GB\ngpus_per_job: 1\nworker_extra_args: [--resources, GPU=2]\n", ["'--resources'"]),
        ("kind: slurm\ncores: 8\nmemory: 64GB\njobs: 0\n", ["'jobs' must be at least 1"]),
        ("kind: slurm\ncores: 8\nmemry: 64GB\n", ["unknown key 'memry'", "did you mean 'memory'"]),
        ("- kind: slurm\n", ["must be a mapping"]),
        ("kind: [slurm\n", ["invalid YAML"]),
        ("kind: slurm\ncores: 8\nmemory: 64GB\nkind: pbs\n", ["invalid YAML", "duplicate key"]),
    ],
)
def test_invalid_cluster_files_are_one_line_errors(tmp_path, capsys, text, fragments):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    code = launch_hpc.main(["--cluster", str(path), "--print-job-script"])
    out, err = capsys.readouterr()
    assert_one_line_error((code, out, err), *fragments, f"({path})")


def test_missing_cluster_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    code = launch_hpc.main(["--cluster", str(path), "--print-job-script"])
    out, err = capsys.readouterr()
    assert_one_line_error((code, out, err), "cannot read the cluster file", f"({path})")


def test_command_setting_its_own_scheduler_is_refused(capsys):
    code = launch_hpc.main(["--cluster", str(SLURM_YAML), "--", "sitfuse", "run", "--scheduler", "tcp://x:1"])
    out, err = capsys.readouterr()
    assert_one_line_error((code, out, err), "leave '--scheduler' out")


@pytest.fixture
def fake_queue(tmp_path) -> tuple[Path, dict[str, str]]:
    """``sbatch``/``scancel`` stand-ins that record what dask-jobqueue hands them."""
    record = tmp_path / "record"
    bin_dir = tmp_path / "bin"
    record.mkdir()
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {record}/job.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {record}/scancel\n')
    for tool in ("sbatch", "scancel"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record, env


# The subcommand: records its arguments, connects to the scheduler it was given, waits until
# the job was submitted, then ends with the given exit code (or sleeps when told to hang).
CHILD = """
import json, pathlib, sys, time
from distributed import Client
record = pathlib.Path(sys.argv[1])
args = sys.argv[2:]
with Client(args[args.index("--scheduler") + 1], timeout="20s") as client:
    workers = len(client.scheduler_info()["workers"])
(record / "argv.json").write_text(json.dumps({"args": args, "workers": workers}))
deadline = time.monotonic() + 30
while not (record / "job.sh").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
if args[0] == "hang":
    time.sleep(60)
sys.exit(int(args[0]))
"""


def test_run_submits_jobs_passes_the_scheduler_and_returns_the_exit_code(tmp_path, fake_queue):
    record, env = fake_queue
    result = run_script(
        "--cluster", str(SLURM_YAML), "--jobs", "1",
        "--", sys.executable, "-c", CHILD, str(record), "3",
        cwd=tmp_path, env=env,
    )
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    address = lines[0].removeprefix("scheduler: ")
    assert lines[0].startswith("scheduler: tcp://")
    assert lines[1].startswith("dashboard: http")
    seen = json.loads((record / "argv.json").read_text())
    assert seen["args"] == ["3", "--scheduler", address, "--gpus-per-worker", "1"]
    assert seen["workers"] == 0  # the stand-in sbatch starts no worker
    job = (record / "job.sh").read_text()
    assert "#SBATCH --gres=gpu:1" in job
    assert f"distributed.cli.dask_worker {address} " in job
    assert (record / "scancel").read_text().split() == ["4242"]  # the job is cancelled on close


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_closes_the_cluster_stops_the_command_and_is_re_raised(tmp_path, fake_queue, signum):
    record, env = fake_queue
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--cluster", str(SLURM_YAML), "--jobs", "1",
         "--", sys.executable, "-c", CHILD, str(record), "hang"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (record / "argv.json").exists() or not (record / "job.sh").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        started = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signum, err
    assert "Traceback" not in err
    assert time.monotonic() - started < 20  # the child was stopped, not waited for
    assert (record / "scancel").read_text().split() == ["4242"]
