from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from sitfuse_byol.tile import apply_blocks


def conv5x5(kernel):
    """A function with a receptive field of radius 2 (zero padding at its own edges)."""

    def run(block: np.ndarray) -> np.ndarray:
        return np.stack([ndimage.convolve(b, kernel, mode="constant") for b in block])

    return run


@pytest.mark.parametrize("chunks", [(3, 32, 40), (3, 17, 100), (3, 100, 130)])
def test_blocks_equal_whole_array_with_mirrored_edges(chunks):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 100, 130)).astype(np.float32)
    func = conv5x5(rng.normal(size=(5, 5)).astype(np.float32))
    tiled = apply_blocks(func, da.from_array(x, chunks=chunks), halo=2, out_channels=3).compute()
    whole = func(np.pad(x, ((0, 0), (2, 2), (2, 2)), mode="symmetric"))[:, 2:-2, 2:-2]
    np.testing.assert_array_equal(tiled, whole)


@pytest.mark.parametrize("shape", [(3, 1, 1), (3, 2, 9), (3, 9, 3)])
def test_an_array_smaller_than_its_halo_is_one_mirrored_block(shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype(np.float32)
    func = conv5x5(rng.normal(size=(5, 5)).astype(np.float32))
    out = apply_blocks(func, da.from_array(x, chunks=(3, 1, 2)), halo=4, out_channels=3)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_array_equal(
        out.compute(), func(np.pad(x, ((0, 0), (4, 4), (4, 4)), mode="symmetric"))[:, 4:-4, 4:-4]
    )


def test_too_small_halo_leaves_seams():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 64, 64)).astype(np.float32)
    func = conv5x5(np.ones((5, 5), np.float32))
    tiled = apply_blocks(func, da.from_array(x, chunks=(1, 16, 16)), halo=1, out_channels=1).compute()
    whole = func(np.pad(x, ((0, 0), (2, 2), (2, 2)), mode="symmetric"))[:, 2:-2, 2:-2]
    assert not np.allclose(tiled, whole)


def test_channel_count_can_change():
    x = np.ones((4, 30, 30), np.float32)
    out = apply_blocks(
        lambda b: np.repeat(b.sum(0, keepdims=True), 7, axis=0),
        da.from_array(x, chunks=(4, 10, 10)),
        halo=3,
        out_channels=7,
    )
    assert out.shape == (7, 30, 30)
    np.testing.assert_array_equal(out.compute(), 4.0)


def test_chunks_narrower_than_the_halo_are_merged_consistently():
    # A ragged last chunk (4 and 2 pixels) narrower than the halo: the declared chunks
    # must match the blocks, or slicing the edge would read the wrong pixels.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 100, 130)).astype(np.float32)
    func = conv5x5(rng.normal(size=(5, 5)).astype(np.float32))
    tiled = apply_blocks(func, da.from_array(x, chunks=(3, 48, 64)), halo=5, out_channels=3)
    whole = func(np.pad(x, ((0, 0), (5, 5), (5, 5)), mode="symmetric"))[:, 5:-5, 5:-5]
    assert min(tiled.chunks[1] + tiled.chunks[2]) >= 5
    np.testing.assert_array_equal(tiled.compute(), whole)
    np.testing.assert_array_equal(tiled[:, -3:, -3:].compute(), whole[:, -3:, -3:])
