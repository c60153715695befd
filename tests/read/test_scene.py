"""Pixels read through a real Dask cluster: a worker's read error still names its scene."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from sitfuse_byol.errors import InputError
from sitfuse_byol.read import open_scene
from sitfuse_byol.read.scene import reading
from sitfuse_byol.run.cluster_client import NO_WORKER_PROFILER
from tests.conftest import corrupt_tile


def test_a_read_error_sent_back_by_a_worker_process_is_an_input_error(tmp_path):
    from distributed import Client, LocalCluster

    path = tmp_path / "tiles.tif"
    profile = {
        "driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "uint16", "tiled": True,
        "blockxsize": 16, "blockysize": 16, "compress": "deflate", "crs": "EPSG:32618",
        "transform": from_origin(0, 640, 10, 10),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.arange(64 * 64, dtype="uint16").reshape(1, 64, 64))
    scene = open_scene(corrupt_tile(path))
    with dask.config.set(NO_WORKER_PROFILER):  # it can hang Python 3.11 (see the constant)
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster), pytest.raises(InputError) as err, reading(scene.source):
        scene.data.sum().compute()
    assert err.value.what.startswith("cannot read pixels: ")
    assert "RasterioIOError" in err.value.what and err.value.where == scene.source


def test_unscaled_scenes_are_in_physical_units_with_nodata_invalid(tmp_path):
    raw = np.array([[0, 7273, 10000], [20000, 43636, 65535]], np.uint16)[None].repeat(2, axis=0)
    path = tmp_path / "sr.tif"
    profile = {
        "driver": "GTiff", "width": 3, "height": 2, "count": 2, "dtype": "uint16", "nodata": 0,
        "crs": "EPSG:32618", "transform": from_origin(0, 20, 10, 10),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(raw)
        dst.scales = [2.75e-5, 2.75e-5]
        dst.offsets = [-0.2, -0.2]
    stored = open_scene(path)
    assert stored.dtype == np.uint16 and stored.packing == ((2.75e-5, -0.2),) * 2
    scene = open_scene(path, unscale=True, valid_range=[0.0, 1.0])
    assert scene.dtype == np.float32 and scene.packing == ((1.0, 0.0),) * 2 and np.isnan(scene.nodata)
    values = scene.data.compute()
    expected = raw.astype(np.float32) * np.float32(2.75e-5) + np.float32(-0.2)
    np.testing.assert_allclose(values[:, 0, 1:], expected[:, 0, 1:], rtol=1e-6)
    assert np.isnan(values[:, 0, 0]).all()  # the fill
    # The range is in reflectance: 7273 is 0.0000075 (in), 65535 is 1.602 (out), the fill is out.
    np.testing.assert_array_equal(scene.valid.compute(), [[False, True, True], [True, True, False]])
    np.testing.assert_array_equal(scene.valid_of(values), scene.valid.compute())
    with pytest.raises(InputError, match=r"valid_range \[1.0, 0.0\] is empty"):
        open_scene(path, unscale=True, valid_range=[1.0, 0.0])
