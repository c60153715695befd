from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from sitfuse_byol.errors import InputError
from sitfuse_byol.normalize import BandStats, compute_stats
from sitfuse_byol.read import open_scene
from sitfuse_byol.read.multifile import MultiFileSpec
from tests.conftest import write_tif


def numpy_stats(arrays, valids):
    values = np.concatenate([a[:, v] for a, v in zip(arrays, valids, strict=True)], axis=1)
    values = values.astype(np.float64)
    return {
        "count": values.shape[1],
        "mean": values.mean(axis=1),
        "std": values.std(axis=1),
        "p2": np.percentile(values, 2, axis=1),
        "p98": np.percentile(values, 98, axis=1),
    }


def test_stats_over_two_real_scenes_equal_numpy(landsat_path, sentinel2_yaml, tmp_path):
    # The Landsat sample, read whole and as its lower half with a nodata value, makes
    # two scenes with different valid masks and small chunks (many partial results).
    first = open_scene(landsat_path, chunk_target=64, patch_size=16)
    second = open_scene(landsat_path, nodata=60, chunk_target=128, patch_size=16, bands=None)
    stats = compute_stats([first, second])
    arrays = [first.data.compute(), second.data.compute()]
    valids = [first.valid.compute(), second.valid.compute()]
    assert valids[1].sum() < valids[0].sum()
    expected = numpy_stats(arrays, valids)
    assert stats.count == (expected["count"],) * 6
    np.testing.assert_allclose(stats.mean, expected["mean"], rtol=1e-12)
    np.testing.assert_allclose(stats.std, expected["std"], rtol=1e-10)
    # Integer data: the histogram has one-value bins, so percentiles are exact.
    np.testing.assert_array_equal(stats.p2, expected["p2"])
    np.testing.assert_array_equal(stats.p98, expected["p98"])


def test_stats_on_sentinel2_sample_equal_numpy(sentinel2_yaml):
    spec = MultiFileSpec.from_mapping(
        yaml.safe_load(sentinel2_yaml.read_text()), base=sentinel2_yaml.parent, where="s2"
    )
    scene = open_scene(spec, chunk_target=128, patch_size=16)
    stats = compute_stats([scene])
    expected = numpy_stats([scene.data.compute()], [scene.valid.compute()])
    np.testing.assert_allclose(stats.mean, expected["mean"], rtol=1e-12)
    np.testing.assert_allclose(stats.std, expected["std"], rtol=1e-10)
    np.testing.assert_array_equal(stats.p2, expected["p2"])
    np.testing.assert_array_equal(stats.p98, expected["p98"])


def test_float_percentiles_within_one_bin(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(100, 20, size=(2, 200, 300)).astype(np.float32)
    data[:, :10] = np.nan
    scene = open_scene(write_tif(tmp_path / "f.tif", data), chunk_target=64, patch_size=16)
    stats = compute_stats([scene])
    expected = numpy_stats([data], [np.isfinite(data).all(axis=0)])
    bin_width = (np.array(stats.max) - np.array(stats.min)) / 65536
    assert np.all(np.abs(np.array(stats.p2) - expected["p2"]) <= bin_width)
    assert np.all(np.abs(np.array(stats.p98) - expected["p98"]) <= bin_width)
    np.testing.assert_allclose(stats.mean, expected["mean"], rtol=1e-6)


def test_an_integer_scene_first_does_not_put_a_float_scenes_values_in_integer_bins(tmp_path):
    # A few integer pixels (0 and 10) first; the percentiles fall among the float scene's values.
    counts = np.random.default_rng(2).choice([0, 10], size=(1, 10, 10)).astype(np.uint16)
    values = np.random.default_rng(3).uniform(3, 7, size=(1, 100, 100)).astype(np.float32)
    scenes = [open_scene(write_tif(tmp_path / "u.tif", counts)), open_scene(write_tif(tmp_path / "f.tif", values))]
    stats = compute_stats(scenes)
    expected = numpy_stats([counts, values], [np.ones((10, 10), bool), np.ones((100, 100), bool)])
    bin_width = (stats.max[0] - stats.min[0]) / 65536
    assert abs(stats.p2[0] - expected["p2"][0]) <= bin_width
    assert abs(stats.p98[0] - expected["p98"][0]) <= bin_width


def test_save_load_roundtrip_and_normalize(landsat_path, tmp_path):
    scene = open_scene(landsat_path)
    stats = compute_stats([scene])
    stats.save(tmp_path / "stats.json")
    loaded = BandStats.load(tmp_path / "stats.json")
    assert loaded == stats
    assert set(json.loads((tmp_path / "stats.json").read_text())) >= {"count", "mean", "std", "p2", "p98"}
    block = scene.data.compute()
    valid = np.ones(block.shape[1:], bool)
    valid[0, 0] = False
    z = stats.normalize(block, valid)
    assert z.dtype == np.float32 and z[:, 0, 0].tolist() == [0.0] * 6
    np.testing.assert_allclose(z[:, valid].mean(axis=1), 0, atol=1e-3)
    np.testing.assert_allclose(z[:, valid].std(axis=1), 1, atol=1e-3)


def test_mismatched_bands_and_all_nodata(landsat_path, tmp_path):
    six = open_scene(landsat_path)
    three = open_scene(landsat_path, bands=[1, 2, 3])
    with pytest.raises(InputError, match="has 3 bands but landsat7_olinda has 6"):
        compute_stats([six, three])
    empty = write_tif(tmp_path / "empty.tif", np.zeros((2, 20, 20), np.uint8), nodata=0)
    hint = "every pixel is nodata, not finite or outside data.valid_range"
    with pytest.raises(InputError, match=f"^no valid pixel in any scene: {hint} \\(empty\\)$"):
        compute_stats([open_scene(empty)])
    data = np.ones((3, 20, 20), np.float32)
    data[1:] = np.nan
    cube = write_tif(tmp_path / "cube.tif", data)
    with pytest.raises(InputError) as err:
        compute_stats([open_scene(cube), open_scene(cube)])
    assert err.value.what == (
        "no valid pixel in any scene: bands B2, B3 have no valid pixel in any scene; leave them out with data.bands"
    )


def test_memory_does_not_grow_with_the_number_of_scenes(landsat_path):
    import tracemalloc

    def peak_for(n_scenes: int) -> int:
        scenes = [open_scene(landsat_path, chunk_target=64, patch_size=16) for _ in range(n_scenes)]
        tracemalloc.start()
        compute_stats(scenes)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    two, twelve = peak_for(2), peak_for(12)
    assert twelve < 1.5 * two, (two, twelve)


def test_each_chunk_is_read_once_per_pass():
    # The valid mask is derived from the data block in hand; computing scene.valid
    # beside the data would decode every chunk a second time.
    import threading

    import dask.array as da
    from affine import Affine

    from sitfuse_byol.grid import Grid
    from sitfuse_byol.read.scene import build_scene

    reads = []
    lock = threading.Lock()

    def read(block: np.ndarray) -> np.ndarray:
        with lock:
            reads.append(block.shape)
        return block

    pixels = np.random.default_rng(0).integers(0, 100, (3, 64, 64)).astype(np.uint16)
    data = da.from_array(pixels, chunks=(3, 32, 32)).map_blocks(read, dtype=np.uint16)
    scene = build_scene(
        id="counted",
        data=data,
        grid=Grid(64, 64, Affine.identity(), None),
        band_names=["a", "b", "c"],
        file_nodata=None,
        nodata=5,
        valid_range=None,
        bands=None,
        source="counted",
    )
    reads.clear()
    stats = compute_stats([scene])
    assert reads.count((3, 32, 32)) == 2 * 4  # two passes over four chunks
    assert stats.count == (int((pixels != 5).all(axis=0).sum()),) * 3


def test_a_float_band_of_one_value_counts_as_constant(tmp_path):
    data = np.stack([np.full((20, 20), 273.15, np.float32), np.arange(400, dtype=np.float32).reshape(20, 20)])
    stats = compute_stats([open_scene(write_tif(tmp_path / "t.tif", data))])
    assert stats.constant_bands() == ["B1"]
