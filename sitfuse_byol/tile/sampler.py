"""The streaming training sampler: random normalized patches from all scenes, in bounded memory.

One epoch visits the chunks of its shard in a seeded random order. Each chunk is read
once (whole, so storage blocks are decoded once), normalized, cut into patches on a
jittered grid, filtered by valid fraction, and up to ``patches_per_chunk`` of them
enter a shuffle pool. Batches are drawn at random from the pool, which mixes patches
from many chunks and scenes. Memory is the pool plus the chunks read ahead, both set
by config; it does not depend on scene size or on the number of scenes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import dask
import numpy as np
import torch

from sitfuse_byol.errors import InputError
from sitfuse_byol.normalize import BandStats
from sitfuse_byol.read import Scene, reading
from sitfuse_byol.tile.index import BLOCK_X, BLOCK_Y, SCENE, PatchIndex


@dataclass(frozen=True)
class PatchBatch:
    """A batch of normalized patches.

    Attributes:
        patches: ``(B, C, P, P)`` float32, z-scored; invalid pixels are 0.
        valid: ``(B, P, P)`` bool.
    """

    patches: torch.Tensor
    valid: torch.Tensor


class _Pool:
    """A fixed-capacity pool of patches; batches leave it in random order."""

    def __init__(self, *, capacity: int, channels: int, patch_size: int) -> None:
        self.patches = np.empty((capacity, channels, patch_size, patch_size), dtype=np.float32)
        self.valid = np.empty((capacity, patch_size, patch_size), dtype=bool)
        self.size = 0

    @property
    def capacity(self) -> int:
        return len(self.patches)

    def add(self, patches: np.ndarray, valid: np.ndarray) -> int:
        """Add as many patches as fit; returns how many were taken."""
        n = min(len(patches), self.capacity - self.size)
        self.patches[self.size : self.size + n] = patches[:n]
        self.valid[self.size : self.size + n] = valid[:n]
        self.size += n
        return n

    def take(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Remove ``n`` random patches; the last ``n`` fill the holes they leave."""
        picked = rng.choice(self.size, size=n, replace=False)
        patches, valid = self.patches[picked], self.valid[picked]
        tail = np.arange(self.size - n, self.size)
        holes = np.setdiff1d(picked, tail, assume_unique=True)
        movers = np.setdiff1d(tail, picked, assume_unique=True)
        self.patches[holes] = self.patches[movers]
        self.valid[holes] = self.valid[movers]
        self.size -= n
        return patches, valid


class PatchSampler:
    """Random normalized patches from a list of scenes, deterministic under a seed.

    Args:
        scenes: Scenes to sample from (all with the same bands as ``stats``).
        stats: Band statistics for normalization.
        patch_size: Patch edge in pixels.
        batch_size: Patches per batch.
        min_valid_fraction: A patch is kept when at least this share of its pixels is valid.
        seed: Seed of chunk order, grid jitter, patch choice and batch order.
        shuffle_buffer: Capacity of the shuffle pool, in patches.
        patches_per_chunk: At most this many patches enter the pool from one chunk read,
            so an epoch spreads over many chunks; ``None`` keeps all.
        prefetch_chunks: Chunks read ahead in background threads.
        rank: This worker's shard.
        world_size: Number of shards.
    """

    def __init__(
        self,
        scenes: Sequence[Scene],
        *,
        stats: BandStats,
        patch_size: int,
        batch_size: int,
        min_valid_fraction: float = 0.9,
        seed: int = 0,
        shuffle_buffer: int = 8192,
        patches_per_chunk: int | None = 1024,
        prefetch_chunks: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        for scene in scenes:
            if scene.n_bands != stats.n_bands:
                raise InputError(
                    f"scene has {scene.n_bands} bands but the statistics have {stats.n_bands}",
                    where=scene.source,
                )
        self.scenes = list(scenes)
        self.stats = stats
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.min_valid_fraction = min_valid_fraction
        self.seed = seed
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.patches_per_chunk = patches_per_chunk
        self.prefetch_chunks = prefetch_chunks
        self.rank = rank
        self.world_size = world_size
        self.index = PatchIndex.from_scenes(self.scenes, patch_size=patch_size).shard(
            rank=rank, world_size=world_size
        )
        if len(self.index.chunks) == 0:
            raise InputError(
                f"no scene is at least {patch_size}x{patch_size} pixels (tiling.patch_size)",
                where=", ".join(s.id for s in self.scenes),
            )

    def _read_chunk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        scene_pos, block_y, block_x = (int(v) for v in self.index.chunks[k, [SCENE, BLOCK_Y, BLOCK_X]])
        scene = self.scenes[scene_pos]
        with reading(scene.source):
            # One compute for both: the valid mask is derived from the same pixels, so the
            # chunk is decoded once.
            block, valid = dask.compute(
                scene.data.blocks[:, block_y, block_x],
                scene.valid.blocks[block_y, block_x],
                scheduler="sync",
            )
        return self.stats.normalize(block, valid), valid

    def _chunk_patches(
        self, k: int, block: np.ndarray, valid: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        p = self.patch_size
        dy, dx, n_rows, n_cols = self.index.patch_grid(k, jitter=tuple(rng.integers(0, p, 2)))
        channels = block.shape[0]
        window = block[:, dy : dy + n_rows * p, dx : dx + n_cols * p]
        patches = window.reshape(channels, n_rows, p, n_cols, p).transpose(1, 3, 0, 2, 4)
        patches = patches.reshape(-1, channels, p, p)
        masks = valid[dy : dy + n_rows * p, dx : dx + n_cols * p]
        masks = masks.reshape(n_rows, p, n_cols, p).transpose(0, 2, 1, 3).reshape(-1, p, p)
        keep = np.arange(len(patches)) % self.index.patch_stride == self.index.patch_phase
        keep &= masks.mean(axis=(1, 2)) >= self.min_valid_fraction
        chosen = np.flatnonzero(keep)
        if self.patches_per_chunk is not None and len(chosen) > self.patches_per_chunk:
            chosen = rng.choice(chosen, size=self.patches_per_chunk, replace=False)
        else:
            chosen = rng.permutation(chosen)
        return patches[chosen], masks[chosen]

    def _chunk_stream(self, rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Chunks in random order, read ahead by a small thread pool."""
        order = rng.permutation(len(self.index.chunks))
        with ThreadPoolExecutor(max_workers=min(2, self.prefetch_chunks)) as pool:
            pending: deque[tuple[int, Future]] = deque()
            position = 0
            while position < len(order) or pending:
                while position < len(order) and len(pending) < self.prefetch_chunks:
                    k = int(order[position])
                    pending.append((k, pool.submit(self._read_chunk, k)))
                    position += 1
                k, future = pending.popleft()
                block, valid = future.result()
                yield k, block, valid

    def epoch(self, epoch: int = 0) -> Iterator[PatchBatch]:
        """The batches of one pass over the shard's chunks, in a random order set by (seed, epoch).

        The last incomplete batch is dropped.

        Raises:
            InputError: No patch in the shard is valid enough.
        """
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        pool = _Pool(
            capacity=self.shuffle_buffer,
            channels=self.stats.n_bands,
            patch_size=self.patch_size,
        )
        seen = 0
        for k, block, valid in self._chunk_stream(rng):
            patches, masks = self._chunk_patches(k, block, valid, rng)
            seen += len(patches)
            start = 0
            while start < len(patches):
                start += pool.add(patches[start:], masks[start:])
                while pool.size == pool.capacity:
                    yield self._batch(pool, rng)
        if seen == 0:
            raise InputError(
                f"no patch has at least {self.min_valid_fraction:.0%} valid pixels "
                "(tiling.min_valid_fraction)",
                where=", ".join(s.id for s in self.scenes),
            )
        while pool.size >= self.batch_size:
            yield self._batch(pool, rng)

    def batches(self, *, start_epoch: int = 0) -> Iterator[tuple[int, PatchBatch]]:
        """An endless stream of ``(epoch, batch)``, epoch after epoch."""
        epoch = start_epoch
        while True:
            for batch in self.epoch(epoch):
                yield epoch, batch
            epoch += 1

    def _batch(self, pool: _Pool, rng: np.random.Generator) -> PatchBatch:
        patches, valid = pool.take(self.batch_size, rng)
        return PatchBatch(patches=torch.from_numpy(patches), valid=torch.from_numpy(valid))
