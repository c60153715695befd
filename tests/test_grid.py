"""The grid value object: resolution and bounds, north-up and rotated."""

from __future__ import annotations

import math

import pytest
from affine import Affine
from rasterio.crs import CRS

from sitfuse_byol.grid import Grid


def test_north_up_and_south_up_grids():
    north_up = Grid(height=20, width=30, transform=Affine(10, 0, 500, 0, -10, 1000), crs=CRS.from_epsg(32618))
    assert north_up.res == (10, 10)
    assert north_up.bounds == (500, 800, 800, 1000)
    south_up = Grid(height=20, width=30, transform=Affine(10, 0, 500, 0, 10, 800), crs=None)
    assert south_up.res == (10, 10) and south_up.bounds == (500, 800, 800, 1000)


def test_a_rotated_grid_has_its_pixel_size_and_the_box_around_all_corners():
    # 30 degrees: two corners alone span a smaller box than the grid covers.
    transform = Affine.translation(500, 1000) * Affine.rotation(30) * Affine.scale(10, -10)
    grid = Grid(height=20, width=30, transform=transform, crs=CRS.from_epsg(32618))
    assert grid.res == pytest.approx((10, 10))
    corners = [transform * (c, r) for c in (0, 30) for r in (0, 20)]
    assert grid.bounds == pytest.approx(
        (min(x for x, _ in corners), min(y for _, y in corners), max(x for x, _ in corners), max(y for _, y in corners))
    )
    left, bottom, right, top = grid.bounds
    assert right - left == pytest.approx(300 * math.cos(math.radians(30)) + 200 * math.sin(math.radians(30)))
