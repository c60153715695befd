"""Lazy reading of multi-band GeoTIFFs (and any single file GDAL opens as a raster)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import dask.array as da
import numpy as np
import rasterio
import rioxarray
import xarray as xr
from affine import Affine
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from sitfuse_byol.errors import InputError
from sitfuse_byol.grid import Grid
from sitfuse_byol.read.chunking import DEFAULT_CHUNK_TARGET, aligned_chunks
from sitfuse_byol.read.scene import Scene, build_scene

#: How many subdataset names a message lists.
SUBDATASETS_SHOWN = 3


def open_dataset(path: Path) -> rasterio.DatasetReader:
    """Open a raster with rasterio, turning failures into one-line :class:`InputError`s."""
    if not path.exists():
        raise InputError("file not found", where=str(path))
    try:
        with warnings.catch_warnings():
            # A scene without georeferencing is allowed; callers warn about it themselves.
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as err:
        reason = str(err).splitlines()[0]
        if "not recognized" in reason:
            reason = "not a raster GDAL can read"
        raise InputError(f"cannot open raster: {reason}", where=str(path)) from err


def check_not_truncated(src: rasterio.DatasetReader, *, where: str) -> None:
    """Fail early on a TIFF cut short, instead of deep inside a Dask computation.

    The TIFF directory records where every block lives; if the last block of any band
    ends past the end of the file, the file was cut off (an interrupted copy or download).
    """
    if src.driver != "GTiff":
        return
    size = Path(src.name).stat().st_size
    block_h, block_w = src.block_shapes[0]
    last = f"{-(-src.width // block_w) - 1}_{-(-src.height // block_h) - 1}"
    for bidx in range(1, src.count + 1):
        offset = src.get_tag_item(f"BLOCK_OFFSET_{last}", "TIFF", bidx=bidx)
        length = src.get_tag_item(f"BLOCK_SIZE_{last}", "TIFF", bidx=bidx)
        if offset and length and int(offset) + int(length) > size:
            raise InputError(
                f"file is truncated: {size} bytes, but its blocks run to {int(offset) + int(length)}",
                where=where,
            )


def check_has_bands(src: rasterio.DatasetReader, *, where: str) -> None:
    """Refuse a file GDAL opens without raster bands, such as a NetCDF or HDF container
    whose rasters are subdatasets that GDAL only opens by name."""
    if src.count:
        return
    names = src.subdatasets
    if not names:
        raise InputError("the file holds no raster band", where=where)
    # GDAL names them "DRIVER:<file>:<name>"; the file is in ``where`` already.
    shown = ", ".join(name.rsplit(src.name, 1)[-1].lstrip(':"/') for name in names[:SUBDATASETS_SHOWN])
    if len(names) > SUBDATASETS_SHOWN:
        shown += f" and {len(names) - SUBDATASETS_SHOWN} more"
    raise InputError(
        f"the file holds subdatasets ({shown}), not raster bands; extract one to a GeoTIFF "
        f"(gdal_translate '{names[0]}' out.tif), or name a NetCDF/HDF5 file *.nc to read its "
        "variables through xarray",
        where=where,
    )


def open_lazy(source: Path | WarpedVRT, *, chunks: Mapping[str, int]) -> da.Array:
    """The pixels of a raster file or warped VRT as a lazy ``(band, y, x)`` Dask array.

    Args:
        source: The file, or a warped VRT over one.
        chunks: Chunk length per dimension, ``band``, ``y`` and ``x`` (``-1``: whole axis).
    """
    with warnings.catch_warnings():
        # An ungeoreferenced file is allowed; inspect warns about it once, explicitly.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        # One raster without subdatasets opens as a DataArray; the stubs give every case.
        array = cast(
            xr.DataArray,
            rioxarray.open_rasterio(
                source,
                chunks=dict(chunks),
                # No lock: chunks read fully in parallel (each read opens its own
                # handle); no masking or scaling, so the file's dtype is kept; no cache,
                # so a chunk is not held in memory after use.
                lock=False,
                mask_and_scale=False,
                cache=False,
            ),
        )
    return array.data


class _DatasetMask:
    """GDAL's per-dataset mask band of a file (internal or ``.msk``), read window by
    window as Dask asks: an array-like for ``da.from_array``."""

    def __init__(self, path: Path, shape: tuple[int, int]) -> None:
        self.path = str(path)
        self.shape = shape
        self.dtype = np.dtype(bool)
        self.ndim = 2

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        window = Window.from_slices(rows, cols, height=self.shape[0], width=self.shape[1])
        with rasterio.open(self.path) as src:
            return src.dataset_mask(window=window) > 0


def has_dataset_mask(src: rasterio.DatasetReader) -> bool:
    """Whether GDAL masks the file's pixels with a mask band, not (only) a nodata value.

    An alpha band is not taken as one: GDAL calls the 4th band of any 8-bit 4-band file
    alpha unless told otherwise, and in a red, green, blue, near-infrared stack that
    would hide every pixel whose near-infrared is 0 (dark water).
    """
    return any(
        MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags for flags in src.mask_flag_enums
    )


def apply_dataset_mask(array: da.Array, path: Path) -> da.Array:
    """The pixels GDAL's mask band hides made NaN, which no pixel value test lets through:
    JPEG-compressed imagery, ``gdalwarp`` output and clipped mosaics often mark their
    invalid pixels that way alone, with no nodata value. Integer data become floating
    point to hold the NaN (float32, or float64 for 32-bit integers), with the same values."""
    mask = da.from_array(
        _DatasetMask(path, (int(array.shape[1]), int(array.shape[2]))),
        chunks=(array.chunks[1], array.chunks[2]),
        lock=False,
        asarray=True,
        fancy=False,
    )
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64 if array.dtype.itemsize >= 4 else np.float32)
    return da.where(mask[None], array, np.nan)


def georeferencing_warning(scene: Scene) -> str | None:
    """The one-line warning for a scene whose outputs cannot be georeferenced, or None.

    A file placed by ground control points alone (unrectified imagery) gets its own
    advice: the outputs are on its pixel grid, which only warping puts on a map.
    """
    if scene.grid.crs is not None:
        if scene.grid.transform == Affine.identity():
            # A CRS alone places nothing: rioxarray and GDAL fall back to pixel
            # coordinates, which in that CRS would put every output near its origin.
            return (
                "warning: scene has a CRS but no geotransform or x/y coordinates; its outputs will sit at "
                f"pixel coordinates (1-unit pixels at the CRS origin) ({scene.source})"
            )
        return None
    gcps: list = []
    # Only a file can hold GCPs: not a multi-file scene's id, nor a Zarr store's folder.
    if Path(scene.source).is_file():
        with contextlib.suppress(RasterioError, OSError), warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(scene.source) as src:
                gcps = src.gcps[0]
    if gcps:
        return (
            f"warning: scene is placed by {len(gcps)} ground control points, without a CRS and geotransform; "
            "its outputs will not be georeferenced: warp it first, e.g. gdalwarp -t_srs EPSG:<code> "
            f"in.tif out.tif ({scene.source})"
        )
    return f"warning: scene has no CRS; its outputs will not be georeferenced ({scene.source})"


def band_names_of(src: rasterio.DatasetReader) -> list[str]:
    """Band descriptions where the file has them, ``B1``, ``B2``... otherwise."""
    return [desc or f"B{i}" for i, desc in enumerate(src.descriptions, start=1)]


def open_geotiff(
    path: Path,
    *,
    bands: Sequence[int | str] | None = None,
    nodata: float | None = None,
    valid_range: Sequence[float] | None = None,
    patch_size: int = 32,
    chunk_target: int = DEFAULT_CHUNK_TARGET,
    scene_id: str | None = None,
) -> Scene:
    """Open a (multi-band) GeoTIFF as a lazy :class:`Scene` without reading pixels.

    Args:
        path: The file.
        bands: 1-based indices or names to keep; all bands when ``None``.
        nodata: Overrides the file's nodata value.
        valid_range: Inclusive ``[min, max]`` of valid values.
        patch_size: Chunks are made a multiple of it.
        chunk_target: Preferred chunk edge in pixels.
        scene_id: Defaults to the file stem.
    """
    where = str(path)
    with open_dataset(path) as src:
        check_not_truncated(src, where=where)
        check_has_bands(src, where=where)
        grid = Grid.of_dataset(src)
        names = band_names_of(src)
        file_nodata = src.nodata
        packing = list(zip(src.scales, src.offsets, strict=True))
        chunks = aligned_chunks(
            shape=grid.shape, block=src.block_shapes[0], patch=patch_size, target=chunk_target
        )
        masked = has_dataset_mask(src)
    array = open_lazy(path, chunks={"band": -1, "y": chunks[0], "x": chunks[1]})
    if masked:
        array = apply_dataset_mask(array, path)
    return build_scene(
        id=scene_id or path.stem,
        data=array,
        grid=grid,
        band_names=names,
        file_nodata=file_nodata,
        nodata=nodata,
        valid_range=valid_range,
        bands=bands,
        source=where,
        packing=packing,
    )
