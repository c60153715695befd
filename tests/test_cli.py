"""The command line: real files in, one-line errors and exit codes out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import dask
import numpy as np
import pytest
import rasterio
import yaml

from sitfuse_byol.cli import main
from tests.conftest import write_tif


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_inspect_json_on_landsat(capsys, landsat_path):
    code, out, _ = run_cli(capsys, "inspect", str(landsat_path), "--json")
    assert code == 0
    info = json.loads(out)
    assert list(info) == [
        "id", "bands", "dtype", "shape", "crs", "transform", "res", "bounds", "nodata", "valid_fraction",
        "bands_without_data",
    ]
    with rasterio.open(landsat_path) as src:
        assert info["transform"] == list(src.transform)[:6]
        assert info["bounds"] == list(src.bounds)
        assert info["shape"] == [src.count, src.height, src.width]
    assert info["crs"] == "EPSG:31985"
    assert info["valid_fraction"] == 1.0
    assert info["nodata"] is None


def test_inspect_multifile_yaml_and_zarr_agree(capsys, sentinel2_yaml, sentinel2_zarr):
    _, out_yaml, _ = run_cli(capsys, "inspect", str(sentinel2_yaml), "--json")
    _, out_zarr, _ = run_cli(capsys, "inspect", str(sentinel2_zarr), "--json")
    a, b = json.loads(out_yaml), json.loads(out_zarr)
    for key in ("id", "bands", "dtype", "shape", "crs", "transform", "res", "bounds", "nodata"):
        assert a[key] == b[key], key
    assert a["crs"] == "EPSG:32618" and a["shape"] == [13, 504, 504]


def test_inspect_human_output_lists_chunks(capsys, landsat_path):
    code, out, _ = run_cli(capsys, "inspect", str(landsat_path))
    assert code == 0
    assert "chunks" in out and "EPSG:31985" in out and "100.00%" in out
    code, out, _ = run_cli(capsys, "inspect", str(landsat_path), "--json", "--unscale")
    assert code == 0 and json.loads(out)["dtype"] == "float32" and json.loads(out)["nodata"] == "nan"
    code, out, _ = run_cli(capsys, "inspect", str(landsat_path))
    # Coordinates to the metre and below, not 6 digits (about 10 m off in a UTM northing).
    with rasterio.open(landsat_path) as src:
        assert f"{src.transform.f:.10g}" in out and f"{src.bounds.bottom:.10g}" in out


def test_inspect_takes_the_reading_options_of_a_config_and_shows_a_nan_nodata(capsys, tmp_path):
    import xarray as xr

    data = np.arange(2 * 20 * 20, dtype=np.float32).reshape(2, 20, 20)
    data[:, :5] = np.nan
    path = write_tif(tmp_path / "nan.tif", data, nodata=float("nan"))
    code, out, _ = run_cli(capsys, "inspect", str(path))
    assert code == 0 and "nodata      nan" in out and "75.00%" in out
    # Band 2 holds 400 + 20 row + col: rows 5 (below, NaN) to 14 stay valid.
    code, out, _ = run_cli(capsys, "inspect", str(path), "--json", "--valid-range", "0", "699")
    info = json.loads(out)
    assert info["nodata"] == "nan" and info["valid_fraction"] == 0.5

    store = tmp_path / "two.nc"
    cube = xr.DataArray(data, dims=("band", "y", "x"), coords={"y": np.arange(20.0), "x": np.arange(20.0)})
    xr.Dataset({"refl": cube, "qa": cube * 0}).to_netcdf(store, engine="h5netcdf")
    code, _, err = run_cli(capsys, "inspect", str(store))
    assert code == 2 and "several 3-D variables (refl, qa); set data.variable" in err
    code, out, _ = run_cli(capsys, "inspect", str(store), "--variable", "refl", "--json")
    assert code == 0 and json.loads(out)["shape"] == [2, 20, 20]


def test_all_nodata_scene_reports_zero_valid_fraction(capsys, tmp_path):
    path = write_tif(tmp_path / "empty.tif", np.zeros((2, 30, 30), np.uint16), nodata=0)
    code, out, _ = run_cli(capsys, "inspect", str(path), "--json")
    assert code == 0 and json.loads(out)["valid_fraction"] == 0.0
    # Every band empty: no band is to blame.
    assert json.loads(out)["bands_without_data"] == ["B1", "B2"]
    code, out, _ = run_cli(capsys, "inspect", str(path))
    assert code == 0 and "leave" not in out


def test_a_band_without_data_is_named(capsys, tmp_path):
    data = np.ones((3, 30, 30), np.float32)
    data[1] = np.nan  # a water-vapour band of a hyperspectral cube
    path = write_tif(tmp_path / "cube.tif", data)
    code, out, _ = run_cli(capsys, "inspect", str(path))
    assert code == 0
    assert "valid       0.00%  (no valid pixel in B2: leave it out with data.bands)" in out
    code, out, _ = run_cli(capsys, "inspect", str(path), "--json", "--bands", "1,3")
    info = json.loads(out)
    assert info["valid_fraction"] == 1.0 and info["bands_without_data"] == []


def test_scene_without_crs_warns_but_works(capsys, tmp_path):
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as dst:
        dst.write(np.ones((1, 8, 8), np.uint8))
    code, out, err = run_cli(capsys, "inspect", str(path), "--json")
    assert code == 0
    assert json.loads(out)["crs"] is None
    assert err.startswith("warning: scene has no CRS")


def test_a_scene_placed_by_ground_control_points_is_told_to_warp_first(capsys, tmp_path):
    from rasterio.control import GroundControlPoint

    path = tmp_path / "gcps.tif"
    gcps = [GroundControlPoint(row, col, 290_000 + 10 * col, 9_110_000 - 10 * row) for row, col in ((0, 0), (0, 8), (8, 0), (8, 8))]
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as dst:
        dst.write(np.ones((1, 8, 8), np.uint8))
        dst.gcps = (gcps, rasterio.crs.CRS.from_epsg(31985))
    code, _, err = run_cli(capsys, "inspect", str(path), "--json")
    assert code == 0
    assert err == (
        "warning: scene is placed by 4 ground control points, without a CRS and geotransform; its outputs will "
        f"not be georeferenced: warp it first, e.g. gdalwarp -t_srs EPSG:<code> in.tif out.tif ({path})\n"
    )


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "missing.tif"))
    assert_one_line_error(code, err, "file not found", "missing.tif")


def test_truncated_geotiff(capsys, tmp_path, landsat_path):
    data = landsat_path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "inspect", str(cut))
    assert_one_line_error(code, err, "cut.tif")
    assert "truncated" in err or "cannot" in err


def test_text_file_named_tif(capsys, tmp_path):
    fake = tmp_path / "fake.tif"
    fake.write_text("hello\n")
    code, _, err = run_cli(capsys, "inspect", str(fake))
    assert_one_line_error(code, err, "not a raster GDAL can read", "fake.tif")


def test_band_index_out_of_range_and_unknown_name(capsys, landsat_path):
    code, _, err = run_cli(capsys, "inspect", str(landsat_path), "--bands", "1,9")
    assert_one_line_error(code, err, "band index 9 out of range 1..6", "landsat7_olinda.tif")
    code, _, err = run_cli(capsys, "inspect", str(landsat_path), "--bands", "B4,NIR")
    assert_one_line_error(code, err, "unknown band name 'NIR'")


def test_multifile_scene_with_different_crs(capsys, tmp_path):
    write_tif(tmp_path / "a.tif", np.ones((20, 20), np.uint16), crs="EPSG:32618")
    write_tif(tmp_path / "b.tif", np.ones((20, 20), np.uint16), crs="EPSG:4326")
    (tmp_path / "scene.yaml").write_text(yaml.safe_dump({"id": "mixed", "bands": ["a.tif", "b.tif"]}))
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "scene.yaml"))
    assert_one_line_error(code, err, "different CRSs", "b.tif")


def test_scene_list_with_one_bad_entry_names_it(capsys, tmp_path, landsat_path):
    (tmp_path / "scenes.txt").write_text(f"{landsat_path}\n# comment\nnot_there.tif\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"scenes": "scenes.txt"}, "output": {"dir": "out"}}))
    code, out, err = run_cli(capsys, "stats", "-c", str(config))
    # The batch goes on without the bad scene, names it, and exits 1.
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scene not_there left out: read: file not found")
    assert "scenes.txt:3" in lines[0]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["scenes"] == ["landsat7_olinda"]
    assert "statistics of 1 scene(s)" in out
    # Once the file is there, the scene counts and the old failure is not reported again.
    shutil.copy(landsat_path, tmp_path / "not_there.tif")
    code, out, err = run_cli(capsys, "stats", "-c", str(config), "--quiet")
    assert (code, err) == (0, "")
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["scenes"] == ["landsat7_olinda", "not_there"]


def test_malformed_yaml_scene_list_is_a_one_line_error(capsys, tmp_path):
    (tmp_path / "scenes.yaml").write_text("- a.tif\n- [b.tif\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"scenes": "scenes.yaml"}, "output": {"dir": "out"}}))
    code, _, err = run_cli(capsys, "stats", "-c", str(config))
    assert_one_line_error(code, err, "invalid YAML", "scenes.yaml")


def test_stats_command_writes_stats_json(capsys, tmp_path, landsat_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"scenes": [str(landsat_path)]}, "output": {"dir": "out"}}))
    code, out, _ = run_cli(capsys, "stats", "-c", str(config))
    assert code == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    with rasterio.open(landsat_path) as src:
        pixels = src.read().reshape(6, -1).astype(float)
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=1))
    np.testing.assert_array_equal(stats["p98"], np.percentile(pixels, 98, axis=1))
    assert "stats.json" in out


def test_console_script_exit_code_and_debug_traceback(tmp_path):
    missing = str(tmp_path / "x.tif")
    plain = subprocess.run(
        [sys.executable, "-m", "sitfuse_byol.cli", "inspect", missing], capture_output=True, text=True
    )
    assert plain.returncode == 2
    assert plain.stderr.strip() == f"error: file not found ({missing})"
    debug = subprocess.run(
        [sys.executable, "-m", "sitfuse_byol.cli", "--debug", "inspect", missing],
        capture_output=True,
        text=True,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=ten", "error: config: train.epochs: must be a positive integer (got 'ten')"),
        ("train.epoch=3", "error: config: train.epoch: unknown key; did you mean 'epochs'?"),
        ("tiling.patch_size=2", "error: config: tiling.patch_size: must be an integer >= 4 (got 2)"),
    ],
)
def test_bad_config_values(capsys, tmp_path, override, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"scenes": ["a.tif"]}}))
    code, _, err = run_cli(capsys, "config", "show", "-c", str(config), "--set", override)
    assert code == 2
    assert err.strip() == message


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "-1"], "error: config: dask.workers: must be a positive integer (got -1)"),
        (["--gpus-per-worker", "-1"], "error: config: dask.gpus_per_worker: must be a non-negative integer (got -1)"),
        (["--scheduler", "nonsense"], "error: cannot reach the Dask scheduler: missing port number in address 'nonsense' (nonsense)"),
    ],
)
def test_dask_flags_are_checked_before_any_work(capsys, tmp_path, landsat_path, flags, message):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"data": {"scenes": [str(landsat_path)]}, "output": {"dir": str(tmp_path / "out")}})
    )
    scheduler_before = dask.config.get("scheduler", None)
    code, _, err = run_cli(capsys, "run", "-c", str(config), "--quiet", *flags)
    assert code == 2
    assert err.strip() == message
    assert not (tmp_path / "out").exists()
    # A failed connection must not leave dask pointed at a scheduler that is not there
    # (later computes in this process would wait for it).
    assert dask.config.get("scheduler", None) == scheduler_before


def test_scenes_flag_is_taken_from_the_current_folder(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"scenes": ["a.tif"]}}))
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "config", "show", "-c", str(config), "--scenes", "scenes/*.tif")
    assert code == 0
    assert yaml.safe_load(out)["data"]["scenes"] == str(tmp_path / "scenes" / "*.tif")
    # Repeated, every one counts (not the last alone).
    code, out, _ = run_cli(
        capsys, "config", "show", "-c", str(config), "--scenes", "scenes/*.tif", "--scenes", "more/b.tif"
    )
    assert code == 0
    assert yaml.safe_load(out)["data"]["scenes"] == [str(tmp_path / "scenes" / "*.tif"), str(tmp_path / "more" / "b.tif")]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train"], "error: the following arguments are required: -c/--config (sitfuse train; see --help)"),
        (["assign", "-c", "x.yaml", "--threshold", "abc"],
         "error: argument --threshold: invalid float value: 'abc' (sitfuse assign; see --help)"),
    ],
)
def test_command_line_mistakes_are_one_line_too(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == expected + "\n"


def test_repeated_or_empty_class_names_are_config_errors(tmp_path, capsys, landsat_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"scenes": [str(landsat_path)]}, "output": {"class_names": ["A", "A", "B"]}}))
    assert main(["config", "show", "-c", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: config: output.class_names: names must differ; 'A' appears more than once (got [A, A, B])"
    )
    config.write_text(yaml.safe_dump({"data": {"scenes": [str(landsat_path)]}, "output": {"class_names": ["A", ""]}}))
    assert main(["config", "show", "-c", str(config)]) == 2
    assert "output.class_names: must be a list of non-empty names" in capsys.readouterr().err
