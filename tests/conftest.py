"""Shared fixtures: paths to the real sample scenes and a writer for small real GeoTIFFs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data_samples"
UTM18N = "EPSG:32618"
TEN_METRE_GRID = Affine(10, 0, 400000, 0, -10, 4000000)


@pytest.fixture(scope="session")
def landsat_path() -> Path:
    return SAMPLES / "landsat7_olinda.tif"


@pytest.fixture(scope="session")
def sentinel2_yaml() -> Path:
    return SAMPLES / "sentinel2_virginia.yaml"


@pytest.fixture(scope="session")
def sentinel2_zarr() -> Path:
    return SAMPLES / "sentinel2_virginia.zarr"


def corrupt_tile(path: Path, *, tile: str = "0_0", length: int = 32) -> Path:
    """Overwrite the start of one tile's compressed stream (``"row_col"``) of a tiled,
    compressed GeoTIFF: its header stays intact, and reading that tile fails in GDAL."""
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item(f"BLOCK_OFFSET_{tile}", "TIFF", bidx=1))
    data = bytearray(path.read_bytes())
    data[offset : offset + length] = b"\xff" * length
    path.write_bytes(bytes(data))
    return path


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = UTM18N,
    transform: Affine = TEN_METRE_GRID,
    nodata: float | None = None,
    descriptions: Sequence[str] | None = None,
    blocksize: int | None = 64,
) -> Path:
    """Write a real (band, y, x) or (y, x) GeoTIFF with rasterio."""
    if data.ndim == 2:
        data = data[None]
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype,
        "transform": transform,
        "nodata": nodata,
    }
    if crs is not None:
        profile["crs"] = crs
    if blocksize:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for i, name in enumerate(descriptions, start=1):
                dst.set_band_description(i, name)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, landsat_path) -> Path:
    """A BYOL checkpoint trained for two steps on the Landsat sample (BatchNorm encoder)."""
    from sitfuse_byol.config import load_config
    from sitfuse_byol.train.loop import train

    out = tmp_path_factory.mktemp("tiny_model")
    raw = {
        "data": {"scenes": [str(landsat_path)]},
        "tiling": {"patch_size": 8, "shuffle_buffer": 256},
        "train": {
            "epochs": 1,
            "steps_per_epoch": 2,
            "batch_size": 8,
            "norm": "batch",
            "encoder_args": {"width": 8, "depth": 3, "out_channels": 8},
            "projector_hidden": 32,
            "projection_dim": 16,
            "seed": 1,
        },
        "output": {"dir": str(out)},
    }
    return train(load_config(raw=raw, base=out)).checkpoint
