"""The :class:`Scene`: a lazily read ``(band, y, x)`` array with its valid mask and grid."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
from rasterio.errors import RasterioError

from sitfuse_byol.errors import InputError
from sitfuse_byol.grid import Grid
from sitfuse_byol.read.bands import select_bands


@dataclass(frozen=True)
class Scene:
    """One scene, opened lazily.

    Attributes:
        id: Short name, used for output file names.
        data: Dask array ``(band, y, x)`` in the file's dtype; no pixel is read until computed.
        valid: Dask boolean array ``(y, x)``; a pixel is valid when every selected band is
            finite, differs from ``nodata`` and lies within ``valid_range``.
        grid: The scene's pixel grid.
        band_names: One name for each band of ``data``.
        nodata: The nodata value in effect, or ``None``.
        valid_range: Inclusive ``(min, max)`` of valid values, or ``None``.
        source: Where the scene came from, for messages.
        packing: Each band's ``(scale, offset)`` as the file declares them. Values are
            read as stored, unscaled, so scenes stored with other ones do not compare.
    """

    id: str
    data: da.Array
    valid: da.Array
    grid: Grid
    band_names: tuple[str, ...]
    nodata: float | None
    valid_range: tuple[float, float] | None
    source: str
    packing: tuple[tuple[float, float], ...] = ()

    @property
    def n_bands(self) -> int:
        return int(self.data.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def chunks(self) -> tuple[int, int]:
        """The (y, x) size of the first chunk; reads happen in these units."""
        return (int(self.data.chunks[1][0]), int(self.data.chunks[2][0]))

    def valid_of(self, block: np.ndarray) -> np.ndarray:
        """The valid mask of an in-memory ``(band, y, x)`` block of this scene."""
        return valid_block(block, nodata=self.nodata, valid_range=self.valid_range)


def valid_mask(
    data: da.Array, *, nodata: float | None, valid_range: Sequence[float] | None
) -> da.Array:
    """Lazily build the ``(y, x)`` mask of pixels valid in every band."""

    def block_valid(block: np.ndarray) -> np.ndarray:
        return valid_block(block, nodata=nodata, valid_range=valid_range)

    return da.map_blocks(block_valid, data, drop_axis=0, dtype=bool)


def valid_block(
    block: np.ndarray, *, nodata: float | None, valid_range: Sequence[float] | None
) -> np.ndarray:
    """The valid mask of an in-memory ``(band, y, x)`` block (see :class:`Scene`)."""
    ok = np.ones(block.shape[1:], dtype=bool)
    for band in block:
        ok &= band_valid(band, nodata=nodata, valid_range=valid_range)
    return ok


def band_valid(band: np.ndarray, *, nodata: float | None, valid_range: Sequence[float] | None) -> np.ndarray:
    """The pixels of one band that hold data by themselves (the other bands aside)."""
    ok = np.isfinite(band) if np.issubdtype(band.dtype, np.floating) else np.ones(band.shape, dtype=bool)
    if nodata is not None and not np.isnan(nodata):
        ok &= band != nodata
    if valid_range is not None:
        ok &= (band >= valid_range[0]) & (band <= valid_range[1])
    return ok


def bands_without_data(scene: Scene) -> list[str]:
    """The names of the scene's bands with no valid pixel at all (a water-vapour band of a
    hyperspectral cube, a band outside ``valid_range``): each makes every pixel invalid.
    Reads the scene; meant for explaining an empty one."""

    def any_valid(block: np.ndarray) -> np.ndarray:
        return np.array([band_valid(b, nodata=scene.nodata, valid_range=scene.valid_range).any() for b in block])[
            :, None, None
        ]

    ones = tuple((1,) * len(axis) for axis in scene.data.chunks[1:])
    per_block = da.map_blocks(any_valid, scene.data, chunks=(scene.data.chunks[0], *ones), dtype=bool)
    with reading(scene.source):
        found = per_block.any(axis=(1, 2)).compute()
    return [name for name, ok in zip(scene.band_names, found, strict=True) if not ok]


def unscaled(scene: Scene, *, valid_range: Sequence[float] | None) -> Scene:
    """The scene in physical units: each band times its scale plus its offset, as float32.

    Its nodata pixels become NaN (so the nodata is NaN), and ``valid_range`` applies to
    the scaled values. Scenes packed with different scales then compare.

    Raises:
        InputError: ``valid_range`` is empty.
    """
    if valid_range is not None and not valid_range[0] <= valid_range[1]:
        raise InputError(f"valid_range {list(valid_range)} is empty", where=scene.source)
    scale = np.array([p[0] for p in scene.packing], np.float32).reshape(-1, 1, 1)
    offset = np.array([p[1] for p in scene.packing], np.float32).reshape(-1, 1, 1)
    nodata = scene.nodata

    def to_physical(raw: np.ndarray) -> np.ndarray:
        values = raw.astype(np.float32) * scale + offset
        if nodata is not None and not np.isnan(nodata):
            values[raw == nodata] = np.nan
        return values

    data = scene.data.rechunk({0: -1}).map_blocks(to_physical, dtype=np.float32)
    return dataclasses.replace(
        scene,
        data=data,
        valid=valid_mask(data, nodata=float("nan"), valid_range=valid_range),
        nodata=float("nan"),
        valid_range=(valid_range[0], valid_range[1]) if valid_range is not None else None,
        packing=tuple((1.0, 0.0) for _ in scene.packing),
    )


def shared_nodata(
    own: Sequence[float | None], *, first: int, dtype: np.dtype, uncovered: bool
) -> float | None:
    """The one nodata value of a scene stacked from bands that each declare their own.

    Validity is decided from pixel values against a single nodata (:func:`valid_block`
    runs on blocks in hand), so every band's fill is rewritten to this value by
    :func:`fill_as`. It is the ``first`` band's nodata where it has one; else NaN for
    floats; else the first nodata another band declares; else 0, GDAL's fill, where
    ``uncovered`` says some pixels of the grid have no data at all. A value chosen from
    another band (or 0) also marks the pixels of any band that hold it as invalid.

    Args:
        own: Each band's own nodata, ``None`` where it has none.
        first: Position of the band whose nodata is preferred (the reference band).
        dtype: The scene's data type.
        uncovered: Whether some pixels of the grid are not covered by a band.
    """
    if own[first] is not None:
        return own[first]
    if all(value is None for value in own) and not uncovered:
        return None
    if np.issubdtype(dtype, np.floating):
        return float("nan")
    return next((value for value in own if value is not None), 0.0)


def fill_as(data: da.Array, *, own: float | None, nodata: float | None) -> da.Array:
    """The pixels of ``data`` with its own nodata rewritten to the scene's ``nodata``."""
    if own is None or nodata is None or np.isnan(own) or own == nodata:
        # NaN is invalid wherever it is, so a NaN fill needs no rewriting.
        return data
    return da.where(data == own, np.array(nodata, dtype=data.dtype), data)


@contextlib.contextmanager
def reading(where: str) -> Iterator[None]:
    """Turn I/O failures that surface while computing pixels into an :class:`InputError`.

    Reads are lazy, so a truncated or corrupt file is often only noticed when its
    pixels are computed, deep inside Dask; this names the scene it came from.
    """
    try:
        yield
    except InputError:
        raise
    except (RasterioError, OSError, ValueError, RuntimeError) as err:
        raise InputError(f"cannot read pixels: {first_line(err)}", where=where) from err
    except Exception as err:
        # Dask's stand-in for an error a worker could not send back as it was (rasterio's
        # do not always survive pickling): a bare Exception of its repr.
        if type(err) is not Exception:
            raise
        raise InputError(f"cannot read pixels: {first_line(err)}", where=where) from err


def first_line(err: BaseException) -> str:
    """The error's first line; rasterio's "Read failed. See previous exception for details."
    points at its cause, whose text (GDAL's, e.g. a bad TIFF tile) is the one that helps."""
    cause = err.__cause__ or err.__context__
    if "See previous exception" in str(err) and cause is not None:
        return first_line(cause)
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def build_scene(
    *,
    id: str,
    data: da.Array,
    grid: Grid,
    band_names: Sequence[str],
    file_nodata: float | None,
    nodata: float | None,
    valid_range: Sequence[float] | None,
    bands: Sequence[int | str] | None,
    source: str,
    packing: Sequence[tuple[float, float]] | None = None,
) -> Scene:
    """Select bands, settle nodata and attach the lazy valid mask.

    A configured ``nodata`` overrides the file's. ``packing``: each band's ``(scale,
    offset)`` (none declared when ``None``).
    """
    positions = select_bands(band_names, bands, where=source)
    if positions != list(range(len(band_names))):
        data = data[positions]
    names = tuple(band_names[i] for i in positions)
    if valid_range is not None and not valid_range[0] <= valid_range[1]:
        raise InputError(f"valid_range {list(valid_range)} is empty", where=source)
    nodata_used = nodata if nodata is not None else file_nodata
    return Scene(
        id=id,
        data=data,
        valid=valid_mask(data, nodata=nodata_used, valid_range=valid_range),
        grid=grid,
        band_names=names,
        nodata=nodata_used,
        valid_range=(valid_range[0], valid_range[1]) if valid_range is not None else None,
        source=source,
        packing=tuple((float(packing[i][0]), float(packing[i][1])) if packing else (1.0, 0.0) for i in positions),
    )
