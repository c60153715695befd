"""Cluster samples: drawn while embeddings are written, or later from the saved store."""

import numpy as np
import pytest

from sitfuse_byol.cluster.sampling import SceneSample, load_samples, sample_embeddings, save_samples
from sitfuse_byol.embed import SceneEmbedding, embed_scene, open_embedding, save_embedding
from sitfuse_byol.errors import InputError
from sitfuse_byol.read import open_scene
from sitfuse_byol.train.checkpoint import load_encoder


@pytest.fixture
def embedding(landsat_path, tiny_checkpoint):
    return embed_scene(open_scene(landsat_path), load_encoder(tiny_checkpoint), block_size=128, window=3)


def test_sample_drawn_while_saving_equals_sample_from_the_store(tmp_path, embedding):
    sample = SceneSample(embedding.scene_id, n=3000, seed=5)
    path = tmp_path / "scene.zarr"
    save_embedding(embedding, path, block_hook=sample.add)
    samples, neighbours = sample.result()
    assert sample.valid_count == int(embedding.valid.sum().compute())

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


@pytest.mark.parametrize("max_blocks", [0, 3])
def test_a_scene_without_valid_pixels_is_refused(embedding, max_blocks):
    # Embeddings are NaN where the input is invalid, and the mask says so too.
    empty = SceneEmbedding(
        scene_id="empty", data=embedding.data * np.nan, valid=embedding.valid & False, grid=embedding.grid
    )
    with pytest.raises(InputError, match="no valid pixel"):
        sample_embeddings(empty, n=10, seed=0, max_blocks=max_blocks)


def test_the_sample_is_uniform_over_valid_pixels_whatever_the_block_order():
    # 10 x 10 blocks, emptier from row to row of blocks, added in two orders: the same
    # rows come out, each valid pixel kept with probability n / V (so a row of blocks
    # gives n x its share of the valid pixels), and about 2n rows at most are held on
    # the way (without thinning, n (1 + ln(blocks)): over twice that here).
    rng = np.random.default_rng(0)
    blocks = {}
    for i in range(10):
        for j in range(10):
            block = rng.normal(size=(2, 20, 20)).astype(np.float32)
            block[:, rng.random((20, 20)) < i / 12] = np.nan
            blocks[(i, j)] = block
    valid = {index: int(np.isfinite(b[0]).sum()) for index, b in blocks.items()}
    total, n = sum(valid.values()), 2000
    results = []
    for order in (sorted(blocks), sorted(blocks, reverse=True)):
        sample = SceneSample("s", n=n, seed=1)
        peak = 0
        for index in order:
            sample.add(blocks[index], index)
            peak = max(peak, sample.held_rows)
        assert peak <= 2 * n + max(valid.values())
        assert sample.valid_count == total
        results.append(sample.result())
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    samples = results[0][0]
    assert abs(len(samples) - n) < 4 * np.sqrt(n)
    row_of = {
        b[:, r, c].tobytes(): index[0]
        for index, b in blocks.items()
        for r, c in zip(*np.nonzero(np.isfinite(b[0])), strict=True)
    }
    per_row = np.bincount([row_of[row.tobytes()] for row in samples], minlength=10)
    expected = np.array([n * sum(v for (i, _), v in valid.items() if i == row) / total for row in range(10)])
    assert (np.abs(per_row - expected) < 5 * np.sqrt(expected)).all(), (per_row, expected)


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


def test_blocks_are_chosen_by_reading_only_the_masks_of_the_blocks_tried():
    # 6 x 6 blocks whose top half holds no valid pixel, 4 runs of 9 blocks: the two runs
    # in the empty half give no block (each of their 9 masks read once), the other two
    # give their first candidate: 20 masks read of 36, none twice.
    import threading

    import dask.array as da
    from affine import Affine

    from sitfuse_byol.cluster.sampling import choose_blocks
    from sitfuse_byol.grid import Grid

    reads = []
    lock = threading.Lock()

    def read(block, block_info=None):
        with lock:
            reads.append(tuple(block_info[0]["chunk-location"]))
        return block

    valid = np.ones((60, 60), bool)
    valid[:30] = False
    mask = da.from_array(valid, chunks=10).map_blocks(read, dtype=bool)
    data = da.from_array(np.where(valid, 1.0, np.nan)[None].astype(np.float32), chunks=(1, 10, 10))
    embedding = SceneEmbedding(scene_id="half", data=data, valid=mask, grid=Grid(60, 60, Affine.identity(), None))
    chosen = choose_blocks(embedding, max_blocks=4, seed=0)
    assert len(chosen) == 2
    assert 3 <= chosen[0][0] <= 4 and chosen[1][0] >= 4  # one from each run of the valid half
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 20
    assert chosen == choose_blocks(embedding, max_blocks=4, seed=0)
    samples, _ = sample_embeddings(embedding, n=100, seed=0, max_blocks=4)
    assert 50 < len(samples) < 150 and (samples == 1.0).all()
