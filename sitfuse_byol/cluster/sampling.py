"""Seeded samples of valid embeddings (and spatial neighbours) from a scene, block by block.

Every valid pixel of the blocks drawn from (all of them, or a seeded choice spread over
the scene) is kept with the same probability, chosen so a scene contributes about ``n``
samples; each block draws from its own seed, so the sample does not depend on how
blocks are scheduled (threads, processes or cluster workers).
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


def block_valid_counts(embedding: SceneEmbedding) -> np.ndarray:
    """Valid pixels in each block of a scene's embeddings, as a ``(block rows, block cols)`` grid.

    Reads the input's mask only, not the embeddings.
    """
    valid = embedding.valid.rechunk(embedding.data.chunks[1:])
    counts = valid.map_blocks(
        lambda block: np.full((1, 1), block.sum(), np.int64),
        chunks=(((1,) * len(valid.chunks[0])), ((1,) * len(valid.chunks[1]))),
        dtype=np.int64,
    )
    return np.asarray(counts.compute())


def sample_embeddings(
    embedding: SceneEmbedding, *, n: int, seed: int, max_blocks: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """About ``n`` valid embeddings of a scene and one valid neighbour of each.

    Args:
        embedding: The scene's embeddings, saved or computed on the fly.
        n: Samples wanted.
        seed: Seed of the block choice and of every block's draw.
        max_blocks: Draw from at most this many blocks holding valid pixels: the
            blocks, in row-major order, are split into this many runs (bands of the
            scene) and one block is drawn at random (seeded) from each, so the choice
            covers the scene from top to bottom. Only those blocks are read or
            embedded, which is what makes streamed embeddings cheap on large scenes.
            0: every block, the same sample as :func:`block_sampler` draws while the
            embeddings are written.

    Returns:
        ``(samples, neighbours)``, both ``(m, D)`` float32.

    Raises:
        InputError: The scene has no valid pixel.
    """
    counts = block_valid_counts(embedding)
    indices = [tuple(int(v) for v in index) for index in np.argwhere(counts > 0)]
    if not indices:
        raise InputError("no valid pixel to sample embeddings from", where=embedding.scene_id)
    if 0 < max_blocks < len(indices):
        rng = np.random.default_rng([seed, zlib.crc32(embedding.scene_id.encode())])
        runs = np.array_split(np.arange(len(indices)), max_blocks)
        indices = [indices[int(rng.choice(run))] for run in runs]
    valid_count = int(sum(counts[index] for index in indices))
    sample = block_sampler(embedding.scene_id, n=n, seed=seed, valid_count=valid_count)
    blocks = embedding.data.rechunk({0: -1}).to_delayed()
    return combine_samples(dask.compute(*[dask.delayed(sample)(blocks[0, i, j], (i, j)) for i, j in indices]))


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
