"""`sitfuse run` end to end on three real scenes, with a real LocalCluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import torch
from rio_cogeo.cogeo import cog_validate

from sitfuse_byol.cli import main
from sitfuse_byol.config import load_config
from tests.conftest import corrupt_tile
from tests.run.conftest import CROP_SIZE, CROPS, labels_of, write_config


def yaml_value(path, section, key):
    import yaml

    return yaml.safe_load(path.read_text())[section][key]


def test_run_writes_label_cogs_on_each_input_grid(base_run, crop_scenes):
    folder, _, code, stdout = base_run
    assert code == 0, stdout
    out = folder / "out"
    for name, scene_path in crop_scenes.items():
        label_path = out / "labels" / f"{name}.tif"
        with rasterio.open(scene_path) as src, rasterio.open(label_path) as dst:
            assert dst.crs == src.crs and dst.transform == src.transform
            assert (dst.width, dst.height) == (src.width, src.height)
            assert dst.dtypes[0] == "uint8" and dst.nodata == 255
            labels = dst.read(1)
            invalid = (src.read() == 0).any(axis=0)
            np.testing.assert_array_equal(labels == 255, invalid)
            assert labels[~invalid].max() < 6
            tags = dst.tags()
            assert tags["K"] == "6" and len(tags["model_hash"]) > 8
            assert tags["config_hash"] == load_config(out / "config.resolved.yaml").settings_digest()
            assert dst.colormap(1)[0][:3] != dst.colormap(1)[1][:3]
            assert dst.descriptions[0] == "cluster"
        is_valid, errors, _ = cog_validate(str(label_path))
        assert is_valid, errors
        for sidecar in (f"{name}.qml", f"{name}.tif.aux.xml", f"{name}.png"):
            assert (out / "labels" / sidecar).exists(), sidecar
        with rasterio.open(out / "confidence" / f"{name}.tif") as conf:
            values = conf.read(1)
            assert np.isnan(values[invalid]).all() and (values[~invalid] >= 0).all()
    manifest = json.loads((out / "run.json").read_text())
    assert {e["status"] for e in manifest["scenes"].values()} == {"done"}
    assert set(manifest["stages"]["embed_seconds"]) == set(crop_scenes)
    for name, entry in manifest["scenes"].items():
        # Every stage a scene went through in this run, with its seconds.
        assert set(entry["timings"]) == {"stats", "histogram", "embed", "export"}
        assert all(seconds > 0 for seconds in entry["timings"].values())
        # Relative to OUTDIR, so a moved output folder still finds its files.
        assert entry["outputs"]["labels"] == f"labels/{name}.tif"
        assert entry["outputs"]["confidence"] == f"confidence/{name}.tif"
    assert (out / "config.resolved.yaml").exists()
    # The log tells the run's story: its start, each stage and scene task, its end.
    log = (out / "logs" / "sitfuse.log").read_text()
    assert "run started: stages stats, train, embed, cluster, export over 3 scene(s)" in log
    for stage in ("stats", "train", "cluster"):
        assert f"stage {stage} done in" in log
    for name in crop_scenes:
        assert f"scene {name}: embed done in" in log and f"scene {name}: export done in" in log
    assert log.rstrip().endswith("run finished: 0 scene(s) failed of 3")
    assert "olinda_a" in stdout and str(out / "labels") in stdout


def test_run_statistics_from_scene_tasks_equal_compute_stats(base_run, crop_scenes):
    from sitfuse_byol.normalize import BandStats, compute_stats
    from sitfuse_byol.read import open_scene

    folder, *_ = base_run
    saved = BandStats.load(folder / "out" / "stats.json")
    expected = compute_stats([open_scene(path) for path in crop_scenes.values()])
    assert saved.scenes == tuple(crop_scenes) and saved.band_names == expected.band_names
    # Integer bands: counts, extremes and percentiles are exact; moments merge in other chunks.
    for name in ("count", "min", "max", "p2", "p98"):
        assert getattr(saved, name) == getattr(expected, name), name
    np.testing.assert_allclose(saved.mean, expected.mean, rtol=1e-12)
    np.testing.assert_allclose(saved.std, expected.std, rtol=1e-12)


def test_one_model_gives_the_same_label_to_the_same_pixels_in_every_scene(base_run):
    folder, *_ = base_run
    out = folder / "out"
    a = labels_of(out / "labels" / "olinda_a.tif")
    b = labels_of(out / "labels" / "olinda_b.tif")
    # Scenes a and b overlap in rows 40..159 and columns 60..159 of a; compare the interior,
    # away from each crop's edges where the mirrored padding differs.
    margin = 12
    row, col = CROPS["olinda_b"]
    a_part = a[row + margin : CROP_SIZE - margin, col + margin : CROP_SIZE - margin]
    b_part = b[margin : CROP_SIZE - row - margin, margin : CROP_SIZE - col - margin]
    assert a_part.size > 5000
    assert (a_part == b_part).mean() > 0.99


def test_rerun_skips_done_scenes_and_force_redoes_them(base_run, tmp_path, capsys):
    folder, config, *_ = base_run
    label = folder / "out" / "labels" / "olinda_a.tif"
    before = label.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", "-c", str(config), "--quiet"]) == 0
    assert label.stat().st_mtime_ns == before
    # The summary says so: nothing ran for the scene in this run.
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("olinda_a "))
    assert row.split()[1:3] == ["unchanged", "-"] and row.endswith(str(label))
    # As does the JSON summary, and `sitfuse train`.
    assert main(["run", "-c", str(config), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scenes"]["olinda_a"]["this_run"] == "unchanged"
    assert summary["scenes"]["olinda_a"]["seconds_this_run"] is None
    assert summary["stages_run"] == [] and summary["failed"] == []
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("unchanged, not trained again (--force trains again): 1 epoch(s)")
    assert main(["run", "-c", str(config), "--json", "--force"]) == 0
    assert label.stat().st_mtime_ns != before
    summary = json.loads(capsys.readouterr().out)
    assert summary["scenes"]["olinda_a"]["this_run"] == "done"
    assert summary["scenes"]["olinda_a"]["seconds_this_run"] > 0
    assert summary["stages_run"] == ["stats", "train", "embed", "cluster", "export"]


def test_cluster_fit_from_kept_samples_equals_fit_from_the_stores(base_run, tmp_path, crop_scenes):
    folder, _, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    kept = [tmp_path / "out" / "embeddings" / f"{name}.samples.npz" for name in crop_scenes]
    assert all(path.exists() for path in kept)
    centroids = np.load(tmp_path / "out" / "cluster" / "centroids.npy")
    # Without the kept samples, workers draw them again from the saved embeddings.
    for path in kept:
        path.unlink()
    config = write_config(tmp_path, crop_scenes.values())
    assert main(["cluster", "-c", str(config), "--quiet", "--force"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "cluster" / "centroids.npy"), centroids)


def test_a_bad_scene_does_not_stop_the_others(tmp_path, crop_scenes, capsys):
    broken = tmp_path / "broken.tif"
    data = crop_scenes["olinda_a"].read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    # An odd band count first in the list fails alone; the others agree on 6 bands.
    four_bands = tmp_path / "four_bands.tif"
    with rasterio.open(crop_scenes["olinda_a"]) as src:
        profile = src.profile | {"count": 4}
        with rasterio.open(four_bands, "w", **profile) as dst:
            dst.write(src.read([1, 2, 3, 4]))
    empty = tmp_path / "empty.tif"
    with rasterio.open(crop_scenes["olinda_a"]) as src, rasterio.open(empty, "w", **src.profile) as dst:
        dst.write(np.zeros((src.count, src.height, src.width), src.dtypes[0]))
    config = write_config(
        tmp_path, [four_bands, crop_scenes["olinda_a"], broken, crop_scenes["olinda_b"], empty]
    )
    code = main(["run", "-c", str(config), "--quiet", "--json"])
    assert code == 1
    output = capsys.readouterr()
    summary = json.loads(output.out.strip().splitlines()[-1])
    # The summary lists the failures; the console gets no line per scene, the log does,
    # as warnings inside the run's record.
    assert "failed in" not in output.err
    log_lines = (tmp_path / "out" / "logs" / "sitfuse.log").read_text().splitlines()
    started = next(i for i, line in enumerate(log_lines) if "run started" in line)
    failures = [i for i, line in enumerate(log_lines) if "failed in" in line]
    assert len(failures) == 3 and min(failures) > started
    assert all(" WARNING " in log_lines[i] for i in failures)
    assert summary["scenes"]["four_bands"] == summary["scenes"]["four_bands"] | {
        "status": "failed",
        "error": f"read: scene has 4 bands but 3 of the 4 scenes (e.g. olinda_a) have 6 ({four_bands})",
    }
    assert summary["scenes"]["broken"]["status"] == "failed"
    assert "broken.tif" in summary["scenes"]["broken"]["error"]
    # All nodata: it fails when embedded, and leaves no embeddings behind.
    assert summary["scenes"]["empty"] == summary["scenes"]["empty"] | {
        "status": "failed", "error": "embed: no valid pixel to sample embeddings from (empty)",
    }
    assert not (tmp_path / "out" / "embeddings" / "empty.zarr").exists()
    assert summary["scenes"]["olinda_a"]["status"] == "done"
    assert summary["scenes"]["olinda_b"]["status"] == "done"
    assert (tmp_path / "out" / "labels" / "olinda_b.tif").exists()
    assert not (tmp_path / "out" / "labels" / "broken.tif").exists()


def _with_a_corrupt_tile(source, path):
    """A copy of ``source`` whose header is intact and whose first tile cannot be decoded."""
    with rasterio.open(source) as src, rasterio.open(path, "w", **(src.profile | {"compress": "deflate"})) as dst:
        dst.write(src.read())
    return corrupt_tile(path, length=64)


def test_a_scene_with_a_corrupt_tile_fails_in_every_command_and_the_others_go_on(tmp_path, crop_scenes, capsys):
    bad = _with_a_corrupt_tile(crop_scenes["olinda_c"], tmp_path / "olinda_c.tif")
    config = str(write_config(tmp_path, [crop_scenes["olinda_a"], crop_scenes["olinda_b"], bad]))
    assert main(["stats", "-c", config, "--quiet"]) == 1
    # The statistics left it out; the next command must not take them for the whole list's.
    assert main(["train", "-c", config, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("scene olinda_c left out: stats: cannot read pixels: ") == 2, err
    assert (tmp_path / "out" / "checkpoints" / "last.pt").exists()
    assert main(["run", "-c", config, "--quiet"]) == 1
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert {s: manifest["scenes"][s]["status"] for s in manifest["scenes"]} == {
        "olinda_a": "done", "olinda_b": "done", "olinda_c": "failed",
    }
    # Embedded on its own (no statistics pass first), it fails in a worker task, retried
    # as a passing read failure might be, and still named by its file with GDAL's reason.
    assert main(["embed", "-c", config, "--quiet", "--force"]) == 1
    error = json.loads((tmp_path / "out" / "run.json").read_text())["scenes"]["olinda_c"]["error"]
    assert error.startswith("embed: cannot read pixels: ") and error.endswith(f"({bad})"), error
    assert "TIFFReadEncodedTile" in error and "See previous exception" not in error


def test_a_rerun_reads_only_the_scene_left_out_of_the_statistics_until_it_is_mended(tmp_path, crop_scenes, capsys):
    bad = _with_a_corrupt_tile(crop_scenes["olinda_c"], tmp_path / "olinda_c.tif")
    config = str(write_config(tmp_path, [crop_scenes["olinda_a"], crop_scenes["olinda_b"], bad]))
    stats, record = tmp_path / "out" / "stats.json", tmp_path / "out" / "run.json"
    assert main(["stats", "-c", config, "--quiet"]) == 1
    made, entry = stats.stat().st_mtime_ns, json.loads(record.read_text())["stages"]["stats"]
    assert list(entry["left_out"]) == ["olinda_c"]
    capsys.readouterr()
    # The statistics stand: only the scene left out is read again, and fails again.
    assert main(["stats", "-c", config, "--quiet"]) == 1
    assert "scene olinda_c left out: stats: cannot read pixels: " in capsys.readouterr().err
    assert stats.stat().st_mtime_ns == made
    assert json.loads(record.read_text())["stages"]["stats"] == entry
    assert json.loads(stats.read_text())["scenes"] == ["olinda_a", "olinda_b"]
    # Mended, it joins the statistics.
    shutil.copy(crop_scenes["olinda_c"], bad)
    assert main(["stats", "-c", config, "--quiet"]) == 0
    assert json.loads(stats.read_text())["scenes"] == ["olinda_a", "olinda_b", "olinda_c"]
    assert json.loads(record.read_text())["stages"]["stats"]["left_out"] == {}


def test_a_scene_still_unreadable_stays_left_out_when_another_reads_again(tmp_path, crop_scenes):
    import os

    bad_b = _with_a_corrupt_tile(crop_scenes["olinda_b"], tmp_path / "olinda_b.tif")
    bad_c = _with_a_corrupt_tile(crop_scenes["olinda_c"], tmp_path / "olinda_c.tif")
    # olinda_b's own bytes, to put back later with the same size and time: to the
    # fingerprint, a read that failed in passing.
    intact = tmp_path / "intact_b.tif"
    with rasterio.open(crop_scenes["olinda_b"]) as src, rasterio.open(
        intact, "w", **(src.profile | {"compress": "deflate"})
    ) as dst:
        dst.write(src.read())
    assert intact.stat().st_size == bad_b.stat().st_size
    config = str(write_config(tmp_path, [crop_scenes["olinda_a"], bad_b, bad_c]))
    record = tmp_path / "out" / "run.json"
    assert main(["stats", "-c", config, "--quiet"]) == 1
    assert sorted(json.loads(record.read_text())["stages"]["stats"]["left_out"]) == ["olinda_b", "olinda_c"]
    stat = bad_b.stat()
    bad_b.write_bytes(intact.read_bytes())
    os.utime(bad_b, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # olinda_b reads now, so the statistics are made anew, still without olinda_c.
    assert main(["stats", "-c", config, "--quiet"]) == 1
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["scenes"] == ["olinda_a", "olinda_b"]
    assert list(json.loads(record.read_text())["stages"]["stats"]["left_out"]) == ["olinda_c"]
    made = (tmp_path / "out" / "stats.json").stat().st_mtime_ns
    assert main(["stats", "-c", config, "--quiet"]) == 1
    assert (tmp_path / "out" / "stats.json").stat().st_mtime_ns == made


def test_scenes_with_bands_in_another_order_or_scale_fail(tmp_path, crop_scenes, capsys, caplog):
    def copy(name, order, descriptions, scale=1.0):
        path = tmp_path / f"{name}.tif"
        with rasterio.open(crop_scenes["olinda_b"]) as src, rasterio.open(path, "w", **src.profile) as dst:
            dst.write(src.read(order))
            dst.descriptions = descriptions(src.descriptions)
            if scale != 1.0:
                dst.scales = [scale] * src.count
                dst.offsets = [-0.2] * src.count
        return path

    reversed_bands = copy("reversed", [6, 5, 4, 3, 2, 1], lambda names: names[::-1])
    renamed = copy("renamed", [1, 2, 3, 4, 5, 6], lambda names: tuple(f"SR_{n}" for n in names))
    scaled = copy("scaled", [1, 2, 3, 4, 5, 6], lambda names: names, scale=2.75e-5)
    config = write_config(tmp_path, [crop_scenes["olinda_a"], reversed_bands, renamed, scaled])
    assert main(["stats", "-c", str(config), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert (
        "scene reversed left out: read: the scene's bands (B7, B5, B4, B3, B2, B1) are olinda_a's "
        "(B1, B2, B3, B4, B5, B7) in another order; list them in data.bands to read every scene in one order "
        f"({reversed_bands})"
    ) in err
    # Other names (other producers' conventions, dated file stems) are no evidence of another order.
    assert "renamed" not in err
    # Names shifted by one are: a warning (a different product may hold other bands).
    shifted = copy("shifted", [1, 2, 3, 4, 5, 6], lambda names: (*names[1:], "B8"))
    config = write_config(tmp_path, [crop_scenes["olinda_a"], shifted, renamed], out="shifted")
    with caplog.at_level("WARNING"):
        assert main(["stats", "-c", str(config), "--quiet"]) == 0
    console_warnings = [r for r in caplog.records if r.levelname == "WARNING" and not hasattr(r, "log_file_only")]
    assert [r.getMessage() for r in console_warnings] == [
        "warning: band names at other positions than in olinda_a (B1, B2, B3, B4, B5, B7): shifted (B2, B3, B4, "
        "B5, B7, B8); scenes are stacked band by band by position, so check that they hold the same bands in the "
        "same order (data.bands selects bands by name)"
    ]
    # A scene left out is nobody's reference; repeated names name no position.
    scaled_shifted = copy("scaled_shifted", [1, 2, 3, 4, 5, 6], lambda names: (*names[1:], "B8"), scale=2.75e-5)
    same = copy("same", [1, 2, 3, 4, 5, 6], lambda names: ("reflectance",) * 6)
    for scenes, code in (([scaled_shifted, crop_scenes["olinda_a"], crop_scenes["olinda_b"]], 1), ([same], 0)):
        config = write_config(tmp_path, scenes, out="quiet")
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert main(["stats", "-c", str(config), "--quiet"]) == code
        assert not [r for r in caplog.records if "band names" in r.getMessage()], scenes
    assert (
        "scene scaled left out: read: the scene's values are stored with (scale, offset) (2.75e-05, -0.2) "
        "but olinda_a's with (1, 0); values are read as stored, so the two would not compare: "
        "set data.unscale: true to read physical values"
    ) in err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["scenes"] == ["olinda_a", "renamed"]
    # The same packing written once in float32: the same, not another.
    scaled32 = copy("scaled32", [1, 2, 3, 4, 5, 6], lambda names: names, scale=float(np.float32(2.75e-5)))
    config = write_config(tmp_path, [scaled, scaled32], out="packed")
    assert main(["stats", "-c", str(config), "--quiet"]) == 0, capsys.readouterr().err
    # Read in physical units, scenes packed differently mix: statistics of all of them.
    config = write_config(tmp_path, [crop_scenes["olinda_a"], scaled], out="unscaled", data={"unscale": True})
    assert main(["stats", "-c", str(config), "--quiet"]) == 0, capsys.readouterr().err
    stats = json.loads((tmp_path / "unscaled" / "stats.json").read_text())
    assert stats["scenes"] == ["olinda_a", "scaled"]


def test_a_scene_left_out_of_the_clustering_fails_again_when_the_clustering_is_reused(
    base_run, tmp_path, crop_scenes, capsys
):
    folder, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    empty = tmp_path / "empty.tif"
    with rasterio.open(crop_scenes["olinda_a"]) as src, rasterio.open(empty, "w", **src.profile) as dst:
        dst.write(np.zeros((src.count, src.height, src.width), src.dtypes[0]))
    config = write_config(tmp_path, [crop_scenes["olinda_a"], empty], embed={"save": False})
    errors = []
    # The second run reuses the clustering the first one fitted; `export` runs on it alone.
    for command in ("cluster", "cluster", "export"):
        assert main([command, "-c", str(config), "--quiet", "--json"]) == 1
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        errors.append(summary["scenes"]["empty"]["error"])
        assert summary["scenes"]["olinda_a"]["status"] == "done"
        assert not (tmp_path / "out" / "labels" / "empty.tif").exists()
    assert errors == ["sample: no valid pixel to sample embeddings from (empty)"] * 3


def test_a_passing_sample_failure_is_tried_again_by_the_next_run(base_run, tmp_path, crop_scenes, capsys, monkeypatch):
    import sitfuse_byol.run.pipeline as pipeline

    folder, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    config = write_config(tmp_path, crop_scenes.values(), embed={"save": False})
    real = pipeline.sample_task
    away = [True]

    def flaky(config, ref, threads=1):
        if ref.id == "olinda_b" and away[0]:  # through every retry of this run
            raise OSError("the network file system went away")
        return real(config, ref, threads)

    monkeypatch.setattr(pipeline, "sample_task", flaky)
    assert main(["cluster", "-c", str(config), "--quiet", "--json"]) == 1
    assert "OSError" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scenes"]["olinda_b"]["error"]
    away[0] = False
    # Not a property of the scene: the next run samples and labels it.
    assert main(["cluster", "-c", str(config), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scenes"]["olinda_b"]["status"] == "done"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_embedding_on_cuda_without_a_gpu_is_refused_before_any_work(base_run, tmp_path, crop_scenes, capsys):
    folder, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    manifest = (tmp_path / "out" / "run.json").read_bytes()
    config = write_config(tmp_path, crop_scenes.values())
    # Local workers embed on this machine: a device it lacks is known at once, not per scene.
    code = main(["embed", "-c", str(config), "--quiet", "--json", "--force", "--device", "cuda"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: device cuda asked for, but torch sees no CUDA GPU (embed.device)"
    assert (tmp_path / "out" / "run.json").read_bytes() == manifest


def test_embeddings_that_do_not_fit_on_the_disk_are_refused_before_any_is_written(
    base_run, tmp_path, crop_scenes, capsys, monkeypatch
):
    import sitfuse_byol.run.pipeline as pipeline

    folder, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / "embeddings")
    config = write_config(tmp_path, crop_scenes.values())
    from sitfuse_byol.train.checkpoint import load_encoder

    dim = load_encoder(tmp_path / "out" / "checkpoints" / "last.pt").encoder.out_channels
    # Float32 stores of every scene, edge chunks (96 px blocks) whole; one byte less is free.
    side = -(-CROP_SIZE // 96) * 96
    need = len(crop_scenes) * side**2 * dim * 4
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: real._replace(free=need - 1))
    assert main(["embed", "-c", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    from dask.utils import format_bytes

    assert err.startswith(
        f"error: embeddings of 3 scene(s) need {format_bytes(need)} but only {format_bytes(need - 1)} is free"
    )
    assert "embed.save: false" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "embeddings").exists()
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: real._replace(free=need))
    assert main(["embed", "-c", str(config), "--quiet"]) == 0


def test_too_many_clusters_is_a_clear_error(tmp_path, crop_scenes, capsys):
    config = write_config(tmp_path, [crop_scenes["olinda_a"]], cluster={"n_clusters": 500, "samples_per_scene": 100})
    assert main(["run", "-c", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: cluster.n_clusters is 500 but only 100 pixels can be sampled (100 from each of 1 scene(s)); "
        "lower n_clusters or raise cluster.samples_per_scene (cluster.n_clusters)"
    )
    # Found before any work: nothing trained, nothing written.
    assert not (tmp_path / "out").exists()
    # Within the sample size, but more than the scene's valid pixels: found when sampling.
    config = write_config(
        tmp_path, [crop_scenes["olinda_a"]], cluster={"n_clusters": 30_000, "samples_per_scene": 100_000}
    )
    assert main(["run", "-c", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cluster.n_clusters is 30000 but only")
    assert len(err.splitlines()) == 1


def test_scene_with_other_bands_and_model_from_other_encoder(base_run, tmp_path, sentinel2_zarr, crop_scenes, capsys):
    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    config = write_config(tmp_path, [sentinel2_zarr])
    log_before = (out / "logs" / "sitfuse.log").read_text()
    # The console script itself: the error stays one line on the terminal, and the refused
    # command writes nothing, not even to the log.
    done = subprocess.run(
        [sys.executable, "-m", "sitfuse_byol.cli", "export", "-c", str(config), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert err.startswith("error: ") and "trained on 6 bands" in err and "has 13" in err
    assert len(err.splitlines()) == 1, err
    assert (out / "logs" / "sitfuse.log").read_text() == log_before

    # Retrain (another encoder), keep the old clustering model, export: refused.
    config = write_config(tmp_path, crop_scenes.values(), train={"seed": 99})
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", "-c", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "clustering model was fitted with another encoder" in err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kmeans", "iic"])
def test_hierarchical_levels_and_streamed_embeddings(tmp_path, crop_scenes, method):
    config = write_config(
        tmp_path, [crop_scenes["olinda_a"]],
        cluster={"hierarchical": True, "n_clusters": 3, "n_fine": 2, "method": method},
        embed={"save": False},
    )
    assert main(["run", "-c", str(config), "--quiet"]) == 0
    fine = labels_of(tmp_path / "out" / "labels" / "olinda_a.tif")
    coarse = labels_of(tmp_path / "out" / "labels" / "olinda_a_coarse.tif")
    valid = fine != 255
    assert fine[valid].max() < 6 and coarse[valid].max() < 3
    np.testing.assert_array_equal(fine[valid] // 2, coarse[valid])
    assert not (tmp_path / "out" / "embeddings").exists()


@pytest.mark.slow
def test_streamed_sample_from_some_blocks_is_the_same_on_one_or_two_workers(base_run, tmp_path, crop_scenes):
    folder, *_ = base_run
    runs = {}
    for workers in (1, 2):
        run_dir = tmp_path / f"workers_{workers}"
        run_dir.mkdir()
        shutil.copytree(folder / "out", run_dir / "out")
        shutil.rmtree(run_dir / "out" / "embeddings")
        # 160 px scenes: 2 of their 64 px sample blocks are embedded for the sample.
        config = write_config(run_dir, crop_scenes.values(), embed={"save": False}, cluster={"sample_blocks": 2})
        assert main(["run", "-c", str(config), "--quiet", "--workers", str(workers)]) == 0
        out = run_dir / "out"
        assert not (out / "embeddings").exists()
        runs[workers] = (
            np.load(out / "cluster" / "centroids.npy"),
            {name: labels_of(out / "labels" / f"{name}.tif") for name in crop_scenes},
        )
    np.testing.assert_array_equal(runs[1][0], runs[2][0])
    for name in crop_scenes:
        np.testing.assert_array_equal(runs[1][1][name], runs[2][1][name])
    # Another sample than the saved run's (every block), so another model.
    assert not np.array_equal(runs[1][0], np.load(folder / "out" / "cluster" / "centroids.npy"))


def _write_class_polygons(path, scene_path):
    """Two class polygons over the first scene, in WGS 84 as a user might draw them."""
    import pyogrio.raw
    import shapely
    from rasterio.warp import transform_geom

    with rasterio.open(scene_path) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs
    width, height = right - left, top - bottom
    boxes = {
        "water": shapely.box(left + 0.6 * width, bottom + 0.1 * height, left + 0.9 * width, bottom + 0.4 * height),
        "land": shapely.box(left + 0.1 * width, bottom + 0.6 * height, left + 0.4 * width, bottom + 0.9 * height),
    }
    geometries = [
        shapely.to_wkb(shapely.geometry.shape(transform_geom(crs, "EPSG:4326", shapely.geometry.mapping(box))))
        for box in boxes.values()
    ]
    pyogrio.raw.write(
        path, geometry=np.array(geometries, dtype=object), field_data=[np.array(list(boxes), dtype=object)],
        fields=["class"], crs="EPSG:4326", driver="GPKG", geometry_type="Polygon",
    )
    return path


def test_assign_command_maps_clusters_and_reapplies_an_edited_mapping(base_run, tmp_path, crop_scenes, capsys):
    import yaml

    folder, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    config = write_config(tmp_path, crop_scenes.values())
    polygons = _write_class_polygons(tmp_path / "classes.gpkg", crop_scenes["olinda_a"])
    assert main(["assign", "-c", str(config), "--labels", str(polygons)]) == 0
    stdout = capsys.readouterr().out
    assert "purity" in stdout
    mapping_path = tmp_path / "out" / "assign" / "mapping.yaml"
    mapping = yaml.safe_load(mapping_path.read_text())
    assert set(mapping["clusters"].values()) <= {"water", "land", "uncertain"}
    classes = tmp_path / "out" / "classes" / "olinda_a.tif"
    with rasterio.open(classes) as dst, rasterio.open(crop_scenes["olinda_a"]) as src:
        assert dst.crs == src.crs and dst.transform == src.transform
        before = dst.read(1)
        assert json.loads(dst.tags()["classes"]) == mapping["classes"]
    assert (tmp_path / "out" / "classes" / "olinda_a.qml").read_text().count("paletteEntry") == 3

    # Send every cluster to "land" by editing the text, then re-apply.
    edited = yaml.safe_load(mapping_path.read_text())
    edited["clusters"] = {k: "land" for k in edited["clusters"]}
    mapping_path.write_text(yaml.safe_dump(edited))
    assert main(["assign", "-c", str(config), "--apply", str(mapping_path)]) == 0
    after = labels_of(classes)
    land = edited["classes"].index("land") if "land" in edited["classes"] else None
    valid = before != 255
    assert land is not None and (after[valid] == land).all()


def test_run_with_labels_assigns_and_reports_like_the_assign_command(base_run, tmp_path, crop_scenes, capsys):
    folder, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    config = write_config(tmp_path, crop_scenes.values())
    polygons = _write_class_polygons(tmp_path / "classes.gpkg", crop_scenes["olinda_a"])
    assert main(["run", "-c", str(config), "--quiet", "--labels", str(polygons)]) == 0
    stdout = capsys.readouterr().out
    assert "purity" in stdout
    assert f"mapping: {tmp_path / 'out' / 'assign' / 'mapping.yaml'}" in stdout.splitlines()
    assert f"class rasters: {tmp_path / 'out' / 'classes'}" in stdout.splitlines()
    assert sorted(p.name for p in (tmp_path / "out" / "classes").glob("*.tif")) == [f"{s}.tif" for s in CROPS]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--labels", "nothere.gpkg"], "error: polygon file not found"),
        (["--labels", "POLYGONS", "--threshold", "1.5"], "error: threshold must be in (0, 1], got 1.5 (threshold)"),
        (["--labels", "POLYGONS", "--field", "nope"], "error: no field 'nope'"),
    ],
)
def test_run_checks_the_class_polygons_before_any_work(tmp_path, crop_scenes, capsys, flags, message):
    polygons = _write_class_polygons(tmp_path / "classes.gpkg", crop_scenes["olinda_a"])
    config = write_config(tmp_path, [crop_scenes["olinda_a"]])
    flags = [str(polygons) if flag == "POLYGONS" else str(tmp_path / flag) if flag.endswith(".gpkg") else flag for flag in flags]
    assert main(["run", "-c", str(config), "--quiet", *flags]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "out").exists()


def test_assign_takes_the_labels_of_the_configs_scenes_only(base_run, tmp_path, crop_scenes, capsys):
    folder, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    config = write_config(tmp_path, crop_scenes.values())
    polygons = _write_class_polygons(tmp_path / "classes.gpkg", crop_scenes["olinda_a"])
    assert main(["assign", "-c", str(config), "--scenes", str(crop_scenes["olinda_a"]), "--labels", str(polygons)]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "classes").glob("*.tif")) == ["olinda_a.tif"]
    # A scene whose labels OUTDIR does not hold: said in one line, nothing written.
    other = tmp_path / "elsewhere.tif"
    shutil.copy(crop_scenes["olinda_b"], other)
    capsys.readouterr()
    assert main(["assign", "-c", str(config), "--scenes", str(other), "--labels", str(polygons)]) == 2
    assert capsys.readouterr().err.startswith("error: no label rasters of these scenes yet")
    # Outputs copied off the machine that has the scenes: the config's glob finds nothing
    # here, and every scene in run.json is assigned.
    import yaml

    moved = yaml.safe_load(config.read_text())
    moved["data"]["scenes"] = str(tmp_path / "nowhere" / "*.tif")
    config.write_text(yaml.safe_dump(moved))
    assert main(["assign", "-c", str(config), "--labels", str(polygons)]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "classes").glob("*.tif")) == [f"{s}.tif" for s in CROPS]


def test_polygons_and_zarr_outputs_on_request(base_run, tmp_path, crop_scenes, capsys):
    import xarray as xr

    folder, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    config = write_config(tmp_path, [crop_scenes["olinda_a"]], output={"polygons": True, "zarr": True, "min_polygon_px": 8})
    capsys.readouterr()
    assert main(["export", "-c", str(config), "--quiet"]) == 0
    assert "labels (COG + .qml + .aux.xml + .png + .gpkg)" in capsys.readouterr().out
    import pyogrio

    info = pyogrio.read_info(tmp_path / "out" / "labels" / "olinda_a.gpkg")
    assert info["features"] > 0
    store = xr.open_zarr(
        tmp_path / "out" / "labels" / "olinda_a.zarr", decode_coords="all", mask_and_scale=False, consolidated=False
    )
    with rasterio.open(crop_scenes["olinda_a"]) as src:
        assert store["labels"].rio.crs == src.crs
    np.testing.assert_array_equal(store["labels"].values, labels_of(tmp_path / "out" / "labels" / "olinda_a.tif"))


def test_assign_names_the_polygon_layer_of_a_file_with_several(base_run, tmp_path, crop_scenes, capsys):
    import pyogrio
    import shapely

    folder, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    config = write_config(tmp_path, crop_scenes.values())
    polygons = _write_class_polygons(tmp_path / "classes.gpkg", crop_scenes["olinda_a"])
    # QGIS users keep sketches beside the classes in one GeoPackage.
    pyogrio.raw.write(
        polygons, geometry=np.array([shapely.to_wkb(shapely.box(-35, -8, -34.9, -7.9))], dtype=object),
        field_data=[np.array(["draft"], dtype=object)], fields=["note"], crs="EPSG:4326", driver="GPKG",
        geometry_type="Polygon", layer="sketches",
    )
    assert sorted(str(name) for name, _ in pyogrio.list_layers(polygons)) == ["classes", "sketches"]

    assert main(["assign", "-c", str(config), "--labels", str(polygons)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: polygon file has several polygon layers (classes, sketches); "
        f"name the one with the classes with --layer ({polygons})"
    )
    assert not (tmp_path / "out" / "assign" / "mapping.yaml").exists()

    assert main(["assign", "-c", str(config), "--labels", str(polygons), "--layer", "classes"]) == 0
    mapping = (tmp_path / "out" / "assign" / "mapping.yaml").read_text()
    assert "water" in mapping and "land" in mapping


def test_embed_runs_on_its_own_before_any_clustering(tmp_path, crop_scenes, capsys):
    config = write_config(tmp_path, [crop_scenes["olinda_a"]])
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["embed", "-c", str(config), "--quiet"]) == 0
    assert (tmp_path / "out" / "embeddings" / "olinda_a.zarr").is_dir()
    assert not (tmp_path / "out" / "cluster" / "model.json").exists()
    # The summary lists the stores, and only outputs that exist.
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("olinda_a "))
    assert row.split()[1] == "done" and row.endswith(str(tmp_path / "out" / "embeddings" / "olinda_a.zarr"))
    assert "embeddings (Zarr)" in out and "clustering model" not in out and "labels (COG" not in out


def test_embeddings_saved_by_another_encoder_or_settings_are_not_reused(base_run, tmp_path, crop_scenes, caplog):
    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    scenes = crop_scenes.values()
    old_centroids = np.load(out / "cluster" / "centroids.npy")
    old_labels = labels_of(out / "labels" / "olinda_a.tif")

    # A retrained encoder: `sitfuse cluster` must not fit on, nor label, the old embeddings.
    # (Streamed samples drawn from every inference block, as from saved stores.)
    config = write_config(tmp_path, scenes, train={"seed": 99}, cluster={"sample_blocks": 0})
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    caplog.clear()
    assert main(["cluster", "-c", str(config), "--quiet"]) == 0
    assert "saved embeddings of olinda_a, olinda_b, olinda_c were made by another encoder" in caplog.text
    streamed_centroids = np.load(out / "cluster" / "centroids.npy")
    streamed_labels = labels_of(out / "labels" / "olinda_a.tif")
    assert not np.array_equal(streamed_centroids, old_centroids)
    # The same as embedding with the new encoder first (every block is sampled either way).
    assert main(["embed", "-c", str(config), "--quiet"]) == 0
    caplog.clear()
    assert main(["cluster", "-c", str(config), "--quiet", "--force"]) == 0
    assert "saved embeddings" not in caplog.text
    np.testing.assert_allclose(np.load(out / "cluster" / "centroids.npy"), streamed_centroids, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels_of(out / "labels" / "olinda_a.tif"), streamed_labels)
    assert not np.array_equal(streamed_labels, old_labels)

    # Other embed settings: the model fitted on stride-1 embeddings does not label stride-2
    # ones; clustered again, the stride-1 stores are recomputed, not mixed up.
    config = write_config(tmp_path, scenes, train={"seed": 99}, embed={"stride": 2})
    assert main(["export", "-c", str(config), "--quiet"]) == 2
    assert main(["cluster", "-c", str(config), "--quiet"]) == 0
    with rasterio.open(out / "labels" / "olinda_a.tif") as dst, rasterio.open(crop_scenes["olinda_a"]) as src:
        assert (dst.width, dst.height, dst.transform) == (src.width, src.height, src.transform)


def test_a_moved_output_folder_is_neither_redone_nor_read_from_its_old_place(base_run, tmp_path, crop_scenes):
    folder, *_ = base_run
    old = tmp_path / "old"
    shutil.copytree(folder / "out", old)
    config = write_config(tmp_path, crop_scenes.values(), out="old")
    # Outputs recorded under `old` itself, which then goes away.
    assert main(["export", "-c", str(config), "--quiet", "--force"]) == 0
    moved = tmp_path / "moved"
    old.rename(moved)
    label = moved / "labels" / "olinda_a.tif"
    before = label.stat().st_mtime_ns
    assert main(["run", "-c", str(config), "--out", str(moved), "--quiet"]) == 0
    assert label.stat().st_mtime_ns == before
    assert not old.exists()
    polygons = _write_class_polygons(tmp_path / "classes.gpkg", crop_scenes["olinda_a"])
    assert main(["assign", "-c", str(config), "--out", str(moved), "--labels", str(polygons)]) == 0
    assert (moved / "classes" / "olinda_a.tif").exists()


def test_a_new_clustering_outdates_class_rasters_mappings_and_switched_off_outputs(
    base_run, tmp_path, crop_scenes, capsys
):
    import yaml

    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    config = write_config(tmp_path, crop_scenes.values())
    polygons = _write_class_polygons(tmp_path / "classes.gpkg", crop_scenes["olinda_a"])
    assert main(["assign", "-c", str(config), "--labels", str(polygons)]) == 0
    with rasterio.open(out / "labels" / "olinda_a.tif") as src:
        old_model = src.tags()["model_hash"]
    mapping_path = out / "assign" / "mapping.yaml"
    assert yaml.safe_load(mapping_path.read_text())["model"] == old_model
    classes = out / "classes" / "olinda_a.tif"
    assert classes.exists()

    # Re-exporting with the same model (only an output option changed) keeps them.
    quiet = write_config(tmp_path, crop_scenes.values(), output={"quicklook": False})
    assert main(["export", "-c", str(quiet), "--quiet"]) == 0
    assert classes.exists() and not (out / "labels" / "olinda_a.png").exists()

    # Another clustering with the same K: the class rasters go, the old mapping is refused.
    reseeded = write_config(tmp_path, crop_scenes.values(), cluster={"seed": 11})
    assert main(["cluster", "-c", str(reseeded), "--quiet"]) == 0
    with rasterio.open(out / "labels" / "olinda_a.tif") as src:
        new_model = src.tags()["model_hash"]
    assert new_model != old_model
    assert not classes.exists() and not (out / "classes" / "olinda_a.qml").exists()
    capsys.readouterr()
    assert main(["assign", "-c", str(reseeded), "--apply", str(mapping_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: mapping was made for clustering model {old_model[:12]}, but the label rasters come from "
        f"{new_model[:12]}; run `sitfuse assign --labels` again (or delete the mapping's `model:` line "
        f"to apply it anyway) ({mapping_path}: model)"
    )


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_dropped_by_a_finalizer_still_stops_the_run():
    import os
    import signal

    from sitfuse_byol.run.interrupts import Interrupts, terminate_as_interrupt

    class Finalizer:
        def __del__(self):
            # The handler's KeyboardInterrupt is raised in here, where Python prints and drops it.
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), terminate_as_interrupt():
        Finalizer()
        Interrupts.check()
    # The handler this process had is back.
    assert signal.getsignal(signal.SIGINT) is before


def test_class_names_of_the_wrong_count_stop_a_run_before_any_work(tmp_path, crop_scenes, capsys):
    config = write_config(tmp_path, [crop_scenes["olinda_a"]], output={"class_names": ["water", "land"]})
    assert main(["run", "-c", str(config), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: 2 class names for 6 cluster labels; give one name per label (output.class_names)"
    )
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_json_keeps_stdout_for_the_summary_and_prints_the_dashboard_on_stderr(base_run, capsys):
    folder, config, *_ = base_run
    assert main(["run", "-c", str(config), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert set(summary["scenes"]) == {"olinda_a", "olinda_b", "olinda_c"}
    assert "Dask dashboard: http" in captured.err
    assert main(["run", "-c", str(config), "--json", "--quiet"]) == 0
    assert "Dask dashboard" not in capsys.readouterr().err


def test_a_refused_command_leaves_the_output_folder_as_it_was(base_run, tmp_path, crop_scenes, capsys):
    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    kept = ("run.json", "config.resolved.yaml", "stats.json")
    before = {name: (out / name).read_bytes() for name in kept}
    config = write_config(tmp_path, crop_scenes.values())
    # Three of the six bands: every scene misfits the trained model, so the command is refused.
    for command in (["cluster"], ["train", "--resume"]):
        capsys.readouterr()
        assert main([*command, "-c", str(config), "--quiet", "--set", "data.bands=[1,2,3]"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: the model was trained on 6 bands") and err.endswith("but this scene has 3 "
                                                                                         f"({crop_scenes['olinda_a']})")
        assert {name: (out / name).read_bytes() for name in kept} == before, command
    # A resume the checkpoint cannot take is refused before the statistics pass rewrites anything.
    one_scene = write_config(tmp_path, [crop_scenes["olinda_a"]])
    for config_path, flags, start in (
        (config, ["--set", "train.lr=0.5"], "error: cannot resume: train.lr was "),
        (one_scene, [], "error: the band statistics differ from the checkpoint's"),
    ):
        capsys.readouterr()
        assert main(["train", "-c", str(config_path), "--quiet", "--resume", "--out", str(out), *flags]) == 2
        assert capsys.readouterr().err.startswith(start)
        assert {name: (out / name).read_bytes() for name in kept} == before, flags
    # Settings found wrong before the statistics pass: nothing written, here or in a new folder.
    refused = [["--set", "train.encoder_args={width: -3}"], ["--set", "cluster.n_clusters=20000"]]
    if not torch.cuda.is_available():
        refused.append(["--device", "cuda"])
    for flags in refused:
        for folder_flags in ([], ["--out", str(tmp_path / "new")]):
            assert main(["run", "-c", str(config), "--quiet", *flags, *folder_flags]) == 2, flags
            assert len(capsys.readouterr().err.strip().splitlines()) == 1
            assert {name: (out / name).read_bytes() for name in kept} == before, flags
            assert not (tmp_path / "new").exists(), flags


def test_a_resume_over_rewritten_scene_files_is_refused_before_their_statistics_are_saved(
    tmp_path, crop_scenes, capsys
):
    import os

    scenes = [shutil.copy(crop_scenes[name], tmp_path / f"{name}.tif") for name in ("olinda_a", "olinda_b")]
    config = write_config(tmp_path, scenes)
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    out = tmp_path / "out"
    # Files touched, pixels the same: the statistics come out the same, and training goes on.
    for path in scenes:
        os.utime(path)
    assert main(["train", "-c", str(config), "--quiet", "--resume", "--set", "train.epochs=2"]) == 0
    kept = {
        name: (out / name).read_bytes()
        for name in ("run.json", "stats.json", "checkpoints/last.pt", "config.resolved.yaml")
    }
    with rasterio.open(scenes[0], "r+") as dst:
        dst.write(dst.read() // 2 + 1)
    capsys.readouterr()
    assert main(["train", "-c", str(config), "--quiet", "--resume", "--set", "train.epochs=3"]) == 2
    assert capsys.readouterr().err.startswith("error: the band statistics differ from the checkpoint's")
    assert {name: (out / name).read_bytes() for name in kept} == kept
    last = (out / "logs" / "sitfuse.log").read_text().splitlines()[-1]
    assert " ERROR " in last and "run stopped: the band statistics differ from the checkpoint's" in last


def test_training_afresh_over_a_checkpoint_is_said_and_a_refused_resume_does_not_stop_the_next_one(
    tmp_path, crop_scenes, caplog
):
    config = write_config(tmp_path, [crop_scenes["olinda_a"]], train={"epochs": 3})
    out = tmp_path / "out"
    # Stopped after epoch 1 of 3, as a Ctrl-C would leave it (last.pt is the epoch-1 checkpoint).
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    shutil.copy(out / "checkpoints" / "epoch_000.pt", out / "checkpoints" / "last.pt")
    # A resume under another lr is refused, and changes nothing...
    assert main(["train", "-c", str(config), "--quiet", "--resume", "--set", "train.lr=0.5"]) == 2
    # ...so the next plain run still resumes: epoch 0 is not trained (written) again.
    first_epoch = (out / "checkpoints" / "epoch_000.pt").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["train", "-c", str(config), "--quiet"]) == 0
    assert "training afresh" not in caplog.text
    assert (out / "checkpoints" / "epoch_000.pt").stat().st_mtime_ns == first_epoch
    # Other train settings without --resume: trained afresh, and said so.
    with caplog.at_level("WARNING"):
        assert main(["train", "-c", str(config), "--quiet", "--set", "train.lr=0.002"]) == 0
    assert "train settings or band statistics changed since" in caplog.text and "training afresh" in caplog.text


def test_constant_bands_are_warned_of(tmp_path, crop_scenes, caplog):
    with rasterio.open(crop_scenes["olinda_a"]) as src:
        data, profile = src.read(), src.profile
    data[[1, 4]] = 50
    path = tmp_path / "flat.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    config = write_config(tmp_path, [path])
    with caplog.at_level("WARNING"):
        assert main(["stats", "-c", str(config), "--quiet"]) == 0
    assert (
        "warning: bands B2, B5 hold the same value at every valid pixel (std 0), which tells nothing apart; "
        f"leave them out with data.bands ({tmp_path / 'out' / 'stats.json'})"
    ) in caplog.text


def test_quicklook_bands_a_scene_lacks_stop_it_before_training(tmp_path, crop_scenes, capsys):
    scene = crop_scenes["olinda_a"]
    config = write_config(tmp_path, [scene], output={"rgb_bands": [99, 1, 2]})
    assert main(["run", "-c", str(config), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: band index 99 out of range 1..6 (bands count from 1) (output.rgb_bands, {scene})"
    )
    assert not (tmp_path / "out" / "checkpoints").exists()
    config = write_config(tmp_path, [scene], output={"rgb_bands": [1, 2]})
    assert main(["run", "-c", str(config), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "error: config: output.rgb_bands: must list three bands (red, green, blue)"
    )


def test_a_failed_scene_keeps_earlier_outputs_only_while_the_clustering_is_the_same(base_run, tmp_path, crop_scenes):
    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    # The same scene id, its file now truncated.
    broken = tmp_path / "scenes" / "olinda_c.tif"
    broken.parent.mkdir()
    data = crop_scenes["olinda_c"].read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    scenes = [crop_scenes["olinda_a"], crop_scenes["olinda_b"], broken]
    earlier = [out / "labels" / f"olinda_c.{ext}" for ext in ("tif", "qml", "tif.aux.xml", "png")]
    earlier.append(out / "confidence" / "olinda_c.tif")
    assert all(path.exists() for path in earlier)
    # The same clustering model: olinda_c's labels still mean what the others' mean.
    assert main(["export", "-c", str(write_config(tmp_path, scenes)), "--quiet"]) == 1
    assert all(path.exists() for path in earlier)
    # Another model labels the other scenes: olinda_c's old cluster numbers would pass for its.
    reseeded = write_config(tmp_path, scenes, cluster={"seed": 11})
    assert main(["run", "-c", str(reseeded), "--quiet"]) == 1
    assert not any(path.exists() for path in earlier)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["scenes"]["olinda_c"]["status"] == "failed"
    assert {manifest["scenes"][s]["status"] for s in ("olinda_a", "olinda_b")} == {"done"}
    with rasterio.open(out / "labels" / "olinda_a.tif") as src:
        assert src.tags()["model_hash"] == json.loads((out / "cluster" / "model.json").read_text())["model_hash"]


def test_output_folders_that_cannot_be_made_are_one_line_errors(base_run, tmp_path, crop_scenes, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    config = write_config(tmp_path, [crop_scenes["olinda_a"]], out="taken")
    assert main(["run", "-c", str(config), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: cannot create an output folder: File exists ({tmp_path / 'taken'})"
    )
    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    shutil.rmtree(out / "labels")
    (out / "labels").write_text("a file where the label rasters go")
    config = write_config(tmp_path, crop_scenes.values())
    assert main(["export", "-c", str(config), "--quiet", "--force"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: cannot create an output folder: File exists ({out / 'labels'})"
    )


def test_a_damaged_checkpoint_is_trained_again_not_reported_as_done(base_run, tmp_path, crop_scenes, caplog):
    from sitfuse_byol.train.checkpoint import load_checkpoint

    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    checkpoint = out / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    config = write_config(tmp_path, crop_scenes.values())
    with caplog.at_level("WARNING"):
        assert main(["train", "-c", str(config), "--quiet"]) == 0
    assert "cannot read checkpoint" in caplog.text and "training again" in caplog.text
    assert load_checkpoint(checkpoint)["step"] == 4


def test_a_scene_without_georeferencing_gets_one_warning_line(tmp_path, crop_scenes):
    with rasterio.open(crop_scenes["olinda_a"]) as src:
        data, profile = src.read(), src.profile
    plain = tmp_path / "plain.tif"
    profile = {k: v for k, v in profile.items() if k not in ("crs", "transform")}
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(data)
    config = write_config(tmp_path, [plain])
    done = subprocess.run(
        [sys.executable, "-m", "sitfuse_byol.cli", "run", "-c", str(config), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"warning: scene has no CRS; its outputs will not be georeferenced ({plain})"
    with rasterio.open(tmp_path / "out" / "labels" / "plain.tif") as labels:
        assert labels.crs is None and labels.shape == data.shape[1:]


def test_scene_ids_that_clash_with_coarse_label_names_are_refused(tmp_path, crop_scenes, capsys):
    coarse = tmp_path / "olinda_a_coarse.tif"
    shutil.copy(crop_scenes["olinda_b"], coarse)
    config = write_config(tmp_path, [crop_scenes["olinda_a"], coarse], cluster={"hierarchical": True, "n_fine": 2})
    assert main(["run", "-c", str(config), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: scene ids 'olinda_a' and 'olinda_a_coarse' clash: with cluster.hierarchical the coarse labels of "
        "'olinda_a' are labels/olinda_a_coarse.tif; rename one of the scenes (data.scenes[1])"
    )
    assert not (tmp_path / "out").exists()


def test_a_run_over_some_scenes_warns_of_the_others_labels_from_another_clustering(
    base_run, tmp_path, crop_scenes, caplog
):
    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    config = write_config(tmp_path, [crop_scenes["olinda_a"]], cluster={"seed": 5})
    with caplog.at_level("WARNING"):
        assert main(["run", "-c", str(config), "--quiet"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        # One scene of three: other statistics, so the encoder is trained again.
        f"warning: the train settings or band statistics changed since {out / 'checkpoints' / 'last.pt'} was "
        "trained; training afresh (its checkpoints are replaced; `--resume` extends a training when only "
        "train.epochs changed)",
        "warning: the labels of olinda_b, olinda_c (not in this run's scene list) come from another clustering "
        "model; their cluster numbers mean something else (`sitfuse assign` refuses the mix)"
    ]


def test_export_with_other_cluster_settings_warns_and_with_other_embed_settings_is_refused(
    base_run, tmp_path, crop_scenes, caplog, capsys
):
    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    for cluster, expected in (({}, 0), ({"n_clusters": 5}, 1)):
        caplog.clear()
        config = write_config(tmp_path, crop_scenes.values(), cluster=cluster)
        with caplog.at_level("WARNING"):
            assert main(["export", "-c", str(config), "--quiet"]) == 0
        warnings = [r.getMessage() for r in caplog.records if "other cluster settings" in r.getMessage()]
        assert len(warnings) == expected, cluster
    # Embeddings made otherwise than those it was fitted on would be labelled wrongly: refused.
    labels = {p.name: p.read_bytes() for p in (out / "labels").glob("*.tif")}
    for embed in ({"window": 3, "block_size": 96}, {"stride": 2, "block_size": 96}):
        config = write_config(tmp_path, crop_scenes.values(), embed=embed)
        capsys.readouterr()
        assert main(["export", "-c", str(config), "--quiet", "--force"]) == 2
        key = next(iter(set(embed) - {"block_size"}))
        assert capsys.readouterr().err.strip() == (
            f"error: the clustering model was fitted on embeddings made with embed.{key} {1 if key == 'stride' else 0} "
            f"(this config: {embed[key]}); set them back, or fit it again with `sitfuse cluster` ({out / 'cluster'})"
        )
    assert {p.name: p.read_bytes() for p in (out / "labels").glob("*.tif")} == labels
    # The block size changes no embedding value, nor is it a cluster setting.
    config = write_config(tmp_path, crop_scenes.values(), embed={"block_size": 64})
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["export", "-c", str(config), "--quiet"]) == 0
    assert "fitted with other" not in caplog.text


def test_export_labels_a_new_scene_with_the_trained_models_and_leaves_them_alone(base_run, tmp_path, crop_scenes):
    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    kept = {p: p.read_bytes() for p in (out / "checkpoints" / "last.pt", out / "cluster" / "centroids.npy", out / "stats.json")}
    # A new scene inside olinda_a: its interior must get olinda_a's labels there.
    row, col, size = 20, 30, 100
    new = tmp_path / "olinda_new.tif"
    with rasterio.open(crop_scenes["olinda_a"]) as src:
        window = rasterio.windows.Window(col, row, size, size)
        profile = src.profile | {"width": size, "height": size, "transform": src.window_transform(window)}
        with rasterio.open(new, "w", **profile) as dst:
            dst.write(src.read(window=window))
    labelled = {s: (out / "labels" / f"{s}.tif").stat().st_mtime_ns for s in crop_scenes}
    config = write_config(tmp_path, [*crop_scenes.values(), new])
    assert main(["export", "-c", str(config), "--quiet"]) == 0
    assert {s: (out / "labels" / f"{s}.tif").stat().st_mtime_ns for s in crop_scenes} == labelled
    assert all(path.read_bytes() == data for path, data in kept.items())
    margin = 16  # beyond the encoder's halo, where the new scene's edges are not the old one's
    labels = labels_of(out / "labels" / "olinda_new.tif")[margin:-margin, margin:-margin]
    expected = labels_of(out / "labels" / "olinda_a.tif")[row + margin : row + size - margin, col + margin : col + size - margin]
    np.testing.assert_array_equal(labels, expected)


def test_an_export_interrupted_after_its_task_published_is_redone_by_the_next_run(
    base_run, tmp_path, crop_scenes, monkeypatch
):
    import os
    import signal

    from sitfuse_byol.run import pipeline, tasks

    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)

    def config(tag: str):  # the same file each time: one output folder
        names = [f"{tag}{k}" for k in range(6)]
        return str(write_config(tmp_path, crop_scenes.values(), output={"class_names": names, "quicklook": False}))

    assert main(["export", "-c", config("old"), "--quiet"]) == 0

    def publish_then_interrupt(*args):
        # The scene's outputs go into place, then Ctrl-C reaches the run before it records them.
        result = tasks.export_task(*args)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(pipeline, "export_task", publish_then_interrupt)
    assert main(["export", "-c", config("new"), "--quiet"]) == 130
    monkeypatch.undo()
    published = [s for s in crop_scenes if 'label="new0"' in (out / "labels" / f"{s}.qml").read_text()]
    assert published  # the case in point: new outputs in place, the record still the old one's
    assert main(["export", "-c", config("old"), "--quiet"]) == 0
    for scene in crop_scenes:
        assert 'label="old0"' in (out / "labels" / f"{scene}.qml").read_text(), scene


def test_assign_takes_sigterm_as_an_interrupt_and_clears_what_a_killed_one_left(base_run, tmp_path, crop_scenes):
    folder, *_ = base_run
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    config = write_config(tmp_path, crop_scenes.values())
    polygons = _write_class_polygons(tmp_path / "classes.gpkg", crop_scenes["olinda_a"])
    # SIGTERM (a job scheduler's stop) while the class rasters are being written.
    script = (
        "import os, signal, sys\n"
        "from sitfuse_byol.assign import mapping\n"
        "from sitfuse_byol.cli import main\n"
        "real = mapping.apply_mapping\n"
        "def stopped(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*args, **kwargs)\n"
        "mapping.apply_mapping = stopped\n"
        f"sys.exit(main(['assign', '-c', {str(config)!r}, '--labels', {str(polygons)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (130, "interrupted")
    # Left by an assign killed too hard to clean up (SIGKILL): the next one removes them.
    stale = [out / "classes" / ".olinda_a.tif.staging-x1", out / "assign" / ".mapping.yaml.tmp-x2"]
    stale[0].mkdir(parents=True)
    stale[1].write_text("half")
    assert main(["assign", "-c", str(config), "--labels", str(polygons)]) == 0
    assert not any(p.exists() for p in stale)
    assert (out / "classes" / "olinda_a.tif").exists()
