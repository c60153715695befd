"""Seeded samples of valid embeddings (and spatial neighbours) from a scene, block by block.

Every valid pixel of the blocks drawn from (all of them, or a seeded choice spread over
the scene) is kept with the same probability, chosen so a scene contributes about ``n``
samples; each block draws from its own seed, so the sample does not depend on how
blocks are scheduled (threads, processes or cluster workers). The scene's valid count,
which sets that probability, is learnt from the blocks themselves as they arrive
(:class:`SceneSample`), so drawing a sample never needs a pass over the input of its own.
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

import dask
import numpy as np

from sitfuse_byol.embed import SceneEmbedding
from sitfuse_byol.errors import EmptySceneError
from sitfuse_byol.export.atomic import atomic_path

NEIGHBOUR_RADIUS = 2


class SceneSample:
    """About ``n`` valid embeddings of a scene and a valid neighbour of each, gathered
    from its blocks in any order, in bounded memory.

    Each valid pixel draws a key ``u`` from its block's own seed and belongs to the
    sample when ``u < n / V``, V being the valid pixels of all blocks added: a uniform
    draw, the same whatever the order of the blocks. V is only known at the end, but it
    is never less than the valid pixels seen so far, so each block keeps just the keys
    below ``n / seen`` and the blocks already held are thinned as more arrive: about
    ``n`` rows are held at any time, not a block's worth per block.

    :meth:`add` may be called from several threads at once (it is the block hook of
    :func:`sitfuse_byol.embed.save_embedding`).

    Args:
        scene_id: The scene; its name seeds every block's draw with ``seed``.
        n: Samples wanted.
        seed: Seed of every block's draw.
    """

    def __init__(self, scene_id: str, *, n: int, seed: int) -> None:
        self.scene_id = scene_id
        self.n = n
        self._seed = [seed, zlib.crc32(scene_id.encode())]
        self._lock = threading.Lock()
        self._seen = 0
        self._held = 0
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def valid_count(self) -> int:
        """Valid pixels in the blocks added so far."""
        return self._seen

    @property
    def held_rows(self) -> int:
        """Rows held now: about ``n``, at most ``2 n`` plus one block's share."""
        return self._held

    def add(self, block: np.ndarray, index: tuple[int, int]) -> None:
        """Draw from one block of embeddings ``(D, h, w)``, NaN where invalid; ``index``
        is the block's place in the scene's grid of blocks (it seeds the draw)."""
        valid = np.isfinite(block[0])
        rng = np.random.default_rng([*self._seed, *index])
        # Keys and neighbour offsets for every pixel, whichever are kept: a pixel's draw
        # then never depends on how many others a block kept.
        keys = rng.random(valid.shape)
        dy = rng.integers(-NEIGHBOUR_RADIUS, NEIGHBOUR_RADIUS + 1, valid.shape)
        dx = rng.integers(-NEIGHBOUR_RADIUS, NEIGHBOUR_RADIUS + 1, valid.shape)
        with self._lock:
            self._seen += int(valid.sum())
            bound = self._bound()
        rows, cols = np.nonzero(valid & (keys < bound))
        n_rows = np.clip(rows + dy[rows, cols], 0, valid.shape[0] - 1)
        n_cols = np.clip(cols + dx[rows, cols], 0, valid.shape[1] - 1)
        # Neighbours pair each sample with a nearby valid pixel: the positive pairs of IIC.
        usable = valid[n_rows, n_cols]
        n_rows, n_cols = np.where(usable, n_rows, rows), np.where(usable, n_cols, cols)
        kept = (keys[rows, cols], block[:, rows, cols].T.copy(), block[:, n_rows, n_cols].T.copy())
        with self._lock:
            self._blocks[index] = kept
            self._held += len(rows)
            if self._held > 2 * self.n:
                self._thin(self._bound())

    def _bound(self) -> float:
        return self.n / self._seen if self._seen else 1.0

    def _thin(self, bound: float) -> None:
        for index, (keys, samples, neighbours) in self._blocks.items():
            keep = keys < bound
            self._blocks[index] = (keys[keep], samples[keep], neighbours[keep])
        self._held = sum(len(keys) for keys, _, _ in self._blocks.values())

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(samples, neighbours)``, both ``(m, D)`` float32, in block order (row-major).

        Raises:
            EmptySceneError: No block added holds a valid pixel.
        """
        if self._seen == 0:
            raise EmptySceneError("no valid pixel to sample embeddings from", where=self.scene_id)
        with self._lock:
            self._thin(self._bound())
            parts = [self._blocks[index] for index in sorted(self._blocks)]
        samples = np.concatenate([p[1] for p in parts]).astype(np.float32)
        neighbours = np.concatenate([p[2] for p in parts]).astype(np.float32)
        return samples, neighbours


def choose_blocks(embedding: SceneEmbedding, *, max_blocks: int, seed: int) -> list[tuple[int, int]]:
    """Up to ``max_blocks`` blocks holding valid pixels, spread over the scene.

    The blocks, in row-major order, are split into ``max_blocks`` runs (bands of the
    scene), and each run gives the first block holding a valid pixel in a seeded random
    order of its blocks (a run without one gives none). Candidates are checked in rounds,
    one per run at a time, so only the blocks tried have their mask read, not the scene.

    Returns:
        Block indices ``(i, j)``, in run order.
    """
    valid = embedding.valid.rechunk(embedding.data.chunks[1:]).to_delayed()
    blocks = [(i, j) for i in range(valid.shape[0]) for j in range(valid.shape[1])]
    runs = np.array_split(np.arange(len(blocks)), min(max_blocks, len(blocks)))
    rng = np.random.default_rng([seed, zlib.crc32(embedding.scene_id.encode())])
    orders = [rng.permutation(run) for run in runs]
    chosen: dict[int, int] = {}
    for depth in range(max(len(order) for order in orders)):
        candidates = [(r, int(order[depth])) for r, order in enumerate(orders) if r not in chosen and depth < len(order)]
        counts = dask.compute(*[dask.delayed(np.count_nonzero)(valid[blocks[b]]) for _, b in candidates])
        chosen.update((r, b) for (r, b), count in zip(candidates, counts, strict=True) if count)
    return [blocks[chosen[r]] for r in sorted(chosen)]


def sample_embeddings(
    embedding: SceneEmbedding, *, n: int, seed: int, max_blocks: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """About ``n`` valid embeddings of a scene and one valid neighbour of each.

    Args:
        embedding: The scene's embeddings, saved or computed on the fly.
        n: Samples wanted.
        seed: Seed of the block choice and of every block's draw.
        max_blocks: Draw from at most this many blocks holding valid pixels, one
            from each of as many bands of the scene (see :func:`choose_blocks`), so
            the choice covers the scene from top to bottom. Only those blocks are
            embedded (and a few more have their mask read), which is what makes
            streamed embeddings cheap on large scenes. 0: every block, the same sample
            as a :class:`SceneSample` hooked into
            :func:`sitfuse_byol.embed.save_embedding` draws while they are written.

    Returns:
        ``(samples, neighbours)``, both ``(m, D)`` float32.

    Raises:
        EmptySceneError: The scene has no valid pixel.
    """
    sample = SceneSample(embedding.scene_id, n=n, seed=seed)
    blocks = embedding.data.rechunk({0: -1}).to_delayed()
    if max_blocks > 0:
        indices = choose_blocks(embedding, max_blocks=max_blocks, seed=seed)
    else:
        indices = [(i, j) for i in range(blocks.shape[1]) for j in range(blocks.shape[2])]
    dask.compute(*[dask.delayed(sample.add)(blocks[0, i, j], (i, j)) for i, j in indices])
    return sample.result()


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
