"""Pixels read through a real Dask cluster: a worker's read error still names its scene."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from sitfuse_byol.errors import InputError
from sitfuse_byol.read import open_scene
from sitfuse_byol.read.scene import reading


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
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
    data = bytearray(path.read_bytes())
    data[offset : offset + 32] = b"\xff" * 32
    path.write_bytes(bytes(data))
    scene = open_scene(path)
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster), pytest.raises(InputError) as err, reading(scene.source):
        scene.data.sum().compute()
    assert err.value.what.startswith("cannot read pixels: ")
    assert "RasterioIOError" in err.value.what and err.value.where == scene.source
