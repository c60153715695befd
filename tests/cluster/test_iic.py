"""IIC deep clustering: the loss, recovery of blobs from neighbour pairs, NumPy inference."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits
from torch import nn

from sitfuse_byol.cluster.iic import fit_iic, iic_loss
from sitfuse_byol.cluster.kmeans import EmbeddingReservoir
from sitfuse_byol.cluster.model import BN_EPS, ClusterModel
from sitfuse_byol.errors import InputError

N_BLOBS, DIM = 6, 16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Many small ops: one thread is about as fast, and unlike two it does not
    # stall at OpenMP barriers when other processes share the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def _pairs(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of six Gaussian blobs, a second point of the same blob for each, and the blob."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4, size=(N_BLOBS, DIM))
    truth = rng.integers(0, N_BLOBS, n)
    x = (centres[truth] + rng.normal(size=(n, DIM))).astype(np.float32)
    x_prime = (centres[truth] + rng.normal(size=(n, DIM))).astype(np.float32)
    return x, x_prime, truth


@pytest.fixture(scope="module")
def fitted() -> tuple[ClusterModel, np.ndarray, np.ndarray, np.ndarray]:
    """An IIC model fitted through a reservoir filled scene by scene, held-out points
    and their blobs, and the reservoir's sample."""
    x, x_prime, truth = _pairs(16_000, seed=0)
    reservoir = EmbeddingReservoir(capacity=12_000, seed=0)
    for rows in np.array_split(np.arange(12_000), 4):
        reservoir.add(x[rows], neighbours=x_prime[rows])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            model = fit_iic(reservoir, n_clusters=N_BLOBS, seed=0, epochs=10)
    finally:
        torch.set_num_threads(before)
    return model, x[12_000:], truth[12_000:], reservoir.samples.copy()


def test_loss_of_perfect_agreement_is_minus_log_k() -> None:
    k = 5
    one_hot = torch.eye(k).repeat(20, 1)
    assert iic_loss(one_hot, one_hot).item() == pytest.approx(-math.log(k), abs=1e-5)


def test_loss_of_independent_assignments_is_zero() -> None:
    k = 4
    z = torch.eye(k).repeat_interleave(k, dim=0)  # every pairing of clusters once
    z_prime = torch.eye(k).repeat(k, 1)
    assert iic_loss(z, z_prime).item() == pytest.approx(0.0, abs=1e-5)


def test_iic_recovers_blobs_from_neighbour_pairs(fitted) -> None:
    model, held_out, truth, _ = fitted
    assert model.method == "iic" and model.n_clusters == N_BLOBS and model.dim == DIM
    labels, distance = model.predict(held_out)
    assert adjusted_rand_score(truth, labels) > 0.8
    assert ((distance >= 0) & (distance <= 1 - 1 / N_BLOBS + 1e-6)).all()
    fit = model.metadata["fit"]
    assert fit["n_samples"] == fit["n_seen"] == 12_000
    assert len(fit["head_losses"]) == 5 and fit["head"] == int(np.argmin(fit["head_losses"]))


def test_centroids_are_cluster_means(fitted) -> None:
    model, _, _, samples = fitted
    assert model.centroids.shape == (N_BLOBS, DIM) and np.isfinite(model.centroids).all()
    labels, _ = model.predict(samples)
    for k in range(N_BLOBS):
        members = samples[labels == k]
        expected = members.mean(axis=0) if len(members) else np.zeros(DIM)
        np.testing.assert_allclose(model.centroids[k], expected, rtol=1e-4, atol=1e-4)
    empty = sorted(set(range(N_BLOBS)) - set(labels.tolist()))
    assert model.metadata["fit"]["empty_clusters"] == empty


def test_numpy_head_matches_torch_in_eval_mode(fitted) -> None:
    model, held_out, _, _ = fitted
    head = model.head
    assert head is not None
    hidden = head["w1"].shape[0]
    net = nn.Sequential(
        nn.Linear(DIM, hidden), nn.BatchNorm1d(hidden, eps=BN_EPS), nn.ReLU(), nn.Linear(hidden, 6)
    )
    state = dict(
        zip(
            ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"],
            [head[k] for k in ["w1", "b1", "bn_weight", "bn_bias", "bn_mean", "bn_var"]],
            strict=True,
        )
    )
    state.update({"3.weight": head["w2"], "3.bias": head["b2"]})
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    net.eval()
    with torch.no_grad():
        probabilities = net(torch.from_numpy(held_out)).softmax(dim=1).numpy()
    labels, distance = model.predict(held_out)
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))
    np.testing.assert_allclose(distance, 1 - probabilities.max(axis=1), atol=1e-5)
    # So the confidence raster must not call it a distance.
    assert model.confidence_meaning == "1 - max cluster probability"


def test_save_load_keeps_predictions_without_pickle(fitted, tmp_path: Path) -> None:
    model, held_out, _, _ = fitted
    directory = model.save(tmp_path / "iic_model")
    assert all(path.suffix in {".npy", ".json"} for path in directory.iterdir())
    for path in directory.glob("*.npy"):
        np.load(path, allow_pickle=False)
    loaded = ClusterModel.load(directory)
    assert loaded.method == "iic" and loaded.model_hash == model.model_hash
    for expected, actual in zip(model.predict(held_out), loaded.predict(held_out), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_iic_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    x, x_prime, _ = _pairs(3000, seed=1)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = fit_iic((x, x_prime), n_clusters=4, seed=3, epochs=2, batch_size=512, hidden=32)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = fit_iic((x, x_prime), n_clusters=4, seed=3, epochs=2, batch_size=512, hidden=32)
    c = fit_iic((x, x_prime), n_clusters=4, seed=4, epochs=2, batch_size=512, hidden=32)
    assert a.model_hash == b.model_hash
    assert a.model_hash != c.model_hash


def test_hierarchical_iic_nests_fine_labels() -> None:
    x, x_prime, _ = _pairs(3000, seed=2)
    model = fit_iic((x, x_prime), n_clusters=N_BLOBS, seed=0, epochs=2, hidden=32, n_fine=3)
    levels = model.predict_levels(x)
    assert model.n_labels == 3 * N_BLOBS
    np.testing.assert_array_equal(levels["fine"] // 3, levels["coarse"])
    assert levels["fine"].max() < model.n_labels


def test_iic_needs_pairs_and_enough_samples() -> None:
    reservoir = EmbeddingReservoir(capacity=100, seed=0)
    reservoir.add(np.zeros((50, 4), np.float32))
    with pytest.raises(ValueError, match="neighbours"):
        fit_iic(reservoir, n_clusters=3, seed=0)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    with pytest.raises(InputError, match="cluster.n_clusters is 8 but only 5 valid pixels"):
        fit_iic((x, x), n_clusters=8, seed=0)
    with pytest.raises(InputError, match="only 0 valid pixels"):
        fit_iic(EmbeddingReservoir(capacity=10), n_clusters=2, seed=0)
