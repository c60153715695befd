from __future__ import annotations

import numpy as np
import pytest
import rasterio

from sitfuse_byol.errors import InputError
from sitfuse_byol.read import open_scene
from sitfuse_byol.read.scene import reading
from tests.conftest import corrupt_tile, write_tif


def test_landsat_sample_opens_lazily_with_its_grid(landsat_path):
    scene = open_scene(landsat_path)
    with rasterio.open(landsat_path) as src:
        expected = src.read()
        assert scene.grid.crs == src.crs
        assert scene.grid.transform == src.transform
        assert scene.grid.shape == (src.height, src.width)
    assert scene.id == "landsat7_olinda"
    assert scene.band_names == ("B1", "B2", "B3", "B4", "B5", "B7")
    assert scene.data.shape == (6, 352, 349)
    assert scene.data.dtype == np.uint8
    np.testing.assert_array_equal(scene.data.compute(), expected)
    assert bool(scene.valid.all().compute())


def test_band_selection_by_index_and_name(landsat_path):
    full = open_scene(landsat_path).data.compute()
    by_index = open_scene(landsat_path, bands=[4, 2]).data.compute()
    by_name = open_scene(landsat_path, bands=["B4", "B2"])
    np.testing.assert_array_equal(by_index, full[[3, 1]])
    np.testing.assert_array_equal(by_name.data.compute(), full[[3, 1]])
    assert by_name.band_names == ("B4", "B2")


def test_band_index_out_of_range_and_unknown_name(landsat_path):
    with pytest.raises(InputError, match=r"band index 7 out of range 1\.\.6"):
        open_scene(landsat_path, bands=[7])
    with pytest.raises(InputError, match=r"unknown band name 'B8'"):
        open_scene(landsat_path, bands=["B8"])


def test_nodata_valid_range_and_non_finite_pixels_are_invalid(tmp_path):
    data = np.full((2, 40, 50), 100.0, dtype=np.float32)
    data[0, 0, 0] = -9999  # file nodata
    data[1, 1, 1] = np.nan
    data[0, 2, 2] = np.inf
    data[1, 3, 3] = 5000  # beyond valid range
    path = write_tif(tmp_path / "f.tif", data, nodata=-9999)
    scene = open_scene(path, valid_range=[0, 1000])
    valid = scene.valid.compute()
    assert scene.nodata == -9999
    assert not valid[0, 0] and not valid[1, 1] and not valid[2, 2] and not valid[3, 3]
    assert valid.sum() == 40 * 50 - 4
    # A configured nodata overrides the file's.
    assert open_scene(path, nodata=100).valid.compute().sum() == 0


def test_chunks_align_to_blocks_and_patches(tmp_path):
    path = write_tif(tmp_path / "big.tif", np.zeros((3, 700, 900), np.uint16), blocksize=64)
    scene = open_scene(path, patch_size=48, chunk_target=400)
    y, x = scene.chunks
    assert y % 64 == 0 and y % 48 == 0
    assert x % 64 == 0 and x % 48 == 0
    assert scene.data.chunks[0] == (3,)


def test_missing_truncated_and_text_files(tmp_path, landsat_path):
    with pytest.raises(InputError, match="file not found"):
        open_scene(tmp_path / "nope.tif")
    data = landsat_path.read_bytes()
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|cannot open"):
        open_scene(truncated)
    text = tmp_path / "notes.tif"
    text.write_text("this is not a raster\n")
    with pytest.raises(InputError, match="cannot open raster: not a raster GDAL can read"):
        open_scene(text)


def test_ungeoreferenced_file_is_allowed(tmp_path):
    path = tmp_path / "plain.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=20, height=10, count=1, dtype="uint8"
    ) as dst:
        dst.write(np.ones((1, 10, 20), np.uint8))
    scene = open_scene(path)
    assert scene.grid.crs is None
    assert scene.grid.crs_string is None


def test_a_corrupt_tile_names_gdals_reason_not_rasterios_pointer(tmp_path):
    from rasterio.transform import from_origin

    path = tmp_path / "tiles.tif"
    rng = np.random.default_rng(0)
    profile = {
        "driver": "GTiff", "width": 64, "height": 64, "count": 2, "dtype": "uint16", "tiled": True,
        "blockxsize": 16, "blockysize": 16, "compress": "deflate", "crs": "EPSG:32618",
        "transform": from_origin(0, 640, 10, 10),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rng.integers(0, 5000, (2, 64, 64)).astype("uint16"))
    scene = open_scene(corrupt_tile(path, tile="1_1", length=64))  # the header is intact
    with pytest.raises(InputError) as err, reading(scene.source):
        scene.data.compute()
    assert err.value.what.startswith("cannot read pixels: ")
    assert "TIFFReadEncodedTile" in err.value.what and "See previous exception" not in err.value.what


def test_a_file_of_subdatasets_names_them_and_how_to_read_one(tmp_path):
    import xarray as xr

    ds = xr.Dataset({name: (("y", "x"), np.ones((4, 5), np.float32)) for name in "abcde"})
    path = tmp_path / "container.h5"
    ds.to_netcdf(path, engine="h5netcdf")
    with pytest.raises(InputError) as err:
        open_scene(path)
    assert err.value.where == str(path)
    assert err.value.what.startswith("the file holds subdatasets (a, b, c and 2 more), not raster bands; ")
    assert f"gdal_translate 'HDF5:{path}://a' out.tif" in err.value.what
    assert "\n" not in err.value.what


@pytest.mark.parametrize(("dtype", "nodata"), [("uint8", None), ("int16", -1)])
def test_pixels_hidden_by_gdals_mask_band_are_invalid(tmp_path, dtype, nodata):
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    data = rng.integers(1, 100, (3, 48, 64)).astype(dtype)
    if nodata is not None:
        data[0, :4, 40:] = nodata
    mask = np.full((48, 64), 255, np.uint8)
    mask[:, :16] = 0  # e.g. the collar of a warped, JPEG-compressed mosaic
    path = tmp_path / "masked.tif"
    profile = {
        "driver": "GTiff", "width": 64, "height": 48, "count": 3, "dtype": dtype,
        "nodata": nodata, "crs": "EPSG:32618", "transform": from_origin(0, 480, 10, 10),
        "tiled": True, "blockxsize": 16, "blockysize": 16,
    }
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.write_mask(mask)
    scene = open_scene(path, bands=[3, 1], chunk_target=32, patch_size=16)
    expected = mask > 0
    if nodata is not None:
        expected[:4, 40:] = False
    np.testing.assert_array_equal(scene.valid.compute(), expected)
    pixels = scene.data.compute()
    np.testing.assert_array_equal(scene.valid_of(pixels), expected)
    np.testing.assert_array_equal(pixels[:, expected], data[[2, 0]][:, expected])  # values kept as they are


def test_the_fourth_band_of_an_8_bit_image_is_data_not_gdals_alpha(tmp_path):
    # GDAL calls it alpha by default; in red, green, blue, near-infrared, 0 is dark water.
    data = np.full((4, 32, 32), 60, np.uint8)
    data[3, 16:] = 0
    path = write_tif(tmp_path / "rgbn.tif", data, descriptions=["red", "green", "blue", "nir"])
    with rasterio.open(path) as src:
        assert src.colorinterp[3].name == "alpha"
    scene = open_scene(path)
    assert scene.dtype == np.uint8
    assert bool(scene.valid.all().compute())
