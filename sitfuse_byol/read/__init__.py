"""Read: lazy, Dask-backed scenes from GeoTIFF, Zarr, NetCDF and multi-file band sets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from sitfuse_byol.errors import InputError
from sitfuse_byol.read.chunking import DEFAULT_CHUNK_TARGET
from sitfuse_byol.read.geotiff import open_geotiff
from sitfuse_byol.read.multifile import MultiFileSpec, open_multifile
from sitfuse_byol.read.scene import Scene, reading, unscaled, valid_block
from sitfuse_byol.read.scene_list import SceneRef, resolve_scene_list
from sitfuse_byol.read.xarray_store import NETCDF_SUFFIXES, open_xarray

__all__ = [
    "Scene",
    "SceneRef",
    "open_scene",
    "open_scene_from_config",
    "open_scenes_from_config",
    "reading",
    "resolve_scene_list",
    "valid_block",
]


class _OpenOptions(TypedDict):
    """The options every reader takes, passed on unchanged by :func:`open_scene`."""

    bands: Sequence[int | str] | None
    nodata: float | None
    valid_range: Sequence[float] | None
    patch_size: int
    chunk_target: int


def open_scene(
    scene: SceneRef | Path | MultiFileSpec,
    *,
    bands: Sequence[int | str] | None = None,
    nodata: float | None = None,
    valid_range: Sequence[float] | None = None,
    variable: str | None = None,
    patch_size: int = 32,
    chunk_target: int = DEFAULT_CHUNK_TARGET,
    unscale: bool = False,
) -> Scene:
    """Open any supported scene lazily; no pixel is read.

    Args:
        scene: A scene list entry, a raster path or a multi-file scene.
        bands: 1-based band indices or band names to keep (all when ``None``).
        nodata: Overrides the file's nodata.
        valid_range: Inclusive ``[min, max]`` of valid values.
        variable: For Zarr/NetCDF, the variable to read.
        patch_size: Chunks are aligned to it.
        chunk_target: Preferred chunk edge in pixels.
        unscale: Apply the files' scale and offset (see :func:`~sitfuse_byol.read.scene.unscaled`);
            ``valid_range`` is then in physical units.

    Raises:
        InputError: The scene cannot be opened or the selection does not fit it; when
            ``scene`` is a :class:`SceneRef`, the message names the list entry.
    """
    spec = scene.spec if isinstance(scene, SceneRef) else scene
    common: _OpenOptions = {
        "bands": bands,
        "nodata": nodata,
        # Unscaled, the range is in physical units: applied after the scaling.
        "valid_range": None if unscale else valid_range,
        "patch_size": patch_size,
        "chunk_target": chunk_target,
    }
    try:
        if isinstance(spec, MultiFileSpec):
            opened = open_multifile(spec, **common)
        elif (path := Path(spec)).suffix.lower() in (".zarr", *NETCDF_SUFFIXES) or path.is_dir():
            opened = open_xarray(path, variable=variable, **common)
        else:
            opened = open_geotiff(path, **common)
        return unscaled(opened, valid_range=valid_range) if unscale else opened
    except InputError as err:
        if isinstance(scene, SceneRef) and scene.entry not in str(err.where):
            err.where = f"{scene.entry}: {err.where}" if err.where else scene.entry
        raise


def open_scenes_from_config(refs: Sequence[SceneRef], *, data: dict, patch_size: int) -> list[Scene]:
    """Open every scene of a list with the ``data`` section of a config; fails on the first bad one."""
    return [open_scene_from_config(ref, data=data, patch_size=patch_size) for ref in refs]


def open_scene_from_config(ref: SceneRef, *, data: dict, patch_size: int) -> Scene:
    """Open one scene with the ``data`` section of a config."""
    return open_scene(
        ref,
        bands=data["bands"],
        nodata=data["nodata"],
        valid_range=data["valid_range"],
        variable=data["variable"],
        patch_size=patch_size,
        chunk_target=data["chunk_size"],
        unscale=data["unscale"],
    )
