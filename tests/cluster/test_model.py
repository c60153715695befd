"""ClusterModel: nearest-centroid prediction, hierarchical labels, blocks, the no-pickle format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from sitfuse_byol.cluster.model import FORMAT_VERSION, ClusterModel
from sitfuse_byol.errors import ModelError


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Small BLAS calls: one thread is as fast and does not stall when other
    # processes share the cores.
    with threadpool_limits(1):
        yield


def _brute_force(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and distance, in float64 from explicit differences."""
    distances = np.linalg.norm(
        x.astype(np.float64)[:, None, :] - centroids.astype(np.float64)[None], axis=2
    )
    return distances.argmin(axis=1), distances.min(axis=1)


@pytest.fixture
def flat() -> ClusterModel:
    rng = np.random.default_rng(1)
    return ClusterModel(
        method="kmeans",
        centroids=rng.normal(scale=3, size=(5, 8)).astype(np.float32),
        metadata={"encoder_hash": "abc123def4567890", "bands": ["B02", "B03"]},
    )


@pytest.fixture
def hierarchical() -> ClusterModel:
    rng = np.random.default_rng(2)
    coarse = rng.normal(scale=10, size=(4, 6)).astype(np.float32)
    fine = coarse[:, None, :] + rng.normal(size=(4, 3, 6)).astype(np.float32)
    return ClusterModel(method="kmeans", centroids=coarse, fine_centroids=fine)


def test_shape_properties(flat: ClusterModel, hierarchical: ClusterModel) -> None:
    assert (flat.n_clusters, flat.n_fine, flat.n_labels, flat.dim) == (5, 0, 5, 8)
    assert (hierarchical.n_clusters, hierarchical.n_fine) == (4, 3)
    assert (hierarchical.n_labels, hierarchical.dim) == (12, 6)


def test_confidence_meaning_names_the_distance_used(flat: ClusterModel, hierarchical: ClusterModel) -> None:
    assert flat.confidence_meaning == "distance to cluster centroid"
    assert hierarchical.confidence_meaning == "distance to fine cluster centroid"


def test_predict_matches_brute_force(flat: ClusterModel) -> None:
    x = np.random.default_rng(3).normal(scale=3, size=(2000, 8)).astype(np.float32)
    labels, distance = flat.predict(x)
    expected_labels, expected_distance = _brute_force(x, flat.centroids)
    assert labels.dtype == np.int64 and distance.dtype == np.float32
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(distance, expected_distance, rtol=1e-5)


def test_distance_is_accurate_next_to_a_far_centroid() -> None:
    # |x|^2 - 2x.c + |c|^2 in float32 cancels to noise (or a negative) for the
    # rows next to the far centroid; the rows near the origin take the fast path.
    centroids = np.stack([np.full(64, 1000.0), np.zeros(64)]).astype(np.float32)
    rng = np.random.default_rng(4)
    near_far_centroid = centroids[0] + rng.normal(scale=1e-3, size=(100, 64))
    near_origin = rng.normal(size=(100, 64))
    x = np.concatenate([near_far_centroid, near_origin]).astype(np.float32)
    labels, distance = ClusterModel(method="kmeans", centroids=centroids).predict(x)
    expected_labels, expected = _brute_force(x, centroids)
    np.testing.assert_array_equal(labels, expected_labels)
    assert (distance >= 0).all()
    np.testing.assert_allclose(distance, expected, rtol=1e-4)


def test_predict_in_several_slabs_equals_brute_force() -> None:
    # More rows than one slab holds (16384), so slab boundaries are crossed.
    rng = np.random.default_rng(5)
    model = ClusterModel(method="kmeans", centroids=rng.normal(size=(3, 2)).astype(np.float32))
    x = rng.normal(size=(70_000, 2)).astype(np.float32)
    labels, distance = model.predict(x)
    expected_labels, expected_distance = _brute_force(x, model.centroids)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(distance, expected_distance, rtol=1e-4, atol=1e-6)


def test_hierarchical_labels_are_nearest_fine_centroid_within_coarse(
    hierarchical: ClusterModel,
) -> None:
    rng = np.random.default_rng(6)
    x = hierarchical.centroids[rng.integers(0, 4, 3000)] + rng.normal(scale=2, size=(3000, 6))
    x = x.astype(np.float32)
    levels = hierarchical.predict_levels(x)
    labels, distance = hierarchical.predict(x)
    coarse, _ = _brute_force(x, hierarchical.centroids)
    np.testing.assert_array_equal(levels["coarse"], coarse)
    np.testing.assert_array_equal(levels["fine"], labels)
    np.testing.assert_array_equal(labels // 3, coarse)
    for k in range(4):
        rows = coarse == k
        sub, sub_distance = _brute_force(x[rows], hierarchical.fine_centroids[k])
        np.testing.assert_array_equal(labels[rows], k * 3 + sub)
        np.testing.assert_allclose(distance[rows], sub_distance, rtol=1e-5)
    assert labels.min() >= 0 and labels.max() < hierarchical.n_labels


def test_flat_levels_have_no_fine(flat: ClusterModel) -> None:
    levels = flat.predict_levels(np.zeros((3, 8), np.float32))
    assert set(levels) == {"coarse", "distance"}


@pytest.mark.parametrize("valid_fraction", [0.8, 0.2])  # predicted whole / gathered
def test_predict_block_masks_invalid_and_non_finite_pixels(
    flat: ClusterModel, valid_fraction: float
) -> None:
    rng = np.random.default_rng(7)
    block = rng.normal(scale=3, size=(8, 12, 10)).astype(np.float32)
    valid = rng.random((12, 10)) < valid_fraction
    block[:, ~valid] = np.nan  # what nodata pixels often hold
    block[3, 0, 0] = np.inf  # a valid pixel whose embedding is broken
    valid[0, 0] = True
    labels, confidence = flat.predict_block(block, valid, nodata=255)

    labelled = valid.copy()
    labelled[0, 0] = False
    assert labels.shape == confidence.shape == (12, 10)
    assert (labels[~labelled] == 255).all() and np.isnan(confidence[~labelled]).all()
    expected_labels, expected_distance = _brute_force(block[:, labelled].T, flat.centroids)
    np.testing.assert_array_equal(labels[labelled], expected_labels)
    np.testing.assert_allclose(confidence[labelled], expected_distance, rtol=1e-5)


def test_predict_block_without_valid_pixels(flat: ClusterModel) -> None:
    labels, confidence = flat.predict_block(
        np.zeros((8, 2, 3), np.float32), np.zeros((2, 3), bool), nodata=65535
    )
    assert (labels == 65535).all() and np.isnan(confidence).all()


def test_wrong_dimension_is_a_model_error(flat: ClusterModel) -> None:
    with pytest.raises(ModelError, match="dimension 8, these have 4"):
        flat.predict(np.zeros((3, 4), np.float32))
    with pytest.raises(ModelError, match="dimension 8, these have 4"):
        flat.predict_block(np.zeros((4, 2, 2), np.float32), np.ones((2, 2), bool), nodata=0)


def test_check_compatible(flat: ClusterModel) -> None:
    flat.check_compatible(dim=8, encoder_hash="abc123def4567890")
    flat.check_compatible(dim=8, encoder_hash=None)
    with pytest.raises(ModelError) as info:
        flat.check_compatible(dim=16, encoder_hash="abc123def4567890", where="models/cluster")
    assert str(info.value) == (
        "clustering model was fitted on embeddings of dimension 8, these have 16 (models/cluster)"
    )
    with pytest.raises(ModelError) as info:
        flat.check_compatible(dim=8, encoder_hash="def456")
    assert str(info.value) == (
        "clustering model was fitted with another encoder "
        "(model encoder abc123def456, checkpoint def456); rerun `sitfuse cluster`"
    )


def test_invalid_models_are_refused() -> None:
    with pytest.raises(ValueError, match="method"):
        ClusterModel(method="dbscan", centroids=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="fine_centroids"):
        ClusterModel(
            method="kmeans", centroids=np.zeros((2, 3)), fine_centroids=np.zeros((2, 2, 4))
        )
    with pytest.raises(ValueError, match="non-finite"):
        ClusterModel(method="kmeans", centroids=np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="head"):
        ClusterModel(method="iic", centroids=np.zeros((2, 3)))


@pytest.mark.parametrize("which", ["flat", "hierarchical"])
def test_save_load_round_trip_without_pickle(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model: ClusterModel = request.getfixturevalue(which)
    directory = model.save(tmp_path / "cluster_model")
    files = sorted(path.name for path in directory.iterdir())
    assert all(name.endswith((".npy", ".json")) for name in files)
    for path in directory.glob("*.npy"):
        np.load(path, allow_pickle=False)
    document = json.loads((directory / "model.json").read_text())
    assert document["format_version"] == FORMAT_VERSION
    assert document["model_hash"] == model.model_hash
    assert (document["n_clusters"], document["n_fine"], document["dim"]) == (
        model.n_clusters,
        model.n_fine,
        model.dim,
    )

    loaded = ClusterModel.load(directory)
    assert loaded.model_hash == model.model_hash
    assert loaded.metadata == model.metadata
    x = np.random.default_rng(8).normal(scale=5, size=(500, model.dim)).astype(np.float32)
    for expected, actual in zip(model.predict(x), loaded.predict(x), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_save_replaces_a_model_atomically(
    flat: ClusterModel, hierarchical: ClusterModel, tmp_path: Path
) -> None:
    target = tmp_path / "cluster_model"
    hierarchical.save(target)
    flat.save(target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cluster_model"]
    assert not (target / "fine_centroids.npy").exists()
    assert ClusterModel.load(target).model_hash == flat.model_hash


def test_unserialisable_metadata_writes_nothing(tmp_path: Path) -> None:
    model = ClusterModel(method="kmeans", centroids=np.zeros((2, 3)), metadata={"x": object()})
    with pytest.raises(TypeError):
        model.save(tmp_path / "cluster_model")
    assert list(tmp_path.iterdir()) == []


def test_model_hash_changes_with_the_arrays(flat: ClusterModel) -> None:
    other = ClusterModel(method="kmeans", centroids=flat.centroids + 1e-3)
    assert other.model_hash != flat.model_hash
    assert (
        ClusterModel(method="kmeans", centroids=flat.centroids.copy()).model_hash == flat.model_hash
    )


def _model_error(directory: Path) -> ModelError:
    with pytest.raises(ModelError) as info:
        ClusterModel.load(directory)
    assert info.value.where == str(directory)
    return info.value


def test_load_missing_model(tmp_path: Path) -> None:
    assert "run `sitfuse cluster` first" in str(_model_error(tmp_path / "nowhere"))


def test_load_corrupt_model_json(flat: ClusterModel, tmp_path: Path) -> None:
    directory = flat.save(tmp_path / "m")
    (directory / "model.json").write_text('{"format": "sitfuse-byol clustering mod')
    assert "unreadable" in str(_model_error(directory))


def test_load_other_format_version(flat: ClusterModel, tmp_path: Path) -> None:
    directory = flat.save(tmp_path / "m")
    document = json.loads((directory / "model.json").read_text())
    document["format_version"] = FORMAT_VERSION + 1
    (directory / "model.json").write_text(json.dumps(document))
    assert "format version" in str(_model_error(directory))


def test_load_tampered_arrays(flat: ClusterModel, tmp_path: Path) -> None:
    directory = flat.save(tmp_path / "m")
    np.save(directory / "centroids.npy", flat.centroids + 1)
    assert "do not match model.json" in str(_model_error(directory))


def test_load_missing_array(hierarchical: ClusterModel, tmp_path: Path) -> None:
    directory = hierarchical.save(tmp_path / "m")
    (directory / "fine_centroids.npy").unlink()
    assert "incomplete or corrupt" in str(_model_error(directory))


def test_load_refuses_pickled_arrays(flat: ClusterModel, tmp_path: Path) -> None:
    directory = flat.save(tmp_path / "m")
    np.save(directory / "centroids.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "incomplete or corrupt" in str(_model_error(directory))


def test_load_refuses_unknown_array_names(flat: ClusterModel, tmp_path: Path) -> None:
    directory = flat.save(tmp_path / "m")
    document = json.loads((directory / "model.json").read_text())
    document["arrays"] = ["../../elsewhere"]
    (directory / "model.json").write_text(json.dumps(document))
    assert "unknown arrays" in str(_model_error(directory))
