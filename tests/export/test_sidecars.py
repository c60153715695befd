"""QGIS style and raster attribute table sidecars, read back as XML and by GDAL."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from sitfuse_byol.export.label_raster import write_label_raster
from sitfuse_byol.export.palette import label_colors
from sitfuse_byol.export.sidecars import aux_xml_path_for, qml_path_for, write_qml, write_rat
from sitfuse_byol.grid import Grid

NAMES = ["water", "Veg & <soil>", 'Éis "glacier"']


@pytest.fixture
def raster(tmp_path: Path) -> Path:
    grid = Grid(48, 64, Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_500_000.0), CRS.from_epsg(32618))
    labels = np.zeros(grid.shape, np.uint8)
    labels[24:, :32] = 1
    labels[:, 32:] = 2
    labels[:24, :32] = 255
    return write_label_raster(
        labels, grid=grid, path=tmp_path / "scene.tif", n_labels=3, class_names=NAMES
    )


def hexes(colors: np.ndarray) -> list[str]:
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in colors]


def test_sidecar_names(tmp_path: Path) -> None:
    assert qml_path_for(tmp_path / "a.b.tif") == tmp_path / "a.b.qml"
    assert aux_xml_path_for(tmp_path / "a.b.tif") == tmp_path / "a.b.tif.aux.xml"


def test_qml_is_a_paletted_style_without_nodata_entry(raster: Path) -> None:
    qml = raster.with_suffix(".qml")
    text = qml.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE qgis")
    root = ET.fromstring(text.split("\n", 1)[1])
    assert root.tag == "qgis" and root.get("version", "").startswith("3.")
    renderer = root.find("pipe/rasterrenderer")
    assert renderer is not None
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = renderer.findall("colorPalette/paletteEntry")
    assert [e.get("value") for e in entries] == ["0", "1", "2"]
    assert [e.get("color") for e in entries] == hexes(label_colors(3))
    assert [e.get("label") for e in entries] == NAMES
    assert all(e.get("alpha") == "255" for e in entries)
    transparent = renderer.findall("rasterTransparency/singleValuePixelList/pixelListEntry")
    assert [(t.get("min"), t.get("max"), t.get("percentTransparent")) for t in transparent] == [
        ("255", "255", "100")
    ]
    resampling = root.find("pipe/provider/resampling")
    assert resampling is not None
    assert resampling.get("zoomedOutResamplingMethod") == "nearestNeighbour"


def test_write_qml_refuses_a_nodata_entry_and_mismatched_tables(tmp_path: Path) -> None:
    colors = label_colors(3)
    with pytest.raises(ValueError, match="nodata"):
        write_qml(tmp_path / "a.qml", labels=[0, 1, 255], names=list("abc"), colors=colors,
                  nodata=255)  # fmt: skip
    with pytest.raises(ValueError, match="names"):
        write_qml(tmp_path / "a.qml", labels=[0, 1, 2], names=["a"], colors=colors, nodata=255)
    with pytest.raises(ValueError, match="colors"):
        write_rat(tmp_path / "a.aux.xml", labels=[0, 1], names=["a", "b"], colors=colors)
    assert list(tmp_path.iterdir()) == []


def test_rat_is_a_thematic_attribute_table(raster: Path) -> None:
    root = ET.parse(raster.with_name("scene.tif.aux.xml")).getroot()
    table = root.find("PAMRasterBand[@band='1']/GDALRasterAttributeTable")
    assert table is not None and table.get("tableType") == "thematic"
    fields = [
        (f.findtext("Name"), f.findtext("Type"), f.findtext("Usage"))
        for f in table.findall("FieldDefn")
    ]
    assert fields == [
        ("Value", "0", "5"),
        ("Class name", "2", "2"),
        ("Red", "0", "6"),
        ("Green", "0", "7"),
        ("Blue", "0", "8"),
    ]
    rows = [[cell.text for cell in row.findall("F")] for row in table.findall("Row")]
    expected = [
        [str(v), name, *map(str, rgb)]
        for v, (name, rgb) in enumerate(zip(NAMES, label_colors(3), strict=True))
    ]
    assert rows == expected


def test_raster_still_reads_with_the_aux_xml_beside_it(raster: Path) -> None:
    aux = raster.with_name("scene.tif.aux.xml")
    before = aux.read_bytes()
    with rasterio.open(raster) as src:
        assert src.nodata == 255 and src.tags()["K"] == "3"
        assert src.colormap(1)[1] == (*label_colors(3)[1], 255)
        assert src.colormap(1)[255] == (0, 0, 0, 0)
        assert src.descriptions == ("cluster",)
        assert (src.read(1)[:24, :32] == 255).all()
    # Opening read-only must not make GDAL rewrite (and drop) the table.
    assert aux.read_bytes() == before


def gdalinfo_json(*args: str) -> dict:
    done = subprocess.run(
        ["gdalinfo", "-json", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return json.loads(done.stdout)


@pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="gdalinfo (gdal-bin) not installed")
def test_gdal_reads_the_attribute_table_and_keeps_it(raster: Path) -> None:
    info = gdalinfo_json(str(raster))
    rat = info.get("rat") or info["bands"][0]["rat"]
    assert rat["tableType"] == "thematic"
    assert [row["f"][:2] for row in rat["row"]] == [[i, n] for i, n in enumerate(NAMES)]
    # Computing statistics makes GDAL rewrite the PAM file; the table must survive.
    gdalinfo_json("-stats", str(raster))
    info = gdalinfo_json(str(raster))
    assert len((info.get("rat") or info["bands"][0]["rat"])["row"]) == 3
    assert "STATISTICS_MEAN" in raster.with_name("scene.tif.aux.xml").read_text()
