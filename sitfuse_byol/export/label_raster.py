"""Write label rasters as Cloud-Optimized GeoTIFFs with colours and class names.

The labels go block by block into a tiled staging GTiff, which the COG driver
copies with categorical (MODE) overviews (:func:`~sitfuse_byol.export.cog.write_cog`).
Colour table, nodata, band description and tags are set on the staging file and
survive the copy; class names go into sidecar files (see
:mod:`sitfuse_byol.export.sidecars`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import dask.array as da
import numpy as np
from rasterio.enums import Resampling
from rasterio.io import DatasetWriter

from sitfuse_byol.export.cog import raster_pieces, write_cog
from sitfuse_byol.export.palette import MAX_LABELS, label_colors
from sitfuse_byol.export.sidecars import aux_xml_path_for, qml_path_for, write_qml, write_rat
from sitfuse_byol.grid import Grid


def label_dtype_and_nodata(n_labels: int) -> tuple[np.dtype, int]:
    """The smallest unsigned dtype for ``n_labels`` labels and its nodata value.

    Labels are ``0 .. n_labels - 1``; the dtype's maximum is reserved as nodata. uint8
    is kept for at most 254 labels (uint16 above, as the export contract states), so a
    uint8 label raster never holds the value next to nodata either.

    Args:
        n_labels: Number of labels.

    Returns:
        ``(uint8, 255)`` for up to 254 labels, else ``(uint16, 65535)``.

    Raises:
        ValueError: If ``n_labels`` is below 1 or above 65535.
    """
    if n_labels < 1:
        raise ValueError(f"need at least one label, got {n_labels}")
    if n_labels <= 254:
        return np.dtype(np.uint8), 255
    if n_labels <= MAX_LABELS:
        return np.dtype(np.uint16), 65535
    raise ValueError(f"at most {MAX_LABELS} labels fit a label raster, got {n_labels}")


def default_class_names(n_labels: int) -> list[str]:
    """``["cluster 0", "cluster 1", ...]``."""
    return [f"cluster {i}" for i in range(n_labels)]


def _checked_block(block: np.ndarray, *, n_labels: int, nodata: int, dtype: np.dtype) -> np.ndarray:
    """Cast a block to the label dtype, refusing values that would wrap or mean nothing."""
    bad = (block < 0) | ((block >= n_labels) & (block != nodata))
    if bad.any():
        example = block[bad].flat[0]
        raise ValueError(
            f"label {example} is neither in 0..{n_labels - 1} nor the nodata value {nodata}"
        )
    return block.astype(dtype, copy=False)


def _fill_staging(
    dst: DatasetWriter,
    labels: np.ndarray | da.Array,
    *,
    n_labels: int,
    colors: np.ndarray,
    tags: Mapping[str, str],
    description: str,
    overview_levels: Sequence[int] | None,
) -> None:
    """Write the labels, colour table, description, tags and overviews into the staging file."""
    dtype, nodata = label_dtype_and_nodata(n_labels)
    for window, block in raster_pieces(labels):
        dst.write(
            _checked_block(block, n_labels=n_labels, nodata=nodata, dtype=dtype),
            1,
            window=window,
        )
    colormap = {i: (*map(int, colors[i]), 255) for i in range(n_labels)}
    colormap[nodata] = (0, 0, 0, 0)
    dst.write_colormap(1, colormap)
    dst.set_band_description(1, description)
    dst.update_tags(**({str(k): str(v) for k, v in tags.items()} | {"K": str(n_labels)}))
    if overview_levels:
        dst.build_overviews(list(overview_levels), Resampling.mode)


def write_label_raster(
    labels: np.ndarray | da.Array,
    *,
    grid: Grid,
    path: Path,
    n_labels: int,
    class_names: Sequence[str] | None = None,
    colors: np.ndarray | None = None,
    tags: Mapping[str, str] | None = None,
    description: str = "cluster",
    overview_levels: Sequence[int] | None = None,
    sidecars: bool = True,
) -> Path:
    """Write a label map as a Cloud-Optimized GeoTIFF, with QGIS style and attribute table.

    The file is uint8 with nodata 255 for up to 254 labels, else uint16 with
    nodata 65535 (:func:`label_dtype_and_nodata`). It is tiled 512 x 512,
    DEFLATE-compressed, carries a colour table (nodata transparent), the band
    description, ``tags`` plus ``K`` (the number of labels), and internal
    overviews resampled with MODE so they hold only real labels. The output
    appears atomically; stale sidecars of an earlier file at ``path`` are
    removed, and new ones are written when ``sidecars`` is true.

    Args:
        labels: 2-D integer labels in ``0 .. n_labels - 1``, holding the nodata
            value where the input is invalid. A dask array is computed one row
            of chunks at a time.
        grid: The pixel grid; its CRS may be ``None``.
        path: The ``.tif`` to create or replace.
        n_labels: Number of labels (K).
        class_names: Name of each label; ``"cluster <i>"`` by default.
        colors: ``(n_labels, 3)`` uint8 RGB colours; :func:`label_colors` by default.
        tags: Extra dataset tags (e.g. model, scene, date).
        description: The band description.
        overview_levels: Overview decimation factors, e.g. ``[2, 4, 8]``;
            ``None`` lets the COG driver halve until the overview fits one
            block; an empty sequence writes no overviews.
        sidecars: Whether to write ``<basename>.qml`` and ``<name>.aux.xml``.

    Returns:
        ``path``.

    Raises:
        ValueError: If the labels do not match the grid, are not integers, hold
            values outside the labels and nodata, or names/colours do not match
            ``n_labels``.
    """
    path = Path(path)
    dtype, nodata = label_dtype_and_nodata(n_labels)
    if labels.ndim != 2 or tuple(labels.shape) != grid.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the grid {grid.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    colors = label_colors(n_labels) if colors is None else np.asarray(colors)
    if colors.shape != (n_labels, 3):
        raise ValueError(f"colors must have shape ({n_labels}, 3), got {colors.shape}")
    colors = colors.astype(np.uint8)
    names = default_class_names(n_labels) if class_names is None else list(class_names)
    if len(names) != n_labels:
        raise ValueError(f"{len(names)} class names for {n_labels} labels")

    if overview_levels is None:
        overview_options = {"OVERVIEWS": "AUTO"}
    elif overview_levels:
        overview_options = {"OVERVIEWS": "FORCE_USE_EXISTING"}
    else:
        overview_options = {"OVERVIEWS": "NONE"}

    write_cog(
        path,
        grid=grid,
        staging_options={
            "dtype": dtype.name,
            "nodata": nodata,
            "compress": "DEFLATE",
            # The staging file is temporary; fast compression is enough.
            "zlevel": 1,
        },
        fill=lambda dst: _fill_staging(
            dst,
            labels,
            n_labels=n_labels,
            colors=colors,
            tags=tags or {},
            description=description,
            overview_levels=overview_levels,
        ),
        cog_options={"OVERVIEW_RESAMPLING": "MODE", **overview_options},
        # Sidecars of a previous file at this path describe other labels.
        stale_sidecars=[qml_path_for(path)],
    )

    if sidecars:
        values = list(range(n_labels))
        write_qml(qml_path_for(path), labels=values, names=names, colors=colors, nodata=nodata)
        write_rat(aux_xml_path_for(path), labels=values, names=names, colors=colors)
    return path
