"""Reservoir sampling across scenes and streaming k-means, flat and hierarchical."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from sitfuse_byol.cluster.kmeans import EmbeddingReservoir, fit_fine_centroids, fit_kmeans
from sitfuse_byol.errors import InputError

N_BLOBS, DIM, N_POINTS, N_SCENES = 6, 16, 20_000, 5


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Small minibatches: one OpenMP/BLAS thread is as fast and does not stall
    # at barriers when other processes share the cores.
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def blobs() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Five "scenes" of points from six well-separated Gaussian blobs, and each point's blob."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=8, size=(N_BLOBS, DIM))
    truth = rng.integers(0, N_BLOBS, N_POINTS)
    points = (centres[truth] + rng.normal(size=(N_POINTS, DIM))).astype(np.float32)
    return np.array_split(points, N_SCENES), np.array_split(truth, N_SCENES)


def _reservoir(scenes: list[np.ndarray], *, capacity: int, seed: int = 0) -> EmbeddingReservoir:
    reservoir = EmbeddingReservoir(capacity=capacity, seed=seed)
    for scene in scenes:
        reservoir.add(scene)
    return reservoir


# ------------------------------------------------------------------ reservoir
def test_reservoir_keeps_everything_below_capacity() -> None:
    reservoir = EmbeddingReservoir(capacity=100, seed=0)
    first, second = np.ones((30, 4), np.float32), np.full((20, 4), 2.0, np.float32)
    reservoir.add(first)
    reservoir.add(second)
    assert reservoir.count == len(reservoir) == 50
    np.testing.assert_array_equal(reservoir.samples, np.concatenate([first, second]))
    assert reservoir.neighbours is None


def test_reservoir_respects_capacity() -> None:
    reservoir = EmbeddingReservoir(capacity=1000, seed=0)
    for _ in range(7):
        reservoir.add(np.random.default_rng(1).normal(size=(900, 3)))
    assert reservoir.count == 6300
    assert len(reservoir) == 1000 and reservoir.samples.shape == (1000, 3)
    assert reservoir.samples.dtype == np.float32


def test_reservoir_is_uniform_over_sources() -> None:
    capacity, sources, rows = 5000, 10, 10_000
    reservoir = EmbeddingReservoir(capacity=capacity, seed=3)
    for source in range(sources):
        tagged = np.column_stack([np.full(rows, source), np.arange(rows)]).astype(np.float32)
        reservoir.add(tagged)
    kept = reservoir.samples
    # Sampling without replacement: no row twice.
    assert len(np.unique(kept, axis=0)) == capacity
    counts = np.bincount(kept[:, 0].astype(int), minlength=sources)
    total = sources * rows
    p = 1 / sources
    sigma = np.sqrt(capacity * p * (1 - p) * (total - capacity) / (total - 1))
    assert np.abs(counts - capacity * p).max() < 5 * sigma, counts
    # Within a source too: early and late rows are equally likely to survive.
    late = (kept[:, 1] >= rows / 2).mean()
    assert abs(late - 0.5) < 5 * np.sqrt(0.25 / capacity)


def test_reservoir_keeps_neighbours_aligned() -> None:
    reservoir = EmbeddingReservoir(capacity=300, seed=0)
    rng = np.random.default_rng(4)
    for _ in range(5):
        rows = rng.normal(size=(200, 4)).astype(np.float32)
        reservoir.add(rows, neighbours=rows + 1000)
    assert reservoir.neighbours is not None
    np.testing.assert_array_equal(reservoir.neighbours, reservoir.samples + 1000)


def test_reservoir_drops_non_finite_rows() -> None:
    reservoir = EmbeddingReservoir(capacity=10, seed=0)
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    neighbours = rows.copy()
    rows[1, 0] = np.nan
    neighbours[4, 1] = np.inf
    reservoir.add(rows, neighbours=neighbours)
    assert reservoir.count == 4
    np.testing.assert_array_equal(reservoir.samples, rows[[0, 2, 3, 5]])


def test_reservoir_is_deterministic_under_its_seed(blobs) -> None:
    scenes, _ = blobs
    a = _reservoir(scenes, capacity=3000, seed=7).samples
    b = _reservoir(scenes, capacity=3000, seed=7).samples
    c = _reservoir(scenes, capacity=3000, seed=8).samples
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_reservoir_refuses_inconsistent_rows() -> None:
    reservoir = EmbeddingReservoir(capacity=10, seed=0)
    reservoir.add(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="4"):
        reservoir.add(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="neighbours"):
        reservoir.add(np.zeros((3, 4)), neighbours=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingReservoir(capacity=0)


# --------------------------------------------------------------------- k-means
def test_kmeans_recovers_blobs_consistently_across_scenes(blobs) -> None:
    scenes, truths = blobs
    model = fit_kmeans(_reservoir(scenes, capacity=8000), n_clusters=N_BLOBS, seed=0)
    assert model.method == "kmeans" and model.centroids.shape == (N_BLOBS, DIM)
    assert model.metadata["fit"]["n_seen"] == N_POINTS
    assert model.metadata["fit"]["n_samples"] == 8000

    per_scene = [model.predict(scene)[0] for scene in scenes]
    assert adjusted_rand_score(np.concatenate(truths), np.concatenate(per_scene)) > 0.95
    # Each scene is labelled on its own, yet a blob gets the same label everywhere.
    blob_label = [
        [np.bincount(labels[truth == blob]).argmax() for blob in range(N_BLOBS)]
        for labels, truth in zip(per_scene, truths, strict=True)
    ]
    assert all(labels == blob_label[0] for labels in blob_label)
    assert sorted(blob_label[0]) == list(range(N_BLOBS))


def test_kmeans_on_an_array_ignores_non_finite_rows(blobs) -> None:
    scenes, truths = blobs
    points = scenes[0].copy()
    points[:10] = np.nan
    model = fit_kmeans(points, n_clusters=N_BLOBS, seed=0)
    assert model.metadata["fit"]["n_samples"] == len(points) - 10
    labels, _ = model.predict(scenes[1])
    assert adjusted_rand_score(truths[1], labels) > 0.95


def test_kmeans_is_deterministic_under_its_seed(blobs) -> None:
    scenes, _ = blobs
    points = np.concatenate(scenes)
    a = fit_kmeans(_reservoir(scenes, capacity=6000), n_clusters=N_BLOBS, seed=1)
    b = fit_kmeans(_reservoir(scenes, capacity=6000), n_clusters=N_BLOBS, seed=1)
    c = fit_kmeans(_reservoir(scenes, capacity=6000), n_clusters=N_BLOBS, seed=2)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.model_hash == b.model_hash
    assert not np.array_equal(a.centroids, c.centroids)
    # Another seed may number the clusters differently but finds the same partition.
    assert adjusted_rand_score(a.predict(points)[0], c.predict(points)[0]) > 0.99


def test_too_few_samples_is_an_input_error() -> None:
    points = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(InputError) as info:
        fit_kmeans(points, n_clusters=8, seed=0)
    assert info.value.what == (
        "cluster.n_clusters is 8 but only 5 valid pixels were sampled; "
        "lower n_clusters or raise cluster.samples_per_scene"
    )
    assert info.value.where == "cluster.n_clusters"


def test_fewer_distinct_points_than_clusters_gives_finite_centroids(caplog) -> None:
    # 3 distinct values for 5 clusters: some clusters can only be duplicates.
    points = np.repeat(np.eye(3, 4, dtype=np.float32), 100, axis=0)
    with caplog.at_level("WARNING"):
        model = fit_kmeans(points, n_clusters=5, seed=0, batch_size=64)
    assert "only 3 distinct clusters of the 5 asked for" in caplog.text
    assert np.isfinite(model.centroids).all()
    labels, distance = model.predict(points)
    np.testing.assert_allclose(distance, 0, atol=1e-6)
    assert len(np.unique(labels)) == 3


# ---------------------------------------------------------------- hierarchical
@pytest.fixture(scope="module")
def nested() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three far-apart blobs; blob 0 is really two sub-blobs, close together."""
    rng = np.random.default_rng(5)
    centres = np.array([[0.0, 0.0], [60.0, 0.0], [0.0, 60.0]])
    blob = rng.integers(0, 3, 9000)
    sub = rng.integers(0, 2, 9000)
    offset = np.where(sub[:, None] == 0, -4.0, 4.0) * np.array([1.0, 0.0]) * (blob[:, None] == 0)
    points = centres[blob] + offset + rng.normal(size=(9000, 2))
    return points.astype(np.float32), blob, sub


def test_hierarchical_labels_nest_and_split_sub_blobs(nested) -> None:
    points, blob, sub = nested
    model = fit_kmeans(points, n_clusters=3, seed=0, n_fine=2)
    assert model.fine_centroids is not None and model.fine_centroids.shape == (3, 2, 2)
    assert (model.n_fine, model.n_labels) == (2, 6)
    levels = model.predict_levels(points)
    labels, _ = model.predict(points)
    np.testing.assert_array_equal(levels["fine"], labels)
    assert labels.min() >= 0 and labels.max() < 6
    np.testing.assert_array_equal(labels // 2, levels["coarse"])
    assert adjusted_rand_score(blob, levels["coarse"]) > 0.99
    in_split = blob == 0
    assert adjusted_rand_score(sub[in_split], labels[in_split]) > 0.95


def test_small_clusters_stay_unsplit_on_sub_label_zero(nested) -> None:
    points, _, _ = nested
    model = fit_kmeans(points, n_clusters=3, seed=0, n_fine=4, min_fine_samples=100_000)
    assert model.metadata["fit"]["unsplit_clusters"] == [0, 1, 2]
    np.testing.assert_array_equal(
        model.fine_centroids, np.repeat(model.centroids[:, None], 4, axis=1)
    )
    levels = model.predict_levels(points)
    np.testing.assert_array_equal(levels["fine"], levels["coarse"] * 4)


def test_fine_fit_is_deterministic_and_leaves_sparse_clusters(nested) -> None:
    points, blob, _ = nested
    centroids = np.stack([points[blob == k].mean(axis=0) for k in range(3)])
    coarse = blob.copy()
    coarse[coarse == 2] = 1  # cluster 2 has no members
    a, unsplit = fit_fine_centroids(points, coarse, centroids, n_fine=3, seed=4)
    b, _ = fit_fine_centroids(points, coarse, centroids, n_fine=3, seed=4)
    np.testing.assert_array_equal(a, b)
    assert unsplit == [2]
    np.testing.assert_array_equal(a[2], np.repeat(centroids[2:3], 3, axis=0))
    assert np.isfinite(a).all()


def test_n_fine_of_one_is_refused(nested) -> None:
    with pytest.raises(ValueError, match="n_fine"):
        fit_kmeans(nested[0], n_clusters=3, seed=0, n_fine=1)
