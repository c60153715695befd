"""Scenes made of single-band files, stacked lazily onto the grid of a reference band.

Bands at the reference grid are read as they are. Any other band is read through a
GDAL warped VRT onto the reference grid, so resampling happens block by block as Dask
reads, never on a whole scene in memory. The method depends on direction:

* **coarsening** (the band is finer than the reference, e.g. 10 m onto 20 m): ``average``,
  the area-weighted mean of the fine pixels, nodata excluded;
* **refining** (the band is coarser, e.g. 60 m onto 10 m): ``bilinear`` by default,
  configurable (``nearest``, ``cubic``...).

Files in another CRS are refused unless ``reproject: true`` is set for the scene.

Each band is masked with its own file's nodata (unless ``data.nodata`` overrides them all):
its fill, and the pixels of the reference grid it does not cover, are given the scene's
one nodata value (see :func:`~sitfuse_byol.read.scene.shared_nodata`). A band that covers
no pixel of the reference grid is refused.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

from sitfuse_byol.errors import InputError
from sitfuse_byol.grid import Grid
from sitfuse_byol.read.chunking import DEFAULT_CHUNK_TARGET, aligned_chunks
from sitfuse_byol.read.geotiff import (
    apply_dataset_mask,
    check_has_bands,
    check_not_truncated,
    has_dataset_mask,
    open_dataset,
    open_lazy,
)
from sitfuse_byol.read.scene import Scene, build_scene, fill_as, shared_nodata

log = logging.getLogger("sitfuse_byol.read")

RESAMPLING_NAMES = {r.name for r in Resampling}

#: Band files already warned about for covering only part of their reference grid.
_warned_partial: set[Path] = set()


@dataclass(frozen=True)
class MultiFileSpec:
    """A scene of single-band files, as written in a scene list or scene YAML.

    Attributes:
        id: Scene id.
        files: One file per band.
        names: Band names; file stems by default.
        reference: 0-based position of the band whose grid the others are resampled onto;
            ``None`` picks the first band of finest resolution.
        refine: Resampling used when a band is coarser than the reference.
        coarsen: Resampling used when a band is finer than the reference.
        reproject: Allow bands in another CRS to be warped onto the reference grid.
    """

    id: str
    files: tuple[Path, ...]
    names: tuple[str, ...] = ()
    reference: int | None = None
    refine: str = "bilinear"
    coarsen: str = "average"
    reproject: bool = False

    @classmethod
    def from_mapping(cls, entry: Mapping, *, base: Path, where: str) -> MultiFileSpec:
        """Parse ``{id: NAME, bands: [file, ...], ...}``; relative paths are taken from ``base``."""
        known = {"id", "bands", "names", "reference", "resampling", "reproject"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise InputError(f"unknown key {unknown[0]!r} in multi-file scene", where=where)
        if not isinstance(entry.get("id"), str) or not entry["id"]:
            raise InputError("multi-file scene needs a string 'id'", where=where)
        files = entry.get("bands")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise InputError("multi-file scene needs 'bands': a list of files", where=where)
        names = entry.get("names") or [Path(f).stem for f in files]
        if not isinstance(names, list) or not all(isinstance(n, str | int) and not isinstance(n, bool) for n in names):
            raise InputError("'names' must be a list of band names", where=where)
        if len(names) != len(files):
            raise InputError(f"{len(names)} names for {len(files)} band files", where=where)
        resampling = entry.get("resampling") or {}
        if not isinstance(resampling, Mapping) or set(resampling) - {"refine", "coarsen"}:
            raise InputError(
                "'resampling' must be a mapping with 'refine' and/or 'coarsen' (e.g. {refine: cubic})", where=where
            )
        refine = resampling.get("refine", "bilinear")
        coarsen = resampling.get("coarsen", "average")
        for method in (refine, coarsen):
            if not isinstance(method, str) or method not in RESAMPLING_NAMES:
                raise InputError(
                    f"unknown resampling {method!r}; use one of {', '.join(sorted(RESAMPLING_NAMES))}", where=where
                )
        reference = entry.get("reference")
        if isinstance(reference, str):
            if reference not in names:
                raise InputError(f"reference band {reference!r} is not a band name", where=where)
            reference = list(names).index(reference)
        elif reference is not None and (isinstance(reference, bool) or not isinstance(reference, int)):
            raise InputError(
                f"'reference' must be a band name or a 0-based band position, got {reference!r}", where=where
            )
        if not isinstance(entry.get("reproject", False), bool):
            raise InputError("'reproject' must be true or false", where=where)
        return cls(
            id=entry["id"],
            files=tuple((base / f) for f in files),
            names=tuple(str(n) for n in names),
            reference=reference,
            refine=refine,
            coarsen=coarsen,
            reproject=bool(entry.get("reproject", False)),
        )


def open_multifile(
    spec: MultiFileSpec,
    *,
    bands: Sequence[int | str] | None = None,
    nodata: float | None = None,
    valid_range: Sequence[float] | None = None,
    patch_size: int = 32,
    chunk_target: int = DEFAULT_CHUNK_TARGET,
) -> Scene:
    """Open a multi-file scene as one lazy ``(band, y, x)`` :class:`Scene` on the reference grid."""
    where = spec.id
    profiles = []
    for path in spec.files:
        with open_dataset(path) as src:
            check_not_truncated(src, where=str(path))
            check_has_bands(src, where=str(path))
            if src.count != 1:
                raise InputError(f"expected a single-band file, found {src.count} bands", where=str(path))
            profiles.append(
                {
                    "grid": Grid.of_dataset(src),
                    "nodata": src.nodata,
                    "block": src.block_shapes[0],
                    "dtype": src.dtypes[0],
                    "packing": (src.scales[0], src.offsets[0]),
                    "masked": has_dataset_mask(src),
                }
            )
    dtypes = {p["dtype"] for p in profiles}
    if len(dtypes) > 1:
        raise InputError(f"band files have different data types: {sorted(dtypes)}", where=where)
    ref_pos = spec.reference
    if ref_pos is None:
        ref_pos = min(range(len(profiles)), key=lambda i: profiles[i]["grid"].res[0])
    if not 0 <= ref_pos < len(profiles):
        raise InputError(f"reference band {ref_pos} out of range", where=where)
    ref = profiles[ref_pos]["grid"]
    for path, profile in zip(spec.files, profiles, strict=True):
        crs = profile["grid"].crs
        if crs != ref.crs and None in (crs, ref.crs):
            raise InputError(
                f"band files have {_crs_name(crs)} and {_crs_name(ref.crs)}: a band file without a CRS "
                "cannot be placed on another's grid (give it one, e.g. gdal_edit.py -a_srs)",
                where=str(path),
            )
        if crs != ref.crs and not spec.reproject:
            raise InputError(
                f"band files have different CRSs ({_crs_name(crs)} and {_crs_name(ref.crs)}); "
                "set reproject: true to warp them onto the reference grid",
                where=str(path),
            )
    coverage = [
        _coverage(profile["grid"], ref, where=str(path))
        for path, profile in zip(spec.files, profiles, strict=True)
    ]
    # A configured nodata overrides every file's; otherwise each band's own fill, and the
    # pixels a band does not cover, get one scene-wide value that the valid mask knows. So
    # do the pixels a warped band's mask hides: GDAL's warper writes the nodata there.
    warped_masked = any(p["masked"] and not p["grid"].same_as(ref) for p in profiles)
    scene_nodata = nodata if nodata is not None else shared_nodata(
        [p["nodata"] for p in profiles],
        first=ref_pos,
        dtype=np.dtype(profiles[ref_pos]["dtype"]),
        uncovered=min(coverage) < 1 or warped_masked,
    )
    for path, fraction in zip(spec.files, coverage, strict=True):
        if fraction < 1:
            _warn_partial(path, fraction=fraction, nodata=scene_nodata)
    chunks = aligned_chunks(
        shape=ref.shape, block=profiles[ref_pos]["block"], patch=patch_size, target=chunk_target
    )
    band_arrays = [
        _band_array(
            path,
            profile,
            ref=ref,
            chunks=chunks,
            spec=spec,
            src_nodata=nodata if nodata is not None else profile["nodata"],
            nodata=scene_nodata,
        )
        for path, profile in zip(spec.files, profiles, strict=True)
    ]
    return build_scene(
        id=spec.id,
        data=da.concatenate(band_arrays, axis=0).rechunk({0: -1}),
        grid=ref,
        band_names=spec.names,
        file_nodata=scene_nodata,
        nodata=nodata,
        valid_range=valid_range,
        bands=bands,
        source=where,
        packing=[p["packing"] for p in profiles],
    )


def _coverage(grid: Grid, ref: Grid, *, where: str) -> float:
    """The fraction of the reference grid's pixels whose centres lie inside a band's
    bounds: the pixels a warped read fills. (By area, a 15 m band half a 30 m pixel
    short of the grid, as a panchromatic band can be, would count as a gap.)

    Raises:
        InputError: The band covers no pixel of the reference grid.
    """
    bounds = grid.bounds
    if grid.crs != ref.crs and grid.crs is not None and ref.crs is not None:
        bounds = transform_bounds(grid.crs, ref.crs, *bounds)
    left, bottom, right, top = ref.bounds
    xs = left + (np.arange(ref.width) + 0.5) * (right - left) / ref.width
    ys = bottom + (np.arange(ref.height) + 0.5) * (top - bottom) / ref.height
    inside_x = int(((xs >= bounds[0]) & (xs <= bounds[2])).sum())
    inside_y = int(((ys >= bounds[1]) & (ys <= bounds[3])).sum())
    if inside_x == 0 or inside_y == 0:
        raise InputError(
            f"band file covers no pixel of the reference grid (bounds {_format_bounds(bounds)} "
            f"and {_format_bounds(ref.bounds)})",
            where=where,
        )
    return inside_x * inside_y / (ref.width * ref.height)


def _format_bounds(bounds: Sequence[float]) -> str:
    return ", ".join(f"{v:.6g}" for v in bounds)


def _warn_partial(path: Path, *, fraction: float, nodata: float | None) -> None:
    """Warn that a band covers only part of the grid, once per file: scenes are opened
    again by each stage and task, and one warning says it all."""
    key = path.resolve()
    if key in _warned_partial:
        return
    _warned_partial.add(key)
    # Rounded down, so a band that misses a sliver never reads as 100%.
    percent = math.floor(fraction * 1000) / 10
    log.warning(
        "warning: band file covers %g%% of the reference grid; the pixels it misses are "
        "marked invalid with nodata %g (%s)",
        percent,
        nodata,
        path,
    )


def _crs_name(crs: rasterio.crs.CRS | None) -> str:
    if crs is None:
        return "no CRS"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def _band_array(
    path: Path,
    profile: dict,
    *,
    ref: Grid,
    chunks: tuple[int, int],
    spec: MultiFileSpec,
    src_nodata: float | None,
    nodata: float | None,
) -> da.Array:
    """One band on the reference grid, its fill and the pixels it does not cover set to
    ``nodata`` (the scene's); ``src_nodata`` is the fill it has in its file."""
    dask_chunks = {"band": 1, "y": chunks[0], "x": chunks[1]}
    grid: Grid = profile["grid"]
    if grid.same_as(ref):
        array = open_lazy(path, chunks=dask_chunks)
        if profile["masked"]:
            array = apply_dataset_mask(array, path)
        return fill_as(array, own=src_nodata, nodata=nodata)
    method = spec.coarsen if grid.res[0] < ref.res[0] else spec.refine
    # rioxarray keeps the VRT's parameters and reopens it per read, so these handles
    # can close here instead of staying open for the life of the scene.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src, WarpedVRT(
            src,
            crs=ref.crs,
            transform=ref.transform,
            width=ref.width,
            height=ref.height,
            resampling=Resampling[method],
            src_nodata=src_nodata,
            nodata=nodata,
        ) as vrt:
            return open_lazy(vrt, chunks=dask_chunks)
