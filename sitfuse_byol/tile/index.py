"""The patch index: where patches lie, as offsets only, separate from reading them.

Patches are laid on a grid inside each Dask chunk, so a patch never straddles two
chunks and reading a chunk once yields all of its patches. The index is a small
integer table, cheap to build for any number of scenes and easy to shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sitfuse_byol.read import Scene

# Columns of PatchIndex.chunks.
SCENE, BLOCK_Y, BLOCK_X, ROW, COL, HEIGHT, WIDTH = range(7)


@dataclass(frozen=True)
class PatchIndex:
    """Chunks that can hold at least one patch, and how patches tile them.

    Attributes:
        chunks: ``(n, 7)`` int64 rows ``scene, block_y, block_x, row, col, height, width``:
            the scene's position in the scene list, the chunk's block index and its
            pixel window.
        patch_size: Patch edge in pixels.
        patch_stride: Shard patches within chunks: a rank keeps patch ``k`` of a chunk
            when ``k % patch_stride == patch_phase``.
        patch_phase: See ``patch_stride``.
    """

    chunks: np.ndarray
    patch_size: int
    patch_stride: int = 1
    patch_phase: int = 0

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene], *, patch_size: int) -> PatchIndex:
        """Index every chunk of every scene that is at least one patch tall and wide."""
        rows = []
        for s, scene in enumerate(scenes):
            y_chunks, x_chunks = scene.data.chunks[1], scene.data.chunks[2]
            y_offsets = np.concatenate([[0], np.cumsum(y_chunks)[:-1]])
            x_offsets = np.concatenate([[0], np.cumsum(x_chunks)[:-1]])
            for i, (row, height) in enumerate(zip(y_offsets, y_chunks, strict=True)):
                for j, (col, width) in enumerate(zip(x_offsets, x_chunks, strict=True)):
                    if height >= patch_size and width >= patch_size:
                        rows.append((s, i, j, row, col, height, width))
        chunks = np.asarray(rows, dtype=np.int64).reshape(-1, 7)
        return cls(chunks=chunks, patch_size=patch_size)

    def __len__(self) -> int:
        """The number of patches the index holds (without jitter)."""
        per_chunk = (self.chunks[:, HEIGHT] // self.patch_size) * (self.chunks[:, WIDTH] // self.patch_size)
        total = int(per_chunk.sum())
        return (total - self.patch_phase + self.patch_stride - 1) // self.patch_stride

    def shard(self, *, rank: int, world_size: int) -> PatchIndex:
        """The part of the index that worker ``rank`` of ``world_size`` reads; shards are disjoint.

        With at least as many chunks as workers, chunks are dealt out, so no chunk is read
        twice. With fewer chunks every worker reads every chunk but keeps a disjoint
        subset of its patches.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if world_size == 1:
            return self
        if len(self.chunks) >= world_size:
            return PatchIndex(chunks=self.chunks[rank::world_size], patch_size=self.patch_size)
        return PatchIndex(
            chunks=self.chunks,
            patch_size=self.patch_size,
            patch_stride=world_size,
            patch_phase=rank,
        )

    def patch_grid(self, k: int, *, jitter: tuple[int, int]) -> tuple[int, int, int, int]:
        """Where chunk ``k``'s patches lie: ``(row0, col0, n_rows, n_cols)`` inside the chunk.

        ``jitter`` shifts the grid by up to one patch, so successive epochs cut the chunk
        differently (at the cost of at most one row and column of patches).
        """
        height, width = int(self.chunks[k, HEIGHT]), int(self.chunks[k, WIDTH])
        p = self.patch_size
        dy, dx = jitter[0] % p, jitter[1] % p
        if (height - dy) // p == 0:
            dy = 0
        if (width - dx) // p == 0:
            dx = 0
        return dy, dx, (height - dy) // p, (width - dx) // p
