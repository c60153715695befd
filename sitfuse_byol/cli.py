"""The ``sitfuse`` command line.

Every user-caused failure ends as one line, ``error: <what> (<where>)``, and exit
code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from sitfuse_byol.config import Config, load_config
from sitfuse_byol.errors import (
    NOT_GEOREFERENCED_WARNING,
    ConfigError,
    InputError,
    ModelError,
    ShardError,
    SitfuseError,
)
from sitfuse_byol.run.lock import output_folder_lock

if TYPE_CHECKING:  # the assign command needs the gis extra, imported when used
    from sitfuse_byol.assign import AssignResult

EXIT_OK, EXIT_USAGE = 0, 2
EXIT_BROKEN_PIPE = 128 + 13  # as a process killed by SIGPIPE
log = logging.getLogger("sitfuse_byol")


def _quiet_library_warnings() -> None:
    # affine 3 makes every rioxarray call warn; it says nothing to our users.
    warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="xarray")
    warnings.filterwarnings("ignore", message=NOT_GEOREFERENCED_WARNING)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, required=True, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (value parsed as YAML), or one entry of a mapping key "
        "(train.encoder_args.width=32); repeatable",
    )
    parser.add_argument(
        "--scenes",
        action="append",
        help="override data.scenes (a path, list file or glob); repeat to give several paths or globs",
    )
    parser.add_argument("--out", help="override output.dir")


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config named by ``-c`` with ``--set``, ``--scenes`` and ``--out`` applied."""
    overrides = list(args.overrides)
    if args.scenes:
        # Typed on the command line, so taken from the current folder (like --out), not
        # from the config's; a glob stays a glob (in a list too).
        given = [str(Path(entry).absolute()) for entry in args.scenes]
        overrides.append(f"data.scenes={json.dumps(given[0] if len(given) == 1 else given)}")
    if args.out:
        overrides.append(f"output.dir={json.dumps(str(Path(args.out).resolve()))}")
    return load_config(args.config, overrides=overrides)


def cmd_inspect(args: argparse.Namespace) -> int:
    from sitfuse_byol.read import open_scene
    from sitfuse_byol.read.geotiff import georeferencing_warning
    from sitfuse_byol.read.inspect import INSPECT_JSON_KEYS, describe_scene, format_description
    from sitfuse_byol.read.scene_list import parse_scene_entry

    spec = parse_scene_entry(args.scene, base=Path.cwd(), where=args.scene)
    bands = [int(b) if b.isdigit() else b for b in args.bands.split(",")] if args.bands else None
    scene = open_scene(
        spec, bands=bands, nodata=args.nodata, valid_range=args.valid_range, variable=args.variable, unscale=args.unscale
    )
    warning = georeferencing_warning(scene)
    if warning:
        print(warning, file=sys.stderr)
    info = describe_scene(scene)
    if args.json:
        print(json.dumps({k: info[k] for k in INSPECT_JSON_KEYS}))
    else:
        print(format_description(info))
    return EXIT_OK


def _band_table(config: Config) -> str:
    """The saved band statistics as a table, for `sitfuse stats`."""
    from sitfuse_byol.normalize import BandStats
    from sitfuse_byol.run.tasks import Paths

    path = Paths(config.output_dir).stats
    stats = BandStats.load(path)
    lines = [f"{'band':<10} {'count':>12} {'mean':>12} {'std':>12} {'p2':>10} {'p98':>10}"]
    for i, name in enumerate(stats.band_names):
        lines.append(
            f"{name:<10} {stats.count[i]:>12d} {stats.mean[i]:>12.4g} {stats.std[i]:>12.4g} "
            f"{stats.p2[i]:>10.4g} {stats.p98[i]:>10.4g}"
        )
    lines.append(f"statistics of {len(stats.scenes)} scene(s) in {path}")
    return "\n".join(lines)


def _training_report(config: Config, *, trained: bool = True) -> str:
    """The last epoch's loss and embedding health, and the checkpoint, for `sitfuse train`.

    ``trained``: this command trained; otherwise the checkpoint already held this training.
    """
    from sitfuse_byol.run.tasks import Paths
    from sitfuse_byol.train.metrics import read_metrics

    lines = []
    rows = read_metrics(config.output_dir / "train" / "metrics.csv")
    if rows:
        last = rows[-1]
        done = "trained" if trained else "unchanged, not trained again (--force trains again):"
        lines.append(
            f"{done} {len(rows)} epoch(s): loss {last['loss']:.4f}, "
            f"std·√d {last['std_sqrt_d']:.3f}, effective rank {last['effective_rank']:.1f}"
        )
    lines.append(f"checkpoint: {Paths(config.output_dir).checkpoint}")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    """`sitfuse train`: the stats and train stages of a run (bad scenes left out, run.json
    kept, so `sitfuse run` goes on from this training); under torchrun (``--ddp``) every
    rank trains here directly."""
    from sitfuse_byol.run.tasks import Paths

    if not args.ddp and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Each rank would run the whole pipeline on its own, all writing to one OUTDIR.
        raise ConfigError("under torchrun, train with --ddp", where="sitfuse train")
    config = config_from_args(args)
    checkpoint = Paths(config.output_dir).checkpoint
    if args.resume and not checkpoint.exists():
        epochs = sorted(checkpoint.parent.glob("epoch_*.pt"))
        hint = f"copy {epochs[-1].name} (or another epoch) to last.pt to resume from it" if epochs else (
            "no checkpoint yet (run without --resume)"
        )
        raise ModelError(f"nothing to resume: {hint}", where=str(checkpoint))
    if not args.ddp:
        return _run_stages(args)
    from sitfuse_byol.progress import train_progress
    from sitfuse_byol.run.pipeline import record_training, saved_stats_are_current
    from sitfuse_byol.train.loop import train

    started = time.perf_counter()

    with contextlib.ExitStack() as hold:
        if os.environ.get("RANK") == "0":  # the one rank that writes (without RANK, train refuses)
            config.output_dir.mkdir(parents=True, exist_ok=True)
            hold.enter_context(output_folder_lock(config.output_dir, command="sitfuse train --ddp"))
        with train_progress(config["train"], quiet=args.quiet) as on_step, _peer_failure_as_error():
            train(
                config,
                device_name=args.device,
                resume=args.resume,
                compile_model=True if args.compile else None,
                ddp=True,
                progress=on_step,
                # Statistics of other data settings (a valid range, nodata) are made again.
                reuse_stats=saved_stats_are_current(config),
            )
        if os.environ.get("RANK", "0") == "0":  # torchrun's rank; the others trained the same model
            from sitfuse_byol.export.atomic import atomic_write_text

            record_training(config, seconds=time.perf_counter() - started)
            atomic_write_text(config.output_dir / "config.resolved.yaml", config.to_yaml())
            print(_training_report(config))
    return EXIT_OK


@contextlib.contextmanager
def _peer_failure_as_error() -> Iterator[None]:
    """A rank whose peer stopped (its own error said by it) stops with one line, not gloo's
    traceback about a closed connection."""
    import torch.distributed as dist

    try:
        yield
    except RuntimeError as err:
        lost = isinstance(err, dist.DistBackendError) or "closed by peer" in str(err) or "reset by peer" in str(err)
        if not lost:
            raise
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SitfuseError(
            f"another training process stopped (its error is printed above; here: {first[:100]})",
            where=f"rank {os.environ.get('RANK', '?')}",
        ) from err


def _run_stages(args: argparse.Namespace) -> int:
    """Run the pipeline stages of a run-family command (``args.stages``, see the parser)."""
    from sitfuse_byol.run.cluster_client import ClusterOptions
    from sitfuse_byol.run.pipeline import RunOptions, run_pipeline

    # After the user's --set, so that they win over it.
    args.overrides = [*args.overrides, *args.forced_overrides]
    if args.device:
        args.overrides.append(f"embed.device={args.device}")
    # The Dask flags are config keys too, so the schema checks them (--workers -1).
    for key in ("workers", "scheduler", "gpus_per_worker"):
        value = getattr(args, key)
        if value is not None:
            args.overrides.append(f"dask.{key}={json.dumps(value)}")
    config = config_from_args(args)
    options = RunOptions(
        force=args.force,
        quiet=args.quiet or args.json,
        json=args.json,
        # --json silences progress but not the dashboard address (then on stderr).
        dashboard=not args.quiet,
        device=args.device,
        cluster=ClusterOptions.from_config(config["dask"], workers_flag=args.workers is not None),
        # Only `run` takes the assign options; the other commands never assign.
        labels=Path(args.labels) if getattr(args, "labels", None) else None,
        label_field=getattr(args, "field", "class"),
        label_layer=getattr(args, "layer", None),
        threshold=getattr(args, "threshold", 0.51),
        stages=args.stages,
        resume=getattr(args, "resume", False),
        compile=True if getattr(args, "compile", False) else None,
        command=args.command,
    )
    summary = run_pipeline(config, options)
    if args.json:
        print(summary.to_json())
    elif args.stages == ("stats",):
        print(_band_table(config))
    elif args.stages == ("stats", "train"):
        print(_training_report(config, trained="train" in summary.stages_run))
    else:
        print(summary.table())
    if summary.failed and args.stages in (("stats",), ("stats", "train")):
        for scene_id in summary.failed:
            print(f"scene {scene_id} left out: {summary.scenes[scene_id]['error']}", file=sys.stderr)
    return summary.exit_code


def cmd_assign(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.apply is None and args.labels is None:
        raise ConfigError(
            "give --labels POLYGONS to assign, or --apply MAPPING to re-apply a mapping", where="sitfuse assign"
        )
    if args.apply is not None and args.labels is not None:
        raise ConfigError(
            "give --labels POLYGONS to count classes anew, or --apply MAPPING, not both", where="sitfuse assign"
        )
    if not config.output_dir.is_dir():
        raise InputError("no label rasters yet; run `sitfuse run` first", where=str(config.output_dir))
    from sitfuse_byol.run.interrupts import remove_stale_temporaries, terminate_as_interrupt

    # Held before run.json is read: a run ending meanwhile may replace the label rasters.
    with terminate_as_interrupt(), output_folder_lock(config.output_dir, command="sitfuse assign"):
        # What an assign killed too hard to clean up left (a run cleans up after itself).
        for folder in ("assign", "classes"):
            remove_stale_temporaries(config.output_dir / folder)
        result = _assign(args, config)
    print(result.report())
    return EXIT_OK


def _assign(args: argparse.Namespace, config: Config) -> AssignResult:
    from sitfuse_byol.assign import run_assign
    from sitfuse_byol.read import resolve_scene_list
    from sitfuse_byol.run.manifest import Manifest

    # The labels of this config's scenes (--scenes), not every scene OUTDIR ever held.
    scene_ids: set[str] | None
    try:
        scene_ids = {ref.id for ref in resolve_scene_list(config["data"]["scenes"], base=config.base)}
    except InputError:
        if args.scenes:
            raise
        # The scenes moved (outputs copied off the cluster): assign what OUTDIR holds.
        scene_ids = None
    manifest = Manifest.load(config.output_dir / "run.json")
    label_paths = manifest.label_paths(scene_ids)
    if not manifest.scenes:
        label_paths = [
            p for p in sorted((config.output_dir / "labels").glob("*.tif"))
            if (p.stem in scene_ids if scene_ids is not None else not p.stem.endswith("_coarse"))
        ]
    if not label_paths:
        raise InputError(
            "no label rasters of these scenes yet; run `sitfuse run` first", where=str(config.output_dir)
        )
    return run_assign(
        label_paths=label_paths,
        polygons_path=Path(args.labels) if args.labels else None,
        field=args.field,
        threshold=args.threshold,
        out_dir=config.output_dir,
        apply=Path(args.apply) if args.apply else None,
        layer=args.layer,
    )


def cmd_config_show(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print(config.to_yaml(), end="")
    return EXIT_OK


def cmd_config_reference(args: argparse.Namespace) -> int:
    from sitfuse_byol.config import reference_markdown

    print(reference_markdown())
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, as every other error (the usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} ({self.prog}; see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sitfuse",
        description="Unsupervised, scene-consistent segmentation of multispectral imagery.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="describe a scene without loading it")
    inspect.add_argument("scene", help="a raster path, a Zarr store, or a multi-file scene YAML")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--bands", help="comma-separated band indices (from 1) or names")
    inspect.add_argument("--nodata", type=float, help="override the file's nodata")
    inspect.add_argument(
        "--valid-range", type=float, nargs=2, metavar=("MIN", "MAX"), help="inclusive range of valid values"
    )
    inspect.add_argument("--variable", help="the variable to read from a Zarr store or NetCDF file")
    inspect.add_argument("--unscale", action="store_true", help="apply the files' scale and offset (data.unscale)")
    inspect.set_defaults(func=cmd_inspect)

    def add_run_args(sub: argparse.ArgumentParser) -> None:
        _add_config_args(sub)
        sub.add_argument("--force", action="store_true", help="redo scenes even when unchanged")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        sub.add_argument("--json", action="store_true", help="print the summary as JSON")
        sub.add_argument("--workers", type=int, help="LocalCluster workers (default: one per 4 cores, at most one per scene)")
        sub.add_argument("--scheduler", help="use an existing Dask scheduler, tcp://HOST:PORT")
        sub.add_argument("--gpus-per-worker", type=int, help="GPUs each worker has (GPU resource)")
        sub.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides train.device and embed.device")

    def add_assign_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--labels", help="class polygons (GPKG/SHP/GeoJSON) drawn in QGIS")
        sub.add_argument("--field", default="class", help="polygon attribute holding the class name")
        sub.add_argument("--layer", help="the polygon layer, when the file holds several (e.g. a GeoPackage)")
        sub.add_argument("--threshold", type=float, default=0.51, help="share a class needs in a cluster")

    # The run family: one pipeline (_run_stages), each command running some of its stages,
    # with config overrides it forces after the user's own.
    run_family = (
        (
            "run",
            "the whole pipeline: stats, train, embed, cluster, export",
            ("stats", "train", "embed", "cluster", "export", "assign"),
            (),
        ),
        # Asking for embeddings means keeping them, whatever embed.save says.
        ("embed", "write dense embeddings of every scene (Zarr)", ("embed",), ("embed.save=true",)),
        ("cluster", "fit one clustering over all scenes and export labels", ("cluster", "export"), ()),
        ("export", "re-export label rasters with the current model", ("export",), ()),
    )
    stats = commands.add_parser("stats", help="per-band statistics over all scenes")
    add_run_args(stats)
    stats.set_defaults(func=_run_stages, stages=("stats",), forced_overrides=())

    train = commands.add_parser("train", help="train the BYOL encoder (computing statistics first when needed)")
    add_run_args(train)
    train.add_argument("--resume", action="store_true", help="continue from checkpoints/last.pt")
    train.add_argument("--compile", action="store_true", help="use torch.compile")
    train.add_argument("--ddp", action="store_true", help="DistributedDataParallel, every rank trains (under torchrun)")
    train.set_defaults(func=cmd_train, stages=("stats", "train"), forced_overrides=())

    for name, help_text, stages, forced_overrides in run_family:
        sub = commands.add_parser(name, help=help_text)
        add_run_args(sub)
        if name == "run":
            add_assign_args(sub)
        sub.set_defaults(func=_run_stages, stages=stages, forced_overrides=forced_overrides)

    assign = commands.add_parser("assign", help="map clusters to classes from QGIS polygons")
    _add_config_args(assign)
    add_assign_args(assign)
    assign.add_argument("--apply", help="re-apply an edited mapping.yaml instead of counting")
    assign.set_defaults(func=cmd_assign)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the resolved config")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    reference = config_commands.add_parser("reference", help="print the config reference (Markdown)")
    reference.set_defaults(func=cmd_config_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sitfuse`` script; returns the exit code."""
    _quiet_library_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    # The run log file takes INFO records from our loggers; the console shows only
    # warnings (or everything with --debug), so an error stays the one line below.
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if args.debug else logging.WARNING)
    if not args.debug:
        # Dask's shutdown can leave a timed-out asyncio future behind, which asyncio reports
        # as "Future exception was never retrieved" (3 lines) after a run that went well;
        # a Ctrl-C while Dask waits makes its cancel callback fail in tornado's loop (a
        # NameError traceback) after the run has stopped anyway.
        console.addFilter(lambda record: record.name not in ("asyncio", "tornado.application"))
    console.addFilter(lambda record: not getattr(record, "log_file_only", False))
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s", handlers=[console])
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SitfuseError as err:
        if args.debug:
            raise
        # Under torchrun every rank meets the same error and one says it, but for what a
        # rank's own share of the data met: that rank says it.
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {err}", file=sys.stderr)
        elif isinstance(err, ShardError):
            print(f"error: {err} [rank {rank}]", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`sitfuse config reference | head`): nothing wrong with the input.
        # Python would complain again flushing stdout at exit, so that goes nowhere now.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as err:
        # What the system refused outside the checks above (a folder made read-only or
        # full during the run): still one line, naming the file.
        if args.debug:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
