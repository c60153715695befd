"""Scene-task plumbing: bad input comes back as a value, torch threads held while tasks run."""

from __future__ import annotations

import threading

import pytest
import torch

from sitfuse_byol.errors import InputError
from sitfuse_byol.run.tasks import TaskFailure, _one_torch_thread, run_scene_task
from tests.conftest import corrupt_tile


def _torch_threads_of_a_new_thread() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_bad_input_is_returned_not_raised_so_dask_does_not_retry_it():
    def corrupt(config, ref, threads):
        raise InputError("not a raster", where="scene.tif")

    result, seconds = run_scene_task(corrupt, None, None, 1)
    assert isinstance(result, TaskFailure)
    assert str(result.error) == "not a raster (scene.tif)"
    assert seconds >= 0

    def lost(config, ref, threads):
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        run_scene_task(lost, None, None, 1)

    assert run_scene_task(lambda config, ref, threads: threads * 2, None, None, 3)[0] == 6


def test_torch_stays_at_one_thread_until_the_last_overlapping_task_leaves():
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = _one_torch_thread(), _one_torch_thread()
        first.__enter__()
        second.__enter__()
        assert _torch_threads_of_a_new_thread() == 1
        # The first task leaving must not hand the second task's new threads two threads.
        first.__exit__(None, None, None)
        assert _torch_threads_of_a_new_thread() == 1
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)



def test_local_cluster_workers_take_turns_over_the_gpus():
    from sitfuse_byol.run.tasks import gpu_index

    assert [gpu_index(name, 2, visible_devices=None) for name in range(5)] == [0, 1, 0, 1, 0]
    assert gpu_index(3, 1, visible_devices=None) == 0  # one GPU: everyone shares it
    assert gpu_index(1, 4, visible_devices="1,2,3,0") == 0  # dask-cuda: its own GPU is listed first
    assert gpu_index("tcp://10.0.0.5:40123", 4, visible_devices=None) == 0  # a remote worker
    assert gpu_index(None, 4, visible_devices=None) == 0  # not on a worker


def test_a_read_failure_travels_back_picklable_with_gdals_reason(tmp_path):
    import pickle

    import numpy as np
    import rasterio

    from sitfuse_byol.run.tasks import SceneReadError

    path = tmp_path / "b.tif"
    profile = {
        "driver": "GTiff", "width": 32, "height": 32, "count": 1, "dtype": "uint16", "tiled": True,
        "blockxsize": 16, "blockysize": 16, "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.arange(32 * 32, dtype="uint16").reshape(1, 32, 32))
    corrupt_tile(path)

    def read_all(config, ref, threads):
        with rasterio.open(path) as src:
            return src.read()

    with pytest.raises(SceneReadError) as err:
        run_scene_task(read_all, None, None, 1)
    assert str(err.value).startswith("cannot read pixels: ")
    assert "TIFFReadEncodedTile" in str(err.value) and "See previous exception" not in str(err.value)
    # Dask sends a worker's error (and its chain) pickled, or else as a bare Exception of its repr.
    assert err.value.__context__ is None and err.value.__cause__ is None
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)


# 128 px blocks hold a window and its halo; a 64 px block at stride 2 (64 px windows)
# does not, and borrows its halo from its neighbours.
@pytest.mark.parametrize(("stride", "block"), [(1, 128), (2, 128), (2, 64)])
def test_a_streamed_sample_embeds_one_window_of_a_few_blocks_with_the_labelling_passs_values(
    tiny_checkpoint, landsat_path, stride, block
):
    import numpy as np
    from scipy.spatial import cKDTree

    from sitfuse_byol.config import load_config
    from sitfuse_byol.embed import embed_scene
    from sitfuse_byol.read import open_scene
    from sitfuse_byol.read.scene_list import SceneRef, parse_scene_entry
    from sitfuse_byol.run.tasks import sample_task
    from sitfuse_byol.train.checkpoint import load_encoder

    out = tiny_checkpoint.parent.parent
    raw = {
        "data": {"scenes": [str(landsat_path)]},
        "embed": {"save": False, "block_size": block, "window": 3, "stride": stride},
        # 3 windows of 32 x 32 embeddings hold twice n, so they are not grown.
        "cluster": {"samples_per_scene": 1500, "sample_blocks": 3, "sample_window": 32},
        "output": {"dir": str(out)},
    }
    config = load_config(raw=raw, base=out)
    ref = SceneRef(spec=parse_scene_entry(str(landsat_path), base=out, where="test"), entry=str(landsat_path))
    samples, neighbours = sample_task(config, ref, 2)
    assert 1000 < len(samples) <= 3 * 32 * 32 and neighbours.shape == samples.shape

    # Each sampled embedding is one the labelling pass computes, within float32 rounding
    # (the windows carry the blocks' halo), and they lie in 3 windows of 32 x 32.
    full = embed_scene(
        open_scene(landsat_path), load_encoder(tiny_checkpoint), block_size=128, window=3, stride=stride
    ).data.compute()
    rows = full.reshape(full.shape[0], -1).T
    finite = np.flatnonzero(np.isfinite(rows).all(axis=1))
    distance, nearest = cKDTree(rows[finite]).query(samples)
    assert distance.max() < 1e-4
    y, x = np.unravel_index(finite[nearest], full.shape[1:])
    cells = block // stride
    blocks = {(int(a), int(b)) for a, b in zip(y // cells, x // cells, strict=True)}
    assert len(blocks) == 3
    for i, j in blocks:
        inside = (y // cells == i) & (x // cells == j)
        assert np.ptp(y[inside]) < 32 and np.ptp(x[inside]) < 32
