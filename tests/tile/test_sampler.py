from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sitfuse_byol.errors import InputError
from sitfuse_byol.normalize import compute_stats
from sitfuse_byol.read import open_scene
from sitfuse_byol.tile import PatchIndex, PatchSampler
from tests.conftest import write_tif


@pytest.fixture
def coded_scene(tmp_path):
    """A scene whose pixel values encode their own (row, col), to trace patches back."""
    rows, cols = np.mgrid[0:96, 0:128]
    data = np.stack([rows, cols, rows * 0 + 7]).astype(np.float32)
    data[:, 40:, :] = -1  # a nodata region, crossing patches whatever the grid jitter
    path = write_tif(tmp_path / "coded.tif", data, nodata=-1, blocksize=32)
    return open_scene(path, patch_size=16, chunk_target=64)


def sampler_for(scenes, **kwargs):
    stats = compute_stats(scenes)
    defaults = {"stats": stats, "patch_size": 16, "batch_size": 4, "seed": 3}
    return PatchSampler(scenes, **{**defaults, **kwargs})


def test_batches_are_valid_normalized_patches_cut_from_the_scene(coded_scene):
    sampler = sampler_for([coded_scene], min_valid_fraction=1.0)
    stats = sampler.stats
    batches = list(sampler.epoch(0))
    assert batches, "no batch"
    for batch in batches:
        assert batch.patches.shape == (4, 3, 16, 16) and batch.patches.dtype == torch.float32
        assert batch.valid.shape == (4, 16, 16) and batch.valid.dtype == torch.bool
        assert bool(batch.valid.all())
        rows = batch.patches[:, 0].numpy() * stats.std[0] + stats.mean[0]
        cols = batch.patches[:, 1].numpy() * stats.std[1] + stats.mean[1]
        # Each patch is a contiguous 16x16 window of the scene, inside the valid region.
        np.testing.assert_allclose(np.diff(rows, axis=1), 1, atol=1e-3)
        np.testing.assert_allclose(np.diff(cols, axis=2), 1, atol=1e-3)
        assert rows.max() < 40


def test_valid_fraction_threshold(coded_scene):
    strict = sum(len(b.patches) for b in sampler_for([coded_scene], min_valid_fraction=1.0).epoch(0))
    loose = sampler_for([coded_scene], min_valid_fraction=0.1, batch_size=1)
    fractions = [float(b.valid.float().mean()) for b in loose.epoch(0)]
    assert min(fractions) >= 0.1 and min(fractions) < 1.0
    assert len(fractions) > strict


def test_deterministic_under_seed_and_changes_with_epoch(coded_scene):
    first = [b.patches for b in sampler_for([coded_scene]).epoch(0)]
    again = [b.patches for b in sampler_for([coded_scene]).epoch(0)]
    other_epoch = [b.patches for b in sampler_for([coded_scene]).epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_epoch, strict=False))


def patch_origins(sampler, epoch=0):
    stats = sampler.stats
    origins = set()
    for batch in sampler.epoch(epoch):
        rows = batch.patches[:, 0, 0, 0].numpy() * stats.std[0] + stats.mean[0]
        cols = batch.patches[:, 1, 0, 0].numpy() * stats.std[1] + stats.mean[1]
        origins |= {(round(r), round(c)) for r, c in zip(rows, cols, strict=True)}
    return origins


@pytest.mark.parametrize("chunk_target", [32, 512])
def test_shards_are_disjoint_and_cover_the_index(coded_scene, tmp_path, chunk_target):
    scene = open_scene(tmp_path / "coded.tif", patch_size=16, chunk_target=chunk_target)
    full = patch_origins(sampler_for([scene], batch_size=1, min_valid_fraction=1.0))
    shards = [
        patch_origins(sampler_for([scene], batch_size=1, min_valid_fraction=1.0, rank=r, world_size=3))
        for r in range(3)
    ]
    for a, b in itertools.combinations(shards, 2):
        assert not a & b
    assert len(set().union(*shards)) >= 0.6 * len(full)


def test_batches_mix_patches_of_several_scenes(coded_scene, tmp_path):
    other = write_tif(tmp_path / "other.tif", np.full((3, 96, 128), 1000, np.float32), blocksize=32)
    scenes = [coded_scene, open_scene(other, patch_size=16, chunk_target=64)]
    sampler = sampler_for(scenes, shuffle_buffer=64, batch_size=8)
    mixed = 0
    for batch in sampler.epoch(0):
        from_other = batch.patches[:, 2, 0, 0] > 0  # band 3: 7 in one scene, 1000 in the other
        mixed += bool(from_other.any() and not from_other.all())
    assert mixed > 0


def test_refuses_when_no_patch_is_valid(tmp_path):
    data = np.zeros((2, 64, 64), np.uint8)
    data[:, :4, :4] = 5  # a few valid pixels, never a valid patch
    scene = open_scene(write_tif(tmp_path / "holes.tif", data, nodata=0), patch_size=16)
    sampler = sampler_for([scene], min_valid_fraction=0.5)
    with pytest.raises(InputError, match="no patch has at least 50% valid pixels"):
        list(sampler.epoch(0))


def test_index_is_offsets_only(coded_scene):
    index = PatchIndex.from_scenes([coded_scene], patch_size=16)
    assert index.chunks.dtype == np.int64 and index.chunks.shape[1] == 7
    assert len(index) == (96 // 16) * (128 // 16)


@pytest.mark.timeout(60)  # the stream used to drop each pass's patches and never yield
def test_a_pass_with_fewer_patches_than_a_batch_still_gives_batches_and_says_so(coded_scene, caplog):
    sampler = sampler_for([coded_scene], min_valid_fraction=1.0, batch_size=64)
    per_pass = sum(len(b.patches) for b in sampler_for([coded_scene], min_valid_fraction=1.0, batch_size=1).epoch(0))
    assert 0 < per_pass < 64
    with caplog.at_level("WARNING"):
        batches = list(itertools.islice(sampler.batches(epoch=0), 3))
    assert [tuple(b.patches.shape) for b in batches] == [(64, 3, 16, 16)] * 3
    assert all(bool(b.valid.all()) for b in batches)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"gives {per_pass} patches" in warnings[0] and "fewer than a batch of 64" in warnings[0]
    # A single pass (epoch) has no full batch to give.
    assert list(sampler.epoch(0)) == []


def test_scenes_a_pass_cuts_no_patch_from_are_named_once(coded_scene, tmp_path, caplog):
    data = np.zeros((3, 64, 64), np.float32)
    data[:, :4, :4] = 5  # valid pixels, never a valid patch
    holes = open_scene(write_tif(tmp_path / "holes.tif", data, nodata=0), patch_size=16)
    sampler = sampler_for([coded_scene, holes], min_valid_fraction=0.5)
    with caplog.at_level("WARNING"):
        assert list(sampler.epoch(0)) and list(sampler.epoch(1))
    warnings = [r.getMessage() for r in caplog.records if "cut no patch" in r.getMessage()]
    assert warnings == [
        "warning: a pass over the scenes cut no patch with at least 50% valid pixels from holes; training learns "
        "from the others (tiling.min_valid_fraction, tiling.patch_size)"
    ]
    # Alone, the scene is refused, by name.
    with pytest.raises(InputError) as err:
        list(sampler_for([holes], min_valid_fraction=0.5).epoch(0))
    assert err.value.where == "holes"
