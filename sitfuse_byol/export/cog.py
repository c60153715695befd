"""The Cloud-Optimized GeoTIFF writer shared by the label and the float rasters.

GDAL's COG driver cannot be written window by window, so a raster goes block by
block into a tiled staging GTiff first, which the COG driver then copies (and
gives overviews). Whatever is set on the staging file (nodata, colour table,
band description, tags) survives the copy.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import DatasetWriter
from rasterio.windows import Window

from sitfuse_byol.export.atomic import atomic_path, remove_path
from sitfuse_byol.export.sidecars import aux_xml_path_for
from sitfuse_byol.grid import Grid

#: Tile size of the staging GTiff and of the COG.
BLOCK_SIZE = 512


@contextlib.contextmanager
def _ungeoreferenced_ok(grid: Grid) -> Iterator[None]:
    """Silence rasterio's warning about a missing geotransform for a grid without CRS.

    An ungeoreferenced scene is legitimate here. Only then, because
    :func:`warnings.catch_warnings` changes process-wide state.
    """
    if grid.crs is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            yield
    else:
        yield


def write_cog(
    path: Path,
    *,
    grid: Grid,
    staging_options: Mapping[str, Any],
    fill: Callable[[DatasetWriter], None],
    cog_options: Mapping[str, str],
    stale_sidecars: Sequence[Path] = (),
) -> Path:
    """Write a one-band COG on ``grid`` through a tiled staging GTiff, atomically.

    The staging file is tiled :data:`BLOCK_SIZE` square and lives beside the
    output, not in ``/tmp``: scenes can be large and ``/tmp`` on compute nodes
    small. Both files are BigTIFF when they might outgrow 4 GiB. The output
    appears atomically, with no PAM ``.aux.xml`` of its own: a stale one of an
    earlier file at ``path`` would describe other pixels.

    Args:
        path: The ``.tif`` to create or replace.
        grid: The pixel grid; its CRS may be ``None``.
        staging_options: Creation options of the staging GTiff besides its grid,
            band count, tiling and BigTIFF: ``dtype``, ``nodata``, compression.
        fill: Writes the pixels, and any band metadata and tags, into the open
            staging dataset.
        cog_options: Options of the COG driver besides ``COMPRESS=DEFLATE``,
            ``BLOCKSIZE`` and ``BIGTIFF``, e.g. the overview resampling.
        stale_sidecars: More files beside ``path`` to remove before the new file
            appears, since they describe the old one.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "height": grid.height,
        "width": grid.width,
        "count": 1,
        "crs": grid.crs,
        "transform": grid.transform,
        "tiled": True,
        "blockxsize": BLOCK_SIZE,
        "blockysize": BLOCK_SIZE,
        "BIGTIFF": "IF_SAFER",
        **staging_options,
    }
    with (
        tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.staging-") as work,
        _ungeoreferenced_ok(grid),
    ):
        staging = Path(work) / "staging.tif"
        with rasterio.open(staging, "w", **profile) as dst:
            fill(dst)
        with atomic_path(path) as tmp:
            rasterio.shutil.copy(
                staging,
                tmp,
                driver="COG",
                COMPRESS="DEFLATE",
                BLOCKSIZE=BLOCK_SIZE,
                BIGTIFF="IF_SAFER",
                # Compression and overviews on the threads this task was given (a scene
                # task's Dask threads), not one: about half the copy's time on 2 cores.
                NUM_THREADS=str(max(1, int(dask.config.get("num_workers", None) or 1))),
                **cog_options,
            )
            # A PAM file GDAL left beside the temporary would not follow the rename.
            remove_path(aux_xml_path_for(tmp))
            for stale in (aux_xml_path_for(path), *stale_sidecars):
                remove_path(stale)
    return path


def raster_pieces(values: np.ndarray | da.Array) -> Iterator[tuple[Window, np.ndarray]]:
    """Yield ``(window, values)`` pieces that tile the array, keeping memory bounded."""
    height, width = values.shape
    if isinstance(values, da.Array):
        row_starts = np.cumsum((0, *values.chunks[0]))
        col_starts = np.cumsum((0, *values.chunks[1]))
        for i in range(values.numblocks[0]):
            # One row of chunks at a time: parallel within the row, bounded memory overall.
            row = dask.compute(*(values.blocks[i, j] for j in range(values.numblocks[1])))
            for j, block in enumerate(row):
                window = Window(
                    int(col_starts[j]),
                    int(row_starts[i]),
                    int(col_starts[j + 1] - col_starts[j]),
                    int(row_starts[i + 1] - row_starts[i]),
                )
                yield window, np.asarray(block)
    else:
        for row in range(0, height, BLOCK_SIZE):
            rows = min(BLOCK_SIZE, height - row)
            yield Window(0, row, width, rows), np.asarray(values[row : row + rows])
