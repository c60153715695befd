"""Read class polygons drawn in QGIS and burn them into label-raster windows.

A user draws polygons of known classes over the cluster maps, saves them as a
GeoPackage, Shapefile or GeoJSON, and names the attribute that holds each
polygon's class. This module reads them with :mod:`pyogrio.raw` (no geopandas),
checks them, reprojects them into a label raster's CRS and rasterizes them
window by window, so that a few small polygons on a very large scene never cost
more memory than the pixels they cover. Needs the ``gis`` extra (pyogrio, shapely).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pyogrio.errors
import pyogrio.raw
import rasterio.features
import rasterio.warp
import shapely
import shapely.geometry
from rasterio._err import CPLE_BaseError  # PROJ failures; rasterio exports it nowhere public
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError
from rasterio.windows import Window
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from sitfuse_byol.errors import InputError
from sitfuse_byol.grid import Grid

#: The class of clusters that no class dominates; no polygon may use the name.
UNCERTAIN = "uncertain"

#: The most pixels burnt and read at once; counting one such window peaks near 40 MB.
MAX_WINDOW_PIXELS = 1 << 20

_NO_CRS_MESSAGE = "polygon file has no CRS; save it with a CRS in QGIS (Layer › Save As › CRS)"


def class_order(name: str) -> tuple[int, float, str]:
    """Sort key of class names: numbers (land-cover codes such as 11, 21, 41) by value,
    then words alphabetically; as text, "100" would come before "21"."""
    try:
        value = float(name)
    except ValueError:
        return (1, 0.0, name)
    return (0, value, name) if math.isfinite(value) else (1, 0.0, name)


@dataclass(frozen=True)
class ClassPolygons:
    """Polygons of known classes, as read from a vector file.

    Attributes:
        path: The vector file.
        geometries: One polygonal shapely geometry per feature, in ``crs``, in file order.
        classes: The class name of each feature.
        crs: The file's CRS as ``"EPSG:n"`` or WKT.
        class_names: The distinct class names, sorted.
        notes: Things a user should know about the file, e.g. skipped features.
    """

    path: Path
    geometries: list[shapely.Geometry]
    classes: list[str]
    crs: str
    class_names: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)

    def class_indices(self) -> np.ndarray:
        """The index of each feature's class in :attr:`class_names`, as int64."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return np.array([index[c] for c in self.classes], dtype=np.int64)


def _is_polygon_layer(geometry_type: str | None) -> bool:
    # "Unknown" is what GeoJSON and mixed layers report; their features are checked one by one.
    return geometry_type is not None and (
        "Polygon" in geometry_type or geometry_type.startswith(("Unknown", "GeometryCollection"))
    )


def _choose_layer(path: Path, layer: str | None) -> str:
    try:
        layers = pyogrio.list_layers(path)
    except pyogrio.errors.DataSourceError as exc:
        raise InputError(f"not a vector file GDAL can read: {exc}", where=str(path)) from exc
    names = [str(name) for name, _ in layers]
    if layer is not None:
        if layer not in names:
            raise InputError(
                f"no layer {layer!r} in polygon file; layers are: {', '.join(names)}",
                where=str(path),
            )
        return layer
    polygon_layers = [str(name) for name, kind in layers if _is_polygon_layer(kind)]
    if not polygon_layers:
        kinds = ", ".join(f"{name} ({kind})" for name, kind in layers) or "none"
        raise InputError(
            f"polygon file holds no polygon layer; layers are: {kinds}. "
            "Draw the classes as polygons, not points or lines",
            where=str(path),
        )
    if len(polygon_layers) > 1:
        raise InputError(
            f"polygon file has several polygon layers ({', '.join(polygon_layers)}); "
            "name the one with the classes with --layer",
            where=str(path),
        )
    return polygon_layers[0]


def _field_hint(field_name: str, fields: Sequence[str], dtypes: Sequence[str]) -> str:
    close = difflib.get_close_matches(field_name, fields, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    # With nothing similar, a lone text field is still the likely class attribute.
    text_fields = [f for f, t in zip(fields, dtypes, strict=True) if t == "object"]
    if len(text_fields) == 1:
        return f" (did you mean {text_fields[0]!r}?)"
    return ""


def _resolve_field(field_name: str, info: dict[str, Any], path: Path) -> str:
    fields = [str(f) for f in info["fields"]]
    if field_name in fields:
        return field_name
    # OGR matches field names case-insensitively, and Shapefile users often see "CLASS".
    folded = [f for f in fields if f.casefold() == field_name.casefold()]
    if len(folded) == 1:
        return folded[0]
    listed = ", ".join(fields) if fields else "(none)"
    hint = _field_hint(field_name, fields, [str(t) for t in info["dtypes"]])
    raise InputError(
        f"no field {field_name!r} in polygons; fields are: {listed}{hint}", where=str(path)
    )


def _class_name(value: Any) -> str | None:
    """A feature's class as text; ``None`` for an empty value."""
    if value is None:
        return None
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        # A numeric class code read as a float (Shapefile "Real") should read "3", not "3.0".
        if float(value).is_integer():
            value = int(value)
    text = str(value).strip()
    return text or None


def _polygons_in(geometry: shapely.Geometry | None) -> list[shapely.Polygon]:
    """The non-empty polygons a geometry holds, dropping points and lines."""
    if geometry is None or geometry.is_empty:
        return []
    if shapely.get_type_id(geometry) == shapely.GeometryType.POLYGON:
        return [geometry]
    if shapely.get_type_id(geometry) in (
        shapely.GeometryType.MULTIPOLYGON,
        shapely.GeometryType.GEOMETRYCOLLECTION,
    ):
        return [p for part in shapely.get_parts(geometry) for p in _polygons_in(part)]
    return []


def _polygonal_part(geometry: shapely.Geometry | None) -> shapely.Geometry | None:
    """A feature's geometry as a Polygon or MultiPolygon; ``None`` if it holds no polygon."""
    if geometry is None:
        return None
    if shapely.get_type_id(geometry) in (
        shapely.GeometryType.POLYGON,
        shapely.GeometryType.MULTIPOLYGON,
    ):
        return None if geometry.is_empty else geometry
    polygons = _polygons_in(geometry)
    return shapely.MultiPolygon(polygons) if polygons else None


def _crs_string(crs_text: str, path: Path) -> str:
    try:
        crs = CRS.from_user_input(crs_text)
    except CRSError as exc:
        raise InputError(
            f"cannot understand the polygon file's CRS: {exc}", where=str(path)
        ) from exc
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()


def read_class_polygons(path: Path, *, field: str, layer: str | None = None) -> ClassPolygons:
    """Read the class polygons a user drew, with their class names.

    Features whose geometry holds no polygon (points, lines, empty) and
    features with an empty class value are skipped and counted in
    :attr:`ClassPolygons.notes`. Numeric class values become text (``3``, not
    ``3.0``); surrounding spaces are removed.

    Args:
        path: A GeoPackage, Shapefile, GeoJSON or any other vector file GDAL reads.
        field: The attribute holding each polygon's class. A field that differs
            only in letter case is accepted, as OGR does.
        layer: The layer to read; by default the file's only polygon layer.

    Returns:
        The polygons in the file's CRS.

    Raises:
        InputError: If the file is missing or not a vector file, has no
            polygon layer or several, lacks the field (the message lists the
            fields), has no CRS, holds no polygon with a class, or uses the
            reserved class name ``"uncertain"``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("polygon file not found", where=str(path))
    layer = _choose_layer(path, layer)
    info = pyogrio.read_info(path, layer=layer)
    column = _resolve_field(field, info, path)
    if info["crs"] is None:
        raise InputError(_NO_CRS_MESSAGE, where=str(path))
    crs = _crs_string(info["crs"], path)
    _, _, wkb, (values,) = pyogrio.raw.read(path, layer=layer, columns=[column])

    geometries, classes = [], []
    not_polygons = empty_classes = 0
    parsed = shapely.from_wkb(wkb) if wkb is not None else []
    for geometry, value in zip(parsed, values, strict=True):
        polygon = _polygonal_part(geometry)
        if polygon is None:
            not_polygons += 1
            continue
        name = _class_name(value)
        if name is None:
            empty_classes += 1
            continue
        geometries.append(polygon)
        classes.append(name)

    notes = []
    if not_polygons:
        notes.append(f"skipped {not_polygons} feature(s) without a polygon (points, lines, empty)")
    if empty_classes:
        notes.append(f"skipped {empty_classes} polygon(s) with an empty {column!r}")
    if not geometries:
        if empty_classes:
            raise InputError(
                f"every polygon has an empty {column!r}; fill in the class of each polygon",
                where=str(path),
            )
        raise InputError(
            "polygon file holds no polygon features (only points, lines or empty geometries); "
            "draw the classes as polygons",
            where=str(path),
        )
    _check_geographic_range(geometries, crs, path)
    notes += _conflicting_overlaps(geometries, classes)
    if UNCERTAIN in classes:
        raise InputError(
            f"class name {UNCERTAIN!r} is reserved for clusters no class dominates; "
            "rename those polygons' class",
            where=str(path),
        )
    return ClassPolygons(
        path=path,
        geometries=geometries,
        classes=classes,
        crs=crs,
        class_names=sorted(set(classes), key=class_order),
        notes=notes,
    )


def _conflicting_overlaps(geometries: Sequence[shapely.Geometry], classes: Sequence[str]) -> list[str]:
    """A note when polygons of different classes overlap: their shared pixels count for the
    later one only (see :func:`burn_windows`), which a user who drew them should know."""
    # Hand-drawn layers hold self-intersecting rings, on which GEOS overlays fail.
    shapes = shapely.make_valid(np.array(geometries, dtype=object))
    first, second = shapely.STRtree(shapes).query(shapes, predicate="intersects")
    candidates = (first < second) & (np.array(classes)[first] != np.array(classes)[second])
    first, second = first[candidates], second[candidates]
    # Relative to the smaller polygon, so slivers that rounding leaves between polygons
    # drawn edge to edge (then reprojected) do not count.
    smaller = np.minimum(shapely.area(shapes[first]), shapely.area(shapes[second]))
    shared = shapely.area(shapely.intersection(shapes[first], shapes[second])) > 1e-6 * smaller
    first, second = first[shared], second[shared]
    if not len(first):
        return []
    i, j = int(first[0]), int(second[0])
    return [
        f"{len(first)} pair(s) of polygons of different classes overlap (e.g. a {classes[i]!r} and a "
        f"{classes[j]!r} polygon); where they do, the class of the later one in the file counts"
    ]


def _check_geographic_range(geometries: Sequence[shapely.Geometry], crs: str, path: Path) -> None:
    """Coordinates beyond ±180/±90 in a longitude/latitude CRS are projected coordinates
    under the wrong CRS, most often a GeoJSON without a ``crs`` member (WGS 84 by RFC 7946)
    saved from a projected layer."""
    if not CRS.from_user_input(crs).is_geographic:
        return
    west, south, east, north = shapely.total_bounds(np.array(geometries, dtype=object))
    if west < -180.5 or east > 360.5 or south < -90.5 or north > 90.5:
        raise InputError(
            f"polygon coordinates (x {west:.6g} to {east:.6g}, y {south:.6g} to {north:.6g}) are not "
            f"longitude/latitude, but the file's CRS is {crs} (a GeoJSON without a 'crs' member "
            "is read as WGS 84); save the polygons with their real CRS in QGIS (Layer › Save As › CRS)",
            where=str(path),
        )


def reproject_polygons(polygons: ClassPolygons, crs: CRS) -> list[shapely.Geometry]:
    """The polygons' geometries in another CRS, in feature order.

    Args:
        polygons: The class polygons.
        crs: The target CRS, e.g. a label raster's.

    Returns:
        One shapely geometry per feature.
    """
    source = CRS.from_user_input(polygons.crs)
    if source == crs:
        return list(polygons.geometries)
    try:
        moved = rasterio.warp.transform_geom(
            source, crs, [shapely.geometry.mapping(g) for g in polygons.geometries]
        )
    except (RasterioError, CPLE_BaseError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"cannot reproject the polygons from {polygons.crs} to the label raster's CRS: {message}",
            where=str(polygons.path),
        ) from exc
    return [shapely.geometry.shape(g) for g in moved]


def _pixel_windows(geometries: Sequence[shapely.Geometry], grid: Grid) -> np.ndarray:
    """``(n, 4)`` int64 ``[row0, row1, col0, col1)`` pixel boxes of each geometry, clipped
    to the grid; empty (row1 <= row0 or col1 <= col0) for geometries outside it."""
    bounds = shapely.bounds(np.array(geometries, dtype=object)).reshape(-1, 4)
    finite = np.isfinite(bounds).all(axis=1)
    bounds = np.where(finite[:, None], bounds, 0.0)
    xs = bounds[:, [0, 2, 2, 0]]
    ys = bounds[:, [1, 1, 3, 3]]
    # All four corners through the inverse transform, so rotated grids work too.
    inv = ~grid.transform
    cols = inv.a * xs + inv.b * ys + inv.c
    rows = inv.d * xs + inv.e * ys + inv.f
    # A pixel is burnt only if its centre lies inside a polygon, so floor/ceil of the
    # corner positions encloses every pixel a polygon can burn.
    boxes = np.stack(
        [
            np.clip(np.floor(rows.min(axis=1)), 0, grid.height),
            np.clip(np.ceil(rows.max(axis=1)), 0, grid.height),
            np.clip(np.floor(cols.min(axis=1)), 0, grid.width),
            np.clip(np.ceil(cols.max(axis=1)), 0, grid.width),
        ],
        axis=1,
    ).astype(np.int64)
    boxes[~finite] = 0
    return boxes


def _overlap_groups(boxes: np.ndarray) -> np.ndarray:
    """A group id per box such that boxes sharing a pixel share a group."""
    n = len(boxes)
    # Shrinking by a quarter pixel makes boxes that merely touch not intersect.
    shapes = shapely.box(
        boxes[:, 2] + 0.25, boxes[:, 0] + 0.25, boxes[:, 3] - 0.25, boxes[:, 1] - 0.25
    )
    pairs = shapely.STRtree(shapes).query(shapes, predicate="intersects")
    graph = coo_array((np.ones(pairs.shape[1], dtype=np.int8), (pairs[0], pairs[1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def burn_windows(
    geometries: Sequence[shapely.Geometry],
    class_indices: np.ndarray,
    *,
    grid: Grid,
    max_pixels: int = MAX_WINDOW_PIXELS,
) -> Iterator[tuple[Window, np.ndarray]]:
    """Rasterize polygons onto a grid, only in windows around them.

    Polygons whose pixel boxes share a pixel are rasterized together, in the
    window enclosing them; that window is cut into strips of at most
    ``max_pixels`` pixels (at least one row), so memory stays bounded even for
    a polygon covering a whole large scene. A pixel belongs to a polygon when
    its centre lies inside (``all_touched=False``). Where polygons overlap, the
    one later in ``geometries`` wins, as when QGIS draws the layer; every
    pixel appears in at most one window.

    Args:
        geometries: Polygons in the grid's CRS.
        class_indices: The class index (``>= 0``) of each polygon.
        grid: The raster grid to burn onto.
        max_pixels: The most pixels in one yielded window.

    Yields:
        ``(window, burnt)``: a window of the grid and an int32 array of its
        shape holding ``class index + 1`` inside polygons and 0 elsewhere.
        Windows no polygon touches are not yielded.
    """
    class_indices = np.asarray(class_indices, dtype=np.int64)
    if not len(geometries):
        return
    boxes = _pixel_windows(geometries, grid)
    inside = np.flatnonzero((boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2]))
    if not len(inside):
        return
    groups = _overlap_groups(boxes[inside])
    for group in np.unique(groups):
        # Ascending feature order keeps "later feature wins" within the group.
        members = inside[groups == group]
        member_boxes = boxes[members]
        row0, row1 = member_boxes[:, 0].min(), member_boxes[:, 1].max()
        col0, col1 = member_boxes[:, 2].min(), member_boxes[:, 3].max()
        width = int(col1 - col0)
        strip_rows = max(1, max_pixels // width)
        for top in range(int(row0), int(row1), strip_rows):
            bottom = min(top + strip_rows, int(row1))
            in_strip = members[(member_boxes[:, 0] < bottom) & (member_boxes[:, 1] > top)]
            if not len(in_strip):
                continue
            window = Window(int(col0), top, width, bottom - top)
            burnt = rasterio.features.rasterize(
                [(geometries[i], int(class_indices[i]) + 1) for i in in_strip],
                out_shape=(bottom - top, width),
                transform=grid.window(
                    row_off=top, col_off=int(col0), height=bottom - top, width=width
                ).transform,
                fill=0,
                all_touched=False,
                dtype="int32",
            )
            if burnt.any():
                yield window, burnt
