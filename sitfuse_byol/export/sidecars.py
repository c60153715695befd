"""Sidecar files that carry class names and colours to GIS software.

* ``<basename>.qml``: a QGIS paletted-renderer style. QGIS loads it
  automatically as the default style of ``<basename>.tif``; it is also where
  QGIS before 3.30 gets class names from.
* ``<basename>.tif.aux.xml``: a GDAL PAM file holding a thematic raster
  attribute table (Value, Class name, Red, Green, Blue), read by GDAL, ArcGIS
  and QGIS 3.30+. rasterio has no attribute-table API, so it is written as XML.

Both are built with :mod:`xml.etree.ElementTree`, which escapes class names.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sitfuse_byol.export.atomic import atomic_write_text

#: The QGIS version the style claims; 3.22 is the oldest LTR it was checked with.
QGIS_STYLE_VERSION = "3.22.0"

# GDAL's GDALRATFieldType and GDALRATFieldUsage codes (gdal.h).
_GFT_INTEGER, _GFT_STRING = 0, 2
_GFU_NAME, _GFU_MINMAX, _GFU_RED, _GFU_GREEN, _GFU_BLUE = 2, 5, 6, 7, 8


def qml_path_for(raster: Path) -> Path:
    """The style path QGIS looks for beside ``raster``: ``<basename>.qml``."""
    return Path(raster).with_suffix(".qml")


def aux_xml_path_for(raster: Path) -> Path:
    """The GDAL PAM path beside ``raster``: ``<name>.aux.xml``."""
    raster = Path(raster)
    return raster.with_name(raster.name + ".aux.xml")


def _checked_table(
    labels: Sequence[int], names: Sequence[str], colors: np.ndarray
) -> tuple[list[int], list[str], np.ndarray]:
    values = [int(v) for v in labels]
    colors = np.asarray(colors)
    if len(names) != len(values):
        raise ValueError(f"{len(names)} names for {len(values)} labels")
    if colors.shape != (len(values), 3):
        raise ValueError(f"colors must have shape ({len(values)}, 3), got {colors.shape}")
    if len(set(values)) != len(values):
        raise ValueError("labels must be unique")
    return values, [str(n) for n in names], colors.astype(np.uint8)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def qml_document(
    *, labels: Sequence[int], names: Sequence[str], colors: np.ndarray, nodata: int | None
) -> str:
    """The text of a QGIS paletted-renderer style.

    Args:
        labels: Pixel values that get a palette entry.
        names: Class name of each label, shown in the QGIS legend.
        colors: ``(len(labels), 3)`` uint8 RGB colours.
        nodata: The raster's nodata value, or ``None``. It gets no palette entry
            and is also listed as fully transparent, so it stays transparent even
            if a user switches off the source nodata in QGIS.

    Returns:
        The QML document.

    Raises:
        ValueError: If the table is inconsistent or ``nodata`` is among ``labels``.
    """
    values, names, colors = _checked_table(labels, names, colors)
    if nodata is not None and int(nodata) in values:
        raise ValueError(f"nodata {nodata} must not have a palette entry")
    root = ET.Element(
        "qgis",
        {
            "version": QGIS_STYLE_VERSION,
            "styleCategories": "AllStyleCategories",
            "hasScaleBasedVisibilityFlag": "0",
            "minScale": "1e+08",
            "maxScale": "0",
        },
    )
    pipe = _sub(root, "pipe")
    # Nearest-neighbour resampling: interpolating label values would invent classes.
    provider = _sub(pipe, "provider")
    _sub(
        provider,
        "resampling",
        enabled="false",
        zoomedInResamplingMethod="nearestNeighbour",
        zoomedOutResamplingMethod="nearestNeighbour",
        maxOversampling="2",
    )
    renderer = _sub(
        pipe,
        "rasterrenderer",
        type="paletted",
        band="1",
        opacity="1",
        alphaBand="-1",
        nodataColor="",
    )
    transparency = _sub(renderer, "rasterTransparency")
    if nodata is not None:
        pixels = _sub(transparency, "singleValuePixelList")
        _sub(pixels, "pixelListEntry", min=str(nodata), max=str(nodata), percentTransparent="100")
    origin = _sub(renderer, "minMaxOrigin")
    for tag, text in (
        ("limits", "None"),
        ("extent", "WholeRaster"),
        ("statAccuracy", "Estimated"),
        ("cumulativeCutLower", "0.02"),
        ("cumulativeCutUpper", "0.98"),
        ("stdDevFactor", "2"),
    ):
        _sub(origin, tag, text)
    palette = _sub(renderer, "colorPalette")
    for value, name, (r, g, b) in zip(values, names, colors, strict=True):
        _sub(
            palette,
            "paletteEntry",
            value=str(value),
            color=f"#{r:02x}{g:02x}{b:02x}",
            alpha="255",
            label=name,
        )
    # QGIS uses this ramp only when a user asks it to recolour the classes.
    _sub(renderer, "colorramp", name="[source]", type="randomcolors")
    _sub(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    _sub(
        pipe,
        "huesaturation",
        saturation="0",
        grayscaleMode="0",
        invertColors="0",
        colorizeOn="0",
        colorizeRed="255",
        colorizeGreen="128",
        colorizeBlue="128",
        colorizeStrength="100",
    )
    _sub(pipe, "rasterresampler", maxOversampling="2")
    _sub(pipe, "resamplingStage", "resamplingFilter")
    _sub(root, "blendMode", "0")
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + body + "\n"


def write_qml(
    path_qml: Path,
    *,
    labels: Sequence[int],
    names: Sequence[str],
    colors: np.ndarray,
    nodata: int | None,
) -> Path:
    """Write a QGIS paletted-renderer style atomically.

    Name it with :func:`qml_path_for` so QGIS loads it with the raster.

    Args:
        path_qml: The ``.qml`` file to write.
        labels: Pixel values that get a palette entry.
        names: Class name of each label.
        colors: ``(len(labels), 3)`` uint8 RGB colours.
        nodata: The raster's nodata value, or ``None``.

    Returns:
        ``path_qml``.

    Raises:
        ValueError: If the table is inconsistent or ``nodata`` is among ``labels``.
    """
    text = qml_document(labels=labels, names=names, colors=colors, nodata=nodata)
    return atomic_write_text(Path(path_qml), text)


def rat_document(*, labels: Sequence[int], names: Sequence[str], colors: np.ndarray) -> str:
    """The text of a GDAL PAM file holding a thematic raster attribute table.

    Args:
        labels: Pixel values, one row each.
        names: Class name of each label.
        colors: ``(len(labels), 3)`` uint8 RGB colours.

    Returns:
        The ``.aux.xml`` document.

    Raises:
        ValueError: If the table is inconsistent.
    """
    values, names, colors = _checked_table(labels, names, colors)
    root = ET.Element("PAMDataset")
    band = _sub(root, "PAMRasterBand", band="1")
    table = _sub(band, "GDALRasterAttributeTable", tableType="thematic")
    fields = (
        ("Value", _GFT_INTEGER, _GFU_MINMAX),
        ("Class name", _GFT_STRING, _GFU_NAME),
        ("Red", _GFT_INTEGER, _GFU_RED),
        ("Green", _GFT_INTEGER, _GFU_GREEN),
        ("Blue", _GFT_INTEGER, _GFU_BLUE),
    )
    for index, (name, field_type, usage) in enumerate(fields):
        definition = _sub(table, "FieldDefn", index=str(index))
        _sub(definition, "Name", name)
        _sub(definition, "Type", str(field_type))
        _sub(definition, "Usage", str(usage))
    for row_index, (value, name, (r, g, b)) in enumerate(zip(values, names, colors, strict=True)):
        row = _sub(table, "Row", index=str(row_index))
        for cell in (str(value), name, str(r), str(g), str(b)):
            _sub(row, "F", cell)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def write_rat(
    path_aux_xml: Path, *, labels: Sequence[int], names: Sequence[str], colors: np.ndarray
) -> Path:
    """Write a raster attribute table as a GDAL PAM ``.aux.xml`` atomically.

    Write it after the raster itself is in place: GDAL may create or rewrite
    the PAM file of a dataset it writes, which would drop the table. Opening the
    raster read-only later leaves the file alone, and GDAL keeps the table when
    it rewrites the file (e.g. to store statistics).

    Args:
        path_aux_xml: The file to write, ``<raster name>.aux.xml``
            (see :func:`aux_xml_path_for`).
        labels: Pixel values, one row each.
        names: Class name of each label.
        colors: ``(len(labels), 3)`` uint8 RGB colours.

    Returns:
        ``path_aux_xml``.

    Raises:
        ValueError: If the table is inconsistent.
    """
    text = rat_document(labels=labels, names=names, colors=colors)
    return atomic_write_text(Path(path_aux_xml), text)
