"""A one-screen description of a scene, for ``sitfuse inspect``."""

from __future__ import annotations

from typing import Any

import numpy as np

from sitfuse_byol.read.scene import Scene, bands_without_data, reading


def describe_scene(scene: Scene) -> dict[str, Any]:
    """The facts ``sitfuse inspect`` prints; computes the valid fraction with Dask."""
    with reading(scene.source):
        valid_fraction = float(scene.valid.mean().compute()) if scene.valid.size else 0.0
    # One band without data leaves no pixel valid; say which, or the user hunts for it.
    empty = bands_without_data(scene) if valid_fraction == 0 and scene.valid.size else []
    nodata = scene.nodata
    grid = scene.grid.to_dict()
    return {
        "id": scene.id,
        "bands": list(scene.band_names),
        "dtype": str(scene.dtype),
        # The grid's shape is (y, x); inspect shows the band axis too.
        "shape": [int(v) for v in scene.data.shape],
        "chunks": [scene.n_bands, *scene.chunks],
        "crs": grid["crs"],
        "transform": grid["transform"],
        "res": grid["res"],
        "bounds": grid["bounds"],
        # JSON has no NaN: "nan", as gdalinfo -json writes it.
        "nodata": "nan" if nodata is not None and np.isnan(nodata) else nodata,
        "valid_fraction": valid_fraction,
        "bands_without_data": empty,
    }


INSPECT_JSON_KEYS = (
    "id",
    "bands",
    "dtype",
    "shape",
    "crs",
    "transform",
    "res",
    "bounds",
    "nodata",
    "valid_fraction",
    "bands_without_data",
)


def _empty_bands_text(empty: list[str], bands: list[str]) -> str:
    if not empty or len(empty) == len(bands):
        return ""
    return f"  (no valid pixel in {', '.join(empty)}: leave {'them' if len(empty) > 1 else 'it'} out with data.bands)"


def _nodata_text(nodata: float | str | None) -> str:
    if nodata is None:
        return "none"
    return nodata if isinstance(nodata, str) else f"{nodata:g}"


def format_description(info: dict[str, Any]) -> str:
    """Aligned ``key: value`` lines for people."""
    crs = info["crs"]
    if crs and len(crs) > 60:
        crs = crs[:57] + "..."
    rows = [
        ("id", info["id"]),
        ("bands", f"{len(info['bands'])}: {', '.join(info['bands'])}"),
        ("dtype", info["dtype"]),
        ("shape", " x ".join(map(str, info["shape"])) + "  (band, y, x)"),
        ("chunks", " x ".join(map(str, info["chunks"]))),
        ("crs", crs if crs else "none (not georeferenced)"),
        # 10 digits: a UTM northing to the millimetre (7 before the decimal point).
        ("transform", ", ".join(f"{v:.10g}" for v in info["transform"])),
        ("resolution", f"{info['res'][0]:g} x {info['res'][1]:g}"),
        ("bounds", ", ".join(f"{v:.10g}" for v in info["bounds"])),
        ("nodata", _nodata_text(info["nodata"])),
        ("valid", f"{info['valid_fraction']:.2%}" + _empty_bands_text(info["bands_without_data"], info["bands"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
