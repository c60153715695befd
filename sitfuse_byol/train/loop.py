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

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from sitfuse_byol.config import Config
from sitfuse_byol.errors import ConfigError, ModelError
from sitfuse_byol.normalize import BandStats, compute_stats
from sitfuse_byol.read import Scene, open_scenes_from_config, resolve_scene_list
from sitfuse_byol.tile import PatchBatch, PatchSampler
from sitfuse_byol.train.augment import AugmentConfig, make_views
from sitfuse_byol.train.byol import BYOL, embedding_stats, tau_schedule
from sitfuse_byol.train.checkpoint import load_checkpoint, save_checkpoint
from sitfuse_byol.train.device import autocast, keep_freed_heap, resolve_device, to_device
from sitfuse_byol.train.encoders import create_encoder, resolve_norm
from sitfuse_byol.train.metrics import COLLAPSE_STD, plot_curves, read_metrics, write_metrics
from sitfuse_byol.train.optim import create_optimizer, param_groups, warmup_cosine

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


def checkpoint_dir(config: Config) -> Path:
    return config.output_dir / "checkpoints"


def ensure_stats(config: Config, scenes: list[Scene]) -> BandStats:
    """Statistics from ``OUTDIR/stats.json``, computed and saved first when missing."""
    path = config.output_dir / "stats.json"
    if path.exists():
        stats = BandStats.load(path)
        if stats.n_bands == scenes[0].n_bands:
            return stats
    stats = compute_stats(scenes)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


def _warmup_steps(config_warmup: int, total_steps: int) -> int:
    # A short run cannot spend most of itself warming up: at most a fifth of it.
    return min(config_warmup, total_steps // 5)


def build_model(config: Config, *, in_channels: int, device: torch.device) -> tuple[BYOL, dict]:
    train = config["train"]
    norm = resolve_norm(train["norm"], train["batch_size"])
    encoder_spec = {
        "name": train["encoder"],
        "in_channels": in_channels,
        "norm": norm,
        "kwargs": dict(train["encoder_args"]),
    }
    encoder = create_encoder(
        encoder_spec["name"], in_channels=in_channels, norm=norm, **encoder_spec["kwargs"]
    )
    model = BYOL(
        encoder,
        projector_hidden=train["projector_hidden"],
        projection_dim=train["projection_dim"],
        predictor_hidden=train["projector_hidden"],
        tau_base=train["tau_base"],
    ).to(device)
    if device.type == "cuda":
        # Module.to accepts memory_format at run time; torch's overloads leave it out.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model, encoder_spec


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
    stats = ensure_stats(config, scenes) if ctx.is_main else None
    if ctx.world_size > 1:
        dist.barrier()
    if stats is None:
        stats = BandStats.load(config.output_dir / "stats.json")

    if device.type == "cpu":
        # The sampler reads and cuts chunks in background threads; torch threads that
        # compete with them for every core stall at OpenMP barriers (seconds per step).
        torch.set_num_threads(cfg["threads"] or max(1, (os.cpu_count() or 2) - 1))
        keep_freed_heap()
    torch.manual_seed(cfg["seed"])
    model, encoder_spec = build_model(config, in_channels=stats.n_bands, device=device)
    if ctx.world_size > 1 and encoder_spec["norm"] == "batch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    total_steps = cfg["epochs"] * cfg["steps_per_epoch"]
    optimizer = create_optimizer(
        cfg["optimizer"],
        param_groups(nn.ModuleList([model.online, model.predictor]), cfg["weight_decay"]),
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
    )
    scheduler = warmup_cosine(optimizer, _warmup_steps(cfg["warmup_steps"], total_steps), total_steps)

    ckpt_dir = checkpoint_dir(config)
    metrics_path = config.output_dir / "train" / "metrics.csv"
    start_epoch, step = 0, 0
    history: list[dict[str, float]] = []
    if resume and (ckpt_dir / "last.pt").exists():
        state = load_checkpoint(ckpt_dir / "last.pt")
        _check_resumable(state, stats=stats, encoder_spec=encoder_spec, total_steps=total_steps)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        history = [row for row in read_metrics(metrics_path) if row["epoch"] < start_epoch]

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
    augment = AugmentConfig.from_dict(cfg["augment"])
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
    try:
        history, collapsed, step = _run_epochs(
            range(start_epoch, end_epoch),
            step=step,
            history=history,
            streams=streams,
            model=model,
            step_model=step_model,
            optimizer=optimizer,
            scheduler=scheduler,
            augment=augment,
            device=device,
            config=config,
            ctx=ctx,
            progress=progress,
            total_steps=total_steps,
            state_extra={
                "stats": _stats_dict(stats),
                "band_names": list(stats.band_names),
                "encoder": encoder_spec,
            },
            ckpt_dir=ckpt_dir,
            metrics_path=metrics_path,
        )
    finally:
        streams.close()
    return TrainResult(checkpoint=ckpt_dir / "last.pt", metrics=history, collapsed=collapsed)


def _run_epochs(
    epochs: range,
    *,
    step: int,
    history: list[dict[str, float]],
    streams: EpochStreams,
    model: BYOL,
    step_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    augment: AugmentConfig,
    device: torch.device,
    config: Config,
    ctx: DistributedContext,
    progress: Callable[[dict[str, Any]], None] | None,
    total_steps: int,
    state_extra: dict[str, Any],
    ckpt_dir: Path,
    metrics_path: Path,
) -> tuple[list[dict[str, float]], bool, int]:
    """Train ``epochs``; after each, rank 0 writes checkpoints, metrics and curves."""
    collapsed = False
    end_epoch = epochs.stop
    for epoch in epochs:
        row, step = _run_epoch(
            epoch=epoch,
            step=step,
            total_steps=total_steps,
            model=model,
            step_model=step_model,
            optimizer=optimizer,
            scheduler=scheduler,
            streams=streams,
            next_epoch=epoch + 1 if epoch + 1 < end_epoch else None,
            augment=augment,
            device=device,
            config=config,
            ctx=ctx,
            progress=progress,
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
        if ctx.is_main:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "step": step,
                "rng": {"torch": torch.get_rng_state()},
                "config": config.values,
                **state_extra,
                "metrics": row,
            }
            save_checkpoint(ckpt_dir / f"epoch_{epoch:03d}.pt", state)
            save_checkpoint(ckpt_dir / "last.pt", state)
            write_metrics(metrics_path, history)
            plot_curves(config.output_dir / "train" / "curves.png", history)
        if ctx.world_size > 1:
            dist.barrier()
    return history, collapsed, step


def _stats_dict(stats: BandStats) -> dict[str, list]:
    # Through JSON, so only plain Python numbers reach the checkpoint (weights_only loads).
    return json.loads(stats.to_json())


def _check_resumable(state: dict, *, stats: BandStats, encoder_spec: dict, total_steps: int) -> None:
    if list(state["band_names"]) != list(stats.band_names):
        raise ModelError(
            f"the checkpoint was trained on bands {', '.join(state['band_names'])}, "
            f"the data has {', '.join(stats.band_names)}",
            where="checkpoints/last.pt",
        )
    if state["encoder"] != encoder_spec:
        raise ModelError(
            "the checkpoint holds another encoder or norm than the config asks for; "
            "resume with the same train settings or start afresh without --resume",
            where="checkpoints/last.pt",
        )
    trained_total = state["config"]["train"]["epochs"] * state["config"]["train"]["steps_per_epoch"]
    if trained_total != total_steps:
        log.warning("warning: epochs or steps changed since the checkpoint; schedules will jump")


def _run_epoch(
    *,
    epoch: int,
    step: int,
    total_steps: int,
    model: BYOL,
    step_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    streams: EpochStreams,
    next_epoch: int | None,
    augment: AugmentConfig,
    device: torch.device,
    config: Config,
    ctx: DistributedContext,
    progress: Callable[[dict[str, Any]], None] | None,
) -> tuple[dict[str, float], int]:
    cfg = config["train"]
    generator = torch.Generator(device=device)
    generator.manual_seed(_epoch_seed(cfg["seed"], epoch, ctx.rank))
    stream = streams.take(epoch, next_epoch=next_epoch)
    model.train()
    losses: list[float] = []
    monitor: list[torch.Tensor] = []
    wait = 0.0
    patches = 0
    tau = tau_schedule(step, total_steps, cfg["tau_base"])
    start = time.perf_counter()
    for _ in range(cfg["steps_per_epoch"]):
        t0 = time.perf_counter()
        batch = next(stream)
        wait += time.perf_counter() - t0
        x = to_device(batch.patches, device, image=True)
        valid = to_device(batch.valid, device)
        view1, valid1, view2, valid2 = make_views(x, valid, config=augment, generator=generator)
        with autocast(device):
            output = step_model(view1, view2, valid1, valid2)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        if cfg["grad_clip"] is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], cfg["grad_clip"]
            )
        optimizer.step()
        scheduler.step()
        step += 1
        # τ for step k is applied right after optimizer step k (BYOL's schedule counts from 0).
        tau = tau_schedule(step - 1, total_steps, cfg["tau_base"])
        model.update_target(tau)
        loss = float(output.loss.detach())
        if not math.isfinite(loss):
            raise ModelError(f"training diverged: loss is {loss} at step {step}; lower train.lr")
        losses.append(loss)
        patches += x.shape[0]
        if sum(m.shape[0] for m in monitor) < MONITOR_SAMPLES:
            monitor.append(output.online_projection.float().cpu())
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress(
                {
                    "epoch": epoch,
                    "step": step,
                    "loss": loss,
                    "tau": tau,
                    "lr": float(scheduler.get_last_lr()[0]),
                    "patches_per_s": patches * ctx.world_size / max(elapsed, 1e-9),
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
        "lr": float(scheduler.get_last_lr()[0]),
        "std_sqrt_d": diagnostics["std_sqrt_d"],
        "effective_rank": diagnostics["effective_rank"],
        "patches_per_s": patches * ctx.world_size / elapsed,
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
