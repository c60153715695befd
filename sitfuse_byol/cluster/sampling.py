"""Seeded samples of valid embeddings (and spatial neighbours) from a scene, block by block.

Every valid pixel is kept with the same probability, chosen so a scene contributes
about ``n`` samples; each block draws from its own seed, so the sample does not depend
on how blocks are scheduled (threads, processes or cluster workers).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import dask
import numpy as np

from sitfuse_byol.embed import SceneEmbedding
from sitfuse_byol.errors import InputError
from sitfuse_byol.export.atomic import atomic_path

NEIGHBOUR_RADIUS = 2


def _block_sample(
    block: np.ndarray, valid: np.ndarray, *, probability: float, seed: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = np.nonzero(valid & (rng.random(valid.shape) < probability))
    # Neighbours pair each sample with a nearby valid pixel: the positive pairs of IIC.
    dy = rng.integers(-NEIGHBOUR_RADIUS, NEIGHBOUR_RADIUS + 1, rows.size)
    dx = rng.integers(-NEIGHBOUR_RADIUS, NEIGHBOUR_RADIUS + 1, rows.size)
    n_rows = np.clip(rows + dy, 0, valid.shape[0] - 1)
    n_cols = np.clip(cols + dx, 0, valid.shape[1] - 1)
    usable = valid[n_rows, n_cols]
    n_rows, n_cols = np.where(usable, n_rows, rows), np.where(usable, n_cols, cols)
    return block[:, rows, cols].T.copy(), block[:, n_rows, n_cols].T.copy()


def valid_pixel_count(embedding: SceneEmbedding) -> int:
    """Valid pixels of a scene's embeddings (computed from its lazy mask).

    Raises:
        InputError: The scene has no valid pixel.
    """
    count = int(embedding.valid.sum().compute())
    if count == 0:
        raise InputError("no valid pixel to sample embeddings from", where=embedding.scene_id)
    return count


def block_sampler(
    scene_id: str, *, n: int, seed: int, valid_count: int
) -> Callable[[np.ndarray, tuple[int, int]], tuple[np.ndarray, np.ndarray]]:
    """A hook drawing a block's share of the scene sample from its embeddings ``(D, h, w)``.

    Invalid pixels are NaN in embeddings, so the mask comes from the block itself. Used as
    :func:`sitfuse_byol.embed.save_embedding`'s hook while embeddings are written, and by
    :func:`sample_embeddings` afterwards: the same blocks and seeds give the same sample.
    """
    probability = min(1.0, n / valid_count)
    scene_key = zlib.crc32(scene_id.encode())

    def sample(block: np.ndarray, index: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        return _block_sample(
            block, np.isfinite(block[0]), probability=probability, seed=[seed, scene_key, *index]
        )

    return sample


def combine_samples(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-block samples in block order."""
    samples = np.concatenate([p[0] for p in parts]).astype(np.float32)
    neighbours = np.concatenate([p[1] for p in parts]).astype(np.float32)
    return samples, neighbours


def sample_embeddings(
    embedding: SceneEmbedding, *, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """About ``n`` valid embeddings of a scene and one valid neighbour of each.

    Returns:
        ``(samples, neighbours)``, both ``(m, D)`` float32.

    Raises:
        InputError: The scene has no valid pixel.
    """
    sample = block_sampler(embedding.scene_id, n=n, seed=seed, valid_count=valid_pixel_count(embedding))
    blocks = embedding.data.rechunk({0: -1}).to_delayed()
    tasks = [
        dask.delayed(sample)(blocks[0, i, j], (i, j))
        for i in range(blocks.shape[1])
        for j in range(blocks.shape[2])
    ]
    return combine_samples(dask.compute(*tasks))


def save_samples(path: Path, samples: np.ndarray, neighbours: np.ndarray, *, n: int, seed: int) -> Path:
    """Keep a scene's sample beside its embeddings (``.npz``, no pickle), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, samples=samples, neighbours=neighbours, n=np.int64(n), seed=np.int64(seed))
    return path


def sample_matches(path: Path, *, n: int, seed: int) -> bool:
    """Whether ``path`` holds a sample saved for this ``n`` and ``seed`` (arrays left unread)."""
    if not path.exists():
        return False
    with np.load(path, allow_pickle=False) as saved:
        return int(saved["n"]) == n and int(saved["seed"]) == seed


def load_samples(path: Path, *, n: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A sample saved by :func:`save_samples` for the same ``n`` and ``seed``, else ``None``."""
    if not sample_matches(path, n=n, seed=seed):
        return None
    with np.load(path, allow_pickle=False) as saved:
        return saved["samples"], saved["neighbours"]
