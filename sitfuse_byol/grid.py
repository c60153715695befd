"""A value object for a raster grid: shape, affine transform and CRS."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from affine import Affine
from rasterio.crs import CRS

if TYPE_CHECKING:
    from rasterio.io import DatasetReader


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a scene.

    Attributes:
        height: Number of rows.
        width: Number of columns.
        transform: Affine transform from pixel (col, row) to map (x, y).
        crs: Coordinate reference system, or ``None`` for an ungeoreferenced scene.
    """

    height: int
    width: int
    transform: Affine
    crs: CRS | None

    @classmethod
    def of_dataset(cls, src: DatasetReader) -> Grid:
        """The grid of an open rasterio dataset (a file or a warped VRT)."""
        return cls(height=src.height, width=src.width, transform=src.transform, crs=src.crs)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y), both positive: the lengths of a pixel's sides, which on a
        rotated grid are not the transform's a and e alone."""
        t = self.transform
        return (math.hypot(t.a, t.d), math.hypot(t.b, t.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units: the box around all four corners
        (two are enough only on a north-up or south-up grid)."""
        corners = [self.transform * (col, row) for col in (0, self.width) for row in (0, self.height)]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        return (min(xs), min(ys), max(xs), max(ys))

    @property
    def crs_string(self) -> str | None:
        """``"EPSG:n"`` where the CRS has an EPSG code, WKT otherwise, ``None`` without CRS."""
        if self.crs is None:
            return None
        epsg = self.crs.to_epsg()
        return f"EPSG:{epsg}" if epsg is not None else self.crs.to_wkt()

    def window(self, *, row_off: int, col_off: int, height: int, width: int) -> Grid:
        """The grid of a window of this grid."""
        return Grid(
            height=height,
            width=width,
            transform=self.transform * Affine.translation(col_off, row_off),
            crs=self.crs,
        )

    def coarsened(self, *, stride: int) -> Grid:
        """The grid of ``stride`` x ``stride`` pixel cells, covering the same extent (ragged edge cells included)."""
        if stride == 1:
            return self
        return Grid(
            height=-(-self.height // stride),
            width=-(-self.width // stride),
            transform=self.transform * Affine.scale(stride, stride),
            crs=self.crs,
        )

    def same_as(self, other: Grid, *, tolerance: float = 1e-9) -> bool:
        """Whether two grids are the same (shape, CRS, transform within ``tolerance``)."""
        return (
            self.shape == other.shape
            and self.crs == other.crs
            and self.transform.almost_equals(other.transform, precision=tolerance)
        )

    def to_dict(self) -> dict[str, Any]:
        """The grid as JSON-ready values: ``shape``, ``crs``, ``transform``, ``res``, ``bounds``.

        ``transform`` holds the six coefficients ``a, b, c, d, e, f`` of the affine.
        """
        return {
            "shape": list(self.shape),
            "crs": self.crs_string,
            "transform": [float(v) for v in list(self.transform)[:6]],
            "res": [float(v) for v in self.res],
            "bounds": [float(v) for v in self.bounds],
        }
