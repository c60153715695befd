"""Three real scenes (overlapping crops of the Landsat sample) and a tiny, fast config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.windows import Window

TINY_RUN = {
    "tiling": {"patch_size": 8, "shuffle_buffer": 512},
    "train": {
        "epochs": 1,
        "steps_per_epoch": 4,
        "batch_size": 16,
        "norm": "batch",
        "encoder_args": {"width": 8, "depth": 2, "out_channels": 8},
        "projector_hidden": 32,
        "projection_dim": 16,
        "seed": 3,
    },
    "embed": {"block_size": 96},
    "cluster": {"n_clusters": 6, "samples_per_scene": 3000, "seed": 3},
    "dask": {"workers": 1},
}

# Column offsets of the three crops: they overlap, so one surface appears in several scenes.
CROPS = {"olinda_a": (0, 0), "olinda_b": (40, 60), "olinda_c": (100, 120)}
CROP_SIZE = 160


def write_crops(landsat_path: Path, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    with rasterio.open(landsat_path) as src:
        for name, (row, col) in CROPS.items():
            window = Window(col, row, CROP_SIZE, CROP_SIZE)
            data = src.read(window=window)
            if name == "olinda_c":
                data[:, :30, :40] = 0  # a nodata corner
            profile = src.profile | {
                "width": CROP_SIZE, "height": CROP_SIZE, "transform": src.window_transform(window),
                "nodata": 0, "tiled": True, "blockxsize": 64, "blockysize": 64,
            }
            path = folder / f"{name}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(data)
                dst.descriptions = src.descriptions
            paths[name] = path
    return paths


def write_config(folder: Path, scenes, *, out: str = "out", **sections) -> Path:
    raw = {key: dict(value) for key, value in TINY_RUN.items()}
    raw["data"] = {"scenes": [str(s) for s in scenes]}
    raw["output"] = {"dir": out}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = folder / f"config_{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def crop_scenes(tmp_path_factory, landsat_path) -> dict[str, Path]:
    return write_crops(landsat_path, tmp_path_factory.mktemp("crops"))


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, crop_scenes):
    """One full run shared by the read-only tests: (folder, config path, exit code, stdout)."""
    import contextlib
    import io

    from sitfuse_byol.cli import main

    folder = tmp_path_factory.mktemp("run")
    config = write_config(folder, crop_scenes.values())
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["run", "-c", str(config), "--quiet"])
    return folder, config, code, stdout.getvalue()


def labels_of(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)
