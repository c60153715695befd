"""A scene's outputs from real embeddings of a real scene, at stride 1 and 2."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import rasterio
import xarray as xr
from matplotlib.image import imread

from sitfuse_byol.cluster import fit_kmeans
from sitfuse_byol.cluster.model import ClusterModel
from sitfuse_byol.embed import SceneEmbedding, embed_scene
from sitfuse_byol.errors import ConfigError
from sitfuse_byol.export.label_raster import label_dtype_and_nodata
from sitfuse_byol.export.scene_outputs import OutputOptions, write_scene_outputs
from sitfuse_byol.read import Scene, open_scene
from sitfuse_byol.train.checkpoint import load_encoder
from tests.conftest import write_tif


@pytest.fixture(scope="module")
def holed_scene(tmp_path_factory, landsat_path) -> Scene:
    """The Landsat sample with nodata 0 in a corner, in single pixels and in one band only.

    The single pixels sit at odd and even rows and columns, so at stride 2 some stride
    cells hold valid and invalid pixels in either corner. Scene chunks (128) and embedding chunks (96, see :func:`fixed_embedding`)
    differ, as they may in a run, and the outputs must not care.
    """
    with rasterio.open(landsat_path) as src:
        data, profile = src.read(), src.profile
    data[data == 0] = 1
    data[:, :21, :31] = 0
    for row, col in [(100, 100), (101, 151), (150, 201), (201, 251), (300, 348)]:
        data[:, row, col] = 0
    data[3, 250, 60:70] = 0  # invalid in one band: invalid
    path = tmp_path_factory.mktemp("holed") / "holed.tif"
    write_tif(
        path, data, crs=profile["crs"], transform=profile["transform"], nodata=0, blocksize=128
    )
    return open_scene(path, chunk_target=128)


def fixed_embedding(scene: Scene, checkpoint: Path, *, stride: int) -> SceneEmbedding:
    """Real embeddings, computed once so the test and the export see the same values."""
    embedding = embed_scene(scene, load_encoder(checkpoint), stride=stride, block_size=128)
    values = embedding.data.compute()
    return SceneEmbedding(
        scene_id=embedding.scene_id,
        data=da.from_array(values, chunks=(-1, 96, 96)),
        valid=embedding.valid,
        grid=embedding.grid,
    )


def expand(layer: np.ndarray, *, stride: int, shape: tuple[int, int]) -> np.ndarray:
    """Each strided pixel repeated over its stride x stride cell, cropped to the scene."""
    full = np.repeat(np.repeat(layer, stride, axis=0), stride, axis=1)
    return full[: shape[0], : shape[1]]


@pytest.mark.parametrize(("stride", "n_fine"), [(1, 0), (2, 0), (2, 3)])
def test_outputs_follow_the_model_and_the_scene_mask(
    tmp_path: Path, holed_scene: Scene, tiny_checkpoint: Path, stride: int, n_fine: int
) -> None:
    scene = holed_scene
    embedding = fixed_embedding(scene, tiny_checkpoint, stride=stride)
    values = embedding.data.compute()
    samples = values.reshape(values.shape[0], -1).T
    model = fit_kmeans(samples, n_clusters=4, seed=0, n_fine=n_fine)
    _, nodata = label_dtype_and_nodata(model.n_labels)

    outputs = write_scene_outputs(
        scene=scene, embedding=embedding, model=model, out_dir=tmp_path, stride=stride,
        options=OutputOptions(polygons=True, zarr=True, quicklook=True), tags={"scene": scene.id},
    )  # fmt: skip

    expected_keys = {"labels", "confidence", "quicklook", "polygons", "labels_zarr"}
    assert set(outputs) == expected_keys | ({"labels_coarse"} if n_fine else set())
    valid = scene.valid.compute()
    assert (~valid).sum() > 21 * 31  # the corner, the specks and the one-band stripe
    predicted, confidence = model.predict_block(values, np.isfinite(values[0]), nodata=nodata)
    expected = np.where(valid, expand(predicted, stride=stride, shape=scene.grid.shape), nodata)
    expected_confidence = np.where(
        valid, expand(confidence, stride=stride, shape=scene.grid.shape), np.nan
    )

    with rasterio.open(outputs["labels"]) as src:
        labels = src.read(1)
        assert (src.height, src.width) == scene.grid.shape
        assert src.transform == scene.grid.transform
        assert src.crs == scene.grid.crs
        assert src.nodata == nodata
    np.testing.assert_array_equal(labels, expected)
    assert (labels[~valid] == nodata).all()
    # Nodata exactly where the input is invalid, at every stride: a cell's embedding is
    # the mean of its valid pixels, so every valid pixel's cell has one.
    np.testing.assert_array_equal(labels == nodata, ~valid)
    if stride > 1:
        # The specks and stripe leave cells with valid and invalid pixels, which the
        # old top-left sampling could leave unlabelled.
        mixed = expand(valid[::stride, ::stride], stride=stride, shape=scene.grid.shape) != valid
        assert mixed.any()

    with rasterio.open(outputs["confidence"]) as src:
        assert (src.height, src.width) == scene.grid.shape and src.transform == scene.grid.transform
        assert src.descriptions == (model.confidence_meaning,)
        written = src.read(1)
    np.testing.assert_array_equal(np.isnan(written), np.isnan(expected_confidence))
    np.testing.assert_allclose(written, expected_confidence, rtol=1e-6, equal_nan=True)

    if n_fine:
        coarse_dtype, coarse_nodata = label_dtype_and_nodata(model.n_clusters)
        with rasterio.open(outputs["labels_coarse"]) as src:
            assert src.dtypes[0] == coarse_dtype.name and src.nodata == coarse_nodata
            assert src.transform == scene.grid.transform
            coarse = src.read(1)
        np.testing.assert_array_equal(
            coarse, np.where(labels == nodata, coarse_nodata, labels // n_fine)
        )

    store = xr.open_zarr(outputs["labels_zarr"], consolidated=False, mask_and_scale=False)
    stored = store["labels"]
    assert stored.dtype == labels.dtype
    np.testing.assert_array_equal(stored.values, labels)
    if n_fine:
        assert store["labels_coarse"].attrs["_FillValue"] == coarse_nodata
        np.testing.assert_array_equal(store["labels_coarse"].values, coarse)
    else:
        assert "labels_coarse" not in store
    assert imread(outputs["quicklook"]).shape[1] > 2 * scene.grid.width
    assert sorted(p.name for p in tmp_path.iterdir()) == [".work", "confidence", "labels"]
    assert not any((tmp_path / ".work").iterdir())


def test_hierarchical_model_keeps_coarse_nodata_in_uint8(
    tmp_path: Path, holed_scene: Scene
) -> None:
    """More than 255 fine labels (uint16) over at most 255 coarse clusters (uint8)."""
    rng = np.random.default_rng(0)
    dim = 4
    model = ClusterModel(
        method="kmeans",
        centroids=rng.normal(size=(2, dim)).astype(np.float32),
        fine_centroids=rng.normal(size=(2, 150, dim)).astype(np.float32),
    )
    assert label_dtype_and_nodata(model.n_labels)[1] == 65535
    height, width = scene_shape = holed_scene.grid.shape
    strided = (-(-height // 2), -(-width // 2))
    values = rng.normal(size=(dim, *strided)).astype(np.float32)
    valid = holed_scene.valid.compute()
    values[:, ~valid[::2, ::2]] = np.nan
    embedding = SceneEmbedding(
        scene_id=holed_scene.id,
        data=da.from_array(values, chunks=(-1, 64, 64)),
        valid=da.from_array(np.isfinite(values[0])),
        grid=holed_scene.grid.coarsened(stride=2),
    )
    outputs = write_scene_outputs(
        scene=holed_scene, embedding=embedding, model=model, out_dir=tmp_path, stride=2,
        options=OutputOptions(quicklook=False), tags={},
    )  # fmt: skip
    with rasterio.open(outputs["labels_coarse"]) as src:
        coarse = src.read(1)
        assert src.dtypes[0] == "uint8" and src.nodata == 255
    with rasterio.open(outputs["labels"]) as src:
        labels = src.read(1)
    assert coarse.shape == scene_shape
    np.testing.assert_array_equal(coarse == 255, labels == 65535)
    np.testing.assert_array_equal(coarse[labels != 65535], labels[labels != 65535] // 150)


def test_class_names_that_do_not_match_the_labels_are_a_config_error(
    tmp_path: Path, holed_scene: Scene, tiny_checkpoint: Path
) -> None:
    embedding = fixed_embedding(holed_scene, tiny_checkpoint, stride=1)
    values = embedding.data.compute()
    model = fit_kmeans(values.reshape(values.shape[0], -1).T, n_clusters=4, seed=0)
    with pytest.raises(ConfigError) as info:
        write_scene_outputs(
            scene=holed_scene, embedding=embedding, model=model, out_dir=tmp_path, stride=1,
            options=OutputOptions(class_names=["water", "forest", "urban"]), tags={},
        )  # fmt: skip
    assert str(info.value) == (
        "3 class names for 4 cluster labels; give one name per label (output.class_names)"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_quicklook_reads_only_its_three_bands_of_a_multi_file_scene(tmp_path: Path) -> None:
    # Band files are read one by one (as for a multi-file scene); the quicklook's mask
    # comes from the labels, so the bands it does not show are never read.
    import threading

    from affine import Affine

    from sitfuse_byol.grid import Grid
    from sitfuse_byol.read.scene import build_scene

    reads: list[int] = []
    lock = threading.Lock()
    rng = np.random.default_rng(0)
    n_bands, size = 6, 64
    pixels = rng.integers(1, 100, (n_bands, size, size)).astype(np.uint16)
    pixels[:, :10, :20] = 0

    def band(index: int) -> da.Array:
        def read(block: np.ndarray) -> np.ndarray:
            with lock:
                reads.append(index)
            return block

        return da.from_array(pixels[index], chunks=32).map_blocks(read, dtype=np.uint16)

    scene = build_scene(
        id="bands", data=da.stack([band(i) for i in range(n_bands)]),
        grid=Grid(size, size, Affine(30.0, 0.0, 500000.0, 0.0, -30.0, 4000000.0), "EPSG:32618"),
        band_names=[f"B{i}" for i in range(n_bands)], file_nodata=0, nodata=None, valid_range=None,
        bands=None, source="bands",
    )  # fmt: skip
    valid = (pixels != 0).all(axis=0)
    values = rng.normal(size=(3, size, size)).astype(np.float32)
    values[:, ~valid] = np.nan
    embedding = SceneEmbedding(
        scene_id=scene.id, data=da.from_array(values, chunks=(-1, 32, 32)),
        valid=da.from_array(valid, chunks=32), grid=scene.grid,
    )  # fmt: skip
    model = fit_kmeans(values[:, valid].T, n_clusters=3, seed=0)
    reads.clear()
    outputs = write_scene_outputs(
        scene=scene, embedding=embedding, model=model, out_dir=tmp_path, stride=1,
        options=OutputOptions(quicklook=True, rgb_bands=["B4", "B2", "B1"]), tags={},
    )  # fmt: skip
    assert sorted(reads) == sorted([1, 2, 4] * 4)  # three bands, four chunks each, once
    assert imread(outputs["quicklook"]).shape[1] > 2 * size
    with rasterio.open(outputs["labels"]) as src:
        np.testing.assert_array_equal(src.read(1) != src.nodata, valid)


def test_a_failed_export_leaves_the_earlier_outputs_of_the_scene_whole(
    tmp_path: Path, holed_scene: Scene, tiny_checkpoint: Path
) -> None:
    from sitfuse_byol.errors import InputError

    embedding = fixed_embedding(holed_scene, tiny_checkpoint, stride=1)
    values = embedding.data.compute()
    samples = values.reshape(values.shape[0], -1).T
    first = write_scene_outputs(
        scene=holed_scene, embedding=embedding, model=fit_kmeans(samples, n_clusters=4, seed=0),
        out_dir=tmp_path, stride=1, options=OutputOptions(quicklook=True), tags={},
    )  # fmt: skip
    assert set(first) == {"labels", "confidence", "quicklook"}
    assert first["labels"] == str(tmp_path / "labels" / f"{holed_scene.id}.tif")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    # The labels and confidence of another model are complete when the quicklook fails.
    with pytest.raises(InputError, match="band index 99 out of range"):
        write_scene_outputs(
            scene=holed_scene, embedding=embedding, model=fit_kmeans(samples, n_clusters=5, seed=1),
            out_dir=tmp_path, stride=1, options=OutputOptions(quicklook=True, rgb_bands=[99, 1, 2]), tags={},
        )  # fmt: skip
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    # QGIS's statistics sidecar describes the raster it was computed for; a new export drops it.
    stale = tmp_path / "confidence" / f"{holed_scene.id}.tif.aux.xml"
    stale.write_text("<PAMDataset/>")
    write_scene_outputs(
        scene=holed_scene, embedding=embedding, model=fit_kmeans(samples, n_clusters=5, seed=1),
        out_dir=tmp_path, stride=1, options=OutputOptions(quicklook=True), tags={},
    )  # fmt: skip
    assert not stale.exists()
    assert (tmp_path / "labels" / f"{holed_scene.id}.tif.aux.xml").exists()


def test_the_quicklook_of_a_cube_with_wavelength_bands_shows_red_green_blue() -> None:
    from sitfuse_byol.export.scene_outputs import _nearest_to_visible

    aviris_like = [f"{nm:.1f}" for nm in range(400, 2501, 10)]
    assert _nearest_to_visible(aviris_like) == [24, 15, 7]  # 640, 550 and 470 nm
    assert _nearest_to_visible(["0.45", "0.55", "0.65", "0.86"]) == [2, 1, 0]  # micrometres
    # Band numbers and names are not wavelengths.
    assert _nearest_to_visible([str(i) for i in range(1, 61)]) is None
    assert _nearest_to_visible(["1", "2", "3"]) is None
    assert _nearest_to_visible(["blue", "green", "red"]) is None
    assert _nearest_to_visible(["1600", "2200"]) is None  # no visible band at all


@pytest.mark.parametrize(
    ("names", "rgb"),
    [
        (["B1", "B2", "B3", "B4", "B5", "B7"], ["B3", "B2", "B1"]),  # Landsat 5/7 TM/ETM+, as in data_samples
        (["B1", "B2", "B3", "B4", "B5", "B6", "B7"], ["B4", "B3", "B2"]),  # Landsat 8/9 OLI
        (["B01", "B02", "B03", "B04", "B08"], ["B04", "B03", "B02"]),  # Sentinel-2
    ],
)
def test_the_quicklook_guesses_true_colour_bands_by_sensor(tmp_path, names, rgb) -> None:
    from sitfuse_byol.export.scene_outputs import _rgb_positions
    from sitfuse_byol.read import open_scene
    from tests.conftest import write_tif

    path = write_tif(tmp_path / "scene.tif", np.ones((len(names), 8, 8), np.uint16), descriptions=names)
    assert [names[i] for i in _rgb_positions(open_scene(path), None)] == rgb
