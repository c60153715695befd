"""Vectorise a label map into a GeoPackage of polygons.

A raw cluster map turns into hundreds of thousands of one-pixel polygons, so
regions smaller than ``min_size_px`` are first merged into their largest
neighbour with GDAL's sieve filter. Needs the ``gis`` extra (pyogrio, shapely).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio.features
import shapely
import shapely.geometry

from sitfuse_byol.export.atomic import atomic_path
from sitfuse_byol.grid import Grid

# Dtypes GDAL's sieve and polygonize accept from rasterio.
_FEATURE_DTYPES = {np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.int32)}


#: Sieve passes at most; real label maps settle in two or three.
MAX_SIEVE_PASSES = 16


def _sieve(labels: np.ndarray, *, min_size_px: int, valid: np.ndarray) -> np.ndarray:
    """Merge regions smaller than ``min_size_px`` into a neighbour, until none is left.

    GDAL's sieve makes one pass and merges a small region only into a neighbour at least
    ``min_size_px`` large: a region whose neighbours were all small when it looked
    survives the pass, so passes repeat until nothing changes. What GDAL never merges
    stays: a region with no valid neighbour (an island in nodata), or one among small
    neighbours only (speckle with no large region near it).
    """
    for _ in range(MAX_SIEVE_PASSES):
        sieved = rasterio.features.sieve(labels, size=min_size_px, mask=valid, connectivity=4)
        if np.array_equal(sieved, labels):
            break
        labels = sieved
    return labels


def _feature_dtype(labels: np.ndarray) -> np.ndarray:
    if labels.dtype in _FEATURE_DTYPES:
        return labels
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    info = np.iinfo(np.int32)
    if labels.size and (labels.min() < info.min or labels.max() > info.max):
        raise ValueError("labels do not fit into int32")
    return labels.astype(np.int32)


def write_polygons(
    path_gpkg: Path,
    *,
    labels: np.ndarray,
    grid: Grid,
    nodata: int,
    min_size_px: int,
    class_names: Sequence[str] | None = None,
    layer: str = "labels",
) -> Path:
    """Sieve a label map, vectorise it and write the polygons to a GeoPackage.

    Each connected region (4-connectivity) of one label becomes one polygon
    feature with the fields ``label`` (int), ``name`` (str) and ``area``
    (float, in CRS units squared; pixel units without CRS). Nodata pixels
    produce no features and are never merged into regions.

    Args:
        path_gpkg: The ``.gpkg`` to create or replace.
        labels: ``(H, W)`` integer labels holding ``nodata`` where invalid.
        grid: The pixel grid of ``labels``; its CRS becomes the layer's CRS.
        nodata: The label nodata value.
        min_size_px: Regions of fewer pixels are merged into their largest
            neighbour first; 1 or less keeps every region.
        class_names: Name of each label, indexed by label; ``"cluster <i>"``
            for labels without one.
        layer: The layer name.

    Returns:
        ``path_gpkg``.

    Raises:
        ValueError: If ``labels`` is not a 2-D integer array of the grid's shape.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape != grid.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the grid {grid.shape}")
    labels = _feature_dtype(labels)
    valid = labels != nodata
    if min_size_px > 1:
        labels = _sieve(labels, min_size_px=min_size_px, valid=valid)

    geometries, values = [], []
    for geojson, value in rasterio.features.shapes(
        labels, mask=valid, connectivity=4, transform=grid.transform
    ):
        geometries.append(shapely.geometry.shape(geojson))
        values.append(int(value))
    names = list(class_names or [])
    field_data = [
        np.array(values, dtype=np.int32),
        np.array([names[v] if v < len(names) else f"cluster {v}" for v in values], dtype=object),
        shapely.area(np.array(geometries, dtype=object)).astype(np.float64),
    ]

    path_gpkg = Path(path_gpkg)
    path_gpkg.parent.mkdir(parents=True, exist_ok=True)
    # An ungeoreferenced scene legitimately has no CRS, which pyogrio warns about. The
    # filter is set only then, because catch_warnings changes process-wide state.
    quiet = warnings.catch_warnings() if grid.crs is None else contextlib.nullcontext()
    with atomic_path(path_gpkg) as tmp, quiet:
        if grid.crs is None:
            warnings.filterwarnings(
                "ignore", message="'crs' was not provided", category=UserWarning
            )
        pyogrio.raw.write(
            tmp,
            geometry=shapely.to_wkb(np.array(geometries, dtype=object)),
            field_data=field_data,
            fields=["label", "name", "area"],
            layer=layer,
            driver="GPKG",
            geometry_type="Polygon",
            crs=grid.crs.to_wkt() if grid.crs is not None else None,
        )
    return path_gpkg
