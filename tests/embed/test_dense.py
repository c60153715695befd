from __future__ import annotations

import warnings

import numpy as np
import pytest
import rasterio
from affine import Affine

from sitfuse_byol.embed import embed_scene, open_embedding, save_embedding, saved_embedding_key
from sitfuse_byol.errors import ModelError
from sitfuse_byol.read import open_scene
from sitfuse_byol.train.checkpoint import load_encoder
from tests.conftest import write_tif


def test_tiled_embeddings_equal_whole_scene(landsat_path, tiny_checkpoint):
    trained = load_encoder(tiny_checkpoint)
    scene = open_scene(landsat_path)
    tiled = embed_scene(scene, trained, block_size=64, window=5).data.compute()
    whole = embed_scene(scene, trained, block_size=1024, window=5).data.compute()
    assert tiled.shape == (trained.encoder.out_channels, 352, 349)
    assert np.isfinite(tiled).all()
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    # Neighbouring pixels across a block edge differ like any neighbours (no seam).
    assert not np.allclose(tiled[:, 63], tiled[:, 64])


def cell_reduce(values: np.ndarray, stride: int, reduce) -> np.ndarray:
    """``reduce`` over each stride x stride cell of ``(..., H, W)``, ragged cells padded with NaN."""
    *lead, h, w = values.shape
    padded = np.full((*lead, -(-h // stride) * stride, -(-w // stride) * stride), np.nan)
    padded[..., :h, :w] = values
    cells = padded.reshape(*lead, padded.shape[-2] // stride, stride, padded.shape[-1] // stride, stride)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cells without a valid pixel
        return reduce(cells, axis=(-3, -1))


@pytest.mark.parametrize("stride", [2, 3])
def test_stride_embeds_cell_means_on_the_scaled_grid(tmp_path, landsat_path, tiny_checkpoint, stride):
    trained = load_encoder(tiny_checkpoint)
    with rasterio.open(landsat_path) as src:
        data, profile = src.read(), src.profile
    data[data == 0] = 1
    # A nodata corner whose edges cut through cells, and single nodata pixels.
    data[:, :20, :31] = 0
    for row, col in [(100, 100), (101, 151), (150, 202), (351, 348)]:
        data[:, row, col] = 0
    path = write_tif(tmp_path / "holes.tif", data, crs=profile["crs"], transform=profile["transform"], nodata=0)
    scene = open_scene(path)
    full = embed_scene(scene, trained, block_size=128).data.compute()
    strided = embed_scene(scene, trained, stride=stride, block_size=128)
    assert strided.grid.transform == scene.grid.transform * Affine.scale(stride)
    cells = (-(-352 // stride), -(-349 // stride))  # ragged last row and column of cells
    assert strided.data.shape[1:] == cells == strided.grid.shape
    values = strided.data.compute()
    np.testing.assert_allclose(values, cell_reduce(full, stride, np.nanmean), atol=1e-5)
    # A cell is valid when any of its pixels is; the corner's partial cells are.
    valid = strided.valid.compute()
    pixel_valid = scene.valid.compute()
    np.testing.assert_array_equal(valid, cell_reduce(pixel_valid.astype(float), stride, np.nanmax) > 0)
    assert not valid[: 20 // stride, : 31 // stride].any() and valid[20 // stride, 0]
    assert np.isnan(values[:, ~valid]).all() and np.isfinite(values[:, valid]).all()


def test_zarr_roundtrip_keeps_grid(tmp_path, landsat_path, tiny_checkpoint):
    trained = load_encoder(tiny_checkpoint)
    scene = open_scene(landsat_path)
    embedding = embed_scene(scene, trained, block_size=128)
    path = tmp_path / "embeddings" / f"{scene.id}.zarr"
    assert saved_embedding_key(path) is None
    assert save_embedding(embedding, path, key="scene:encoder:settings") == []
    assert saved_embedding_key(path) == "scene:encoder:settings"
    reopened = open_embedding(path)
    assert reopened.scene_id == "landsat7_olinda"
    assert reopened.grid.crs == scene.grid.crs
    assert reopened.grid.transform.almost_equals(scene.grid.transform)
    np.testing.assert_array_equal(reopened.data.compute(), embedding.data.compute())


def test_band_count_mismatch_is_refused(sentinel2_zarr, tiny_checkpoint):
    trained = load_encoder(tiny_checkpoint)
    with pytest.raises(ModelError, match="trained on 6 bands"):
        embed_scene(open_scene(sentinel2_zarr), trained)


def test_group_norm_encoder_is_seamless_too(tmp_path, landsat_path):
    """GroupNorm (chosen for small batches) uses tracked statistics at inference: no seams."""
    from sitfuse_byol.config import load_config
    from sitfuse_byol.train.loop import train

    raw = {
        "data": {"scenes": [str(landsat_path)]},
        "tiling": {"patch_size": 8, "shuffle_buffer": 256},
        "train": {
            "epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "norm": "auto",
            "encoder_args": {"width": 8, "depth": 2, "out_channels": 8},
            "projector_hidden": 32, "projection_dim": 16,
        },
        "output": {"dir": str(tmp_path)},
    }
    trained = load_encoder(train(load_config(raw=raw, base=tmp_path)).checkpoint)
    assert any(type(m).__name__ == "TrackedGroupNorm" for m in trained.encoder.modules())
    scene = open_scene(landsat_path)
    tiled = embed_scene(scene, trained, block_size=64).data.compute()
    whole = embed_scene(scene, trained, block_size=1024).data.compute()
    # oneDNN picks its 8-channel kernels by block width, so a few values (of up to ~15
    # here) differ by float32 rounding; the default 64-channel encoder matches exactly.
    np.testing.assert_allclose(tiled, whole, atol=1e-5, rtol=1e-6)


def test_window_averages_the_per_pixel_embeddings(landsat_path, tiny_checkpoint):
    trained = load_encoder(tiny_checkpoint)
    scene = open_scene(landsat_path)
    plain = embed_scene(scene, trained, block_size=64, window=0).data.compute()
    averaged = embed_scene(scene, trained, block_size=64, window=3).data.compute()
    rows, cols = np.nonzero(np.isfinite(plain[0]))
    inside = (rows > 0) & (cols > 0) & (rows < plain.shape[1] - 1) & (cols < plain.shape[2] - 1)
    checked = 0
    for r, c in list(zip(rows[inside], cols[inside], strict=True))[::997]:
        neighbourhood = plain[:, r - 1 : r + 2, c - 1 : c + 2].reshape(plain.shape[0], -1)
        if np.isfinite(neighbourhood).all():
            np.testing.assert_allclose(averaged[:, r, c], neighbourhood.mean(axis=1), rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= 20
    assert not np.allclose(averaged[np.isfinite(averaged)], plain[np.isfinite(averaged)])


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_embeddings_match_the_cpu_within_bf16(landsat_path, tiny_checkpoint):
    scene = open_scene(landsat_path)
    cpu = embed_scene(scene, load_encoder(tiny_checkpoint), block_size=64, window=3).data.compute()
    gpu = embed_scene(scene, load_encoder(tiny_checkpoint, device="cuda"), block_size=64, window=3).data.compute()
    np.testing.assert_array_equal(np.isnan(gpu), np.isnan(cpu))
    finite = np.isfinite(cpu)
    # bf16 keeps 8 bits of mantissa through each layer.
    np.testing.assert_allclose(gpu[finite], cpu[finite], rtol=0.05, atol=0.05 * float(np.abs(cpu[finite]).max()))


@pytest.mark.parametrize("stride", [1, 2])
def test_a_sliver_of_a_last_block_still_saves_to_zarr(tmp_path, landsat_path, tiny_checkpoint, stride):
    """A scene edge one pixel past a block boundary: the block edge shrinks so that the
    last block is not narrower than the halo, and the Zarr store gets regular chunks."""
    from sitfuse_byol.embed.dense import embedding_halo

    trained = load_encoder(tiny_checkpoint)
    assert embedding_halo(trained, window=5) > 1
    with rasterio.open(landsat_path) as src:
        data, profile = src.read(), src.profile
    block = 64
    # 2 x 64 + 1 columns, 64 + 1 rows: each axis ends in a 1-pixel sliver of a block.
    sliver = np.tile(data, (1, 1, 2))[:, : block + 1, : 2 * block + 1]
    path = write_tif(tmp_path / "sliver.tif", sliver, crs=profile["crs"], transform=profile["transform"])
    scene = open_scene(path)
    embedding = embed_scene(scene, trained, block_size=block, window=5, stride=stride)
    assert all(len(set(axis[:-1])) <= 1 and axis[-1] <= axis[0] for axis in embedding.data.chunks[1:])
    store = tmp_path / "sliver.zarr"
    save_embedding(embedding, store)
    whole = embed_scene(scene, trained, block_size=1024, window=5, stride=stride).data.compute()
    np.testing.assert_allclose(open_embedding(store).data.compute(), whole, atol=1e-5)
