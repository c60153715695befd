"""``sitfuse run``: stats → train → embed → cluster → export (→ assign), over a scene list.

Global stages (statistics, training, the clustering fit) run once; per-scene stages
(embed, export) are Dask tasks with retries. A scene that fails is recorded in
``run.json`` and left out; the others go on. Every output is written under a
temporary name and renamed when complete, and ``run.json`` records a scene only when
all of its outputs exist, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import logging.handlers
import shutil
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.utils import format_bytes

from sitfuse_byol.cluster.sampling import load_samples, sample_matches
from sitfuse_byol.config import Config
from sitfuse_byol.errors import FOR_LOG_FILE, EmptySceneError, InputError, SitfuseError
from sitfuse_byol.export.atomic import atomic_write_text, remove_path
from sitfuse_byol.progress import stage_progress, train_progress
from sitfuse_byol.read import Scene, SceneRef, open_scene_from_config, resolve_scene_list
from sitfuse_byol.read.bands import in_another_order
from sitfuse_byol.read.geotiff import georeferencing_warning
from sitfuse_byol.run.cluster_client import ClusterOptions, dask_client, worker_info
from sitfuse_byol.run.interrupts import Interrupts, remove_stale_temporaries, terminate_as_interrupt
from sitfuse_byol.run.lock import LOCK_NAME, output_folder_lock
from sitfuse_byol.run.manifest import Manifest, scene_fingerprint
from sitfuse_byol.run.scene_progress import PROGRESS_TOPIC, SceneShares
from sitfuse_byol.run.tasks import (
    Paths,
    SceneReadError,
    TaskFailure,
    embed_task,
    embedding_key,
    export_task,
    has_saved_embedding,
    histogram_task,
    moments_task,
    run_scene_task,
    sample_task,
    saved_embedding_state,
    train_task,
)

if TYPE_CHECKING:  # the assign stage's polygons need the gis extra, imported when used
    from sitfuse_byol.assign import ClassPolygons
    from sitfuse_byol.normalize.stats import BandStats

log = logging.getLogger("sitfuse_byol.run")

# Fitting memory: 1M samples of 64 features is 256 MB, whatever the number of scenes;
# k-means gains nothing measurable from more (cluster benchmark, 1 vs 3 passes).
MAX_CLUSTER_SAMPLES = 1_000_000

# How long an interrupted run waits for a worker's training to see its stop event
# (it looks about every second, between steps).
TRAINING_STOP_WAIT_S = 30


@dataclass(frozen=True)
class RunOptions:
    force: bool = False
    quiet: bool = False
    json: bool = False
    # Print the Dask dashboard's address (on stderr under --json); None: unless quiet.
    dashboard: bool | None = None
    device: str | None = None
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    labels: Path | None = None
    label_field: str = "class"
    label_layer: str | None = None
    threshold: float = 0.51
    stages: tuple[str, ...] = ("stats", "train", "embed", "cluster", "export", "assign")
    # `sitfuse train --resume` / `--compile`; a run resumes an interrupted training by itself.
    resume: bool = False
    compile: bool | None = None
    # The CLI command, named to whoever finds the output folder held by this run.
    command: str = "run"


def stats_stage_key(config: Config, fingerprints: Iterable[str]) -> str:
    """What the band statistics depend on: the data settings and every scene's files."""
    return "|".join(("stats", config.digest("data"), *sorted(fingerprints)))


def train_stage_key(config: Config, stats_path: Path) -> str:
    """What the trained encoder depends on: data, tiling and train settings, and the statistics."""
    from sitfuse_byol.train.checkpoint import file_hash

    return "|".join(("train", config.digest("data", "tiling", "train"), file_hash(stats_path)))


def _config_stats_key(config: Config) -> str:
    """:func:`stats_stage_key` of the config's whole scene list, as it is on disk now."""
    refs = resolve_scene_list(config["data"]["scenes"], base=config.base)
    return stats_stage_key(config, (scene_fingerprint(r) for r in refs))


def saved_stats_are_current(config: Config) -> bool:
    """Whether ``OUTDIR/stats.json`` was computed under these data settings from these scene
    files, as ``run.json`` records it (the check a run's stats stage makes)."""
    manifest = Manifest.load(config.output_dir / "run.json")
    return manifest.stages.get("stats", {}).get("key") == _config_stats_key(config)


def record_training(config: Config, *, seconds: float) -> None:
    """Mark the statistics and training of a run done in ``run.json``, as a run's own stages
    would, after an encoder was trained outside one (``sitfuse train --ddp`` under
    torchrun), so that a later ``sitfuse run`` goes on from it instead of training again.
    """
    from sitfuse_byol.train.checkpoint import checkpoint_hash

    paths = Paths(config.output_dir)
    manifest = Manifest.load(config.output_dir / "run.json")
    manifest.stages["stats"] = {"key": _config_stats_key(config), "seconds": 0.0}
    key = train_stage_key(config, paths.stats)
    manifest.stages["train_started"] = {"key": key}
    manifest.stages["train"] = {
        "key": key, "seconds": round(seconds, 3), "checkpoint": checkpoint_hash(paths.checkpoint),
    }
    manifest.save()


#: The pipeline's stages in the order they run (assign follows when asked for).
STAGES = ("stats", "train", "embed", "cluster", "export")


@dataclass
class RunSummary:
    """A run's outcome: the scenes' run.json entries, and which scenes failed in this run
    (an entry may still say ``failed`` from an earlier run that this one did not redo)."""

    scenes: dict[str, dict[str, Any]]
    stages: dict[str, dict[str, Any]]
    out_dir: Path
    failed: list[str] = field(default_factory=list)
    # Each scene's task seconds in this run; a scene without any was left as it was.
    seconds: dict[str, float] = field(default_factory=dict)
    # The stages that did work in this run (the others found their results current).
    stages_run: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def this_run(self, scene_id: str) -> str:
        """What this run did to the scene: ``done``, ``failed``, or ``unchanged`` (its
        outputs kept from an earlier run; --force redoes it)."""
        if scene_id in self.failed:
            return "failed"
        if scene_id in self.seconds:
            return self.scenes[scene_id]["status"]
        return "unchanged" if self.scenes[scene_id]["status"] == "done" else self.scenes[scene_id]["status"]

    def to_json(self) -> str:
        """The summary for scripts: run.json's entries, each with what this run did to the
        scene and its seconds in this run (null when left as it was)."""
        scenes = {
            s: entry | {"this_run": self.this_run(s), "seconds_this_run": self.seconds.get(s)}
            for s, entry in self.scenes.items()
        }
        return json.dumps(
            {
                "out_dir": str(self.out_dir), "scenes": scenes, "stages": self.stages,
                "stages_run": self.stages_run, "failed": self.failed,
            }
        )

    def table(self) -> str:
        """Per scene: its status, its seconds in this run and its labels (or error); then
        the run's outputs that exist."""
        rows = [("scene", "status", "seconds", "outputs / error")]
        for scene_id, entry in self.scenes.items():
            outputs = entry.get("outputs", {})
            detail = entry.get("error") or outputs.get("labels") or outputs.get("embeddings", "")
            seconds = f"{self.seconds[scene_id]:.1f}" if scene_id in self.seconds else "-"
            rows.append((scene_id, self.this_run(scene_id), seconds, detail))
        widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
        labels = self.out_dir / "labels"
        extras = "".join(
            f" + {suffix}" for suffix in (".png", ".gpkg") if labels.is_dir() and any(labels.glob(f"*{suffix}"))
        )
        kinds = [
            (f"labels (COG + .qml + .aux.xml{extras})", labels),
            ("class rasters (sitfuse assign)", self.out_dir / "classes"),
            ("confidence (lower: more confident)", self.out_dir / "confidence"),
            ("embeddings (Zarr)", self.out_dir / "embeddings"),
            ("clustering model", self.out_dir / "cluster"),
            ("encoder checkpoint", self.out_dir / "checkpoints" / "last.pt"),
            ("training curves", self.out_dir / "train" / "curves.png"),
            ("manifest", self.out_dir / "run.json"),
        ]
        width = max(len(name) for name, _ in kinds)
        outputs = [f"outputs in {self.out_dir}:"]
        outputs += [f"  {name:<{width}}  {path}" for name, path in kinds if path.exists()]
        return "\n".join(lines + [""] + outputs)


def _packing_key(packing: tuple[tuple[float, float], ...]) -> tuple[float, ...]:
    # Files store scale factors as float32 or float64: 2.75e-5 is not 2.75e-5 in both,
    # but the two agree to 6 significant digits.
    return tuple(float(f"{value:.6g}") for pair in packing for value in pair)


def _packing_text(packing: tuple[tuple[float, float], ...]) -> str:
    """One (scale, offset) where all bands share it, else the list."""
    shown = sorted(set(packing), key=packing.index)
    return ", ".join(f"({scale:.7g}, {offset:.7g})" for scale, offset in shown)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create an output folder: {err.strerror}", where=str(folder)) from err


def export_key(fingerprint: str, model_hash: str, output_digest: str) -> str:
    """A scene's export key in run.json: its input, the clustering model, the output settings."""
    return f"{fingerprint}:{model_hash}:{output_digest}"


def export_key_model(key: str) -> str:
    """The clustering model's hash in an :func:`export_key` ('' for another key)."""
    parts = key.split(":")
    return parts[1] if len(parts) == 3 else ""


class _RunLog:
    """A run's log records: held in memory until the run passes its checks, so a refused
    command leaves no log file (nor folder) behind, then kept in ``OUTDIR/logs/sitfuse.log``."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("sitfuse_byol")
        self.handler: logging.Handler = logging.handlers.MemoryHandler(
            capacity=1 << 20, flushLevel=logging.CRITICAL + 1
        )
        self.level = self.logger.level

    def __enter__(self) -> _RunLog:
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        return self

    def write_to(self, path: Path) -> None:
        file = logging.FileHandler(path)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file.setLevel(logging.INFO)
        buffer = self.handler
        assert isinstance(buffer, logging.handlers.MemoryHandler)
        buffer.setTarget(file)
        buffer.flush()
        self.logger.removeHandler(buffer)
        self.logger.addHandler(file)
        self.handler = file

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
        self.logger.setLevel(self.level)


def _error_text(err: BaseException) -> str:
    if isinstance(err, SitfuseError):
        return str(err)
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class Pipeline:
    """One run over a scene list; see the module docstring."""

    def __init__(self, config: Config, options: RunOptions) -> None:
        self.config = config
        self.options = options
        self.paths = Paths(config.output_dir)
        self.out = config.output_dir
        self.manifest = Manifest.load(self.out / "run.json")
        self.refs: list[SceneRef] = []
        self.scenes: dict[str, Scene] = {}
        self.fingerprints: dict[str, str] = {}
        self.errors: dict[str, BaseException] = {}
        # Each scene's task seconds in this run, by stage, for its run.json entry.
        self.scene_seconds: dict[str, dict[str, float]] = {}
        self.stages_run: list[str] = []
        # config.resolved.yaml as this run found it, put back if a --resume is refused late.
        self.resolved_before: str | None = None
        # The statistics of the checkpoint a `--resume` continues (None: no resume).
        self.resumed_stats: dict | None = None
        # Until the run-wide checks pass, nothing is written: a refused command (exit 2)
        # leaves the output folder as it was, its run.json included.
        self.checked = False
        self.log: _RunLog | None = None
        # The --labels polygons, read by the checks at the start (see _check_labels).
        self.class_polygons: ClassPolygons | None = None
        self.deferred_failures: dict[str, tuple[dict[str, float], str]] = {}
        # Failed scenes' outputs from earlier runs, with their export keys: kept, and kept
        # in run.json, while the clustering model is the same (see _remove_stale_outputs).
        self.earlier_exports: dict[str, tuple[str, dict[str, str]]] = {}

    # -- bookkeeping -----------------------------------------------------------------

    def _fail(self, scene_id: str, err: BaseException, *, stage: str) -> None:
        message = _error_text(err)
        self.errors[scene_id] = err
        if self.checked:
            log.warning("scene %s failed in %s: %s", scene_id, stage, message, extra=FOR_LOG_FILE)
        log.debug("".join(traceback.format_exception(err)))
        earlier = self.manifest.scenes.get(scene_id) or {}
        if export_key_model(earlier.get("key", "")) and scene_id not in self.earlier_exports:
            outputs = {kind: str(path) for kind, path in self.manifest.outputs(scene_id).items() if path.exists()}
            self.earlier_exports[scene_id] = (earlier["key"], outputs)
        failure = (self.scene_seconds.get(scene_id, {}), f"{stage}: {message}")
        if self.checked:
            self._record_failure(scene_id, *failure)
        else:
            self.deferred_failures[scene_id] = failure
        self.scenes.pop(scene_id, None)

    def _record_failure(self, scene_id: str, timings: dict[str, float], error: str) -> None:
        key, outputs = self.earlier_exports.get(scene_id, ("", {}))
        self.manifest.record(scene_id, status="failed", key=key, timings=timings, outputs=outputs, error=error)

    def _stage_key(self, name: str, *parts: str) -> str:
        return "|".join((name, *parts))

    def _stage_done(self, name: str, key: str, *required: Path) -> bool:
        entry = self.manifest.stages.get(name, {})
        return (
            not self.options.force
            and entry.get("key") == key
            and all(p.exists() for p in required)
        )

    def _mark_stage(self, name: str, key: str, started: float, **extra: Any) -> None:
        self.manifest.stages[name] = {"key": key, "seconds": round(time.perf_counter() - started, 3), **extra}
        self.manifest.save()
        self._ran(name)
        log.info("stage %s done in %.1f s", name, self.manifest.stages[name]["seconds"])

    def _ran(self, stage: str) -> None:
        if stage in STAGES and stage not in self.stages_run:
            self.stages_run.append(stage)

    def _checkpoint_is_the_trained_one(self) -> bool:
        """``last.pt`` is the file the last finished training wrote (run.json keeps its hash)."""
        from sitfuse_byol.train.checkpoint import checkpoint_hash

        recorded = self.manifest.stages.get("train", {}).get("checkpoint")
        return self.paths.checkpoint.exists() and recorded == checkpoint_hash(self.paths.checkpoint)

    def _model_hash(self) -> str:
        """The saved clustering model's hash ('' before any clustering)."""
        model_json = self.paths.cluster_model / "model.json"
        return json.loads(model_json.read_text()).get("model_hash", "") if model_json.exists() else ""

    def _checkpoint_status(self) -> tuple[str, dict | None]:
        """What ``checkpoints/last.pt`` is: ``"missing"``; ``"written"``, the one training
        finished with; ``"other"``, another good checkpoint (an ``epoch_NNN.pt`` copied over
        it), returned loaded; or ``"damaged"`` (truncated, a disk error), which means
        training again, not a success that every later stage then refuses."""
        from sitfuse_byol.errors import ModelError
        from sitfuse_byol.train.checkpoint import load_checkpoint

        if not self.paths.checkpoint.exists():
            return "missing", None
        if self._checkpoint_is_the_trained_one():
            return "written", None
        try:
            state = load_checkpoint(self.paths.checkpoint)
        except ModelError as err:
            log.warning("warning: %s; training again", err)
            return "damaged", None
        return "other", state

    # -- stages ----------------------------------------------------------------------

    def open_scenes(self) -> None:
        self.refs = resolve_scene_list(self.config["data"]["scenes"], base=self.config.base)
        for ref in self.refs:
            try:
                self.fingerprints[ref.id] = scene_fingerprint(ref)
                scene = open_scene_from_config(
                    ref, data=self.config["data"], patch_size=self.config["tiling"]["patch_size"]
                )
            except SitfuseError as err:
                self._fail(ref.id, err, stage="read")
                continue
            self.scenes[ref.id] = scene
            warning = georeferencing_warning(scene)
            if warning:
                log.warning("%s", warning)
        counts = Counter(s.n_bands for s in self.scenes.values())
        if len(counts) > 1:
            # The odd ones out fail, not everything after an odd first scene; a tie goes
            # to the count that comes first in the list.
            bands, agreeing = counts.most_common(1)[0]
            example = next(s.id for s in self.scenes.values() if s.n_bands == bands)
            for scene in list(self.scenes.values()):
                if scene.n_bands != bands:
                    self._fail(
                        scene.id,
                        InputError(
                            f"scene has {scene.n_bands} bands but {agreeing} of the "
                            f"{len(self.scenes)} scenes (e.g. {example}) have {bands}",
                            where=scene.source,
                        ),
                        stage="read",
                    )
        self._check_band_agreement()

    def _check_band_agreement(self) -> None:
        """Scenes are stacked band by band by position, in stored units: a scene holding
        the first scene's bands in another order fails (blue would pass for near-infrared),
        as does one stored with another scale or offset than most scenes."""
        if not self.scenes:
            return
        scenes = list(self.scenes.values())
        keys = {scene.id: _packing_key(scene.packing) for scene in scenes}
        # The packing most scenes share (a tie: the first scene's), as for band counts;
        # counted, not compared pairwise: a list may hold thousands of scenes.
        common = Counter(keys.values()).most_common(1)[0][0]
        # Also the reference for band order: the first scene that is not left out.
        reference = next(scene for scene in scenes if keys[scene.id] == common)
        for scene in scenes:
            if keys[scene.id] != common:
                self._fail(
                    scene.id,
                    InputError(
                        f"the scene's values are stored with (scale, offset) {_packing_text(scene.packing)} "
                        f"but {reference.id}'s with {_packing_text(reference.packing)}; values are read as "
                        "stored, so the two would not compare: set data.unscale: true to read physical values",
                        where=scene.source,
                    ),
                    stage="read",
                )
            elif in_another_order(scene.band_names, reference.band_names):
                self._fail(
                    scene.id,
                    InputError(
                        f"the scene's bands ({', '.join(scene.band_names)}) are {reference.id}'s "
                        f"({', '.join(reference.band_names)}) in another order; list them in data.bands "
                        "to read every scene in one order",
                        where=scene.source,
                    ),
                    stage="read",
                )
        self._warn_of_other_band_names()

    def _warn_of_other_band_names(self) -> None:
        """Say once which scenes hold one of the first (kept) scene's band names at another
        position (a product one band off, say): still stacked by position, green would pass
        for blue. Names that differ throughout (other producers' conventions) prove nothing,
        and repeated names (every band "reflectance") name no position."""

        def distinct(scene: Scene) -> bool:
            return len(set(scene.band_names)) == len(scene.band_names)

        first = next(iter(self.scenes.values()), None)
        if first is None or not distinct(first):
            return
        position = {name: i for i, name in enumerate(first.band_names)}
        others = [
            s for s in self.scenes.values()
            if distinct(s) and any(position.get(name, i) != i for i, name in enumerate(s.band_names))
        ]
        if others:
            shown = "; ".join(f"{s.id} ({', '.join(s.band_names)})" for s in others[:3])
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            log.warning(
                "warning: band names at other positions than in %s (%s): %s%s; scenes are stacked band by "
                "band by position, so check that they hold the same bands in the same order (data.bands "
                "selects bands by name)",
                first.id, ", ".join(first.band_names), shown, more,
            )

    def _require_models(self, stages: tuple[str, ...]) -> None:
        """A stage run on its own needs what earlier stages leave behind."""
        from sitfuse_byol.errors import ModelError
        from sitfuse_byol.train.checkpoint import TrainedEncoder, load_encoder

        def fail_misfits(trained: TrainedEncoder) -> None:
            for scene in list(self.scenes.values()):
                try:
                    trained.check_bands(scene.band_names, where=scene.source)
                except ModelError as err:
                    self._fail(scene.id, err, stage="read")

        if "train" in stages:
            if self.options.resume and self.paths.checkpoint.exists():
                # Before the stats stage rewrites stats.json for scenes the model cannot take.
                fail_misfits(load_encoder(self.paths.checkpoint))
            return
        if not {"embed", "cluster", "export"} & set(stages):
            return
        if not self.paths.checkpoint.exists():
            raise ModelError("no trained encoder; run `sitfuse train` first", where=str(self.paths.checkpoint))
        trained = load_encoder(self.paths.checkpoint)
        fail_misfits(trained)
        # Only the export labels with the clustering model; a cluster stage fits it first.
        if "export" not in stages or "cluster" in stages:
            return
        model_json = self.paths.cluster_model / "model.json"
        if not model_json.exists():
            raise ModelError("no clustering model; run `sitfuse cluster` first", where=str(self.paths.cluster_model))
        from sitfuse_byol.run.tasks import load_cluster_model

        model = load_cluster_model(self.paths.cluster_model)
        model.check_compatible(
            dim=trained.encoder.out_channels,
            encoder_hash=trained.checkpoint_hash,
            where=str(self.paths.cluster_model),
        )
        fitted_on = model.metadata.get("embedding_settings")
        if fitted_on is not None and fitted_on != self._embedding_settings():
            # Centroids fitted on other embeddings would label these ones wrongly.
            differ = ", ".join(
                f"embed.{k} {fitted_on.get(k)} (this config: {v})"
                for k, v in self._embedding_settings().items()
                if fitted_on.get(k) != v
            )
            raise ModelError(
                f"the clustering model was fitted on embeddings made with {differ}; set them back, "
                "or fit it again with `sitfuse cluster`",
                where=str(self.paths.cluster_model),
            )
        # Newer models record the cluster settings alone; older ones only with the embed ones.
        if "cluster_hash" in model.metadata:
            other, settings = model.metadata["cluster_hash"] != self.config.digest("cluster"), "cluster settings"
        else:
            other = model.metadata.get("config_hash") not in (None, self.config.digest("cluster", "embed"))
            settings = "cluster or embed settings"
        if other:
            log.warning(
                "warning: the clustering model was fitted with other %s than this config's; it labels the "
                "scenes with its %d clusters (`sitfuse cluster` fits it again) (%s)",
                settings, model.n_labels, self.paths.cluster_model,
            )

    def _embedding_settings(self) -> dict[str, int]:
        """The embed settings that change embedding values (block size and saving do not)."""
        return {key: self.config["embed"][key] for key in ("stride", "window")}

    def _check_class_names(self, stages: tuple[str, ...]) -> None:
        """``output.class_names`` must name every label; found out before any work, not per scene."""
        from sitfuse_byol.export.scene_outputs import check_class_names

        names = self.config["output"]["class_names"]
        if not names or "export" not in stages:
            return
        cfg = self.config["cluster"]
        if "cluster" in stages:
            n_labels = cfg["n_clusters"] * (cfg["n_fine"] if cfg["hierarchical"] else 1)
        else:
            from sitfuse_byol.run.tasks import load_cluster_model

            n_labels = load_cluster_model(self.paths.cluster_model).n_labels
        check_class_names(names, n_labels=n_labels)

    def _check_labels(self, stages: tuple[str, ...]) -> None:
        """The class polygons and threshold of ``--labels``, read at the start: a typo in
        them is found before the run, not after hours of it."""
        if "assign" not in stages or self.options.labels is None:
            return
        from sitfuse_byol.assign import check_threshold, read_class_polygons

        check_threshold(self.options.threshold)
        self.class_polygons = read_class_polygons(
            self.options.labels, field=self.options.label_field, layer=self.options.label_layer
        )

    def _check_rgb_bands(self, stages: tuple[str, ...]) -> None:
        """Each scene must have ``output.rgb_bands`` for its quicklook; found out at the
        start, not after training."""
        from sitfuse_byol.read.bands import select_bands

        rgb = self.config["output"]["rgb_bands"]
        if rgb is None or not self.config["output"]["quicklook"] or "export" not in stages:
            return
        for scene in list(self.scenes.values()):
            try:
                select_bands(scene.band_names, rgb, where=f"output.rgb_bands, {scene.source}")
            except InputError as err:
                self._fail(scene.id, err, stage="read")

    def _check_output_names(self, stages: tuple[str, ...]) -> None:
        """With two levels, scene X's coarse labels are ``labels/X_coarse.tif``: a scene of
        that id would overwrite them, or they it."""
        if "export" not in stages or not self.config["cluster"]["hierarchical"]:
            return
        ids = {ref.id for ref in self.refs}
        clash = next((ref for ref in self.refs if f"{ref.id}_coarse" in ids), None)
        if clash is not None:
            raise InputError(
                f"scene ids {clash.id!r} and {clash.id + '_coarse'!r} clash: with cluster.hierarchical the coarse "
                f"labels of {clash.id!r} are labels/{clash.id}_coarse.tif; rename one of the scenes",
                where=clash.entry,
            )

    def _check_training(self, stages: tuple[str, ...]) -> None:
        """The device and the encoder the config asks for, before the statistics pass."""
        from sitfuse_byol.train.device import resolve_device
        from sitfuse_byol.train.encoders import create_encoder, resolve_norm

        if not self.scenes:
            return
        # Local workers embed on this machine's devices; a scheduler's workers have their own.
        if {"embed", "cluster", "export"} & set(stages) and not self.options.cluster.scheduler:
            resolve_device(self.config["embed"]["device"], where="embed.device")
        if "train" not in stages:
            return
        self._check_resumable()
        cfg = self.config["train"]
        trained = not (self.options.force or self.options.resume) and self._checkpoint_is_the_trained_one()
        # A GPU worker trains with --gpus-per-worker; a finished training (re-exporting on a
        # CPU node) needs no device at all, whatever the settings were.
        if not self.options.cluster.gpus_per_worker and not trained:
            resolve_device(self.options.device or cfg["device"], where="train.device")
        bands = next(iter(self.scenes.values())).n_bands
        create_encoder(
            cfg["encoder"], in_channels=bands, norm=resolve_norm(cfg["norm"], cfg["batch_size"]),
            **cfg["encoder_args"],
        )

    def _check_resumable(self) -> None:
        """``--resume`` refused for what is known before any work: train settings it cannot
        take, and statistics that are (or would be made) other than the checkpoint's. A
        refusal after the statistics pass would have rewritten them for a model that
        cannot use them."""
        from sitfuse_byol.errors import ModelError
        from sitfuse_byol.normalize.stats import BandStats
        from sitfuse_byol.train.checkpoint import load_checkpoint
        from sitfuse_byol.train.loop import STATS_DIFFER, resume_conflict, same_normalization

        if not self.options.resume or not self.paths.checkpoint.exists():
            return
        state = load_checkpoint(self.paths.checkpoint)
        self.resumed_stats = state["stats"]
        where = str(self.paths.checkpoint)
        if conflict := resume_conflict(state, self.config):
            raise ModelError(f"cannot resume: {conflict}", where=where)
        # Statistics the stats stage keeps (nothing changed) are compared now; those it
        # makes anew, before they are saved (see _check_resumed_statistics).
        key = stats_stage_key(self.config, (self.fingerprints[s] for s in self.scenes))
        if self._stage_done("stats", key, self.paths.stats):
            try:
                saved = BandStats.load(self.paths.stats)
            except (OSError, ValueError, KeyError, TypeError):
                return  # made again by the stats stage, and compared then
            if not same_normalization(state["stats"], saved):
                raise ModelError(STATS_DIFFER, where=where)

    def _check_cluster_count(self, stages: tuple[str, ...]) -> None:
        """More clusters than samples can ever be drawn is known before training."""
        from sitfuse_byol.errors import ConfigError

        cfg = self.config["cluster"]
        most = cfg["samples_per_scene"] * len(self.scenes)
        if "cluster" in stages and self.scenes and cfg["n_clusters"] > most:
            raise ConfigError(
                f"cluster.n_clusters is {cfg['n_clusters']} but only {most} pixels can be sampled "
                f"({cfg['samples_per_scene']} from each of {len(self.scenes)} scene(s)); lower n_clusters or "
                "raise cluster.samples_per_scene",
                where="cluster.n_clusters",
            )

    def _prepare_output_dirs(self, stages: tuple[str, ...]) -> None:
        """Create the folders outputs are renamed into, so one that cannot be made (a file
        of that name, no permission) stops the run before any work, not each scene after it."""
        folders = [self.out / "logs"]
        embeddings = self.out / "embeddings"
        if "embed" in stages and self.config["embed"]["save"] and embeddings.exists() and not embeddings.is_dir():
            # Made by the embed stage once it knows the stores fit on the disk.
            raise InputError("cannot create an output folder: File exists", where=str(embeddings))
        if "export" in stages:
            folders += [self.out / "labels", self.out / "confidence"]
        for folder in folders:
            _make_folder(folder)

    def _hold_output_folder(self, hold: contextlib.ExitStack) -> None:
        """Take the output folder for this run (see :mod:`sitfuse_byol.run.lock`) before
        starting a cluster, so that a second command learns at once that it is taken."""
        made = not self.out.exists()
        _make_folder(self.out)
        if made:
            # A run that stops before writing (an unreachable scheduler) leaves no folder
            # behind it (run last by the stack, once the lock is released).
            hold.callback(self._remove_unused_folder)
        hold.enter_context(output_folder_lock(self.out, command=f"sitfuse {self.options.command}"))
        if self.manifest.changed_on_disk():
            # Another command wrote here while this one started: its checks saw an older state.
            raise InputError(
                "another sitfuse command changed this output folder while this one started; run it again",
                where=str(self.out),
            )

    def _remove_unused_folder(self) -> None:
        if not self.checked:
            remove_path(self.out / LOCK_NAME)
            with contextlib.suppress(OSError):  # not empty after all: left as it is
                self.out.rmdir()

    def _start_writing(self, stages: tuple[str, ...]) -> None:
        """The run-wide checks passed and the cluster is up: make the output folders, clear
        what killed runs left there, keep the log and the resolved config there, and record
        what failed so far."""
        self._prepare_output_dirs(stages)
        remove_stale_temporaries(self.out)
        self.checked = True
        resolved = self.out / "config.resolved.yaml"
        self.resolved_before = resolved.read_text() if resolved.exists() else None
        atomic_write_text(resolved, self.config.to_yaml())
        if self.log is not None:
            self.log.write_to(self.out / "logs" / "sitfuse.log")
        log.info(
            "run started: stages %s over %d scene(s), config %s, output %s",
            ", ".join(s for s in stages if s != "assign" or self.options.labels), len(self.refs),
            self.config.digest()[:12], self.out,
        )
        for scene_id, failure in self.deferred_failures.items():
            # Logged now, inside the run's record, not among the lines before it started.
            log.warning("scene %s failed in %s", scene_id, failure[1], extra=FOR_LOG_FILE)
            self._record_failure(scene_id, *failure)
        self.deferred_failures.clear()

    def _remove_stale_outputs(self) -> None:
        """A scene that failed in this run keeps outputs of an earlier run only while they
        come from the clustering model the other scenes were just labelled with: beside
        those, labels of another model would pass for this run's (cluster 7 meaning
        something else)."""
        from sitfuse_byol.export.scene_outputs import remove_scene_outputs

        current = self._model_hash()
        if not current:
            return
        stale = [
            s for s, (key, _) in self.earlier_exports.items() if s in self.errors and export_key_model(key) != current
        ]
        for scene_id in stale:
            remove_scene_outputs(scene_id, out_dir=self.out)
            self.manifest.forget_outputs(scene_id)
        if stale:
            log.warning(
                "warning: removed the outputs of %s from an earlier run: they were made by another clustering model",
                ", ".join(stale),
            )
        others = [
            s for s, entry in self.manifest.scenes.items()
            if s not in self.fingerprints and entry.get("status") == "done" and export_key_model(entry["key"]) != current
        ]
        if others:
            names = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            log.warning(
                "warning: the labels of %s (not in this run's scene list) come from another clustering model; "
                "their cluster numbers mean something else (`sitfuse assign` refuses the mix)", names,
            )

    def _encoder_hash(self) -> str:
        """The trained encoder's identity: its checkpoint's hash (cached while unchanged)."""
        from sitfuse_byol.train.checkpoint import checkpoint_hash

        return checkpoint_hash(self.paths.checkpoint)

    def _check_embedding_space(self, scene_ids: list[str]) -> None:
        """Refuse to start embeddings that cannot fit on the output's disk.

        Float32 embeddings take ``4 * D`` bytes a pixel (61.7 GB for one 10980 x 10980
        Sentinel-2 scene at D=128), and Zarr stores edge chunks whole; a disk filling
        up hours into a batch would fail every scene after it. Quotas (Lustre, GPFS)
        are not seen, only the file system's free space.

        Raises:
            InputError: The stores would need more than the free space.
        """
        from sitfuse_byol.train.checkpoint import load_encoder

        if not scene_ids:
            return
        stride, block = self.config["embed"]["stride"], self.config["embed"]["block_size"]
        dim = load_encoder(self.paths.checkpoint).encoder.out_channels

        def stored(pixels: int) -> int:
            # Edge chunks take a whole chunk (a block, strided) on disk.
            chunk = -(-block // stride)
            return -(-pixels // chunk) * chunk

        pixels = sum(
            stored(-(-self.scenes[s].grid.height // stride)) * stored(-(-self.scenes[s].grid.width // stride))
            for s in scene_ids
        )
        need = pixels * dim * 4
        self.paths.out.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.paths.out).free
        log.info("embeddings of %d scene(s): %s, %s free", len(scene_ids), format_bytes(need), format_bytes(free))
        if need > free:
            raise InputError(
                f"embeddings of {len(scene_ids)} scene(s) need {format_bytes(need)} but only {format_bytes(free)} "
                "is free; stream them (embed.save: false) or embed fewer pixels (embed.stride)",
                where=str(self.paths.out),
            )

    def _live_refs(self) -> list[SceneRef]:
        """The scenes not failed so far, in scene-list order."""
        return [ref for ref in self.refs if ref.id in self.scenes]

    def _embedding_states(self) -> dict[str, str]:
        """Each live scene's :func:`saved_embedding_state`, warning once about stale stores
        (they are recomputed on the fly)."""
        states = {ref.id: saved_embedding_state(self.config, ref) for ref in self._live_refs()}
        stale = [scene_id for scene_id, state in states.items() if state == "stale"]
        if stale:
            names = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
            log.warning(
                "warning: saved embeddings of %s were made by another encoder, other settings or an older "
                "input; computing them on the fly (`sitfuse embed` saves them again)", names,
            )
        return states

    def _require_scenes(self) -> None:
        """Go on while any scene is left; with none, the first scene's error is the run's error."""
        if self.scenes:
            return
        first = next(iter(self.errors.values()), None)
        if isinstance(first, SitfuseError):
            raise first
        raise InputError("no scene could be processed; see run.json", where=str(self.out / "run.json"))

    def stage_stats(self, client: Any) -> None:
        """Band statistics from two passes of scene tasks, merged here in scene-list order."""
        from sitfuse_byol.normalize.stats import HistogramBins, merged_moments, stats_from

        key = stats_stage_key(self.config, (self.fingerprints[s] for s in self.scenes))
        # Before the shortcut reads anything: a scene failing there is left out too.
        candidates = list(self.scenes)
        if self._stage_done("stats", key, self.paths.stats) or self._stats_stand_without_failed_scenes(client):
            return
        started = time.perf_counter()
        parts: dict[str, list[Any]] = {}
        self._scene_tasks(
            client, name="stats", func=moments_task, keys={s: "moments" for s in self.scenes},
            on_result=lambda scene_id, result, seconds: parts.__setitem__(scene_id, result), gpu=False,
        )
        # A running sum (exact: integer counts), not one bands x bins array per scene held
        # until the end.
        histogram: list[np.ndarray] = []
        while True:
            # Pixels are read here for the first time: a corrupt scene fails now and is left out.
            self._require_scenes()
            ids = [ref.id for ref in self.refs if ref.id in self.scenes]
            first = self.scenes[ids[0]]
            moments = merged_moments((p for s in ids for p in parts[s]), scenes=[self.scenes[s] for s in ids])
            bins = HistogramBins.from_moments(
                moments, integer_data=all(np.issubdtype(self.scenes[s].dtype, np.integer) for s in ids)
            )
            histogram.clear()

            def add(scene_id: str, result: np.ndarray, seconds: float) -> None:
                if histogram:
                    histogram[0] += result
                else:
                    histogram.append(np.array(result, dtype=np.int64))

            self._scene_tasks(
                client, name="histogram", func=functools.partial(histogram_task, bins=bins),
                keys={s: "histogram" for s in ids}, on_result=add, gpu=False,
            )
            # A scene failing only now leaves its moments in the bins: redo them without it.
            if len(self.scenes) == len(ids):
                break
        stats = stats_from(
            band_names=first.band_names, scene_ids=ids, moments=moments, histogram=histogram[0], bins=bins
        )
        self._check_resumed_statistics(stats)
        if constant := stats.constant_bands():
            every = len(constant) == stats.n_bands
            log.warning(
                "warning: %s %s the same value at every valid pixel (std 0)%s (%s)",
                "every band" if every else f"band{'s' if len(constant) > 1 else ''} {', '.join(constant)}",
                "holds" if every or len(constant) == 1 else "hold",
                ": there is nothing to learn from" if every else ", which tells nothing apart; leave "
                f"{'them' if len(constant) > 1 else 'it'} out with data.bands",
                self.paths.stats,
            )
        stats.save(self.paths.stats)
        # Keyed by the scenes it holds, and naming those left out (corrupt pixels): the next
        # command reads them again, so each fails there too instead of reaching training.
        self._mark_stage(
            "stats", stats_stage_key(self.config, (self.fingerprints[s] for s in ids)), started,
            left_out={s: self.fingerprints[s] for s in candidates if s not in ids},
        )

    def _check_resumed_statistics(self, stats: BandStats) -> None:
        """Statistics made anew (the same scenes, their files touched) must be the
        checkpoint's for ``--resume``: refused before they replace the saved ones."""
        from sitfuse_byol.errors import ModelError
        from sitfuse_byol.train.loop import STATS_DIFFER, same_normalization

        if self.resumed_stats is None:
            return
        if not same_normalization(self.resumed_stats, stats):
            # Refused as at the start: the resolved config goes back to what the outputs hold.
            resolved = self.out / "config.resolved.yaml"
            if self.resolved_before is None:
                remove_path(resolved)
            else:
                atomic_write_text(resolved, self.resolved_before)
            raise ModelError(STATS_DIFFER, where=str(self.paths.checkpoint))

    def _stats_stand_without_failed_scenes(self, client: Any) -> bool:
        """Whether the saved statistics hold every scene of this run but those whose pixels
        could not be read when they were made, still failing now.

        Only those scenes are read again (the first pass), not every scene twice: a batch
        of hundreds of scenes keeping one corrupt file would otherwise make its statistics
        again on every rerun. One now readable (replaced or repaired in place, or a
        passing read failure) means statistics are made again with it.
        """
        entry = self.manifest.stages.get("stats", {})
        left_out = entry.get("left_out") or {}
        again = [s for s in self.scenes if left_out.get(s) == self.fingerprints[s]]
        kept = [s for s in self.scenes if s not in again]
        if not again or not kept or not self._stage_done(
            "stats", stats_stage_key(self.config, (self.fingerprints[s] for s in kept)), self.paths.stats
        ):
            return False
        self._scene_tasks(
            client, name="stats", func=moments_task, keys={s: "moments" for s in again},
            on_result=lambda scene_id, result, seconds: None, gpu=False,
        )
        return all(s not in self.scenes for s in again)

    def stage_train(self, client: Any) -> None:
        from sitfuse_byol.train.checkpoint import checkpoint_hash, load_checkpoint
        from sitfuse_byol.train.loop import resume_conflict

        key = train_stage_key(self.config, self.paths.stats)
        status, state = self._checkpoint_status()
        # A checkpoint put in place of the trained one is kept when it is a full training
        # under these settings, and continued when it stopped short of it.
        conflict = resume_conflict(state, self.config) if state is not None else None
        complete = status == "written" or (
            status == "other" and conflict is None and state is not None and state["epoch"] + 1 == self.config["train"]["epochs"]
        )
        if self._stage_done("train", key, self.paths.checkpoint) and complete:
            if status == "other":
                self.manifest.stages["train"]["checkpoint"] = checkpoint_hash(self.paths.checkpoint)
                self.manifest.save()
            return
        started = time.perf_counter()
        # By itself a run resumes only the training it started under these very settings
        # and statistics (interrupted, or an earlier epoch put back), never another one.
        same_start = self.manifest.stages.get("train_started", {}).get("key") == key
        if same_start and status == "written" and not self.options.force:
            conflict = resume_conflict(load_checkpoint(self.paths.checkpoint), self.config)
        resumable = status in ("written", "other") and conflict is None
        resume = self.options.resume or (not self.options.force and resumable and same_start)
        if not resume and not self.options.force and status in ("written", "other"):
            log.warning(
                "warning: the train settings or band statistics changed since %s was trained; training afresh "
                "(its checkpoints are replaced; `--resume` extends a training when only train.epochs changed)",
                self.paths.checkpoint,
            )
        self.manifest.stages["train_started"] = {"key": key}
        self.manifest.save()
        self._train(client, resume=resume)
        self._mark_stage("train", key, started, checkpoint=checkpoint_hash(self.paths.checkpoint))

    def _train(self, client: Any, *, resume: bool) -> None:
        """Train here, or on a GPU worker with ``--gpus-per-worker``."""
        from sitfuse_byol.train.loop import train

        if self.options.cluster.gpus_per_worker:
            from distributed import Event, wait

            # Training goes to a GPU worker; only paths and the config travel.
            stop = Event(f"sitfuse-stop-training-{uuid.uuid4().hex}", client=client)
            future = client.submit(
                train_task, self.config, stop_event=stop.name, device_name=self.options.device, resume=resume,
                compile_model=self.options.compile,
                scenes=list(self.scenes.values()), resources=self.options.cluster.resources, pure=False,
            )
            try:
                future.result()
            except KeyboardInterrupt:
                # Told to stop, the training ends within seconds instead of outliving the run.
                stop.set()
                with contextlib.suppress(Exception):
                    wait(future, timeout=TRAINING_STOP_WAIT_S)
                raise
        else:
            with train_progress(self.config["train"], quiet=self.options.quiet) as on_step:

                def after_step(values: dict) -> None:
                    Interrupts.check()
                    on_step(values)

                train(
                    self.config,
                    device_name=self.options.device,
                    resume=resume,
                    compile_model=self.options.compile,
                    scenes=list(self.scenes.values()),
                    progress=after_step,
                )

    def _scene_tasks(
        self,
        client: Any,
        *,
        name: str,
        func: Callable,
        keys: dict[str, str],
        on_result: Callable[[str, Any, float], None],
        gpu: bool = True,
        on_abandoned: Callable[[str], None] | None = None,
    ) -> None:
        """Run ``func(config, ref, threads)`` for every scene not yet done under its key.

        ``gpu``: the task may use a GPU, so it needs the workers' GPU resource (when
        ``--gpus-per-worker`` asks for one); statistics passes run on any worker.
        ``on_abandoned``: called for each scene whose task had not reported when an
        interrupt (or any error) stopped the stage; the task may still be running.
        """
        from distributed import as_completed

        # LocalClusters get their shape from ClusterOptions.sized_for; on an existing
        # cluster a scene's blocks run on one thread unless the config says otherwise.
        threads = self.options.cluster.threads_per_worker or 1
        todo = [ref for ref in self.refs if ref.id in self.scenes and ref.id in keys]
        if not todo:
            return
        if name in ("embed", "export"):  # the other stages say so when they save
            self._ran(name)
        futures = {}
        for ref in todo:
            future = client.submit(
                run_scene_task, func, self.config, ref, threads,
                key=f"{name}-{ref.id}-{keys[ref.id]}-{time.time_ns()}",
                retries=self.options.cluster.retries,
                resources=self.options.cluster.resources if gpu else None,
                pure=False,
            )
            futures[future] = ref
        unreported = {ref.id for ref in todo}
        try:
            with (
                stage_progress(name, total=len(futures), quiet=self.options.quiet) as advance,
                _block_progress(client, advance) as shares,
            ):
                for future in as_completed(futures):
                    Interrupts.check()
                    ref = futures[future]
                    try:
                        result, seconds = future.result()
                    except Exception as err:  # retries spent: a lost worker, a transient error
                        # Named by its file, as bad input is (a worker's error knows no scene).
                        where = self.scenes[ref.id].source if ref.id in self.scenes else str(ref.spec)
                        text = str(err) if isinstance(err, SceneReadError) else _error_text(err)
                        self._fail(ref.id, SitfuseError(text, where=where), stage=name)
                    else:
                        if isinstance(result, TaskFailure):
                            self._fail(ref.id, result.error, stage=name)
                        else:
                            self.scene_seconds.setdefault(ref.id, {})[name] = seconds
                            on_result(ref.id, result, seconds)
                            log.info("scene %s: %s done in %.1f s", ref.id, name, seconds)
                    finally:
                        future.release()
                    unreported.discard(ref.id)
                    shares.finished(future.key)
        except BaseException:
            if on_abandoned is not None:
                for scene_id in unreported:
                    on_abandoned(scene_id)
            raise

    def stage_embed(self, client: Any) -> None:
        if not self.config["embed"]["save"]:
            return
        # Each store carries the key of what it was made from; a store whose key matches
        # is current, whatever the manifest says.
        keys = {
            ref.id: embedding_key(self.config, ref)
            for ref in self._live_refs()
            if self.options.force or not has_saved_embedding(self.config, ref)
        }

        self._check_embedding_space(list(keys))

        def record(scene_id: str, result: Any, seconds: float) -> None:
            # Also in the scene's own timings once it is exported in this run; kept here
            # for `sitfuse embed`, which exports nothing.
            self.manifest.stages.setdefault("embed_seconds", {})[scene_id] = round(seconds, 3)
            self.manifest.save()

        self._scene_tasks(client, name="embed", func=embed_task, keys=keys, on_result=record)

    def stage_cluster(self, client: Any) -> None:
        from sitfuse_byol.cluster.kmeans import EmbeddingReservoir, fit_kmeans
        from sitfuse_byol.train.checkpoint import load_encoder

        encoder_hash = self._encoder_hash()
        key = self._stage_key(
            "cluster", encoder_hash, self.config.digest("cluster", "embed", "data", leave_out=("data.scenes",)),
            *sorted(self.fingerprints[s] for s in self.scenes),
        )
        if self._stage_done("cluster", key, self.paths.cluster_model / "model.json"):
            self._fail_left_out()
            return
        states = self._embedding_states()
        started = time.perf_counter()
        sampling = set(self.scenes)
        cfg = self.config["cluster"]
        sampled = {"n": cfg["samples_per_scene"], "seed": cfg["seed"]}
        reservoir = EmbeddingReservoir(
            capacity=max(min(cfg["samples_per_scene"] * len(self.scenes), MAX_CLUSTER_SAMPLES), cfg["n_clusters"]),
            seed=cfg["seed"],
        )
        # Samples kept by the embed stage are read here one scene at a time; only scenes
        # without one (embed.save: false, an older run) go to workers, and only their
        # samples wait in memory for their turn.
        computed: dict[str, Any] = {}
        self._scene_tasks(
            client,
            name="sample",
            func=sample_task,
            keys={
                s: "sample"
                for s, state in states.items()
                if not (state == "current" and sample_matches(self.paths.samples(s), **sampled))
            },
            on_result=lambda scene_id, result, seconds: computed.__setitem__(scene_id, result),
        )
        # Added in scene-list order, so the sample does not depend on task completion order.
        for ref in self._live_refs():
            sample = computed.pop(ref.id) if ref.id in computed else load_samples(self.paths.samples(ref.id), **sampled)
            if sample is not None:
                reservoir.add(sample[0], neighbours=sample[1])
        self._require_scenes()
        n_fine = cfg["n_fine"] if cfg["hierarchical"] else 0
        if cfg["method"] == "iic":
            from sitfuse_byol.cluster.iic import fit_iic

            model = fit_iic(reservoir, n_clusters=cfg["n_clusters"], seed=cfg["seed"], n_fine=n_fine)
        else:
            model = fit_kmeans(reservoir, n_clusters=cfg["n_clusters"], seed=cfg["seed"], n_fine=n_fine)
        trained = load_encoder(self.paths.checkpoint)
        model.metadata.update(
            {
                "encoder_hash": encoder_hash,
                "band_names": list(trained.band_names),
                "config_hash": self.config.digest("cluster", "embed"),
                "embedding_settings": self._embedding_settings(),
                "cluster_hash": self.config.digest("cluster"),
                "scenes": list(self.scenes),
            }
        )
        model.save(self.paths.cluster_model)
        # Only what no rerun can change; a passing failure (a lost worker, a read error)
        # is tried again by the next run.
        left_out = {
            s: _error_text(self.errors[s])
            for s in sorted(sampling - set(self.scenes))
            if isinstance(self.errors.get(s), EmptySceneError)
        }
        self._mark_stage("cluster", key, started, left_out=left_out)

    def _fail_left_out(self) -> None:
        """Scenes the current clustering left out for want of a valid pixel fail as they
        did then, instead of being labelled all nodata by a model that never saw them."""
        for scene_id, message in self.manifest.stages.get("cluster", {}).get("left_out", {}).items():
            if scene_id in self.scenes:
                self._fail(scene_id, EmptySceneError(message), stage="sample")
        self._require_scenes()

    def stage_export(self, client: Any) -> None:
        self._fail_left_out()
        model_key = self._model_hash()
        # Where the outputs go is not what they are: a moved OUTDIR is not redone.
        output_key = self.config.digest("output", "embed", "data", leave_out=("output.dir", "data.scenes"))
        keys = {}
        for scene_id in self.scenes:
            key = export_key(self.fingerprints[scene_id], model_key, output_key)
            if self.options.force or not self.manifest.is_done(scene_id, key):
                keys[scene_id] = key
        if keys and "cluster" not in self.options.stages:
            self._embedding_states()

        def record(scene_id: str, outputs: Any, seconds: float) -> None:
            self.manifest.record(
                scene_id, status="done", key=keys[scene_id], timings=self.scene_seconds[scene_id], outputs=outputs
            )

        # A task left running by an interrupt can still put its scene's new outputs in
        # place after this run stops; its old record must not pass them off as current.
        self._scene_tasks(
            client, name="export", func=export_task, keys=keys, on_result=record, on_abandoned=self.manifest.outdate
        )

    def stage_assign(self) -> str | None:
        if self.options.labels is None:
            return None
        from sitfuse_byol.assign import run_assign

        label_paths = self.manifest.label_paths(set(self.scenes))
        result = run_assign(
            label_paths=label_paths,
            polygons_path=self.options.labels,
            field=self.options.label_field,
            layer=self.options.label_layer,
            threshold=self.options.threshold,
            out_dir=self.out,
            polygons=self.class_polygons,
        )
        return result.report()

    # -- driver ----------------------------------------------------------------------

    def run(self) -> RunSummary:
        stages = self.options.stages
        with _RunLog() as self.log, contextlib.ExitStack() as hold:
            try:
                return self._run(stages, hold)
            except SitfuseError as err:
                # The console gets the error as the command's one line; the log keeps it too.
                log.error("run stopped: %s", err, extra=FOR_LOG_FILE)
                raise
            except Exception as err:
                log.error("run stopped: %s", _error_text(err), extra=FOR_LOG_FILE)
                raise
            finally:
                # Scene records not yet written (see Manifest), interrupted or not.
                if self.checked:
                    self.manifest.flush()

    def _run_stages(self, client: Any, stages: tuple[str, ...]) -> None:
        # Workers import torch, GDAL and the package while this process trains.
        warm_up = [
            client.submit(_preload, workers=[address], pure=False, allow_other_workers=False)
            for address in worker_info(client)
        ]
        for name in STAGES:
            if name in stages:
                Interrupts.check()
                getattr(self, f"stage_{name}")(client)
        Interrupts.check()
        del warm_up

    def _run(self, stages: tuple[str, ...], hold: contextlib.ExitStack) -> RunSummary:
        with terminate_as_interrupt():
            self.open_scenes()
            self._require_scenes()
            self._require_models(stages)
            self._check_class_names(stages)
            self._check_rgb_bands(stages)
            self._check_labels(stages)
            self._check_output_names(stages)
            self._require_scenes()
            self._check_training(stages)
            self._check_cluster_count(stages)
            self.options = replace(self.options, cluster=self.options.cluster.sized_for(len(self.scenes)))
            dashboard = self.options.dashboard if self.options.dashboard is not None else not self.options.quiet
            # Under --json, stdout holds the summary alone.
            stream = sys.stderr if self.options.json else sys.stdout
            self._hold_output_folder(hold)
            try:
                with contextlib.ExitStack() as cluster:
                    with Interrupts.defer():
                        client = cluster.enter_context(
                            dask_client(self.options.cluster, quiet=not dashboard, stream=stream)
                        )
                    self._start_writing(stages)
                    self._run_stages(client, stages)
            except KeyboardInterrupt:
                log.info("interrupted; the next run goes on from here")
                raise
            finally:
                # Every task is over once the cluster is closed, finished or interrupted:
                # what a killed worker or an interrupt left half-written goes now, not at
                # the next run (a run refused before writing leaves OUTDIR alone).
                if self.checked:
                    remove_stale_temporaries(self.out)
            if "export" in stages:
                self._remove_stale_outputs()
            assigned = self.stage_assign() if "assign" in stages else None
        if assigned:
            print(assigned, file=sys.stderr if self.options.json else sys.stdout)
        ids = [ref.id for ref in self.refs]
        # The summary names outputs by their full paths; run.json keeps them relative.
        scenes = {
            s: self.manifest.scenes[s] | {"outputs": {k: str(p) for k, p in self.manifest.outputs(s).items()}}
            for s in ids
            if s in self.manifest.scenes
        }
        for s in ids:
            # `sitfuse embed` alone: run.json records scenes once labelled, not their embeddings.
            if s not in scenes and "embed" in self.scene_seconds.get(s, {}):
                scenes[s] = {"status": "done", "outputs": {"embeddings": str(self.paths.embedding(s))}, "error": None}
        failed = [s for s in ids if s in self.errors]
        log.info("run finished: %d scene(s) failed of %d", len(failed), len(ids))
        return RunSummary(
            scenes=scenes, stages=self.manifest.stages, out_dir=self.out, failed=failed,
            seconds={s: sum(t.values()) for s, t in self.scene_seconds.items() if t}, stages_run=self.stages_run,
        )


@contextlib.contextmanager
def _block_progress(client: Any, advance: Callable[..., None]) -> Iterator[SceneShares]:
    """Scene tasks' progress events move the stage's bar while they run."""
    shares = SceneShares(advance)
    client.subscribe_topic(PROGRESS_TOPIC, shares.on_event)
    try:
        yield shares
    finally:
        with contextlib.suppress(Exception):  # a client already closing
            client.unsubscribe_topic(PROGRESS_TOPIC)


def _preload() -> None:
    importlib.import_module("sitfuse_byol.run.tasks")
    # matplotlib (quicklooks) takes half a second to import; better now than in export.
    importlib.import_module("sitfuse_byol.export.quicklook")


def run_pipeline(config: Config, options: RunOptions) -> RunSummary:
    return Pipeline(config, options).run()

