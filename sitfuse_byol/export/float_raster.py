"""Continuous rasters (e.g. cluster confidence) as Cloud-Optimized GeoTIFF."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import dask.array as da
import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from sitfuse_byol.export.atomic import atomic_path
from sitfuse_byol.grid import Grid


def write_float_raster(
    values: da.Array,
    *,
    grid: Grid,
    path: Path,
    description: str,
    tags: Mapping[str, str] | None = None,
) -> Path:
    """Write a 2-D float32 dask array as a COG with NaN nodata, one row of chunks at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": 1,
        "dtype": "float32",
        "nodata": float("nan"),
        "transform": grid.transform,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "predictor": 3,
    }
    if grid.crs is not None:
        profile["crs"] = grid.crs
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.staging-") as work:
        staging = Path(work) / "staging.tif"
        with rasterio.open(staging, "w", **profile) as dst:
            row = 0
            for i in range(values.numblocks[0]):
                band = values.blocks[i, :].compute().astype(np.float32)
                dst.write(band, 1, window=Window(0, row, grid.width, band.shape[0]))
                row += band.shape[0]
            dst.set_band_description(1, description)
            dst.update_tags(**(tags or {}))
        with atomic_path(path) as tmp:
            rasterio.shutil.copy(
                staging, tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR="FLOATING_POINT",
                OVERVIEW_RESAMPLING="AVERAGE", BLOCKSIZE=512,
            )
    return path
