"""The streaming training sampler: random normalized patches from all scenes, in bounded memory.

One epoch visits the chunks of its shard in a seeded random order. Each chunk is read
once (whole, so storage blocks are decoded once), normalized, cut into patches on a
jittered grid, filtered by valid fraction, and up to ``patches_per_chunk`` of them
enter a shuffle pool. Batches are drawn at random from the pool, which mixes patches
from many chunks and scenes. Memory is the pool plus the chunks read ahead, both set
by config; it does not depend on scene size or on the number of scenes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from sitfuse_byol.errors import InputError, ShardError
from sitfuse_byol.normalize import BandStats
from sitfuse_byol.read import Scene, reading
from sitfuse_byol.tile.index import BLOCK_X, BLOCK_Y, SCENE, PatchIndex

log = logging.getLogger("sitfuse_byol.tile")


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
        """Remove ``n`` random patches; unpicked patches from the end fill the holes."""
        picked = rng.choice(self.size, size=n, replace=False)
        patches, valid = self.patches[picked], self.valid[picked]
        tail = self.size - n
        picked_in_tail = np.zeros(n, dtype=bool)
        picked_in_tail[picked[picked >= tail] - tail] = True
        holes = picked[picked < tail]
        movers = tail + np.flatnonzero(~picked_in_tail)
        self.patches[holes] = self.patches[movers]
        self.valid[holes] = self.valid[movers]
        self.size = tail
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
        shuffle_buffer: int = 2048,
        patches_per_chunk: int | None = 1024,
        prefetch_chunks: int = 3,
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
        self._warned_small = False
        self._checked_scenes = False
        self.index = PatchIndex.from_scenes(self.scenes, patch_size=patch_size).shard(
            rank=rank, world_size=world_size
        )
        if len(self.index.chunks) == 0:
            raise InputError(
                f"no scene is at least {patch_size}x{patch_size} pixels (tiling.patch_size)",
                where=", ".join(s.id for s in self.scenes),
            )

    def _chunk_patches(self, k: int, seed: np.random.SeedSequence) -> tuple[int, np.ndarray, np.ndarray]:
        """Read chunk ``k``, normalize it and cut the chosen patches; runs in a reader thread.

        Returns:
            ``(scene position, patches, masks)``.

        Each chunk gets its own seed, drawn in schedule order, so results do not depend
        on which thread finishes first.
        """
        rng = np.random.default_rng(seed)
        scene_pos, block_y, block_x = (int(v) for v in self.index.chunks[k, [SCENE, BLOCK_Y, BLOCK_X]])
        scene = self.scenes[scene_pos]
        try:
            with reading(scene.source):
                raw = scene.data.blocks[:, block_y, block_x].compute(scheduler="sync")
        except InputError as err:
            # Met in this rank's share of the chunks: under torchrun this rank says it.
            raise ShardError(err.what, where=err.where) from err
        # The mask comes from the pixels in hand; computing scene.valid would decode again.
        valid = scene.valid_of(raw)
        block = self.stats.normalize(raw, valid)
        p = self.patch_size
        dy, dx, n_rows, n_cols = self.index.patch_grid(k, jitter=tuple(rng.integers(0, p, 2)))
        # Views only: (C, rows, p, cols, p) and (rows, p, cols, p); nothing is copied until
        # the chosen patches are gathered.
        grid = block[:, dy : dy + n_rows * p, dx : dx + n_cols * p].reshape(
            block.shape[0], n_rows, p, n_cols, p
        )
        mask_grid = valid[dy : dy + n_rows * p, dx : dx + n_cols * p].reshape(n_rows, p, n_cols, p)
        fraction = mask_grid.mean(axis=(1, 3)).ravel()
        keep = np.arange(fraction.size) % self.index.patch_stride == self.index.patch_phase
        keep &= fraction >= self.min_valid_fraction
        chosen = np.flatnonzero(keep)
        if self.patches_per_chunk is not None and len(chosen) > self.patches_per_chunk:
            chosen = rng.choice(chosen, size=self.patches_per_chunk, replace=False)
        else:
            chosen = rng.permutation(chosen)
        rows, cols = np.divmod(chosen, n_cols)
        # Advanced indices around slices put the patch axis first: (n, C, p, p) and (n, p, p).
        return scene_pos, grid[:, rows, :, cols, :], mask_grid[rows, :, cols, :]

    def _pass_seed(self, epoch: int, n_pass: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.seed, epoch, n_pass, self.rank])

    def _chunk_stream(
        self, epoch: int, passes: int | None
    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(pass, scene position, patches, masks)`` of each chunk over passes in seeded orders.

        Chunks are read and cut ahead in threads (GDAL and numpy release the GIL), and
        read-ahead runs across pass boundaries, so even a one-chunk scene overlaps
        reading with use.
        """

        def schedule() -> Iterator[tuple[int, int, np.random.SeedSequence]]:
            n_pass = 0
            while passes is None or n_pass < passes:
                order_seed, chunk_seeds = self._pass_seed(epoch, n_pass).spawn(2)
                order = np.random.default_rng(order_seed).permutation(len(self.index.chunks))
                for k, chunk_seed in zip(order, chunk_seeds.spawn(len(order)), strict=True):
                    yield n_pass, int(k), chunk_seed
                n_pass += 1

        plan = schedule()
        pool = ThreadPoolExecutor(max_workers=min(2, self.prefetch_chunks))
        pending: deque[tuple[int, Future]] = deque()
        try:
            while True:
                while len(pending) < self.prefetch_chunks:
                    step = next(plan, None)
                    if step is None:
                        break
                    n_pass, k, chunk_seed = step
                    pending.append((n_pass, pool.submit(self._chunk_patches, k, chunk_seed)))
                if not pending:
                    return
                n_pass, future = pending.popleft()
                yield n_pass, *future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _stream(self, epoch: int, passes: int | None) -> Iterator[PatchBatch]:
        pool = _Pool(capacity=self.shuffle_buffer, channels=self.stats.n_bands, patch_size=self.patch_size)
        current_pass, seen = -1, 0
        batch_rng = np.random.default_rng(self._pass_seed(epoch, 0))
        # Patches each scene gave in this stream's first pass, until checked once.
        per_scene = None if self._checked_scenes else np.zeros(len(self.scenes), dtype=np.int64)
        for n_pass, scene_pos, patches, masks in self._chunk_stream(epoch, passes):
            if n_pass != current_pass:
                if current_pass >= 0:
                    yield from self._end_pass(pool, batch_rng, seen)
                    self._warn_of_scenes_without_patches(per_scene)
                    per_scene = None
                current_pass, seen = n_pass, 0
                batch_rng = np.random.default_rng(self._pass_seed(epoch, n_pass))
            seen += len(patches)
            if per_scene is not None:
                per_scene[scene_pos] += len(patches)
            start = 0
            while start < len(patches):
                start += pool.add(patches[start:], masks[start:])
                while pool.size == pool.capacity:
                    yield self._batch(pool, batch_rng)
        yield from self._end_pass(pool, batch_rng, seen)
        self._warn_of_scenes_without_patches(per_scene)

    def _warn_of_scenes_without_patches(self, per_scene: np.ndarray | None) -> None:
        """Once: the scenes of this shard that a whole pass cut no patch from (too small,
        or too little valid at once), which training would otherwise leave out unsaid."""
        if per_scene is None or self._checked_scenes:
            return
        self._checked_scenes = True
        if self.world_size > 1:
            return  # a scene's chunks are dealt out: another rank may cut patches from it
        in_shard = np.unique(self.index.chunks[:, SCENE])
        empty = [self.scenes[int(i)].id for i in in_shard if per_scene[int(i)] == 0]
        if empty and len(empty) < len(in_shard):
            log.warning(
                "warning: a pass over the scenes cut no patch with at least %.0f%% valid pixels from %s; "
                "training learns from the others (tiling.min_valid_fraction, tiling.patch_size)",
                100 * self.min_valid_fraction, ", ".join(empty),
            )

    def _end_pass(self, pool: _Pool, rng: np.random.Generator, seen: int) -> Iterator[PatchBatch]:
        """The full batches left at the end of a pass of ``seen`` patches.

        The rest is dropped, unless the pass gave fewer patches than a batch: then they
        stay in the pool for the next pass, since dropping them would leave an endless
        stream that never yields.
        """
        if seen == 0:
            raise ShardError(
                f"no patch has at least {self.min_valid_fraction:.0%} valid pixels "
                "(tiling.min_valid_fraction)",
                # This shard's scenes: under DDP another rank may have patches from others.
                where=", ".join(self.scenes[int(i)].id for i in np.unique(self.index.chunks[:, SCENE])),
            )
        if seen < self.batch_size and not self._warned_small:
            self._warned_small = True
            log.warning(
                "warning: a pass over the scenes gives %d patches with at least %.0f%% valid pixels, fewer than "
                "a batch of %d: each batch repeats patches of several passes (shifted); lower train.batch_size "
                "or tiling.patch_size, or add scenes (%s)",
                seen, 100 * self.min_valid_fraction, self.batch_size, ", ".join(s.id for s in self.scenes),
            )
        while pool.size >= self.batch_size:
            yield self._batch(pool, rng)
        if seen >= self.batch_size:
            pool.size = 0

    def epoch(self, epoch: int = 0) -> Iterator[PatchBatch]:
        """One pass over the shard's chunks, in a random order set by ``(seed, epoch)``.

        Raises:
            InputError: No patch in the shard is valid enough.
        """
        return self._stream(epoch, passes=1)

    def batches(self, *, epoch: int = 0) -> Iterator[PatchBatch]:
        """An endless stream for training epoch ``epoch``: passes 0, 1, 2... seeded by it.

        A training epoch takes as many batches as it needs; because the stream depends
        only on ``(seed, epoch, rank)``, resuming at an epoch boundary is exact.
        """
        return self._stream(epoch, passes=None)

    def _batch(self, pool: _Pool, rng: np.random.Generator) -> PatchBatch:
        patches, valid = pool.take(self.batch_size, rng)
        return PatchBatch(patches=torch.from_numpy(patches), valid=torch.from_numpy(valid))
