from __future__ import annotations

import numpy as np
import pytest
import rasterio
import xarray as xr

from sitfuse_byol.errors import InputError
from sitfuse_byol.read import open_scene


def _refusal(ds: xr.Dataset, path) -> InputError:
    """The one-line error that opening ``ds``, written as NetCDF to ``path``, gives."""
    ds.to_netcdf(path, engine="h5netcdf")
    with pytest.raises(InputError) as err:
        open_scene(path)
    return err.value


def test_zarr_sample_keeps_crs_transform_and_dtype(sentinel2_zarr):
    scene = open_scene(sentinel2_zarr)
    with rasterio.open(sentinel2_zarr.parent / "sentinel2_virginia" / "B02.tif") as ref:
        assert scene.grid.crs == ref.crs
        assert scene.grid.transform.almost_equals(ref.transform)
        b02 = ref.read(1)
    assert scene.id == "sentinel2_virginia"
    assert scene.dtype == np.uint16
    assert scene.nodata == 0
    assert scene.band_names[8] == "B8A"
    np.testing.assert_array_equal(scene.data[1].compute(), b02)


def test_netcdf_with_2d_variables_stacks_them_as_bands(tmp_path):
    y = np.arange(30) * -20.0 + 5000
    x = np.arange(40) * 20.0 + 1000
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {name: (("y", "x"), rng.random((30, 40)).astype(np.float32)) for name in ("red", "nir")},
        coords={"y": y, "x": x},
    )
    ds = ds.rio.write_crs("EPSG:32633")
    path = tmp_path / "scene.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    scene = open_scene(path, bands=["nir"])
    assert scene.band_names == ("nir",)
    assert scene.grid.crs.to_epsg() == 32633
    assert scene.grid.transform.a == 20.0 and scene.grid.transform.e == -20.0
    assert scene.grid.transform.c == 990.0  # pixel centre 1000 minus half a pixel
    np.testing.assert_array_equal(scene.data[0].compute(), ds["nir"].values)


def test_missing_store_and_unknown_variable(tmp_path, sentinel2_zarr):
    with pytest.raises(InputError, match="file not found"):
        open_scene(tmp_path / "none.zarr")
    with pytest.raises(InputError, match="no variable 'radiance'"):
        open_scene(sentinel2_zarr, variable="radiance")


def test_coordinates_that_are_not_a_grid_are_an_input_error(tmp_path):
    ds = xr.Dataset(
        {"v": (("band", "y", "x"), np.zeros((2, 3, 4), np.float32))},
        coords={"y": ["a", "b", "c"], "x": np.arange(4.0)},
    )
    path = tmp_path / "strings.nc"
    err = _refusal(ds, path)
    assert "cannot derive the grid" in str(err)
    assert err.where == str(path)


def test_unevenly_spaced_coordinates_are_an_input_error(tmp_path):
    x = np.array([0.0, 10.0, 20.0, 35.0, 45.0])  # one 15 m step among 10 m ones
    ds = xr.Dataset({"v": (("band", "y", "x"), np.zeros((1, 4, 5), np.float32))},
                    coords={"y": np.arange(4) * -10.0, "x": x})
    assert _refusal(ds, tmp_path / "uneven.nc").what == (
        "the x coordinates are not evenly spaced (steps from 10 to 15); resample the data onto a regular grid first"
    )


def test_a_folder_that_is_not_a_zarr_store_says_how_to_name_its_rasters(tmp_path):
    (tmp_path / "scenes").mkdir()
    with pytest.raises(InputError) as err:
        open_scene(tmp_path / "scenes")
    assert err.value.what.startswith("a folder that is not a Zarr store; for the rasters in it give a glob")


def test_float32_coordinates_of_a_regular_grid_are_accepted(tmp_path):
    # float32 northings near 4.5e6 m are only 0.5 m apart, so a 10.3 m grid's steps vary by 5%.
    y = (4_500_000.0 - 10.3 * np.arange(50)).astype(np.float32)
    x = (300_000.0 + 10.3 * np.arange(40)).astype(np.float32)
    ds = xr.Dataset({"v": (("band", "y", "x"), np.ones((1, 50, 40), np.float32))}, coords={"y": y, "x": x})
    assert np.ptp(np.diff(y.astype(np.float64))) > 0.1
    path = tmp_path / "f32.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    transform = open_scene(path).grid.transform
    assert transform.a == pytest.approx(10.3, abs=1e-2) and transform.e == pytest.approx(-10.3, abs=1e-2)


def test_stacked_2d_variables_are_masked_with_their_own_fill_values(tmp_path):
    red = np.full((4, 5), 10, np.int16)
    red[0, 0] = -9999
    nir = np.full((4, 5), 20, np.int16)
    nir[3] = -1
    ds = xr.Dataset({"red": (("y", "x"), red), "nir": (("y", "x"), nir)})
    ds["red"].encoding["_FillValue"] = -9999
    ds["nir"].encoding["_FillValue"] = -1
    path = tmp_path / "fills.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    scene = open_scene(path)
    assert scene.nodata == -9999
    assert scene.dtype == np.int16
    expected = np.ones((4, 5), bool)
    expected[0, 0] = False
    expected[3] = False
    np.testing.assert_array_equal(scene.valid.compute(), expected)
    np.testing.assert_array_equal(scene.valid_of(scene.data.compute()), expected)
    # A configured nodata overrides every variable's fill value: the fills are data then.
    valid = open_scene(path, nodata=10).valid.compute()
    assert valid[0, 0] and valid.sum() == 1


def test_2d_variables_on_different_dimensions_are_an_input_error(tmp_path):
    ds = xr.Dataset(
        {"red": (("y", "x"), np.ones((4, 5), np.float32)), "sst": (("lat", "lon"), np.ones((3, 3), np.float32))}
    )
    path = tmp_path / "mixed.nc"
    err = _refusal(ds, path)
    assert err.what == (
        "2-D variables on different dimensions (red on y, x; sst on lat, lon); set data.variable (inspect: --variable) "
        "to read one"
    )
    assert err.where == str(path)
    assert open_scene(path, variable="sst").data.shape == (1, 3, 3)


def test_2d_variables_without_spatial_dimensions_are_not_bands(tmp_path):
    ds = xr.Dataset(
        {
            "red": (("y", "x"), np.ones((4, 5), np.float32)),
            "time_bnds": (("time", "nv"), np.zeros((1, 2))),
        }
    )
    path = tmp_path / "bounds.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    assert open_scene(path).band_names == ("red",)


def test_stacked_variables_of_different_types_share_the_first_fill_value(tmp_path):
    quality = np.full((4, 5), 1, np.uint8)
    quality[0] = 255
    ds = xr.Dataset(
        {"sst": (("y", "x"), np.full((4, 5), 290.0, np.float32)), "quality": (("y", "x"), quality)}
    )
    ds["sst"].encoding["_FillValue"] = -9999.0
    ds["quality"].encoding["_FillValue"] = 255
    path = tmp_path / "types.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    scene = open_scene(path)
    assert scene.dtype == np.float32 and scene.nodata == -9999
    assert scene.valid.compute().sum() == 3 * 5


def test_latitude_longitude_without_a_grid_mapping_is_wgs84(tmp_path):
    lat = 40.0 - 0.01 * np.arange(30)  # north up, as most products store it
    lon = -75.0 + 0.01 * np.arange(40)
    data = np.arange(30 * 40, dtype=np.float32).reshape(30, 40)
    path = tmp_path / "grid.nc"
    xr.Dataset({"sst": (("lat", "lon"), data), "chl": (("lat", "lon"), data)}, coords={"lat": lat, "lon": lon}).to_netcdf(
        path, engine="h5netcdf"
    )
    scene = open_scene(path)
    assert scene.grid.crs == rasterio.crs.CRS.from_epsg(4326)
    assert scene.grid.transform.c == pytest.approx(-75.005) and scene.grid.transform.f == pytest.approx(40.005)
    # Projected coordinates without a CRS stay without one: nothing says what they are.
    xr.Dataset({"sst": (("y", "x"), data)}, coords={"y": 1000.0 - 30 * np.arange(30), "x": 30.0 * np.arange(40)}).to_netcdf(
        tmp_path / "plain.nc", engine="h5netcdf"
    )
    assert open_scene(tmp_path / "plain.nc").grid.crs is None


def test_the_declared_scale_and_offset_are_kept_and_values_stay_as_stored(tmp_path):
    data = np.arange(2 * 10 * 12, dtype=np.int16).reshape(2, 10, 12)
    cube = xr.DataArray(
        data, dims=("band", "y", "x"), coords={"y": 100.0 - 10 * np.arange(10), "x": 10.0 * np.arange(12)},
        attrs={"scale_factor": 1e-4, "add_offset": -0.1},
    )
    xr.Dataset({"refl": cube}).to_netcdf(tmp_path / "packed.nc", engine="h5netcdf")
    scene = open_scene(tmp_path / "packed.nc")
    assert scene.packing == ((1e-4, -0.1), (1e-4, -0.1))
    assert scene.dtype == np.int16
    np.testing.assert_array_equal(scene.data.compute(), data)
    assert open_scene(tmp_path / "packed.nc", bands=[2]).packing == ((1e-4, -0.1),)


def _utm_cube(data: np.ndarray, *, y_ascending: bool = False) -> xr.DataArray:
    """A ``(band, y, x)`` cube of 30 m pixels in EPSG:32618, row 0 north unless ``y_ascending``."""
    _, height, width = data.shape
    y = 4_200_000 - 30.0 * (np.arange(height) + 0.5)
    x = 500_000 + 30.0 * (np.arange(width) + 0.5)
    cube = xr.DataArray(data, dims=("band", "y", "x"), coords={"y": y, "x": x}, name="refl").rio.write_crs("EPSG:32618")
    return cube.isel(y=slice(None, None, -1)) if y_ascending else cube


def test_kilometre_coordinates_are_put_in_the_crs_metres(tmp_path):
    from pyproj import CRS as ProjCRS

    lcc = ProjCRS.from_proj4("+proj=lcc +lat_1=25 +lat_2=60 +lat_0=42.5 +lon_0=-100 +ellps=WGS84 +units=m")
    x_km = 1000 + (np.arange(40) + 0.5)
    y_km = 500 - (np.arange(30) + 0.5)
    ds = xr.Dataset(
        {"tmax": (("band", "y", "x"), np.ones((2, 30, 40), np.float32), {"grid_mapping": "lcc"})},
        coords={"x": ("x", x_km, {"units": "km"}), "y": ("y", y_km, {"units": "km"})},
    )
    ds["lcc"] = xr.DataArray(0, attrs=lcc.to_cf())
    ds.to_netcdf(tmp_path / "daymet.nc", engine="h5netcdf")
    transform = open_scene(tmp_path / "daymet.nc").grid.transform
    assert (transform.a, transform.e, transform.c, transform.f) == pytest.approx((1000, -1000, 1_000_000, 500_000))
    ds["x"].attrs["units"] = "m"
    err = _refusal(ds, tmp_path / "mixed_units.nc")
    assert err.what == "the y and x coordinates are in different units ('km', 'm')"


def test_every_cf_missing_value_and_the_valid_range_are_invalid(tmp_path):
    data = np.full((2, 6, 5), 1000, np.int16)
    data[:, 0] = -32768  # _FillValue
    data[:, 1] = -9999  # missing_value
    data[1, 2, 0] = 20000  # above valid_range
    cube = _utm_cube(data)
    cube.attrs.update(missing_value=np.int16(-9999), valid_range=np.array([0, 10000], np.int16))
    cube.encoding["_FillValue"] = np.int16(-32768)
    cube.to_dataset().to_netcdf(tmp_path / "refl.nc", engine="h5netcdf")
    scene = open_scene(tmp_path / "refl.nc")
    expected = np.ones((6, 5), bool)
    expected[:2] = False
    expected[2, 0] = False
    assert scene.nodata == -32768
    np.testing.assert_array_equal(scene.valid.compute(), expected)
    np.testing.assert_array_equal(scene.valid_of(scene.data.compute()), expected)
    # Stacked 2-D variables each follow their own attributes.
    ds = xr.Dataset({"red": cube[0].drop_vars("band", errors="ignore"), "nir": cube[1].drop_vars("band", errors="ignore")})
    for name in ("red", "nir"):
        ds[name].attrs.update(cube.attrs)
        ds[name].encoding["_FillValue"] = np.int16(-32768)
    ds.to_netcdf(tmp_path / "bands.nc", engine="h5netcdf")
    np.testing.assert_array_equal(open_scene(tmp_path / "bands.nc").valid.compute(), expected)


def test_a_cube_stored_south_row_first_is_read_north_up(tmp_path):
    data = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)
    _utm_cube(data).to_dataset().to_netcdf(tmp_path / "north.nc", engine="h5netcdf")
    _utm_cube(data, y_ascending=True).to_dataset().to_netcdf(tmp_path / "south.nc", engine="h5netcdf")
    north, south = open_scene(tmp_path / "north.nc"), open_scene(tmp_path / "south.nc")
    assert south.grid == north.grid and south.grid.transform.e == -30
    np.testing.assert_array_equal(south.data.compute(), data)


def test_a_single_date_is_squeezed_out_of_cubes_and_bands(tmp_path):
    data = np.arange(3 * 6 * 5, dtype=np.float32).reshape(3, 6, 5)
    cube = _utm_cube(data).expand_dims(time=np.array(["2020-06-01"], dtype="datetime64[ns]"))
    cube.to_dataset().to_netcdf(tmp_path / "cube.nc", engine="h5netcdf")
    scene = open_scene(tmp_path / "cube.nc")
    assert scene.data.shape == (3, 6, 5) and scene.grid.crs.to_epsg() == 32618
    np.testing.assert_array_equal(scene.data.compute(), data)
    bands = xr.Dataset({f"B{i + 1}": cube.isel(band=i) for i in range(3)})
    bands.to_netcdf(tmp_path / "bands.nc", engine="h5netcdf")
    scene = open_scene(tmp_path / "bands.nc")
    assert scene.band_names == ("B1", "B2", "B3")
    np.testing.assert_array_equal(scene.data.compute(), data)
    # Two dates are not one scene: the message names the variable's dimensions.
    two = xr.concat([cube, cube], dim="time").to_dataset()
    err = _refusal(two, tmp_path / "series.nc")
    assert err.what.startswith("no 2-D or 3-D data variable (refl has dimensions time, band, y, x)")
    two.to_netcdf(tmp_path / "series2.nc", engine="h5netcdf")
    with pytest.raises(InputError, match=r"variable 'refl' has dimensions \(time, band, y, x\)"):
        open_scene(tmp_path / "series2.nc", variable="refl")


def test_latitude_and_longitude_data_variables_are_not_bands(tmp_path):
    data = np.ones((2, 6, 5), np.float32)
    cube = _utm_cube(data)
    ds = xr.Dataset({"red": cube[0], "nir": cube[1]})
    ds["lat"] = (("y", "x"), np.full((6, 5), 37.9), {"units": "degrees_north"})
    ds["longitude_2d"] = (("y", "x"), np.full((6, 5), -75.1), {"standard_name": "longitude"})
    ds.to_netcdf(tmp_path / "swath.nc", engine="h5netcdf")
    assert open_scene(tmp_path / "swath.nc").band_names == ("red", "nir")


def test_upper_case_suffixes_are_read_as_netcdf(tmp_path):
    _utm_cube(np.ones((2, 6, 5), np.float32)).to_dataset().to_netcdf(tmp_path / "SCENE.NC", engine="h5netcdf")
    scene = open_scene(tmp_path / "SCENE.NC")
    assert scene.grid.crs.to_epsg() == 32618 and scene.grid.transform.c == 500_000


def test_a_zarr_array_without_metadata_is_named(tmp_path):
    import shutil

    store = tmp_path / "cube.zarr"
    _utm_cube(np.ones((2, 6, 5), np.float32)).to_dataset().to_zarr(store, zarr_format=3, consolidated=False)
    shutil.rmtree(store / "refl" / "c", ignore_errors=True)
    (store / "refl" / "zarr.json").unlink()
    with pytest.raises(InputError) as err:
        open_scene(store)
    assert "refl: no array metadata (zarr.json or .zarray), the store is damaged" in err.value.what


def test_a_crs_without_a_transform_is_warned_of(tmp_path):
    from sitfuse_byol.read.geotiff import georeferencing_warning

    cube = _utm_cube(np.ones((2, 6, 5), np.float32)).drop_vars(["x", "y"])
    cube.to_dataset().to_netcdf(tmp_path / "placed.nc", engine="h5netcdf")
    scene = open_scene(tmp_path / "placed.nc")
    assert scene.grid.crs.to_epsg() == 32618
    assert georeferencing_warning(scene).startswith("warning: scene has a CRS but no geotransform or x/y coordinates")
    _utm_cube(np.ones((2, 6, 5), np.float32)).to_dataset().to_netcdf(tmp_path / "ok.nc", engine="h5netcdf")
    assert georeferencing_warning(open_scene(tmp_path / "ok.nc")) is None


def test_an_integer_valid_range_without_a_fill_value_gets_a_nodata_outside_it(tmp_path):
    data = np.full((2, 6, 5), 500, np.uint16)
    data[:, 0, 0] = 65000
    cube = _utm_cube(data)
    cube.attrs["valid_range"] = np.array([0, 10000], np.uint16)
    cube.to_dataset().to_netcdf(tmp_path / "refl.nc", engine="h5netcdf")
    scene = open_scene(tmp_path / "refl.nc")
    assert scene.nodata == 65535
    valid = scene.valid.compute()
    assert not valid[0, 0] and valid.sum() == 6 * 5 - 1


def test_a_time_series_is_not_read_as_bands(tmp_path):
    cube = _utm_cube(np.ones((1, 6, 5), np.float32)).expand_dims(
        time=np.array(["2020-06-01", "2020-07-01", "2020-08-01"], dtype="datetime64[ns]")
    )
    err = _refusal(cube.to_dataset(), tmp_path / "series.nc")
    assert err.what.startswith("no 2-D or 3-D data variable (refl has dimensions time, band, y, x)")


def test_kilometre_coordinates_on_a_crs_in_kilometres_are_kept(tmp_path):
    from pyproj import CRS as ProjCRS

    lcc_km = ProjCRS.from_proj4("+proj=lcc +lat_1=25 +lat_2=60 +lat_0=42.5 +lon_0=-100 +ellps=WGS84 +units=km")
    ds = xr.Dataset(
        {"tmax": (("band", "y", "x"), np.ones((2, 30, 40), np.float32), {"grid_mapping": "lcc"})},
        coords={"x": ("x", 1000 + np.arange(40) + 0.5, {"units": "km"}), "y": ("y", 500 - np.arange(30) - 0.5, {"units": "km"})},
    )
    ds["lcc"] = xr.DataArray(0, attrs=lcc_km.to_cf())
    ds.to_netcdf(tmp_path / "km.nc", engine="h5netcdf")
    transform = open_scene(tmp_path / "km.nc").grid.transform
    assert (transform.a, transform.c) == pytest.approx((1, 1000))
