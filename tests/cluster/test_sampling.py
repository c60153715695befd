"""Cluster samples: drawn while embeddings are written, or later from the saved store."""

import numpy as np
import pytest

from sitfuse_byol.cluster.sampling import (
    block_sampler,
    combine_samples,
    load_samples,
    sample_embeddings,
    save_samples,
    valid_pixel_count,
)
from sitfuse_byol.embed import SceneEmbedding, embed_scene, open_embedding, save_embedding
from sitfuse_byol.errors import InputError
from sitfuse_byol.read import open_scene
from sitfuse_byol.train.checkpoint import load_encoder


@pytest.fixture
def embedding(landsat_path, tiny_checkpoint):
    return embed_scene(open_scene(landsat_path), load_encoder(tiny_checkpoint), block_size=128, window=3)


def test_sample_drawn_while_saving_equals_sample_from_the_store(tmp_path, embedding):
    count = valid_pixel_count(embedding)
    hook = block_sampler(embedding.scene_id, n=3000, seed=5, valid_count=count)
    path = tmp_path / "scene.zarr"
    samples, neighbours = combine_samples(save_embedding(embedding, path, block_hook=hook))

    saved = open_embedding(path)
    reopened = SceneEmbedding(
        scene_id=embedding.scene_id, data=saved.data, valid=embedding.valid, grid=saved.grid
    )
    again, again_neighbours = sample_embeddings(reopened, n=3000, seed=5)
    np.testing.assert_array_equal(samples, again)
    np.testing.assert_array_equal(neighbours, again_neighbours)
    # About n rows of finite, valid embeddings.
    assert samples.shape[1] == embedding.dim and 2500 < len(samples) < 3500
    assert np.isfinite(samples).all() and np.isfinite(neighbours).all()


def test_saved_samples_are_reused_only_for_the_same_size_and_seed(tmp_path, embedding):
    samples, neighbours = sample_embeddings(embedding, n=500, seed=1)
    path = save_samples(tmp_path / "s.samples.npz", samples, neighbours, n=500, seed=1)
    loaded = load_samples(path, n=500, seed=1)
    assert loaded is not None
    np.testing.assert_array_equal(loaded[0], samples)
    np.testing.assert_array_equal(loaded[1], neighbours)
    assert load_samples(path, n=600, seed=1) is None
    assert load_samples(path, n=500, seed=2) is None
    assert load_samples(tmp_path / "missing.npz", n=500, seed=1) is None


@pytest.mark.parametrize(
    "count",
    [valid_pixel_count, lambda empty: sample_embeddings(empty, n=10, seed=0, max_blocks=3)],
    ids=["valid_pixel_count", "sample_embeddings"],
)
def test_a_scene_without_valid_pixels_is_refused(embedding, count):
    empty = SceneEmbedding(
        scene_id="empty", data=embedding.data, valid=embedding.valid & False, grid=embedding.grid
    )
    with pytest.raises(InputError, match="no valid pixel"):
        count(empty)


def test_a_sample_from_some_blocks_draws_from_one_block_of_each_band(embedding):
    full = embedding.data.compute()
    rows_of = embedding.data.chunks[1]
    cols_of = embedding.data.chunks[2]
    row_edges, col_edges = np.cumsum((0, *rows_of)), np.cumsum((0, *cols_of))
    block_of = {}
    for i in range(len(rows_of)):
        for j in range(len(cols_of)):
            part = full[:, row_edges[i] : row_edges[i + 1], col_edges[j] : col_edges[j + 1]]
            for pixel in part.reshape(part.shape[0], -1).T:
                if np.isfinite(pixel).all():
                    block_of[pixel.tobytes()] = (i, j)
    with_valid = sorted(set(block_of.values()))
    assert len(with_valid) >= 6
    top, bottom = np.array_split(np.arange(len(with_valid)), 2)

    samples, _ = sample_embeddings(embedding, n=1000, seed=3, max_blocks=2)
    again, _ = sample_embeddings(embedding, n=1000, seed=3, max_blocks=2)
    np.testing.assert_array_equal(samples, again)
    assert 800 < len(samples) < 1200  # about n, from the chosen blocks' valid pixels
    # One block from each half of the scene's blocks (row-major), so both halves are seen.
    chosen = sorted({with_valid.index(block_of[row.tobytes()]) for row in samples})
    assert len(chosen) == 2 and chosen[0] in top and chosen[1] in bottom
    other, _ = sample_embeddings(embedding, n=1000, seed=4, max_blocks=2)
    assert len({block_of[row.tobytes()] for row in other}) == 2
    assert not np.array_equal(other, samples)
