"""Per-scene work, as plain functions of (config, scene, model paths): safe to ship to Dask workers.

Only paths travel in the task graph; each worker loads a model once (cached by path).
Inside a task, blocks are computed by local threads with one torch thread each, so the
arithmetic, and therefore every label, is the same whether the task runs in this
process, a LocalCluster worker or a remote worker.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
from rasterio.errors import RasterioError
from threadpoolctl import threadpool_limits

from sitfuse_byol.cluster.model import ClusterModel
from sitfuse_byol.cluster.sampling import SceneSample, load_samples, sample_embeddings, save_samples
from sitfuse_byol.config import Config
from sitfuse_byol.embed import (
    SceneEmbedding,
    cell_valid,
    embed_scene,
    open_embedding,
    save_embedding,
    saved_embedding_key,
)
from sitfuse_byol.errors import NOT_GEOREFERENCED_WARNING, InputError, SitfuseError
from sitfuse_byol.export.atomic import remove_path
from sitfuse_byol.export.scene_outputs import OutputOptions, write_scene_outputs
from sitfuse_byol.normalize.stats import HistogramBins, scene_histogram, scene_moment_parts
from sitfuse_byol.read import Scene, SceneRef, open_scene_from_config
from sitfuse_byol.read.scene import first_line
from sitfuse_byol.run.manifest import scene_fingerprint
from sitfuse_byol.run.scene_progress import counted_threads_get, reporting_progress
from sitfuse_byol.train.checkpoint import checkpoint_hash, load_encoder
from sitfuse_byol.train.device import resolve_device


@dataclass(frozen=True)
class Paths:
    """Where a run keeps its files."""

    out: Path

    @property
    def stats(self) -> Path:
        return self.out / "stats.json"

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    @property
    def cluster_model(self) -> Path:
        return self.out / "cluster"

    def embedding(self, scene_id: str) -> Path:
        return self.out / "embeddings" / f"{scene_id}.zarr"

    def samples(self, scene_id: str) -> Path:
        return self.out / "embeddings" / f"{scene_id}.samples.npz"


_torch_threads_lock = threading.Lock()
_torch_threads_holders = 0
_torch_threads_before = 1


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Hold torch at one thread while any task of this process computes.

    New threads (Dask's block threads) start from torch's shared default, so a task that
    restored the default while another was still starting threads would hand those two
    threads each; the first task in sets it, the last one out restores it.
    """
    global _torch_threads_holders, _torch_threads_before
    with _torch_threads_lock:
        if _torch_threads_holders == 0:
            _torch_threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _torch_threads_holders += 1
    try:
        yield
    finally:
        with _torch_threads_lock:
            _torch_threads_holders -= 1
            if _torch_threads_holders == 0:
                torch.set_num_threads(_torch_threads_before)


@contextlib.contextmanager
def local_compute(threads: int) -> Iterator[None]:
    """Local threads for Dask, each running torch and BLAS on one thread.

    Blocks run in parallel instead of ops, which avoids oversubscribing the cores and
    keeps every sum in the same order wherever the task runs (same labels locally and
    on any cluster).
    """
    with (
        _one_torch_thread(),
        threadpool_limits(limits=1),
        # The threaded scheduler, counting blocks for the scene task's progress bar.
        dask.config.set(scheduler=counted_threads_get, num_workers=max(1, threads)),
    ):
        yield


def _open(config: Config, ref: SceneRef) -> Scene:
    return open_scene_from_config(ref, data=config["data"], patch_size=config["tiling"]["patch_size"])


def gpu_index(worker_name: Any, gpu_count: int, *, visible_devices: str | None) -> int:
    """The GPU a worker embeds on: our LocalCluster's workers (named 0, 1, ...) take turns.

    A worker whose ``CUDA_VISIBLE_DEVICES`` is set (dask-cuda rotates it per worker, and
    the HPC launcher's prologue may set it) lists its own GPU first, so it takes GPU 0;
    so does a remote worker (named by its address).
    """
    if visible_devices or gpu_count <= 1:
        return 0
    if isinstance(worker_name, int) and not isinstance(worker_name, bool):
        return worker_name % gpu_count
    return 0


def _embedding_device(config: Config) -> torch.device:
    # Resolved on the worker: on a cluster, the GPU is there, not in the driver.
    device = resolve_device(config["embed"]["device"], where="embed.device")
    if device.type != "cuda":
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except ValueError:  # not on a Dask worker
        name = None
    index = gpu_index(name, torch.cuda.device_count(), visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    return torch.device("cuda", index)


def _embed(config: Config, scene: Scene, *, sample_edge: int = 0) -> SceneEmbedding:
    """The scene's embeddings; with ``sample_edge``, only a window of that many pixels
    in each block (see :func:`~sitfuse_byol.embed.embed_scene`)."""
    return embed_scene(
        scene,
        load_encoder(Paths(config.output_dir).checkpoint, device=_embedding_device(config)),
        stride=config["embed"]["stride"],
        window=config["embed"]["window"],
        block_size=config["embed"]["block_size"],
        sample_edge=sample_edge,
    )


def sample_window(cluster: Mapping[str, Any]) -> int:
    """The edge, in embeddings, of the window embedded in each streamed sample block:
    ``cluster.sample_window``, grown until ``sample_blocks`` windows hold twice
    ``samples_per_scene`` (which would otherwise cap the sample)."""
    wanted = math.ceil(math.sqrt(2 * cluster["samples_per_scene"] / cluster["sample_blocks"]))
    return max(cluster["sample_window"], wanted)


def embedding_key(config: Config, ref: SceneRef) -> str:
    """What a scene's embeddings are made from: its files, the encoder, the data and embed settings."""
    encoder = checkpoint_hash(Paths(config.output_dir).checkpoint)
    settings = config.digest("data", "embed", leave_out=("data.scenes",))
    return f"{scene_fingerprint(ref)}:{encoder}:{settings}"


def saved_embedding_state(config: Config, ref: SceneRef) -> str:
    """``"current"``: the scene's saved embeddings are wanted and were made from what this
    config would make them from; ``"stale"``: a store exists but was not (another encoder,
    other settings, a changed input, or an older version without its key); ``"none"``."""
    path = Paths(config.output_dir).embedding(ref.id)
    if not (config["embed"]["save"] and path.exists()):
        return "none"
    return "current" if saved_embedding_key(path) == embedding_key(config, ref) else "stale"


def has_saved_embedding(config: Config, ref: SceneRef) -> bool:
    """Whether the scene's embeddings are to be read from their Zarr store (saved, wanted and
    current); stale ones are computed again on the fly instead."""
    return saved_embedding_state(config, ref) == "current"


def scene_embedding(config: Config, scene: Scene, *, saved: bool) -> SceneEmbedding:
    """The scene's saved embeddings when ``saved`` (see :func:`has_saved_embedding`, which
    the caller asks once), else embeddings computed on the fly."""
    if saved:
        embedding = open_embedding(Paths(config.output_dir).embedding(scene.id))
        # The store's own mask (finite first feature) reads every chunk of every feature;
        # the scene's mask, read from the input, is the same pixels at a fraction of the I/O.
        valid = cell_valid(scene.valid, stride=config["embed"]["stride"]).rechunk(embedding.data.chunks[1:])
        return SceneEmbedding(scene_id=scene.id, data=embedding.data, valid=valid, grid=embedding.grid)
    return _embed(config, scene)


class SceneReadError(Exception):
    """A scene task's read failure, as it travels back from a worker (see :func:`run_scene_task`)."""


@dataclass(frozen=True)
class TaskFailure:
    """A scene task's bad-input error, returned instead of raised (see :func:`run_scene_task`)."""

    error: SitfuseError


def run_scene_task(
    func: Callable[[Config, SceneRef, int], Any], config: Config, ref: SceneRef, threads: int
) -> tuple[Any, float]:
    """Run ``func(config, ref, threads)``; return its result (or failure) and its own seconds.

    Bad input fails the same way every time, so it comes back as a :class:`TaskFailure`
    value: Dask retries only what raises (a lost worker, a transient I/O error). The
    seconds exclude time spent queued behind other scenes.
    """
    # Worker processes do not inherit the command's filters; the run warns once per scene.
    warnings.filterwarnings("ignore", message=NOT_GEOREFERENCED_WARNING)
    start = time.perf_counter()
    read_failure = None
    try:
        with reporting_progress():
            result = func(config, ref, threads)
    except SitfuseError as err:
        result = TaskFailure(err)
    except RasterioError as err:
        read_failure = f"cannot read pixels: {first_line(err)}"
    if read_failure is not None:
        # Raised again, so that a passing read failure is retried; but as an error that
        # survives the trip to the driver and says what GDAL said (the cause's text, not
        # "Read failed. See previous exception"). Raised outside the handler, so it carries
        # no rasterio error as its context: Dask would send an unpicklable chain as a bare
        # Exception of its repr.
        raise SceneReadError(read_failure)
    return result, time.perf_counter() - start


def moments_task(config: Config, ref: SceneRef, threads: int = 1) -> list[np.ndarray]:
    """Statistics pass 1 over one scene (per-chunk band moments)."""
    with local_compute(threads):
        return scene_moment_parts(_open(config, ref))


def histogram_task(config: Config, ref: SceneRef, threads: int = 1, *, bins: HistogramBins) -> np.ndarray:
    """Statistics pass 2 over one scene (band histograms on the run's common bins)."""
    with local_compute(threads):
        return scene_histogram(_open(config, ref), bins)


def embed_task(config: Config, ref: SceneRef, threads: int = 1) -> str:
    """Write one scene's embeddings to ``OUTDIR/embeddings/<id>.zarr`` (returned), and its cluster sample.

    The sample is drawn from the blocks while they are written, so clustering need not
    read every embedding back, and nothing reads the input before (the scene's valid
    count comes from the blocks too); it is the same sample :func:`sample_task` draws
    from the saved store (same blocks, same seeds).
    """
    paths = Paths(config.output_dir)
    n, seed = config["cluster"]["samples_per_scene"], config["cluster"]["seed"]
    # A sample left from older embeddings must never pair with the new ones, even if
    # this task dies between writing the two.
    paths.samples(ref.id).unlink(missing_ok=True)
    with local_compute(threads):
        scene = _open(config, ref)
        sample = SceneSample(scene.id, n=n, seed=seed)
        save_embedding(
            _embed(config, scene), paths.embedding(scene.id), block_hook=sample.add, key=embedding_key(config, ref)
        )
        try:
            samples, neighbours = sample.result()
        except InputError:
            # No valid pixel: the scene fails, and leaves no embeddings that look usable.
            remove_path(paths.embedding(scene.id))
            raise
        save_samples(paths.samples(scene.id), samples, neighbours, n=n, seed=seed)
    return str(paths.embedding(scene.id))


def sample_task(config: Config, ref: SceneRef, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """About ``cluster.samples_per_scene`` valid embeddings of a scene, with neighbours."""
    cfg = config["cluster"]
    saved = has_saved_embedding(config, ref)
    # ``embed_task`` deletes the sample before it replaces the embeddings, so a sample
    # beside current embeddings was drawn from them.
    if saved:
        kept = load_samples(Paths(config.output_dir).samples(ref.id), n=cfg["samples_per_scene"], seed=cfg["seed"])
        if kept is not None:
            return kept
    with local_compute(threads):
        scene = _open(config, ref)
        if saved or not cfg["sample_blocks"]:
            embedding = scene_embedding(config, scene, saved=saved)
        else:
            # Streamed embeddings are computed here and again for the labels, so the
            # sample comes from one window of each of a few blocks.
            embedding = _embed(config, scene, sample_edge=config["embed"]["stride"] * sample_window(cfg))
        return sample_embeddings(
            embedding, n=cfg["samples_per_scene"], seed=cfg["seed"], max_blocks=0 if saved else cfg["sample_blocks"]
        )


@functools.lru_cache(maxsize=4)
def _cached_cluster_model(path: str, mtime_ns: int) -> ClusterModel:
    return ClusterModel.load(Path(path))


def load_cluster_model(path: Path) -> ClusterModel:
    """The clustering model, loaded once per worker process."""
    marker = path / "model.json"
    return _cached_cluster_model(str(path.resolve()), marker.stat().st_mtime_ns if marker.exists() else 0)


def export_task(config: Config, ref: SceneRef, threads: int = 1) -> dict[str, str]:
    """Label, confidence and sidecar outputs of one scene."""
    paths = Paths(config.output_dir)
    with local_compute(threads):
        scene = _open(config, ref)
        # Streamed embeddings load the encoder on the embedding device; the checks reuse
        # that copy (it is cached per device) rather than load one more on the CPU.
        saved = has_saved_embedding(config, ref)
        trained = load_encoder(paths.checkpoint, device="cpu" if saved else _embedding_device(config))
        trained.check_bands(scene.band_names, where=scene.source)
        model = load_cluster_model(paths.cluster_model)
        embedding = scene_embedding(config, scene, saved=saved)
        model.check_compatible(dim=embedding.dim, encoder_hash=trained.checkpoint_hash)
        tags = {
            "model_hash": model.model_hash,
            "encoder_hash": trained.checkpoint_hash,
            "config_hash": config.settings_digest(),
            "scene": scene.id,
        }
        return write_scene_outputs(
            scene=scene,
            embedding=embedding,
            model=model,
            out_dir=config.output_dir,
            stride=config["embed"]["stride"],
            options=OutputOptions.from_config(config["output"]),
            tags=tags,
        )


#: Seconds between a worker-side training's looks at its stop event (a scheduler round trip).
STOP_CHECK_S = 1.0


class TrainingStopped(Exception):
    """The run that submitted a training to a worker was interrupted (see :func:`train_task`)."""


def train_task(config: Config, *, stop_event: str, **train_kwargs: Any) -> None:
    """:func:`~sitfuse_byol.train.loop.train` on a Dask worker (``--gpus-per-worker``).

    A running task is not stopped by its client going away: the training would go on
    after an interrupted run and race a rerun's training on ``last.pt``. So it looks at
    the Dask ``Event`` named ``stop_event`` about every :data:`STOP_CHECK_S` seconds
    between steps, and stops (after its last finished epoch's checkpoint) once it is set.

    Raises:
        TrainingStopped: The event was set.
    """
    from distributed import Event

    from sitfuse_byol.train.loop import train

    stop = Event(stop_event)
    looked = time.monotonic()

    def check_stop(values: dict[str, Any]) -> None:
        nonlocal looked
        if time.monotonic() - looked >= STOP_CHECK_S:
            looked = time.monotonic()
            if stop.is_set():
                raise TrainingStopped("the run was interrupted")

    train(config, progress=check_stop, **train_kwargs)
