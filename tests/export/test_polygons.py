"""Sieved polygons written to a GeoPackage and read back with pyogrio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import shapely
from affine import Affine
from rasterio.crs import CRS

from sitfuse_byol.export.polygons import write_polygons
from sitfuse_byol.grid import Grid

GRID = Grid(20, 30, Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_500_000.0), CRS.from_epsg(32618))


def two_regions_with_noise() -> np.ndarray:
    """Label 0 on the left, 1 on the right, a nodata corner and three specks of noise."""
    labels = np.zeros(GRID.shape, np.uint8)
    labels[:, 15:] = 1
    labels[:5, :5] = 255
    labels[10, 5] = 1
    labels[12, 20] = 0
    labels[15, 25:27] = 0
    return labels


def read(path: Path) -> tuple[dict, list[shapely.Geometry], dict[str, np.ndarray]]:
    meta, _, geometry, fields = pyogrio.raw.read(path)
    return meta, list(shapely.from_wkb(geometry)), dict(zip(meta["fields"], fields, strict=True))


def test_sieved_polygons_have_labels_names_areas_and_crs(tmp_path: Path) -> None:
    labels = two_regions_with_noise()
    path = write_polygons(
        tmp_path / "scene.gpkg", labels=labels, grid=GRID, nodata=255, min_size_px=4,
        class_names=["water", "land"],
    )  # fmt: skip
    meta, geometries, fields = read(path)
    assert meta["crs"] == "EPSG:32618"
    assert meta["geometry_type"] == "Polygon"
    assert sorted(fields["label"].tolist()) == [0, 1]
    assert dict(zip(fields["label"].tolist(), fields["name"].tolist(), strict=True)) == {
        0: "water",
        1: "land",
    }
    valid_area = (labels != 255).sum() * 100.0
    assert fields["area"].sum() == pytest.approx(valid_area)
    assert shapely.union_all(geometries).area == pytest.approx(valid_area)
    assert all(g.is_valid for g in geometries)
    by_label = dict(zip(fields["label"].tolist(), fields["area"].tolist(), strict=True))
    assert by_label[1] == pytest.approx(20 * 15 * 100.0)  # the noise was absorbed
    assert shapely.box(*GRID.bounds).contains(shapely.union_all(geometries))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.gpkg"]


def test_the_sieve_repeats_until_no_region_is_below_the_minimum(tmp_path: Path) -> None:
    """Blocks of 16 px with specks: one GDAL sieve pass leaves regions whose neighbours were
    small when it looked (1 px here); the repeated passes leave none below 20 px."""
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 6, (50, 50)), np.ones((4, 4), int)).astype(np.uint8)
    specks = rng.random(labels.shape) < 0.05
    labels[specks] = rng.integers(0, 6, int(specks.sum()))
    grid = Grid(200, 200, GRID.transform, GRID.crs)
    path = write_polygons(tmp_path / "blocks.gpkg", labels=labels, grid=grid, nodata=255, min_size_px=20)
    _, geometries, fields = read(path)
    assert fields["area"].min() >= 20 * 100.0
    assert shapely.union_all(geometries).area == pytest.approx(200 * 200 * 100.0)


def test_without_sieve_every_speck_is_a_feature(tmp_path: Path) -> None:
    path = write_polygons(
        tmp_path / "raw.gpkg", labels=two_regions_with_noise().astype(np.int64), grid=GRID,
        nodata=255, min_size_px=1,
    )  # fmt: skip
    _, geometries, fields = read(path)
    assert len(geometries) == 5
    assert set(fields["name"].tolist()) == {"cluster 0", "cluster 1"}


def test_ungeoreferenced_and_empty_maps(tmp_path: Path) -> None:
    grid = Grid(20, 30, Affine.identity(), None)
    path = write_polygons(
        tmp_path / "pixels.gpkg", labels=two_regions_with_noise(), grid=grid, nodata=255,
        min_size_px=4,
    )  # fmt: skip
    meta, _, fields = read(path)
    assert meta["crs"] is None
    assert fields["area"].sum() == pytest.approx((two_regions_with_noise() != 255).sum())
    path = write_polygons(
        tmp_path / "empty.gpkg", labels=np.full(GRID.shape, 255, np.uint8), grid=GRID,
        nodata=255, min_size_px=4,
    )  # fmt: skip
    _, geometries, _ = read(path)
    assert geometries == []


def test_bad_labels_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not match the grid"):
        write_polygons(tmp_path / "x.gpkg", labels=np.zeros((5, 5), np.uint8), grid=GRID,
                       nodata=255, min_size_px=4)  # fmt: skip
    with pytest.raises(ValueError, match="integers"):
        write_polygons(tmp_path / "x.gpkg", labels=np.zeros(GRID.shape, np.float32), grid=GRID,
                       nodata=255, min_size_px=4)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
