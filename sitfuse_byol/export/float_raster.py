"""Continuous rasters (e.g. cluster confidence) as Cloud-Optimized GeoTIFF."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import dask.array as da
import numpy as np
from rasterio.io import DatasetWriter

from sitfuse_byol.export.cog import raster_pieces, write_cog
from sitfuse_byol.grid import Grid


def write_float_raster(
    values: da.Array,
    *,
    grid: Grid,
    path: Path,
    description: str,
    tags: Mapping[str, str] | None = None,
) -> Path:
    """Write a 2-D float32 dask array as a COG with NaN nodata, one row of chunks at a time.

    The COG is DEFLATE-compressed with the floating-point predictor, tiled like the
    label rasters, and has overviews averaged from the full resolution.

    Args:
        values: ``(H, W)`` values on ``grid``, NaN where there are none.
        grid: The pixel grid; its CRS may be ``None``.
        path: The ``.tif`` to create or replace.
        description: The band description.
        tags: Dataset tags.

    Returns:
        ``path``.
    """

    def fill(dst: DatasetWriter) -> None:
        for window, piece in raster_pieces(values):
            dst.write(piece.astype(np.float32, copy=False), 1, window=window)
        dst.set_band_description(1, description)
        dst.update_tags(**(tags or {}))

    return write_cog(
        path,
        grid=grid,
        staging_options={
            "dtype": "float32",
            "nodata": float("nan"),
            "compress": "deflate",
            "predictor": 3,
        },
        fill=fill,
        cog_options={"PREDICTOR": "FLOATING_POINT", "OVERVIEW_RESAMPLING": "AVERAGE"},
    )
