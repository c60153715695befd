"""The BYOL training loop: sampler → augmentations → BYOL step → EMA, with exact resume.

Every epoch draws its batches from a sampler stream and an augmentation generator seeded
by ``(seed, epoch, rank)`` only, and a checkpoint holds all other state (weights of
both networks, optimizer, scheduler, step), so stopping after an epoch and resuming
gives the same weights as never stopping.

Distributed runs (``torchrun`` or ``--ddp``) use DistributedDataParallel: each rank
reads its own shard of the sampler, BatchNorm becomes SyncBatchNorm (GroupNorm needs
nothing), τ and the learning rate follow the global step (every step is taken by all
ranks together), and only rank 0 writes checkpoints and metrics.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sitfuse_byol.config import SCHEMA, Config, yaml_text
from sitfuse_byol.cores import usable_cores
from sitfuse_byol.errors import ConfigError, ModelError, SitfuseError
from sitfuse_byol.export.atomic import atomic_path
from sitfuse_byol.normalize import BandStats, compute_stats
from sitfuse_byol.read import Scene, open_scenes_from_config, resolve_scene_list
from sitfuse_byol.tile import PatchBatch, PatchSampler
from sitfuse_byol.train.augment import AugmentConfig, make_views
from sitfuse_byol.train.byol import BYOL, BYOLOutput, embedding_stats, tau_schedule
from sitfuse_byol.train.checkpoint import build_encoder, load_checkpoint, save_checkpoint
from sitfuse_byol.train.device import autocast, keep_freed_heap, resolve_device, to_device
from sitfuse_byol.train.encoders import resolve_norm
from sitfuse_byol.train.metrics import COLLAPSE_STD, plot_curves, read_metrics, write_metrics
from sitfuse_byol.train.optim import create_optimizer, default_lr, param_groups, warmup_cosine

log = logging.getLogger("sitfuse_byol.train")
# Embeddings kept per epoch for the collapse diagnostics.
MONITOR_SAMPLES = 1024


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    metrics: list[dict[str, float]]
    collapsed: bool


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, enable: bool, device: torch.device) -> DistributedContext:
    """Join the process group set up by ``torchrun`` (env:// rendezvous), when asked or launched so."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not enable and world_size == 1:
        return DistributedContext()
    if "RANK" not in os.environ:
        raise ConfigError("--ddp needs the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR)")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def training_threads() -> int:
    """CPU threads for torch when ``train.threads`` is null: this process's cores, shared
    among the training processes ``torchrun`` started on this node.

    The patch sampler's background threads need little CPU (data wait stays well under
    1% with every core training, measured on 2 cores), so holding a core back for them
    cost about 40% of the training speed of a 2-core machine.
    """
    return max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def checkpoint_dir(config: Config) -> Path:
    return config.output_dir / "checkpoints"


def training_stats(config: Config, scenes: list[Scene], *, reuse: bool = True) -> tuple[BandStats, bool]:
    """The band statistics to train with: ``OUTDIR/stats.json`` when it can be reused,
    else computed (not saved: a refused resume must leave the file as it was).

    Args:
        config: The validated config.
        scenes: The training scenes.
        reuse: Whether the saved statistics may be used at all; ``False`` when the data
            settings or scene files changed since they were computed.

    Returns:
        The statistics, and whether they were computed (and so still need saving).
    """
    path = config.output_dir / "stats.json"
    if reuse and path.exists():
        stats = BandStats.load(path)
        # Statistics of other scenes or bands (the band count alone can agree) would
        # normalise with the wrong values and be saved as this model's.
        same_scenes = sorted(stats.scenes) == sorted(s.id for s in scenes)  # their order does not matter
        if stats.band_names == tuple(scenes[0].band_names) and same_scenes:
            return stats, False
    return compute_stats(scenes), True


def _from_rank_zero(ctx: DistributedContext, func: Callable[[], Any]) -> Any:
    """``func()`` run on rank 0 only, its result (or its :class:`SitfuseError`) given to every rank.

    An error met on rank 0 alone would otherwise leave the other ranks at a barrier whose
    peer has gone, and they would die with a gloo traceback instead of the same one line.
    """
    if ctx.world_size == 1:
        return func()
    message: list[Any] = [None]
    if ctx.is_main:
        try:
            message[0] = ("ok", func())
        except SitfuseError as err:
            message[0] = ("error", type(err), err.what, err.where)
        except Exception as err:
            # Anything else (a full disk, a bug) still stops every rank, not rank 0 alone;
            # rank 0 goes on to report it as itself.
            dist.broadcast_object_list([("crash", f"{type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    if message[0][0] == "crash":
        raise SitfuseError(f"rank 0 failed: {message[0][1]}", where=f"rank {ctx.rank}")
    if message[0][0] == "error":
        _, kind, what, where = message[0]
        raise kind(what, where=where)
    return message[0][1]


def _warmup_steps(config_warmup: int, total_steps: int) -> int:
    # A short run cannot spend most of itself warming up: at most a fifth of it.
    return min(config_warmup, total_steps // 5)


def build_model(config: Config, *, in_channels: int, device: torch.device) -> tuple[BYOL, dict]:
    """The BYOL model of the config's ``train`` section, and the spec of its encoder.

    The encoder is built from the spec by :func:`build_encoder`, the function that
    rebuilds it from a checkpoint, so training and inference cannot construct it
    differently.

    Args:
        config: The validated config.
        in_channels: Bands of the training data.
        device: Where the model lives (channels-last on CUDA).

    Returns:
        The model in training mode, and the encoder spec a checkpoint stores.
    """
    train = config["train"]
    encoder_spec = {
        "name": train["encoder"],
        "in_channels": in_channels,
        "norm": resolve_norm(train["norm"], train["batch_size"]),
        "kwargs": dict(train["encoder_args"]),
    }
    model = BYOL(
        build_encoder(encoder_spec),
        projector_hidden=train["projector_hidden"],
        projection_dim=train["projection_dim"],
        predictor_hidden=train["projector_hidden"],
    ).to(device)
    if device.type == "cuda":
        # Module.to accepts memory_format at run time; torch's overloads leave it out.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model, encoder_spec


def build_optimizer(
    model: BYOL, *, train_config: dict[str, Any], total_steps: int, world_size: int = 1
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer of the online network and predictor, and its warm-up + cosine schedule.

    The target network is frozen, so :func:`param_groups` leaves it out; the remaining
    parameters come in the order online, predictor, which a resumed optimizer state
    relies on.

    Args:
        model: The BYOL model (after any SyncBatchNorm conversion).
        train_config: The config's ``train`` section.
        total_steps: Optimizer steps of the whole run, the end of the cosine.
        world_size: Processes training together; the global batch sets a null ``lr``.

    Returns:
        The optimizer and its learning-rate scheduler.
    """
    lr = train_config["lr"]
    if lr is None:
        lr = default_lr(train_config["optimizer"], global_batch=train_config["batch_size"] * world_size)
    optimizer = create_optimizer(
        train_config["optimizer"],
        param_groups(model, train_config["weight_decay"]),
        lr=lr,
        weight_decay=train_config["weight_decay"],
    )
    warmup = _warmup_steps(train_config["warmup_steps"], total_steps)
    return optimizer, warmup_cosine(optimizer, warmup, total_steps)


@dataclass(frozen=True)
class StepParts:
    """What one BYOL training step updates, and how.

    Attributes:
        model: The BYOL model; its target network follows the online one by EMA.
        step_model: What the forward pass runs through: ``model`` itself, or its
            DistributedDataParallel or compiled wrapper.
        optimizer: Optimises the online network and the predictor.
        scheduler: The learning-rate schedule, stepped after every optimizer step.
        augment: The augmentations that make the two views.
        grad_clip: Largest gradient norm; ``None`` disables clipping.
    """

    model: BYOL
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: AugmentConfig
    grad_clip: float | None

    @functools.cached_property
    def clip_params(self) -> list[torch.Tensor]:
        """The parameters whose gradients clipping rescales: the optimizer's, in its order.

        Gathered once rather than at every step. The order sets the summation order
        of the total norm, so keeping the optimizer's keeps clipping bit-exact.
        """
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def train_step(
    parts: StepParts, x: torch.Tensor, valid: torch.Tensor, *, generator: torch.Generator, tau: float
) -> BYOLOutput:
    """One BYOL training step, the same for the training loop and the benchmarks.

    Augments the batch into two views, computes the loss (bf16 autocast on CUDA),
    backpropagates, clips the gradient norm, steps the optimizer and then the
    learning-rate schedule, and moves the target network by EMA.

    Args:
        parts: The model, optimizer, schedule and augmentations.
        x: ``(B, C, P, P)`` patches on the training device.
        valid: ``(B, P, P)`` bool validity of their pixels.
        generator: Draws the augmentations, on the device of ``x``.
        tau: EMA rate of this step, from :func:`tau_schedule`.

    Returns:
        The forward pass's output: the loss, and the detached view-1 embedding and
        projection the loop monitors for collapse.
    """
    view1, valid1, view2, valid2 = make_views(x, valid, config=parts.augment, generator=generator)
    with autocast(x.device):
        output: BYOLOutput = parts.step_model(view1, view2, valid1, valid2)
    parts.optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    if parts.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(parts.clip_params, parts.grad_clip)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.model.update_target(tau)
    return output


@dataclass(frozen=True)
class _Run:
    """What every epoch of one :func:`train` call shares.

    Attributes:
        parts: Model, optimizer, schedule and augmentations of the training step.
        streams: The epochs' batch streams.
        device: The training device.
        config: The validated config.
        ctx: This process's place in a distributed run.
        progress: Called after every step, or ``None``.
        total_steps: Optimizer steps of the whole run (τ and lr schedules).
        ckpt_dir: Where rank 0 writes ``epoch_NNN.pt`` and ``last.pt``.
        metrics_path: Where rank 0 writes the per-epoch metrics CSV.
        state_extra: Stored in every checkpoint besides the training state
            (band statistics, band names, encoder spec).
    """

    parts: StepParts
    streams: EpochStreams
    device: torch.device
    config: Config
    ctx: DistributedContext
    progress: Callable[[dict[str, Any]], None] | None
    total_steps: int
    ckpt_dir: Path
    metrics_path: Path
    state_extra: dict[str, Any]


def train(
    config: Config,
    *,
    device_name: str | None = None,
    resume: bool = False,
    compile_model: bool | None = None,
    ddp: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop_after_epochs: int | None = None,
    scenes: list[Scene] | None = None,
    reuse_stats: bool = True,
) -> TrainResult:
    """Train BYOL on the config's scenes and write checkpoints and metrics under ``OUTDIR``.

    Args:
        config: The validated config.
        device_name: Overrides ``train.device``.
        resume: Continue from ``OUTDIR/checkpoints/last.pt``.
        compile_model: Overrides ``train.compile``.
        ddp: Train with DistributedDataParallel (launched by ``torchrun``).
        progress: Called after every step with loss, τ, lr, patches/s and data-wait share.
        stop_after_epochs: Stop (as if interrupted) after this many epochs of this call.
        scenes: The scenes to train on, already opened; by default the config's scene list.
        reuse_stats: Whether ``OUTDIR/stats.json`` may be used when it holds these scenes
            and bands; ``False`` computes them again (see :func:`training_stats`).

    Raises:
        ModelError: Resuming from a checkpoint of other bands or another model.
        ConfigError: Bad training settings.
    """
    cfg = config["train"]
    device = resolve_device(device_name or cfg["device"])
    ctx = init_distributed(enable=ddp, device=device)
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        device = torch.device("cuda", ctx.local_rank)
    if scenes is None:
        refs = resolve_scene_list(config["data"]["scenes"], base=config.base)
        scenes = open_scenes_from_config(refs, data=config["data"], patch_size=config["tiling"]["patch_size"])
    stats, new_stats = _from_rank_zero(ctx, lambda: training_stats(config, scenes, reuse=reuse_stats))

    if device.type == "cpu":
        keep_freed_heap()
    torch.manual_seed(cfg["seed"])
    model, encoder_spec = build_model(config, in_channels=stats.n_bands, device=device)
    if ctx.world_size > 1 and encoder_spec["norm"] == "batch" and device.type == "cuda":
        # SyncBatchNorm runs on GPUs only. On CPU ranks (gloo) each rank normalises with
        # its own batch, and DDP hands rank 0's running statistics to the others.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    total_steps = cfg["epochs"] * cfg["steps_per_epoch"]
    optimizer, scheduler = build_optimizer(
        model, train_config=cfg, total_steps=total_steps, world_size=ctx.world_size
    )

    ckpt_dir = checkpoint_dir(config)
    metrics_path = config.output_dir / "train" / "metrics.csv"
    start_epoch, step = 0, 0
    history: list[dict[str, float]] = []
    if resume and (ckpt_dir / "last.pt").exists():
        state = load_checkpoint(ckpt_dir / "last.pt")
        _check_resumable(state, stats=stats, encoder_spec=encoder_spec, total_steps=total_steps, config=config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        history = [row for row in read_metrics(metrics_path) if row["epoch"] < start_epoch]
    if new_stats and ctx.is_main:
        stats.save(config.output_dir / "stats.json")

    sampler = PatchSampler(
        scenes,
        stats=stats,
        patch_size=config["tiling"]["patch_size"],
        batch_size=cfg["batch_size"],
        min_valid_fraction=config["tiling"]["min_valid_fraction"],
        seed=cfg["seed"],
        shuffle_buffer=config["tiling"]["shuffle_buffer"],
        prefetch_chunks=config["tiling"]["prefetch_chunks"],
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    step_model: nn.Module = model
    if ctx.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if device.type == "cuda" else None
        )
    if compile_model if compile_model is not None else cfg["compile"]:
        # Compiling a module gives an OptimizedModule; the stubs only promise a callable.
        step_model = cast(nn.Module, torch.compile(step_model))

    streams = EpochStreams(sampler)
    end_epoch = cfg["epochs"]
    if stop_after_epochs is not None:
        end_epoch = min(end_epoch, start_epoch + stop_after_epochs)
    run = _Run(
        parts=StepParts(
            model=model,
            step_model=step_model,
            optimizer=optimizer,
            scheduler=scheduler,
            augment=AugmentConfig.from_dict(cfg["augment"]),
            grad_clip=cfg["grad_clip"],
        ),
        streams=streams,
        device=device,
        config=config,
        ctx=ctx,
        progress=progress,
        total_steps=total_steps,
        ckpt_dir=ckpt_dir,
        metrics_path=metrics_path,
        state_extra={
            "stats": _stats_dict(stats),
            "band_names": list(stats.band_names),
            "encoder": encoder_spec,
        },
    )
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"] or training_threads())
    try:
        history, collapsed, step = _run_epochs(
            run, epochs=range(start_epoch, end_epoch), step=step, history=history
        )
    finally:
        streams.close()
        # Later work in this process (a benchmark, the embed stage) gets its cores back.
        torch.set_num_threads(threads_before)
    return TrainResult(checkpoint=ckpt_dir / "last.pt", metrics=history, collapsed=collapsed)


def _run_epochs(
    run: _Run, *, epochs: range, step: int, history: list[dict[str, float]]
) -> tuple[list[dict[str, float]], bool, int]:
    """Train ``epochs``; after each, rank 0 writes checkpoints, metrics and curves."""
    collapsed = False
    parts = run.parts
    for epoch in epochs:
        row, step = _run_epoch(
            run,
            epoch=epoch,
            step=step,
            next_epoch=epoch + 1 if epoch + 1 < epochs.stop else None,
        )
        history.append(row)
        if row["std_sqrt_d"] < COLLAPSE_STD:
            collapsed = True
            log.warning(
                "warning: embeddings are collapsing (std·√d = %.3f at epoch %d); "
                "try a lower lr, a higher tau_base or milder augmentations",
                row["std_sqrt_d"],
                epoch,
            )
        if run.ctx.is_main:
            state = {
                "model": parts.model.state_dict(),
                "optimizer": parts.optimizer.state_dict(),
                "scheduler": parts.scheduler.state_dict(),
                "epoch": epoch,
                "step": step,
                "rng": {"torch": torch.get_rng_state()},
                "config": run.config.values,
                **run.state_extra,
                "metrics": row,
            }
            epoch_path = run.ckpt_dir / f"epoch_{epoch:03d}.pt"
            save_checkpoint(epoch_path, state)
            # The metrics before last.pt: an interrupt between the two then leaves a row
            # the resumed run drops and writes again, never an epoch without its row.
            write_metrics(run.metrics_path, history)
            plot_curves(run.config.output_dir / "train" / "curves.png", history)
            # last.pt holds the same state: copy the file rather than serialise it
            # twice, through a temporary so a crash never leaves half a last.pt.
            with atomic_path(run.ckpt_dir / "last.pt") as tmp:
                shutil.copyfile(epoch_path, tmp)
        if run.ctx.world_size > 1:
            dist.barrier()
    return history, collapsed, step


def _stats_dict(stats: BandStats) -> dict[str, list]:
    # Through JSON, so only plain Python numbers reach the checkpoint (weights_only loads).
    return json.loads(stats.to_json())


#: Train settings a resumed run may change: how long it runs, and where (the schema's
#: placement keys: device, compile, threads).
RESUME_MAY_CHANGE = frozenset({"epochs", "steps_per_epoch"} | {k for k, key in SCHEMA["train"].items() if key.placement})

#: Tiling settings a resumed run must keep: the size and validity of the patches it learns from.
RESUME_KEEPS_TILING = ("patch_size", "min_valid_fraction")


def resume_conflict(state: dict, config: Config) -> str | None:
    """Why a checkpoint cannot be resumed under ``config`` (None: it can).

    The optimizer and scheduler states restored on resume hold the old learning rate,
    optimizer kind and parameter shapes, so any other train setting than the run's
    length would be silently ignored, or fail deep inside torch.
    """
    old, new = state["config"]["train"], config["train"]
    changed = [
        f"train.{k}" for k in sorted(set(old) | set(new)) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k)
    ]
    # What the patches are: the rest of the training would learn from other inputs.
    old_tiling, new_tiling = state["config"]["tiling"], config["tiling"]
    changed += [f"tiling.{k}" for k in RESUME_KEEPS_TILING if old_tiling.get(k) != new_tiling.get(k)]
    if changed:
        section, key = changed[0].split(".")
        was, now = state["config"][section].get(key), config[section].get(key)
        return (
            f"{changed[0]} was {yaml_text(was)} when the checkpoint was trained, now {yaml_text(now)}; only "
            f"{', '.join(f'train.{k}' for k in sorted(RESUME_MAY_CHANGE))} may change on resume "
            "(train afresh without --resume)"
        )
    if state["epoch"] + 1 > new["epochs"]:
        return (
            f"the checkpoint has trained {state['epoch'] + 1} epochs, more than train.epochs ({new['epochs']}); "
            "raise train.epochs to continue"
        )
    return None


def _check_resumable(state: dict, *, stats: BandStats, encoder_spec: dict, total_steps: int, config: Config) -> None:
    conflict = resume_conflict(state, config)
    if conflict:
        raise ModelError(f"cannot resume: {conflict}", where="checkpoints/last.pt")
    if list(state["band_names"]) != list(stats.band_names):
        raise ModelError(
            f"the checkpoint was trained on bands {', '.join(state['band_names'])}, "
            f"the data has {', '.join(stats.band_names)}",
            where="checkpoints/last.pt",
        )
    if not same_normalization(state["stats"], stats):
        raise ModelError(STATS_DIFFER, where="checkpoints/last.pt")
    if state["encoder"] != encoder_spec:
        raise ModelError(
            "the checkpoint holds another encoder or norm than the config asks for; "
            "resume with the same train settings or start afresh without --resume",
            where="checkpoints/last.pt",
        )
    trained_total = state["config"]["train"]["epochs"] * state["config"]["train"]["steps_per_epoch"]
    if trained_total != total_steps:
        log.warning("warning: epochs or steps changed since the checkpoint; schedules will jump")


STATS_DIFFER = (
    "the band statistics differ from the checkpoint's (data settings or scenes changed), so "
    "the rest of the training would see differently normalised pixels; train afresh without --resume"
)


def same_normalization(saved: dict, stats: BandStats) -> bool:
    """Whether a checkpoint's statistics normalise as ``stats`` do (recomputing the same
    pixels may differ in the last bits); other bands never do."""
    if list(saved.get("band_names", stats.band_names)) != list(stats.band_names):
        return False
    return all(
        np.shape(saved[key]) == np.shape(getattr(stats, key))
        and np.allclose(saved[key], getattr(stats, key), rtol=1e-9, atol=0)
        for key in ("mean", "std")
    )


def _run_epoch(
    run: _Run, *, epoch: int, step: int, next_epoch: int | None
) -> tuple[dict[str, float], int]:
    """Train one epoch from global step ``step``; its metrics row and the step after it."""
    cfg = run.config["train"]
    generator = torch.Generator(device=run.device)
    generator.manual_seed(_epoch_seed(cfg["seed"], epoch, run.ctx.rank))
    stream = run.streams.take(epoch, next_epoch=next_epoch)
    run.parts.model.train()
    losses: list[float] = []
    monitor: list[torch.Tensor] = []
    wait = 0.0
    patches = 0
    start = time.perf_counter()
    # steps_per_epoch is at least 1 (config minimum), so tau and lr are always set below.
    for _ in range(cfg["steps_per_epoch"]):
        t0 = time.perf_counter()
        batch = next(stream)
        wait += time.perf_counter() - t0
        x = to_device(batch.patches, run.device, image=True)
        valid = to_device(batch.valid, run.device)
        # τ for step k is applied right after optimizer step k (BYOL's schedule counts from 0).
        tau = tau_schedule(step, run.total_steps, cfg["tau_base"])
        # The rate this step uses: train_step moves the schedule on after its update.
        lr = float(run.parts.scheduler.get_last_lr()[0])
        output = train_step(run.parts, x, valid, generator=generator, tau=tau)
        step += 1
        loss = float(output.loss.detach())
        if not math.isfinite(loss):
            raise ModelError(f"training diverged: loss is {loss} at step {step}; lower train.lr")
        losses.append(loss)
        patches += x.shape[0]
        if sum(m.shape[0] for m in monitor) < MONITOR_SAMPLES:
            monitor.append(output.online_projection.float().cpu())
        if run.progress is not None:
            elapsed = time.perf_counter() - start
            run.progress(
                {
                    "epoch": epoch,
                    "step": step,
                    "loss": loss,
                    "tau": tau,
                    "lr": lr,
                    "patches_per_s": patches * run.ctx.world_size / max(elapsed, 1e-9),
                    "data_wait": wait / max(elapsed, 1e-9),
                }
            )
    elapsed = time.perf_counter() - start
    diagnostics = embedding_stats(torch.cat(monitor)[:MONITOR_SAMPLES])
    row = {
        "epoch": epoch,
        "step": step,
        "loss": sum(losses) / len(losses),
        "tau": tau,
        "lr": lr,
        "std_sqrt_d": diagnostics["std_sqrt_d"],
        "effective_rank": diagnostics["effective_rank"],
        "patches_per_s": patches * run.ctx.world_size / elapsed,
        "data_wait": wait / elapsed,
        "seconds": elapsed,
    }
    return row, step


class EpochStreams:
    """Each epoch's batch stream, with the next epoch's first batch read ahead.

    An epoch's stream depends only on ``(seed, epoch, rank)`` (exact resume), so it
    starts with a cold read; starting it in the background while the previous epoch
    trains hides that read.
    """

    def __init__(self, sampler: PatchSampler) -> None:
        self.sampler = sampler
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.ahead: tuple[int, Future] | None = None

    def _start(self, epoch: int) -> Future:
        def first() -> tuple[Iterator[PatchBatch], PatchBatch]:
            stream = self.sampler.batches(epoch=epoch)
            return stream, next(stream)

        return self.pool.submit(first)

    def take(self, epoch: int, *, next_epoch: int | None) -> Iterator[PatchBatch]:
        """The stream of ``epoch``; starts reading ``next_epoch`` (None: nothing) ahead."""
        future = self.ahead[1] if self.ahead and self.ahead[0] == epoch else self._start(epoch)
        self.ahead = (next_epoch, self._start(next_epoch)) if next_epoch is not None else None
        stream, first = future.result()
        return itertools.chain([first], stream)

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead[1].cancel()
        self.pool.shutdown(wait=True)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63)
