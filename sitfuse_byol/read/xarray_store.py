"""Lazy reading of Zarr stores and NetCDF files through xarray."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from rasterio.crs import CRS

from sitfuse_byol.errors import InputError
from sitfuse_byol.grid import Grid
from sitfuse_byol.read.chunking import DEFAULT_CHUNK_TARGET, aligned_chunks
from sitfuse_byol.read.scene import Scene, build_scene, fill_as, shared_nodata

NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf")
SPATIAL_DIMS = (("y", "x"), ("lat", "lon"), ("latitude", "longitude"))


def _open_dataset(path: Path) -> xr.Dataset:
    if not path.exists():
        raise InputError("file not found", where=str(path))
    kwargs: dict = {
        "chunks": {},
        # Without these a _FillValue silently turns integers into float64 with NaNs, and
        # the grid mapping (CRS) is dropped.
        "mask_and_scale": False,
        "decode_coords": "all",
    }
    is_zarr = path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists()
    if path.is_dir() and not is_zarr:
        raise InputError(
            f"a folder that is not a Zarr store; for the rasters in it give a glob such as {path}/*.tif",
            where=str(path),
        )
    # zarr and xarray warn about what then fails anyway (a store missing its metadata);
    # the error below says it in one line.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if is_zarr:
                return xr.open_zarr(path, consolidated=False, **kwargs)
            for engine in ("h5netcdf", "scipy"):
                try:
                    return xr.open_dataset(path, engine=engine, **kwargs)
                except (OSError, ValueError, TypeError):
                    continue
        except Exception as err:  # zarr and xarray raise many unrelated types for a bad store
            raise InputError(f"cannot open dataset: {str(err).splitlines()[0]}", where=str(path)) from err
    raise InputError("cannot open dataset: not a NetCDF file xarray can read", where=str(path))


def _spatial_dims(array: xr.DataArray, *, where: str) -> tuple[str, str]:
    for y, x in SPATIAL_DIMS:
        if y in array.dims and x in array.dims:
            return y, x
    raise InputError(f"no spatial dimensions (y, x) among {list(array.dims)}", where=where)


def _fill_value(array: xr.DataArray) -> float | None:
    """A variable's nodata: its ``_FillValue``, ``nodata`` or ``missing_value``."""
    for key in ("_FillValue", "nodata", "missing_value"):
        value = array.attrs.get(key, array.encoding.get(key))
        if value is not None:
            return float(np.asarray(value).ravel()[0])
    return None


def _packing(array: xr.DataArray) -> tuple[float, float]:
    """A variable's CF ``scale_factor`` and ``add_offset`` (kept as attributes: the
    store is opened without mask_and_scale)."""
    scale, offset = (array.attrs.get(k, array.encoding.get(k, d)) for k, d in (("scale_factor", 1.0), ("add_offset", 0.0)))
    return float(np.asarray(scale).ravel()[0]), float(np.asarray(offset).ravel()[0])


def _has_spatial_dims(array: xr.DataArray) -> bool:
    return any(y in array.dims and x in array.dims for y, x in SPATIAL_DIMS)


def _select_array(
    ds: xr.Dataset, variable: str | None, *, nodata: float | None, where: str
) -> tuple[xr.DataArray, float | None]:
    """One ``(band, y, x)`` array and its nodata: the named variable, the only 3-D one, or
    2-D ones stacked.

    Stacked variables each keep their own fill value in the file; unless ``nodata`` is
    configured (it overrides them all), each is rewritten to one value for the scene.
    """
    if variable is not None:
        if variable not in ds.data_vars:
            raise InputError(
                f"no variable {variable!r}; variables are {', '.join(map(str, ds.data_vars))}",
                where=where,
            )
        candidates = [ds[variable]]
    else:
        candidates = [v for v in ds.data_vars.values() if v.ndim in (2, 3)]
    if not candidates:
        raise InputError("no 2-D or 3-D data variable", where=where)
    three_d = [v for v in candidates if v.ndim == 3]
    if three_d:
        if len(three_d) > 1:
            names = ", ".join(str(v.name) for v in three_d)
            raise InputError(f"several 3-D variables ({names}); set data.variable (inspect: --variable)", where=where)
        array = three_d[0]
        y, x = _spatial_dims(array, where=where)
        band_dim = next(d for d in array.dims if d not in (y, x))
        return array.transpose(band_dim, y, x), _fill_value(array)
    # Several 2-D variables on one grid are taken as bands, named after the variables.
    # Those without spatial dimensions (e.g. CF bounds such as time_bnds) cannot be bands.
    spatial = [v for v in candidates if _has_spatial_dims(v)] or candidates
    y, x = _spatial_dims(spatial[0], where=where)
    others = [v for v in spatial if set(v.dims) != {y, x}]
    if others:
        raise InputError(
            f"2-D variables on different dimensions ({spatial[0].name} on {y}, {x}; "
            f"{others[0].name} on {', '.join(map(str, others[0].dims))}); "
            "set data.variable (inspect: --variable) to read one",
            where=where,
        )
    own = [_fill_value(v) for v in spatial]
    dtype = np.result_type(*(v.dtype for v in spatial))
    shared = nodata if nodata is not None else shared_nodata(own, first=0, dtype=dtype, uncovered=False)
    if nodata is None:
        # In the type the stack has anyway, which can hold the shared value.
        spatial = [
            v.copy(data=fill_as(v.data.astype(dtype), own=fill, nodata=shared))
            for v, fill in zip(spatial, own, strict=True)
        ]
    stacked = xr.concat(
        [v.transpose(y, x) for v in spatial], dim="band", coords="minimal", compat="override"
    )
    return stacked.assign_coords(band=[str(v.name) for v in spatial]), shared


def _check_even_spacing(array: xr.DataArray, dim: Hashable, *, where: str) -> None:
    """A grid needs evenly spaced coordinates; uneven ones would get an average pixel size
    and misplace every output pixel."""
    if dim not in array.coords or array.sizes[dim] < 3:
        return
    values = np.asarray(array.coords[dim].values)
    if not np.issubdtype(values.dtype, np.number):
        return  # grid_of's transform fails on these, with its own message
    coords = values.astype(np.float64)
    step = (coords[-1] - coords[0]) / (len(coords) - 1)
    # A tenth of a pixel off the line through the ends, plus the rounding of the stored
    # type (float32 UTM northings are only 0.5 m apart).
    rounding = 2 * np.finfo(values.dtype).eps * np.abs(coords).max() if values.dtype.kind == "f" else 0.0
    off = np.abs(coords - (coords[0] + step * np.arange(len(coords)))).max()
    if step == 0 or off > 0.1 * abs(step) + rounding:
        steps = np.diff(coords)
        raise InputError(
            f"the {dim} coordinates are not evenly spaced (steps from {steps.min():.6g} to {steps.max():.6g}); "
            "resample the data onto a regular grid first",
            where=where,
        )


def grid_of(array: xr.DataArray, *, where: str) -> Grid:
    """The grid of a ``(band, y, x)`` array, from its CRS and (y, x) coordinates.

    rioxarray itself falls back to the identity transform where the coordinates are
    missing or an axis is one pixel long, as GDAL does for an ungeoreferenced file.

    Raises:
        InputError: The coordinates cannot be read as a grid (e.g. they are not numbers).
    """
    y, x = array.dims[1], array.dims[2]
    for dim in (y, x):
        _check_even_spacing(array, dim, where=where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crs = array.rio.crs
        try:
            transform = array.rio.set_spatial_dims(x_dim=x, y_dim=y).rio.transform(recalc=True)
        # rioxarray and numpy raise assorted types for unusable coordinates; an identity
        # transform here would silently misplace every output.
        except Exception as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(
                f"cannot derive the grid from the {y}/{x} coordinates: {detail}", where=where
            ) from err
    if crs is None and _geographic(array, y=y, x=x):
        # CF latitude/longitude coordinates without a grid mapping: WGS 84, as GDAL's
        # netCDF driver takes them, rather than outputs without any CRS.
        crs = CRS.from_epsg(4326)
    return Grid(height=array.sizes[y], width=array.sizes[x], transform=transform, crs=crs)


def _geographic(array: xr.DataArray, *, y: Hashable, x: Hashable) -> bool:
    """Whether the (y, x) dimensions are latitude and longitude in degrees."""
    if (y, x) not in SPATIAL_DIMS[1:] or y not in array.coords or x not in array.coords:
        return False
    lat, lon = np.asarray(array[y].values, dtype=float), np.asarray(array[x].values, dtype=float)
    return bool(np.abs(lat).max() <= 90 and lon.min() >= -180 and lon.max() <= 360)


def open_xarray(
    path: Path,
    *,
    variable: str | None = None,
    bands: Sequence[int | str] | None = None,
    nodata: float | None = None,
    valid_range: Sequence[float] | None = None,
    patch_size: int = 32,
    chunk_target: int = DEFAULT_CHUNK_TARGET,
    scene_id: str | None = None,
) -> Scene:
    """Open a Zarr store or NetCDF file as a lazy :class:`Scene`.

    The variable is ``variable`` if given, else the only 3-D variable, else all 2-D
    variables stacked as bands. Nodata comes from ``nodata``, else the variable's
    ``_FillValue``/``nodata`` attribute; stacked variables' fill values become one value
    (the first's where it has one). Band names come from the band coordinate.
    """
    where = str(path)
    ds = _open_dataset(path)
    array, file_nodata = _select_array(ds, variable, nodata=nodata, where=where)
    grid = grid_of(array, where=where)
    if array.dims[0] in array.coords:
        names = [str(v) for v in array.coords[array.dims[0]].values]
    else:
        names = [f"B{i}" for i in range(1, array.shape[0] + 1)]
    stored = array.encoding.get("chunks") or array.encoding.get("preferred_chunks")
    if isinstance(stored, dict):
        stored = tuple(stored.get(d, array.sizes[d]) for d in array.dims)
    block = (int(stored[1]), int(stored[2])) if stored else grid.shape
    chunks = aligned_chunks(shape=grid.shape, block=block, patch=patch_size, target=chunk_target)
    data = array.data.rechunk((-1, chunks[0], chunks[1]))
    return build_scene(
        id=scene_id or path.stem,
        data=data,
        grid=grid,
        band_names=names,
        file_nodata=file_nodata,
        nodata=nodata,
        valid_range=valid_range,
        bands=bands,
        source=where,
        packing=[_packing(ds[n] if n in ds.data_vars and ds[n].ndim == 2 else array) for n in names],
    )
