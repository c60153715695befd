"""Open written label rasters in real QGIS (Debian's python3-qgis), headless.

QGIS runs in the system Python, not the venv, in a subprocess; it can crash
while tearing down, so the probe prints its findings and leaves with os._exit.
Skipped where ``/usr/bin/python3 -c "import qgis.core"`` fails
(``apt-get install -y python3-qgis qgis-providers`` provides it).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS

from sitfuse_byol.export.label_raster import write_label_raster
from sitfuse_byol.export.palette import label_colors
from sitfuse_byol.grid import Grid

SYSTEM_PYTHON = "/usr/bin/python3"

PROBE = """
import json, os, sys
from qgis.core import (QgsApplication, QgsMapRendererSequentialJob, QgsMapSettings,
                       QgsRasterLayer)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor

QgsApplication.setPrefixPath("/usr", True)
app = QgsApplication([], False)
app.initQgis()
path, pixels = sys.argv[1], json.loads(sys.argv[2])
layer = QgsRasterLayer(path, "labels")
renderer = layer.renderer()
out = {"valid": layer.isValid(), "type": renderer.type(), "crs": layer.crs().authid()}
if renderer.type() == "paletted":
    out["classes"] = [[c.value, c.color.name(), c.label] for c in renderer.classes()]
    out["transparent"] = [
        [e.min, e.max, e.percentTransparent]
        for e in renderer.rasterTransparency().transparentSingleValuePixelList()
    ]
settings = QgsMapSettings()
settings.setLayers([layer])
settings.setDestinationCrs(layer.crs())
settings.setExtent(layer.extent())
settings.setOutputSize(QSize(layer.width(), layer.height()))
settings.setBackgroundColor(QColor(0, 0, 0, 0))
job = QgsMapRendererSequentialJob(settings)
job.start()
job.waitForFinished()
image = job.renderedImage()
out["pixels"] = [
    list(image.pixelColor(x, y).getRgb()) for x, y in pixels
]
print(json.dumps(out))
sys.stdout.flush()
os._exit(0)
"""


def qgis_available() -> bool:
    try:
        done = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not qgis_available(), reason="QGIS (python3-qgis) not installed"),
]


def probe(tmp_path: Path, raster: Path, pixels: list[tuple[int, int]]) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    done = subprocess.run(
        [SYSTEM_PYTHON, str(script), str(raster), json.dumps(pixels)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_qgis_loads_the_style_and_renders_the_palette(tmp_path: Path) -> None:
    grid = Grid(48, 64, Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_500_000.0), CRS.from_epsg(32618))
    labels = np.zeros(grid.shape, np.uint8)
    labels[24:, :32] = 1
    labels[:, 32:] = 2
    labels[:24, :32] = 255
    names = ["water", "Veg & <soil>", "urban"]
    path = write_label_raster(
        labels, grid=grid, path=tmp_path / "scene.tif", n_labels=3, class_names=names
    )
    # (x, y): nodata, label 1, label 2.
    out = probe(tmp_path, path, [(5, 5), (5, 40), (50, 10)])
    colors = label_colors(3)
    assert out["valid"] and out["crs"] == "EPSG:32618"
    assert out["type"] == "paletted"
    # The names come only from the QML: GDAL's colour table alone would give 256 unnamed classes.
    assert out["classes"] == [
        [float(i), f"#{r:02x}{g:02x}{b:02x}", names[i]] for i, (r, g, b) in enumerate(colors)
    ]
    assert out["transparent"] == [[255.0, 255.0, 100.0]]
    assert out["pixels"] == [[0, 0, 0, 0], [*colors[1], 255], [*colors[2], 255]]


def test_qgis_reads_a_uint16_label_raster(tmp_path: Path) -> None:
    grid = Grid(40, 50, Affine(10.0, 0.0, 0.0, 0.0, -10.0, 0.0), CRS.from_epsg(32618))
    labels = np.full(grid.shape, 299, np.uint16)
    labels[:20] = 65535
    path = write_label_raster(labels, grid=grid, path=tmp_path / "k300.tif", n_labels=300)
    out = probe(tmp_path, path, [(5, 5), (5, 30)])
    assert out["type"] == "paletted"
    assert len(out["classes"]) == 300
    assert out["transparent"] == [[65535.0, 65535.0, 100.0]]
    assert out["pixels"] == [[0, 0, 0, 0], [*label_colors(300)[299], 255]]
