"""Run ``sitfuse`` on SLURM or PBS workers through dask-jobqueue, configured by one YAML file.

Usage::

    python pipelines/launch_hpc.py --cluster pipelines/slurm.yaml [--jobs N] [--print-job-script] \\
        -- sitfuse run -c configs/landsat.yaml [more args]

The launcher starts a Dask scheduler in this process, submits ``jobs`` batch jobs whose
workers connect back to it, runs the command after ``--`` with ``--scheduler ADDRESS``
appended (and ``--gpus-per-worker 1`` when the jobs have GPUs), and closes the cluster,
cancelling the jobs, when the command ends or the launcher is interrupted. Its exit code is
the command's. With ``--print-job-script`` it prints the batch script and submits nothing.

GPU jobs run one worker process per GPU: ``processes`` equals ``gpus_per_job``, each worker
advertises ``--resources GPU=1``, and the job asks for the GPUs (``--gres=gpu:N`` on SLURM,
``ngpus=N`` in the PBS ``resource_spec``).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask
import yaml
from dask.utils import parse_bytes

from sitfuse_byol.config import load_yaml
from sitfuse_byol.run.cluster_client import NO_WORKER_PROFILER_ENV

EXIT_OK = 0
EXIT_USAGE = 2
STOP_TIMEOUT_S = 30

# Keys of the cluster file and their types: kind, jobs and gpus_per_job are the launcher's
# own; the others are keyword arguments of ``SLURMCluster`` / ``PBSCluster``.
KEY_TYPES: dict[str, type] = {
    "kind": str,
    "jobs": int,
    "gpus_per_job": int,
    "queue": str,
    "account": str,
    "cores": int,
    "memory": str,
    "walltime": str,
    "processes": int,
    "job_name": str,
    "python": str,
    "interface": str,
    "local_directory": str,
    "log_directory": str,
    "resource_spec": str,
    "job_extra_directives": list,
    "job_script_prologue": list,
    "worker_extra_args": list,
}
REQUIRED_KEYS = ("kind", "cores", "memory")
PBS_ONLY_KEYS = ("resource_spec",)
KINDS = ("slurm", "pbs")
TYPE_NAMES = {int: "an integer", str: "a string", list: "a list of strings"}


class LaunchError(Exception):
    """A problem with the cluster file or the command line, reported as one line."""

    def __init__(self, what: str, *, where: str | None = None) -> None:
        super().__init__(what if where is None else f"{what} ({where})")


class Terminated(BaseException):
    """SIGTERM raised as an exception, so that ``finally`` blocks close the cluster."""


@dataclass(frozen=True)
class ClusterSpec:
    """A validated cluster file.

    Attributes:
        kind: ``"slurm"`` or ``"pbs"``.
        jobs: Number of batch jobs to scale to.
        gpus_per_job: GPUs per job; each gets its own worker process.
        options: Keyword arguments for ``SLURMCluster`` / ``PBSCluster``.
        source: The cluster file, named in errors.
    """

    kind: str
    jobs: int
    gpus_per_job: int
    options: dict[str, Any]
    source: str = ""


def load_spec(path: Path) -> ClusterSpec:
    """Read and validate a cluster file.

    Args:
        path: The YAML file.

    Returns:
        The cluster spec, with the GPU settings folded into its options.

    Raises:
        LaunchError: The file is unreadable, has unknown keys, wrong types or values.
    """
    raw = _read_yaml(path=path)
    where = str(path)
    _check_keys(raw=raw, where=where)
    values = {key: value for key, value in raw.items() if value is not None}
    for key in REQUIRED_KEYS:
        if key not in values:
            raise LaunchError(f"missing required key '{key}'", where=where)
    for key, value in values.items():
        _check_type(key=key, value=value, where=where)
    kind = values.pop("kind")
    jobs = values.pop("jobs", 1)
    gpus = values.pop("gpus_per_job", 0)
    _check_values(kind=kind, jobs=jobs, gpus=gpus, options=values, where=where)
    options = _with_gpus(kind=kind, gpus=gpus, options=values) if gpus else values
    # The workers a run starts itself go without Dask's profiler (it can hang Python 3.11);
    # these get the same before anything else runs. Left out of the file, the prologue is
    # the site's (dask-jobqueue's config), which setting it here would otherwise replace.
    prologue = options.get("job_script_prologue")
    if prologue is None:
        prologue = dask.config.get(f"jobqueue.{kind}.job-script-prologue", default=None) or []
    options["job_script_prologue"] = [f"export {NO_WORKER_PROFILER_ENV}", *prologue]
    return ClusterSpec(kind=kind, jobs=jobs, gpus_per_job=gpus, options=options, source=where)


def _read_yaml(*, path: Path) -> dict[str, Any]:
    try:
        # The project's safe loader: a key given twice (kind: slurm, then kind: pbs) is an error.
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise LaunchError("the cluster file is not UTF-8 text", where=str(path)) from err
    except OSError as err:
        raise LaunchError(f"cannot read the cluster file: {err.strerror}", where=str(path)) from err
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise LaunchError(f"invalid YAML: {problem}", where=str(path)) from err
    if not isinstance(raw, dict):
        raise LaunchError("the cluster file must be a mapping of keys to values", where=str(path))
    return raw


def _check_keys(*, raw: dict[str, Any], where: str) -> None:
    for key in raw:
        if key not in KEY_TYPES:
            close = difflib.get_close_matches(str(key), KEY_TYPES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(KEY_TYPES)}"
            raise LaunchError(f"unknown key '{key}'{hint}", where=where)


def _check_type(*, key: str, value: Any, where: str) -> None:
    expected = KEY_TYPES[key]
    if expected is list:
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    else:
        ok = isinstance(value, expected) and not isinstance(value, bool)
    if not ok:
        # YAML 1.1 reads an unquoted 12:00:00 as the sexagesimal integer 43200.
        hint = "; quote the value" if expected is str and isinstance(value, int | float) else ""
        raise LaunchError(
            f"'{key}' must be {TYPE_NAMES[expected]}, got {value!r}{hint}", where=where
        )


def _check_values(
    *, kind: str, jobs: int, gpus: int, options: dict[str, Any], where: str
) -> None:
    if kind not in KINDS:
        raise LaunchError(f"'kind' must be one of {', '.join(KINDS)}, got '{kind}'", where=where)
    for key in PBS_ONLY_KEYS:
        if key in options and kind != "pbs":
            raise LaunchError(f"'{key}' is only for kind: pbs", where=where)
    if jobs < 1:
        raise LaunchError(f"'jobs' must be at least 1, got {jobs}", where=where)
    for key in ("cores", "processes"):
        if options.get(key, 1) < 1:
            raise LaunchError(f"'{key}' must be at least 1, got {options[key]}", where=where)
    try:
        memory = parse_bytes(options["memory"])
    except ValueError as err:
        raise LaunchError(f"'memory' must be a size like 64GB, got '{options['memory']}'", where=where) from err
    if memory <= 0:
        raise LaunchError(f"'memory' must be a positive size like 64GB, got '{options['memory']}'", where=where)
    _check_gpus(gpus=gpus, options=options, where=where)


def _check_gpus(*, gpus: int, options: dict[str, Any], where: str) -> None:
    if gpus < 0:
        raise LaunchError(f"'gpus_per_job' must be 0 or more, got {gpus}", where=where)
    if gpus and options.get("processes", gpus) != gpus:
        raise LaunchError(
            f"'processes' ({options['processes']}) must equal 'gpus_per_job' ({gpus}): "
            "one worker process per GPU; leave 'processes' out",
            where=where,
        )
    processes = gpus or options.get("processes", 1)
    if options["cores"] % processes:
        raise LaunchError(
            f"cores ({options['cores']}) must be divisible by the {processes} worker processes per job",
            where=where,
        )
    if gpus and any(arg.startswith("--resources") for arg in options.get("worker_extra_args", [])):
        raise LaunchError(
            "leave '--resources' out of 'worker_extra_args'; with 'gpus_per_job' the launcher "
            "adds '--resources GPU=1'",
            where=where,
        )


def _with_gpus(*, kind: str, gpus: int, options: dict[str, Any]) -> dict[str, Any]:
    """One worker process per GPU, each advertising a ``GPU`` resource, and the job asking for them."""
    options = dict(options, processes=gpus)
    options["worker_extra_args"] = [*options.get("worker_extra_args", []), "--resources", "GPU=1"]
    if kind == "slurm":
        directives = options.get("job_extra_directives", [])
        if not any(d.startswith(("--gres", "--gpus", "-G")) for d in directives):
            options["job_extra_directives"] = [*directives, f"--gres=gpu:{gpus}"]
    else:
        options["resource_spec"] = _pbs_resource_spec(gpus=gpus, options=options)
    return options


def _pbs_resource_spec(*, gpus: int, options: dict[str, Any]) -> str:
    """The PBS ``resource_spec`` with ``ngpus``; dask-jobqueue's own default, when none is given."""
    from dask_jobqueue.pbs import pbs_format_bytes_ceil

    spec = options.get("resource_spec")
    if spec is None:
        memory = pbs_format_bytes_ceil(parse_bytes(options["memory"]))
        spec = f"select=1:ncpus={options['cores']}:mem={memory}"
    return spec if "ngpus" in spec else f"{spec}:ngpus={gpus}"


def make_cluster(spec: ClusterSpec, *, dashboard_address: str | None = None) -> Any:
    """Start the scheduler of a ``SLURMCluster`` or ``PBSCluster``; no job is submitted yet.

    Args:
        spec: The validated cluster file.
        dashboard_address: Where the dashboard listens, e.g. ``":0"`` for any free port;
            Dask's default (``:8787``) when None.

    Returns:
        The dask-jobqueue cluster; close it when done.

    Raises:
        LaunchError: dask-jobqueue cannot start it with these options (a network
            interface this node lacks, a log directory it cannot create, ...).
    """
    from dask_jobqueue import PBSCluster, SLURMCluster

    cluster_class = SLURMCluster if spec.kind == "slurm" else PBSCluster
    scheduler_options = {} if dashboard_address is None else {"dashboard_address": dashboard_address}
    with _start_errors_as_launch_errors(spec):
        return cluster_class(**spec.options, scheduler_options=scheduler_options)


@contextlib.contextmanager
def _start_errors_as_launch_errors(spec: ClusterSpec) -> Iterator[None]:
    # What dask-jobqueue raises for options it cannot use; anything else is a bug to see whole.
    try:
        yield
    except (OSError, RuntimeError, ValueError, TypeError) as err:
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        raise LaunchError(f"cannot start the {spec.kind} cluster: {reason}", where=spec.source or None) from err


def job_script(spec: ClusterSpec) -> str:
    """The batch script each job would run, rendered without submitting anything."""
    cluster = make_cluster(spec, dashboard_address=":0")
    try:
        with _start_errors_as_launch_errors(spec):
            return cluster.job_script()
    finally:
        cluster.close()


def check_command(command: list[str], *, spec: ClusterSpec) -> None:
    """Refuse a command that cannot run before any job is submitted.

    Raises:
        LaunchError: No command, one that sets ``--scheduler`` itself, a program not on
            ``PATH``, or no batch system here to submit to.
    """
    if not command:
        raise LaunchError(
            "no command to run: give it after '--', e.g. "
            "-- sitfuse run -c CONFIG (or use --print-job-script)"
        )
    if any(arg == "--scheduler" or arg.startswith("--scheduler=") for arg in command):
        raise LaunchError("leave '--scheduler' out of the command; the launcher adds it")
    if shutil.which(command[0]) is None:
        raise LaunchError(f"command not found on PATH: {command[0]}")
    submit = "sbatch" if spec.kind == "slurm" else "qsub"
    if shutil.which(submit) is None:
        raise LaunchError(f"'{submit}' not found on PATH; run the launcher on a {spec.kind} login node")


def sitfuse_command(command: list[str], *, address: str, gpus_per_job: int) -> list[str]:
    """The command with the scheduler address, and the GPU resource when jobs have GPUs."""
    extra = ["--scheduler", address]
    if gpus_per_job and "--gpus-per-worker" not in command:
        extra += ["--gpus-per-worker", "1"]
    return [*command, *extra]


def run_command(command: list[str]) -> int:
    """Run ``command`` to completion; on an interrupt, stop it and re-raise.

    Returns:
        Its exit code, or 128 + N when signal N ended it.
    """
    with subprocess.Popen(command) as proc:
        try:
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    return 128 - code if code < 0 else code


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()


def launch(spec: ClusterSpec, *, command: list[str]) -> int:
    """Submit the jobs, run ``command`` against their scheduler, then cancel the jobs.

    Returns:
        The command's exit code.
    """
    cluster = make_cluster(spec)
    try:
        cluster.scale(jobs=spec.jobs)
        print(f"scheduler: {cluster.scheduler_address}")
        print(f"dashboard: {cluster.dashboard_link}")
        print(f"submitted {spec.jobs} {spec.kind} job(s); workers join as the jobs start", flush=True)
        full = sitfuse_command(command, address=cluster.scheduler_address, gpus_per_job=spec.gpus_per_job)
        return run_command(full)
    finally:
        cluster.close()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split ``argv`` at the first ``--`` into the launcher's options and the command."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="launch_hpc.py",
        description="Run a sitfuse command on SLURM/PBS workers started by dask-jobqueue.",
        usage="%(prog)s --cluster FILE [--jobs N] [--print-job-script] -- sitfuse run -c CONFIG ...",
    )
    parser.add_argument("--cluster", required=True, type=Path, metavar="FILE", help="cluster YAML (slurm.yaml, pbs.yaml)")
    parser.add_argument("--jobs", type=_positive_int, metavar="N", help="batch jobs to scale to (overrides 'jobs')")
    parser.add_argument(
        "--print-job-script", action="store_true", help="print the batch script and submit nothing"
    )
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    """The launcher's entry point.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 after ``--print-job-script``, 2 on a bad cluster file or command line, else the
        command's exit code.
    """
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = load_spec(args.cluster)
        if args.jobs is not None:
            spec = replace(spec, jobs=args.jobs)
        if args.print_job_script:
            print(job_script(spec), end="")
            return EXIT_OK
        check_command(command, spec=spec)
        return launch(spec, command=command)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _handle_signals() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM ``Terminated``, so ``finally`` closes the cluster.

    Importing dask_jobqueue makes SIGINT call ``sys.exit()`` (exit code 0), so it is imported
    before the handlers are set.
    """
    import dask_jobqueue  # noqa: F401

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)


def _end_by_signal(signum: int) -> None:
    """Re-raise ``signum`` with its default action, so the caller sees how the launcher ended."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


if __name__ == "__main__":
    _handle_signals()
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        _end_by_signal(signal.SIGINT)
    except Terminated:
        _end_by_signal(signal.SIGTERM)
