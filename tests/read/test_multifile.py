from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from affine import Affine

from sitfuse_byol.errors import InputError
from sitfuse_byol.read import open_scene
from sitfuse_byol.read.multifile import MultiFileSpec
from tests.conftest import write_tif


def spec_of(path: Path) -> MultiFileSpec:
    import yaml

    return MultiFileSpec.from_mapping(yaml.safe_load(path.read_text()), base=path.parent, where=str(path))


def test_sentinel2_bands_are_stacked_on_the_10m_grid(sentinel2_yaml):
    scene = open_scene(spec_of(sentinel2_yaml))
    with rasterio.open(sentinel2_yaml.parent / "sentinel2_virginia" / "B02.tif") as ref:
        assert scene.grid.transform == ref.transform
        assert scene.grid.crs == ref.crs
        assert scene.grid.shape == (ref.height, ref.width)
        b02 = ref.read(1)
    assert scene.id == "sentinel2_virginia"
    assert scene.band_names[:4] == ("B01", "B02", "B03", "B04")
    assert scene.data.shape == (13, 504, 504)
    assert scene.data.chunks[0] == (13,)
    assert scene.nodata == 0
    np.testing.assert_array_equal(scene.data[1].compute(), b02)


def test_refined_bands_match_bilinear_zarr_stack(sentinel2_yaml, sentinel2_zarr):
    """The 20 m and 60 m bands are refined bilinearly, like the reference Zarr stack."""
    scene = open_scene(spec_of(sentinel2_yaml))
    stack = xr.open_zarr(sentinel2_zarr, decode_coords="all", mask_and_scale=False, consolidated=False)
    ours = scene.data.compute().astype(np.int64)
    theirs = stack["reflectance"].values.astype(np.int64)
    interior = (slice(None), slice(8, -8), slice(8, -8))
    assert np.abs(ours[interior] - theirs[interior]).max() <= 1


def test_coarsening_averages(tmp_path):
    fine = np.arange(40 * 40, dtype=np.float32).reshape(40, 40)
    coarse = np.ones((20, 20), np.float32)
    write_tif(tmp_path / "fine.tif", fine, transform=Affine(10, 0, 0, 0, -10, 400))
    write_tif(tmp_path / "coarse.tif", coarse, transform=Affine(20, 0, 0, 0, -20, 400))
    spec = MultiFileSpec.from_mapping(
        {"id": "s", "bands": ["coarse.tif", "fine.tif"], "reference": "coarse"},
        base=tmp_path,
        where="test",
    )
    scene = open_scene(spec)
    assert scene.grid.res == (20.0, 20.0)
    expected = fine.reshape(20, 2, 20, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(scene.data[1].compute(), expected, rtol=1e-6)


def test_different_crs_is_refused_without_reproject(tmp_path):
    write_tif(tmp_path / "a.tif", np.ones((20, 20), np.uint16), crs="EPSG:32618")
    # The same place in the next UTM zone west, so the warped band covers the reference.
    zone_17 = Affine(10, 0, 939900, 0, -10, 4010600)
    write_tif(tmp_path / "b.tif", np.ones((40, 40), np.uint16), crs="EPSG:32617", transform=zone_17)
    entry = {"id": "s", "bands": ["a.tif", "b.tif"]}
    spec = MultiFileSpec.from_mapping(entry, base=tmp_path, where="test")
    with pytest.raises(InputError, match=r"different CRSs \(EPSG:32617 and EPSG:32618\)"):
        open_scene(spec)
    spec = MultiFileSpec.from_mapping({**entry, "reproject": True}, base=tmp_path, where="test")
    assert open_scene(spec).grid.crs.to_epsg() == 32618


def test_a_band_file_without_a_crs_is_refused_beside_one_with_a_crs(tmp_path):
    write_tif(tmp_path / "a.tif", np.ones((20, 20), np.uint16), crs="EPSG:32618")
    # The same numbers as the reference grid, but no CRS to say they are the same place.
    write_tif(tmp_path / "b.tif", np.ones((10, 10), np.uint16), crs=None, transform=Affine(20, 0, 400000, 0, -20, 4000000))
    for reproject in (True, False):
        spec = MultiFileSpec.from_mapping(
            {"id": "s", "bands": ["a.tif", "b.tif"], "reproject": reproject}, base=tmp_path, where="test"
        )
        with pytest.raises(InputError, match=r"band files have no CRS and EPSG:32618: a band file without") as err:
            open_scene(spec)
        assert err.value.where == str(tmp_path / "b.tif")


def test_bad_multifile_mappings(tmp_path):
    with pytest.raises(InputError, match="needs a string 'id'"):
        MultiFileSpec.from_mapping({"bands": ["a.tif"]}, base=tmp_path, where="x")
    with pytest.raises(InputError, match="unknown key 'band'"):
        MultiFileSpec.from_mapping({"id": "s", "band": ["a.tif"]}, base=tmp_path, where="x")
    with pytest.raises(InputError, match="unknown resampling 'bicubic'"):
        MultiFileSpec.from_mapping(
            {"id": "s", "bands": ["a.tif"], "resampling": {"refine": "bicubic"}}, base=tmp_path, where="x"
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"resampling": "cubic"}, "'resampling' must be a mapping"),
        ({"resampling": {"refine": ["cubic"]}}, "unknown resampling \\['cubic'\\]"),
        ({"reference": 1.5}, "'reference' must be a band name or a 0-based band position, got 1.5"),
        ({"reference": [1]}, "'reference' must be"),
        ({"names": "B1"}, "'names' must be a list"),
        ({"reproject": "yes"}, "'reproject' must be true or false"),
    ],
)
def test_multifile_values_of_the_wrong_type(tmp_path, extra, message):
    with pytest.raises(InputError, match=message):
        MultiFileSpec.from_mapping({"id": "s", "bands": ["a.tif"], **extra}, base=tmp_path, where="x")


def two_band_spec(tmp_path: Path, *files: str) -> MultiFileSpec:
    return MultiFileSpec.from_mapping({"id": "s", "bands": list(files)}, base=tmp_path, where="test")


def test_each_band_file_is_masked_with_its_own_nodata(tmp_path):
    ref = np.full((20, 20), 7, np.uint16)
    ref[0, 0] = 0  # the reference file's fill
    band = np.full((20, 20), 9, np.uint16)
    band[:5] = 65535  # the band file's own fill, not the reference's
    coarse = np.full((10, 10), 3, np.uint16)
    coarse[-1] = 65535  # a band on another grid, warped onto the reference one
    write_tif(tmp_path / "ref.tif", ref, nodata=0)
    write_tif(tmp_path / "band.tif", band, nodata=65535)
    write_tif(tmp_path / "coarse.tif", coarse, nodata=65535, transform=Affine(20, 0, 400000, 0, -20, 4000000))
    spec = MultiFileSpec.from_mapping(
        {"id": "s", "bands": ["ref.tif", "band.tif", "coarse.tif"], "resampling": {"refine": "nearest"}},
        base=tmp_path,
        where="test",
    )
    scene = open_scene(spec)
    assert scene.nodata == 0
    assert scene.dtype == np.uint16
    expected = np.ones((20, 20), bool)
    expected[0, 0] = False
    expected[:5] = False
    expected[-2:] = False
    np.testing.assert_array_equal(scene.valid.compute(), expected)
    # The blocks in hand give the same mask as the scene's lazy one.
    np.testing.assert_array_equal(scene.valid_of(scene.data.compute()), expected)
    # A configured nodata still overrides every file's: their fills are data then.
    valid = open_scene(spec, nodata=7).valid.compute()
    assert valid[0, 0] and valid.sum() == 1


def test_a_band_nodata_without_a_reference_nodata_masks_that_band(tmp_path):
    write_tif(tmp_path / "ref.tif", np.ones((20, 20), np.uint16))
    band = np.ones((20, 20), np.uint16)
    band[:5] = 65535
    write_tif(tmp_path / "band.tif", band, nodata=65535)
    scene = open_scene(two_band_spec(tmp_path, "ref.tif", "band.tif"))
    assert scene.nodata == 65535
    assert scene.valid.compute().sum() == 15 * 20
    # Float bands mark their fill NaN instead: no value is taken from the data.
    write_tif(tmp_path / "fref.tif", np.ones((20, 20), np.float32))
    write_tif(tmp_path / "fband.tif", np.where(band == 65535, -9999, 1).astype(np.float32), nodata=-9999)
    scene = open_scene(two_band_spec(tmp_path, "fref.tif", "fband.tif"))
    assert np.isnan(scene.nodata)
    assert scene.valid.compute().sum() == 15 * 20


def test_a_band_file_outside_the_reference_grid_is_refused(tmp_path):
    write_tif(tmp_path / "ref.tif", np.ones((20, 20), np.uint16))
    far = write_tif(tmp_path / "far.tif", np.ones((20, 20), np.uint16), transform=Affine(10, 0, 900000, 0, -10, 4000000))
    with pytest.raises(InputError, match="^band file covers no pixel of the reference grid") as err:
        open_scene(two_band_spec(tmp_path, "ref.tif", "far.tif"))
    assert err.value.where == str(far)
    assert "\n" not in str(err.value)


def test_pixels_a_band_file_does_not_cover_are_invalid_and_warned_about_once(tmp_path, caplog):
    write_tif(tmp_path / "ref.tif", np.ones((20, 20), np.uint16))
    # The right half of the reference grid only.
    write_tif(tmp_path / "half.tif", np.ones((20, 10), np.uint16), transform=Affine(10, 0, 400100, 0, -10, 4000000))
    spec = two_band_spec(tmp_path, "ref.tif", "half.tif")
    with caplog.at_level("WARNING", logger="sitfuse_byol.read"):
        scene = open_scene(spec)
        open_scene(spec)
    valid = scene.valid.compute()
    assert not valid[:, :10].any() and valid[:, 10:].all()
    np.testing.assert_array_equal(scene.valid_of(scene.data.compute()), valid)
    records = [r for r in caplog.records if r.name == "sitfuse_byol.read"]
    assert len(records) == 1
    assert records[0].getMessage().startswith("warning: band file covers 50% of the reference grid")
    assert str(tmp_path / "half.tif") in records[0].getMessage()


def test_a_band_file_without_bands_names_its_subdatasets(tmp_path):
    write_tif(tmp_path / "ref.tif", np.ones((20, 20), np.uint16))
    ds = xr.Dataset({name: (("y", "x"), np.ones((20, 20), np.uint16)) for name in ("red", "nir")})
    ds.to_netcdf(tmp_path / "bands.h5", engine="h5netcdf")
    with pytest.raises(InputError, match=r"holds subdatasets \(nir, red\)|holds subdatasets \(red, nir\)") as err:
        open_scene(two_band_spec(tmp_path, "ref.tif", "bands.h5"))
    assert err.value.where == str(tmp_path / "bands.h5")


def test_a_finer_band_half_a_pixel_short_of_the_grid_covers_it(tmp_path, caplog):
    """A 15 m band whose edge stops within the last 30 m pixel (as a panchromatic band can)
    still covers every pixel centre: no warning, and no nodata forced onto the scene."""
    ref = np.full((10, 10), 500, np.uint16)
    ref[3, 3] = 0  # a legitimate zero: the reference file declares no nodata
    write_tif(tmp_path / "ref30.tif", ref, transform=Affine(30, 0, 400000, 0, -30, 4000000))
    write_tif(tmp_path / "pan15.tif", np.full((20, 19), 600, np.uint16), transform=Affine(15, 0, 400000, 0, -15, 4000000))
    with caplog.at_level("WARNING", logger="sitfuse_byol.read"):
        spec = MultiFileSpec.from_mapping(
            {"id": "s", "bands": ["ref30.tif", "pan15.tif"], "reference": "ref30"}, base=tmp_path, where="test"
        )
        scene = open_scene(spec)
    assert scene.grid.res == (30, 30)
    assert not caplog.records
    assert scene.nodata is None and scene.valid.compute().all()


def _masked_band(path: Path, values: np.ndarray, hidden_cols: slice, transform: Affine) -> Path:
    mask = np.full(values.shape, 255, np.uint8)
    mask[:, hidden_cols] = 0
    profile = {
        "driver": "GTiff", "width": values.shape[1], "height": values.shape[0], "count": 1, "dtype": values.dtype,
        "crs": "EPSG:32618", "transform": transform, "tiled": True, "blockxsize": 16, "blockysize": 16,
    }
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(values[None])
        dst.write_mask(mask)
    return path


def test_band_files_masked_by_gdal_mask_bands_on_the_grid_and_warped(tmp_path):
    ten = Affine(10, 0, 400000, 0, -10, 4000000)
    _masked_band(tmp_path / "ref.tif", np.full((48, 48), 7, np.uint16), slice(0, 8), ten)
    _masked_band(tmp_path / "coarse.tif", np.full((24, 24), 3, np.uint16), slice(20, 24), ten * Affine.scale(2))
    scene = open_scene(two_band_spec(tmp_path, "ref.tif", "coarse.tif"), chunk_target=32, patch_size=16)
    expected = np.zeros((48, 48), bool)
    expected[:, 8:40] = True  # hidden: the reference's first 8 columns, the coarse band's last 4 (8 at 10 m)
    np.testing.assert_array_equal(scene.valid.compute(), expected)
    pixels = scene.data.compute()
    assert (pixels[0][expected] == 7).all() and (pixels[1][expected] == 3).all()
