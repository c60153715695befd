"""run.json: scene fingerprints (they change when a scene's files are rewritten, Zarr v2 and
v3 alike) and batched writes of scene records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from sitfuse_byol.read.scene_list import SceneRef, parse_scene_entry
from sitfuse_byol.run.manifest import Manifest, scene_fingerprint


def _write_store(path, value: float, zarr_format: int) -> None:
    data = xr.DataArray(np.full((2, 8, 8), value, np.float32), dims=("band", "y", "x"), name="bands")
    data.to_dataset().to_zarr(path, mode="w", zarr_format=zarr_format, consolidated=False)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_fingerprint_follows_a_rewritten_zarr_store(tmp_path, zarr_format):
    store = tmp_path / "scene.zarr"
    _write_store(store, 1.0, zarr_format)
    ref = SceneRef(spec=parse_scene_entry(str(store), base=tmp_path, where="test"), entry=str(store))
    first = scene_fingerprint(ref)
    assert scene_fingerprint(ref) == first
    # A rewrite rewrites the array's metadata file (here: one byte longer).
    meta = store / "bands" / ("zarr.json" if zarr_format == 3 else ".zarray")
    meta.write_text(meta.read_text() + " ")
    assert scene_fingerprint(ref) != first


def test_scene_records_are_written_in_batches_and_flushed(tmp_path):
    path = tmp_path / "run.json"
    manifest = Manifest(path=path)
    for k in range(200):
        manifest.record(f"s{k}", status="done", key="k", timings={"export": 0.1})
    # The first record is written at once, the rest within the interval wait (200
    # records take far less than SAVE_INTERVAL): one file rewrite, not 200.
    on_disk = json.loads(path.read_text())["scenes"]
    assert 1 <= len(on_disk) < 200
    manifest.flush()
    assert set(json.loads(path.read_text())["scenes"]) == {f"s{k}" for k in range(200)}
    assert Manifest.load(path).scenes == manifest.scenes
    # A stage mark writes at once, with every record pending.
    manifest.record("late", status="failed", key="", timings={}, error="export: boom")
    manifest.stages["cluster"] = {"key": "c"}
    manifest.save()
    saved = json.loads(path.read_text())
    assert saved["scenes"]["late"]["error"] == "export: boom" and saved["stages"]["cluster"] == {"key": "c"}
