"""Lazy reading of Zarr stores and NetCDF files through xarray."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine
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
    is_zarr = path.suffix.lower() == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists()
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


#: The attributes that name a variable's missing-data values, the first found being its nodata.
FILL_KEYS = ("_FillValue", "nodata", "missing_value")


def _attribute(array: xr.DataArray, key: str) -> object:
    """An attribute, or the encoding entry xarray moved it to."""
    return array.attrs.get(key, array.encoding.get(key))


def _fill_value(array: xr.DataArray) -> float | None:
    """A variable's nodata: its ``_FillValue``, ``nodata`` or ``missing_value``."""
    return next((values[0] for key in FILL_KEYS if (values := _numbers(_attribute(array, key)))), None)


def _packing(array: xr.DataArray) -> tuple[float, float]:
    """A variable's CF ``scale_factor`` and ``add_offset`` (kept as attributes: the
    store is opened without mask_and_scale)."""
    scale, offset = (_numbers(_attribute(array, key)) or [default] for key, default in (("scale_factor", 1.0), ("add_offset", 0.0)))
    return scale[0], offset[0]


def _has_spatial_dims(array: xr.DataArray) -> bool:
    return any(y in array.dims and x in array.dims for y, x in SPATIAL_DIMS)


def _is_time(array: xr.DataArray, dim: Hashable) -> bool:
    return str(dim).lower() in ("time", "t") or (
        dim in array.coords and np.issubdtype(array.coords[dim].dtype, np.datetime64)
    )


def _squeezed(array: xr.DataArray) -> xr.DataArray:
    """The variable without its length-1 time dimension, or without any length-1
    dimension besides the spatial ones when it has more than one: one date of a
    time series, ``(time=1, y, x)`` bands or a ``(time=1, band, y, x)`` cube."""
    spatial = next(((y, x) for y, x in SPATIAL_DIMS if y in array.dims and x in array.dims), ())
    extra = [d for d in array.dims if d not in spatial]
    # A time series (time > 1) is never turned into bands by dropping its band axis.
    series = any(_is_time(array, d) and array.sizes[d] > 1 for d in extra)
    drop = [
        d for d in extra if array.sizes[d] == 1 and (_is_time(array, d) or (len(extra) > 1 and not series))
    ]
    return array.squeeze(drop) if drop else array


def _is_auxiliary(array: xr.DataArray) -> bool:
    """Latitude and longitude stored as data variables (2-D swath or curvilinear
    coordinates not named in a ``coordinates`` attribute): positions, not bands."""
    names = {"lat", "lon", "latitude", "longitude"}
    standard = str(array.attrs.get("standard_name", "")).lower()
    units = str(array.attrs.get("units", "")).lower().replace(" ", "_")
    return (
        str(array.name).lower() in names
        or standard in ("latitude", "longitude")
        or units in ("degrees_north", "degree_north", "degrees_east", "degree_east")
    )


def _invalid_to_nodata(array: xr.DataArray, nodata: float | None, *, own: bool) -> xr.DataArray:
    """The variable with every value CF calls missing rewritten to the scene's ``nodata``.

    CF lets a variable mark missing data in more than one way at once: ``_FillValue``
    and ``missing_value`` (a value or a list), and ``valid_min``/``valid_max``/
    ``valid_range`` in stored units. ``own``: the file's fill values count (they do
    not when a configured nodata overrides them); the valid range always does.
    """
    if nodata is None:
        if not np.issubdtype(array.dtype, np.floating):
            return array
        nodata = float("nan")
    data = array.data
    if own:
        for key in FILL_KEYS:
            for value in _numbers(_attribute(array, key)):
                data = fill_as(data, own=value, nodata=nodata)
    low, high = _cf_valid_range(array)
    if low is not None or high is not None:
        below = data < low if low is not None else False
        above = data > high if high is not None else False
        data = da.where(below | above, np.array(nodata, dtype=data.dtype), data)
    return array.copy(data=data)


def _outside_valid_range(array: xr.DataArray) -> float | None:
    """A nodata for an integer variable with a CF valid range and no fill value: the
    type's largest (or smallest) value, when it lies outside the range."""
    low, high = _cf_valid_range(array)
    if np.issubdtype(array.dtype, np.floating) or (low is None and high is None):
        return None
    info = np.iinfo(array.dtype)
    if high is not None and info.max > high:
        return float(info.max)
    if low is not None and info.min < low:
        return float(info.min)
    return None


def _cf_valid_range(array: xr.DataArray) -> tuple[float | None, float | None]:
    """A variable's CF valid range in stored units: ``valid_range``, else ``valid_min``
    and ``valid_max`` (either may be absent)."""
    if len(pair := _numbers(array.attrs.get("valid_range"))) == 2:
        return pair[0], pair[1]
    low, high = (_numbers(array.attrs.get(key)) for key in ("valid_min", "valid_max"))
    return (low[0] if low else None), (high[0] if high else None)


def _numbers(value: object) -> list[float]:
    """An attribute's numbers (none for a missing or non-numeric one)."""
    if value is None:
        return []
    try:
        return [float(v) for v in np.ravel(np.asarray(value, dtype=np.float64))]
    except (TypeError, ValueError):
        return []


def _select_array(
    ds: xr.Dataset, variable: str | None, *, nodata: float | None, where: str
) -> tuple[xr.DataArray, float | None, list[xr.DataArray]]:
    """One ``(band, y, x)`` array and its nodata: the named variable, the only 3-D one, or
    2-D ones stacked; plus the variable each band comes from (for its packing).

    Stacked variables each keep their own fill value in the file; unless ``nodata`` is
    configured (it overrides them all), each is rewritten to one value for the scene.
    Values outside a variable's CF valid range become nodata too.
    """
    if variable is not None:
        if variable not in ds.data_vars:
            raise InputError(
                f"no variable {variable!r}; variables are {', '.join(map(str, ds.data_vars))}",
                where=where,
            )
        candidates = [_squeezed(ds[variable])]
        if candidates[0].ndim not in (2, 3):
            raise InputError(
                f"variable {variable!r} has dimensions ({', '.join(map(str, candidates[0].dims))}); a scene is "
                "one (band, y, x) cube or 2-D bands: select or average the others first",
                where=where,
            )
    else:
        squeezed = [_squeezed(v) for v in ds.data_vars.values() if not _is_auxiliary(v)]
        candidates = [v for v in squeezed if v.ndim in (2, 3)]
        if not candidates:
            more = [v for v in squeezed if v.ndim > 3]
            detail = f" ({more[0].name} has dimensions {', '.join(map(str, more[0].dims))})" if more else ""
            raise InputError(f"no 2-D or 3-D data variable{detail}{_missing_zarr_metadata(where)}", where=where)
    three_d = [v for v in candidates if v.ndim == 3]
    if three_d:
        if len(three_d) > 1:
            names = ", ".join(str(v.name) for v in three_d)
            raise InputError(f"several 3-D variables ({names}); set data.variable (inspect: --variable)", where=where)
        array = three_d[0]
        y, x = _spatial_dims(array, where=where)
        band_dim = next(d for d in array.dims if d not in (y, x))
        fill = _fill_value(array)
        if fill is None:
            fill = _outside_valid_range(array)
        array = _invalid_to_nodata(array, nodata if nodata is not None else fill, own=nodata is None)
        return array.transpose(band_dim, y, x), fill, [array] * array.sizes[band_dim]
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
    own = [fill if (fill := _fill_value(v)) is not None else _outside_valid_range(v) for v in spatial]
    dtype = np.result_type(*(v.dtype for v in spatial))
    shared = nodata if nodata is not None else shared_nodata(own, first=0, dtype=dtype, uncovered=False)
    # In the type the stack has anyway, which can hold the shared value.
    bands = [_invalid_to_nodata(v.astype(dtype), shared, own=nodata is None) for v in spatial]
    stacked = xr.concat(
        [v.transpose(y, x) for v in bands], dim="band", coords="minimal", compat="override"
    )
    return stacked.assign_coords(band=[str(v.name) for v in spatial]), shared, spatial


def _missing_zarr_metadata(where: str) -> str:
    """Names the arrays of a Zarr store that lost their metadata (which xarray skips)."""
    store = Path(where)
    if not store.is_dir():
        return ""
    lost = sorted(
        child.name
        for child in store.iterdir()
        if child.is_dir() and not any((child / name).exists() for name in ("zarr.json", ".zarray", ".zgroup"))
    )
    return f"; {', '.join(lost)}: no array metadata (zarr.json or .zarray), the store is damaged" if lost else ""


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
    if (scale := _to_crs_units(array, y=y, x=x, crs=crs, where=where)) != 1:
        transform = Affine.scale(scale) * transform
    return Grid(height=array.sizes[y], width=array.sizes[x], transform=transform, crs=crs)


KILOMETRES = ("km", "kilometre", "kilometres", "kilometer", "kilometers")
METRES = ("m", "metre", "metres", "meter", "meters")


def _to_crs_units(array: xr.DataArray, *, y: Hashable, x: Hashable, crs: CRS | None, where: str) -> float:
    """The factor from the x/y coordinates' units to the CRS's: 1000 for kilometres on
    a CRS in metres (Daymet and other CF grids store km), else 1.

    Raises:
        InputError: The coordinates are in kilometres on a CRS in other units, or the
            two axes are in different units.
    """
    units = [str(array.coords[d].attrs.get("units", "")).strip().lower() if d in array.coords else "" for d in (y, x)]
    in_km = [u in KILOMETRES for u in units]
    if not any(in_km) or crs is None or not crs.is_projected:
        return 1.0
    if not all(in_km):
        raise InputError(f"the {y} and {x} coordinates are in different units ({units[0]!r}, {units[1]!r})", where=where)
    if str(crs.linear_units).lower() in KILOMETRES:
        return 1.0
    if str(crs.linear_units).lower() not in METRES:
        raise InputError(
            f"the {y}/{x} coordinates are in km but the CRS is in {crs.linear_units}; convert them first", where=where
        )
    return 1000.0


def _geographic(array: xr.DataArray, *, y: Hashable, x: Hashable) -> bool:
    """Whether the (y, x) dimensions are latitude and longitude in degrees."""
    if (y, x) not in SPATIAL_DIMS[1:] or y not in array.coords or x not in array.coords:
        return False
    lat, lon = np.asarray(array[y].values, dtype=float), np.asarray(array[x].values, dtype=float)
    return bool(np.abs(lat).max() <= 90 and lon.min() >= -180 and lon.max() <= 360)


def _north_up(array: xr.DataArray) -> xr.DataArray:
    """A ``(band, y, x)`` array stored south row first (y ascending, as many NetCDF
    products are) turned north up, lazily, as GDAL's netCDF driver does: outputs are then
    north-up rasters, and quicklooks are not upside down."""
    y = array.dims[1]
    if y not in array.coords or array.sizes[y] < 2:
        return array
    values = np.asarray(array.coords[y].values)
    if not np.issubdtype(values.dtype, np.number) or values[1] <= values[0]:
        return array
    return array.isel({y: slice(None, None, -1)})


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
    array, file_nodata, sources = _select_array(ds, variable, nodata=nodata, where=where)
    array = _north_up(array)
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
        packing=[_packing(source) for source in sources],
    )
