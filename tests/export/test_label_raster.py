"""Label COGs, the atomic writers and palettes, checked on real files."""

from __future__ import annotations

import colorsys
import json
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import rasterio
from affine import Affine
from dask.callbacks import Callback
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate

from sitfuse_byol.export.atomic import atomic_path, atomic_write_json, atomic_write_text
from sitfuse_byol.export.float_raster import write_float_raster
from sitfuse_byol.export.label_raster import label_dtype_and_nodata, write_label_raster
from sitfuse_byol.export.palette import hierarchical_colors, label_colors
from sitfuse_byol.grid import Grid

UTM18N = CRS.from_epsg(32618)
K = 9


def utm_grid(height: int = 1100, width: int = 1300) -> Grid:
    return Grid(height, width, Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_500_000.0), UTM18N)


def pattern(grid: Grid) -> np.ndarray:
    """Labels whose average would invent a class: a 1/8 checkerboard (mean 4.5), a
    constant-3 band on the right and a nodata corner bottom left."""
    rows, cols = np.indices(grid.shape)
    labels = np.where((rows + cols) % 2 == 0, 1, 8).astype(np.uint8)
    labels[:, 700:] = 3
    labels[900:, :300] = 255
    return labels


# GDAL averages a paletted band in colour space and snaps to the nearest entry, so
# a grey ramp (label i is grey 25 * i) exposes AVERAGE: 0 and 8 would average to 4.
GREY = np.repeat((np.arange(K) * 25).astype(np.uint8)[:, None], 3, axis=1)


def majority_pattern(grid: Grid) -> np.ndarray:
    """Each 2 x 2 block holds three 0s and one 8, at a place that varies from block to
    block: MODE gives 0 everywhere, NEAREST sometimes 8, AVERAGE (see GREY) 4."""
    rows, cols = np.indices(grid.shape)
    place = (rows // 2 + cols // 2) % 4
    return np.where((rows % 2) * 2 + cols % 2 == place, 8, 0).astype(np.uint8)


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# --- atomic writers -----------------------------------------------------------------


def test_atomic_path_renames_on_success_and_keeps_suffix(tmp_path: Path) -> None:
    final = tmp_path / "scene.tif"
    with atomic_path(final) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".scene.tif.tmp-") and tmp.suffix == ".tif"
        assert not final.exists()
        tmp.write_bytes(b"data")
    assert final.read_bytes() == b"data"
    assert leftovers(tmp_path, {"scene.tif"}) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_path_leaves_nothing_on_error(tmp_path: Path, error: BaseException) -> None:
    final = tmp_path / "scene.tif"
    with pytest.raises(type(error)), atomic_path(final) as tmp:
        tmp.write_bytes(b"half a file")
        tmp.with_name(tmp.name + ".ovr.tmp").write_bytes(b"a writer's scratch file")
        raise error
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    final = tmp_path / "scene.tif"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"new")
        raise RuntimeError
    assert final.read_bytes() == b"old"
    assert leftovers(tmp_path, {"scene.tif"}) == []


def test_atomic_path_cleans_a_directory_tree_on_error(tmp_path: Path) -> None:
    final = tmp_path / "features.zarr"
    with pytest.raises(KeyboardInterrupt), atomic_path(final) as tmp:
        (tmp / "c" / "0").mkdir(parents=True)
        (tmp / "zarr.json").write_text("{}")
        (tmp / "c" / "0" / "0").write_bytes(b"chunk")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_an_existing_directory(tmp_path: Path) -> None:
    final = tmp_path / "features.zarr"
    (final / "old").mkdir(parents=True)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == ["zarr.json"]
    assert leftovers(tmp_path, {"features.zarr"}) == []


def test_atomic_path_refuses_an_empty_block(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "x.json"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_text_and_json(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_json(tmp_path / "b.json", {"k": [1, 2], "name": "Eis"})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"k": [1, 2], "name": "Eis"}
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "c.json", {"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


# --- palettes -----------------------------------------------------------------------


def test_label_colors_are_stable_distinct_and_start_with_tab20() -> None:
    many = label_colors(4096)
    assert many.dtype == np.uint8 and many.shape == (4096, 3)
    np.testing.assert_array_equal(label_colors(300), many[:300])
    np.testing.assert_array_equal(many[:2], [[31, 119, 180], [255, 127, 14]])
    assert len(np.unique(many, axis=0)) == 4096
    first = many[:255].astype(int)
    distance = np.sqrt(((first[:, None] - first[None]) ** 2).sum(-1))
    np.fill_diagonal(distance, 1000)
    assert distance.min() > 10
    assert label_colors(0).shape == (0, 3)
    assert label_colors(65535).shape == (65535, 3)
    with pytest.raises(ValueError):
        label_colors(65536)


def test_hierarchical_colors_share_a_hue_per_coarse_cluster() -> None:
    colors = hierarchical_colors(8, 6)
    assert colors.shape == (48, 3) and colors.dtype == np.uint8
    assert len(np.unique(colors, axis=0)) == 48
    hues = np.array([colorsys.rgb_to_hsv(*(c / 255.0))[0] for c in colors]).reshape(8, 6)

    def circular(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = np.abs(a - b) % 1.0
        return np.minimum(d, 1.0 - d)

    within = max(circular(h[:, None], h[None]).max() for h in hues)
    centres = hues.mean(axis=1)
    between = circular(centres[:, None], centres[None])[~np.eye(8, dtype=bool)].min()
    assert within < 0.08 < between
    np.testing.assert_array_equal(hierarchical_colors(8, 6), colors)
    with pytest.raises(ValueError):
        hierarchical_colors(300, 300)


# --- label COGs ---------------------------------------------------------------------


def test_label_dtype_and_nodata() -> None:
    assert label_dtype_and_nodata(1) == (np.dtype(np.uint8), 255)
    assert label_dtype_and_nodata(254) == (np.dtype(np.uint8), 255)
    assert label_dtype_and_nodata(255) == (np.dtype(np.uint16), 65535)
    assert label_dtype_and_nodata(256) == (np.dtype(np.uint16), 65535)
    assert label_dtype_and_nodata(65535) == (np.dtype(np.uint16), 65535)
    for bad in (0, 65536):
        with pytest.raises(ValueError):
            label_dtype_and_nodata(bad)


def test_cog_carries_grid_palette_tags_and_mode_overviews(tmp_path: Path) -> None:
    grid = utm_grid()
    labels = pattern(grid)
    path = write_label_raster(
        labels,
        grid=grid,
        path=tmp_path / "scene.tif",
        n_labels=K,
        tags={"scene": "S2 tile", "K": "a stale value"},
    )
    assert path == tmp_path / "scene.tif"
    assert cog_validate(str(path)) == (True, [], [])
    palette = label_colors(K)
    with rasterio.open(path) as src:
        assert src.driver == "GTiff"
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert src.block_shapes == [(512, 512)]
        assert src.dtypes == ("uint8",) and src.nodata == 255
        assert (src.height, src.width) == grid.shape
        assert src.crs == grid.crs and src.transform == grid.transform
        assert src.descriptions == ("cluster",)
        assert src.tags()["K"] == str(K) and src.tags()["scene"] == "S2 tile"
        colormap = src.colormap(1)
        for label in range(K):
            assert colormap[label] == (*palette[label], 255)
        assert colormap[255] == (0, 0, 0, 0)
        np.testing.assert_array_equal(src.read(1), labels)
        assert src.overviews(1) == [2, 4]
    with rasterio.open(path, overview_level=0) as ovr:
        overview = ovr.read(1)
    assert overview.shape == (550, 650)
    # MODE keeps categories: a mean of the 1/8 checkerboard would give 4 or 5.
    assert set(np.unique(overview)) <= {1, 3, 8, 255}
    assert (overview[:, 360:] == 3).all()
    assert (overview[460:, :140] == 255).all()
    assert leftovers(tmp_path, {"scene.tif", "scene.qml", "scene.tif.aux.xml"}) == []


def test_overviews_take_the_majority_label(tmp_path: Path) -> None:
    grid = utm_grid(1024, 1024)
    path = write_label_raster(
        majority_pattern(grid), grid=grid, path=tmp_path / "m.tif", n_labels=K, colors=GREY
    )
    with rasterio.open(path) as src:
        assert src.colormap(1)[4] == (100, 100, 100, 255)
        assert src.overviews(1) == [2]
    with rasterio.open(path, overview_level=0) as ovr:
        assert (ovr.read(1) == 0).all()


def test_uint16_for_more_than_255_labels(tmp_path: Path) -> None:
    grid = utm_grid(600, 700)
    labels = (np.arange(600 * 700) % 300).reshape(grid.shape).astype(np.uint16)
    labels[:50] = 65535
    path = write_label_raster(labels, grid=grid, path=tmp_path / "k300.tif", n_labels=300)
    with rasterio.open(path) as src:
        assert src.dtypes == ("uint16",) and src.nodata == 65535
        assert src.tags()["K"] == "300"
        np.testing.assert_array_equal(src.read(1), labels)
        assert src.colormap(1)[299] == (*label_colors(300)[299], 255)
        assert src.colormap(1)[65535][3] == 0


def test_dask_input_gives_the_same_file_as_numpy(tmp_path: Path) -> None:
    grid = utm_grid()
    labels = pattern(grid)
    # Chunks deliberately not aligned with the 512-pixel tiles.
    lazy = da.from_array(labels, chunks=(300, 700)).astype(np.int64)
    computes = []

    with Callback(start=lambda dsk: computes.append(len(dsk))):
        from_dask = write_label_raster(lazy, grid=grid, path=tmp_path / "dask.tif", n_labels=K)
    from_numpy = write_label_raster(labels, grid=grid, path=tmp_path / "numpy.tif", n_labels=K)
    assert from_dask.read_bytes() == from_numpy.read_bytes()
    # One compute per row of chunks, never the whole array at once.
    assert len(computes) == lazy.numblocks[0]


def test_invalid_labels_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    grid = utm_grid(100, 120)
    labels = np.zeros(grid.shape, dtype=np.int32)
    labels[50, 60] = K  # one past the last label
    with pytest.raises(ValueError, match="label 9"):
        write_label_raster(labels, grid=grid, path=tmp_path / "x.tif", n_labels=K)
    labels[50, 60] = -1
    with pytest.raises(ValueError, match="label -1"):
        write_label_raster(labels, grid=grid, path=tmp_path / "x.tif", n_labels=K)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": np.zeros((10, 12), np.uint8)}, "do not match the grid"),
        ({"labels": np.zeros((100, 120), np.float32)}, "must be integers"),
        ({"colors": np.zeros((K - 1, 3), np.uint8)}, "colors must have shape"),
        ({"class_names": ["a", "b"]}, "class names"),
        ({"n_labels": 70_000}, "at most 65535"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, match: str) -> None:
    arguments = {
        "labels": np.zeros((100, 120), np.uint8),
        "grid": utm_grid(100, 120),
        "path": tmp_path / "x.tif",
        "n_labels": K,
    } | kwargs
    labels = arguments.pop("labels")
    with pytest.raises(ValueError, match=match):
        write_label_raster(labels, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_ungeoreferenced_scene(tmp_path: Path) -> None:
    labels = np.arange(50 * 60).reshape(50, 60) % K
    for name, transform in (("pixels.tif", Affine.identity()), ("scaled.tif", Affine.scale(2, -2))):
        grid = Grid(50, 60, transform, None)
        path = write_label_raster(labels, grid=grid, path=tmp_path / name, n_labels=K)
        with rasterio.open(path) as src:
            assert src.crs is None
            assert src.transform == transform
            np.testing.assert_array_equal(src.read(1), labels)


def test_explicit_overview_levels(tmp_path: Path) -> None:
    grid = utm_grid(1100, 1300)
    labels = majority_pattern(grid)
    one = write_label_raster(labels, grid=grid, path=tmp_path / "one.tif", n_labels=K,
                             colors=GREY, overview_levels=[2])  # fmt: skip
    none = write_label_raster(labels, grid=grid, path=tmp_path / "none.tif", n_labels=K,
                              overview_levels=[])  # fmt: skip
    with rasterio.open(one) as src:
        assert src.overviews(1) == [2]
    with rasterio.open(one, overview_level=0) as ovr:
        assert (ovr.read(1) == 0).all()
    with rasterio.open(none) as src:
        assert src.overviews(1) == []
    assert cog_validate(str(one))[0] and cog_validate(str(none))[0]


def test_rewrite_replaces_file_and_sidecars(tmp_path: Path) -> None:
    grid = utm_grid(64, 64)
    path = tmp_path / "scene.tif"
    write_label_raster(np.zeros(grid.shape, np.uint8), grid=grid, path=path, n_labels=2)
    write_label_raster(np.full(grid.shape, 4, np.uint8), grid=grid, path=path, n_labels=5)
    with rasterio.open(path) as src:
        assert src.tags()["K"] == "5" and (src.read(1) == 4).all()
    assert (tmp_path / "scene.qml").read_text().count("<paletteEntry") == 5
    write_label_raster(np.ones(grid.shape, np.uint8), grid=grid, path=path, n_labels=3,
                       sidecars=False)  # fmt: skip
    # Stale sidecars would describe the five labels of the previous file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


# --- float rasters ----------------------------------------------------------------------


def test_float_cog_carries_grid_nan_nodata_and_average_overviews(tmp_path: Path) -> None:
    grid = utm_grid(1100, 1300)
    rows, cols = np.indices(grid.shape)
    values = (rows + cols / 1000).astype(np.float32)
    values[900:, :300] = np.nan
    path = write_float_raster(
        da.from_array(values, chunks=(400, 700)), grid=grid, path=tmp_path / "conf.tif",
        description="distance", tags={"scene": "S2 tile"},
    )  # fmt: skip
    assert cog_validate(str(path)) == (True, [], [])
    with rasterio.open(path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert src.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
        assert src.block_shapes == [(512, 512)]
        assert src.dtypes == ("float32",) and np.isnan(src.nodata)
        assert src.crs == grid.crs and src.transform == grid.transform
        assert src.descriptions == ("distance",) and src.tags()["scene"] == "S2 tile"
        np.testing.assert_array_equal(src.read(1), values)
        assert src.overviews(1) == [2, 4]
    with rasterio.open(path, overview_level=0) as ovr:
        # AVERAGE: a 2 x 2 mean, between the extremes of the full resolution (NEAREST
        # would give one of the four values, not their mean).
        assert 0 < np.nanmean(ovr.read(1)) < np.nanmax(values)
        assert ovr.read(1)[0, 0] == pytest.approx(values[:2, :2].mean(), abs=1e-6)
    assert leftovers(tmp_path, {"conf.tif"}) == []


def test_float_cog_without_crs_and_over_a_stale_pam_file(tmp_path: Path) -> None:
    grid = Grid(50, 60, Affine.identity(), None)
    path = tmp_path / "conf.tif"
    (tmp_path / "conf.tif.aux.xml").write_text("<PAMDataset/>")
    values = np.linspace(0, 1, 50 * 60, dtype=np.float32).reshape(50, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_float_raster(da.from_array(values), grid=grid, path=path, description="d")
    with rasterio.open(path) as src:
        assert src.crs is None and src.transform == Affine.identity()
        np.testing.assert_array_equal(src.read(1), values)
    # The PAM file described the file replaced.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf.tif"]
