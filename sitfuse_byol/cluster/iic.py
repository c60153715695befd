"""Deep clustering with Invariant Information Clustering, the SIT-FUSE alternative.

Ji, Henriques & Vedaldi 2019 (arXiv:1807.06653): a head maps an embedding
``x`` and a paired embedding ``x'`` (here: of a spatial neighbour, which most
often shows the same surface) to soft cluster assignments ``z, z'``, and is
trained to maximise their mutual information, estimated on a batch through the
joint distribution ``P = mean(z^T z')``, symmetrised. Maximising ``I(z; z')``
rewards assignments that agree across the pair (invariance) and that use all
clusters evenly (the marginal entropy term), which prevents collapse without
the empty-cluster handling k-means needs.

Training needs torch; the fitted head is stored as plain float32 arrays in a
:class:`~sitfuse_byol.cluster.model.ClusterModel`, which runs it in NumPy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from sitfuse_byol.cluster.kmeans import (
    EmbeddingReservoir,
    _check_n_fine,
    check_enough_samples,
    fit_fine_centroids,
)
from sitfuse_byol.cluster.model import BN_EPS, ClusterModel

__all__ = ["fit_iic", "iic_loss"]


def iic_loss(z: torch.Tensor, z_prime: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Negative mutual information of paired soft assignments (the IIC loss).

    ``P = mean_b z_b^T z'_b``, symmetrised ``(P + P^T) / 2``;
    ``loss = -sum_ij P_ij (log P_ij - log P_i - log P_j)`` with ``P_i``, ``P_j``
    the marginals. Entries below ``eps`` are clamped (without gradient) before
    the logarithms, as in the reference implementation. The minimum, ``-log K``,
    is reached by confident, agreeing assignments spread evenly over ``K``
    clusters.

    Args:
        z: ``(B, K)`` softmax outputs for the embeddings.
        z_prime: ``(B, K)`` softmax outputs for their pairs.
        eps: Clamp for probabilities before taking logarithms.

    Returns:
        The scalar loss.
    """
    joint = z.T @ z_prime / z.shape[0]
    joint = (joint + joint.T) / 2
    joint = joint / joint.sum()
    p_i = joint.sum(dim=1, keepdim=True).clamp_min(eps)
    p_j = joint.sum(dim=0, keepdim=True).clamp_min(eps)
    joint = joint.clamp_min(eps)
    return -(joint * (joint.log() - p_i.log() - p_j.log())).sum()


def fit_iic(
    data: EmbeddingReservoir | tuple[np.ndarray, np.ndarray],
    *,
    n_clusters: int,
    seed: int,
    epochs: int = 10,
    batch_size: int = 1024,
    lr: float = 1e-3,
    hidden: int = 256,
    device: str = "cpu",
    n_fine: int = 0,
    min_fine_samples: int | None = None,
) -> ClusterModel:
    """Train an IIC head on embedding pairs and wrap it in a :class:`ClusterModel`.

    The head is ``Linear(D, hidden) - BatchNorm1d - ReLU - Linear(hidden, K)``
    with a softmax, trained with Adam on :func:`iic_loss`; both members of a
    pair go through the head in one batch, so BatchNorm sees both. Batches
    are drawn without replacement from a ``torch.Generator`` seeded with
    ``seed``, and the weights are initialised under ``torch.manual_seed(seed)``
    inside :func:`torch.random.fork_rng`, so the caller's global RNG is left
    untouched and the result is reproducible on CPU (CUDA kernels may not be
    bitwise deterministic).

    The model's ``centroids`` are the mean embedding of each cluster as the
    trained head assigns the sample; a cluster that gets no sample has a zero
    centroid and is listed in ``metadata["fit"]["empty_clusters"]``. With
    ``n_fine >= 2`` each cluster is split as in
    :func:`~sitfuse_byol.cluster.kmeans.fit_fine_centroids`.

    Args:
        data: An :class:`EmbeddingReservoir` filled with ``neighbours``, or an
            ``(embeddings, neighbours)`` pair of ``(N, D)`` arrays.
        n_clusters: ``K``, the head's output size.
        seed: Seed of initialisation, batch order and the fine fits.
        epochs: Passes over the pairs.
        batch_size: Pairs per step; a larger batch estimates ``P`` better
            when ``K`` is large.
        lr: Adam learning rate.
        hidden: Hidden width of the head.
        device: Torch device to train on.
        n_fine: Fine clusters per cluster (``>= 2``), or 0 for a flat model.
        min_fine_samples: Fewest members for a cluster to be split; None
            means ``n_fine``.

    Returns:
        An ``iic`` :class:`ClusterModel`; ``metadata["fit"]`` records sample
        size, steps, final loss and empty clusters.

    Raises:
        InputError: If fewer valid pairs than ``n_clusters`` are available.
        ValueError: If ``data`` holds no neighbours, on a non-positive
            ``n_clusters``, ``epochs``, ``batch_size`` or ``hidden``, or an
            ``n_fine`` of 1 or below 0.
    """
    if min(n_clusters, epochs, batch_size, hidden) < 1:
        raise ValueError("n_clusters, epochs, batch_size and hidden must be at least 1")
    _check_n_fine(n_fine)
    x, x_prime, seen = _pairs_of(data)
    check_enough_samples(n_clusters, len(x))
    n, dim = x.shape

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.BatchNorm1d(hidden, eps=BN_EPS),
            nn.ReLU(),
            nn.Linear(hidden, n_clusters),
        ).to(device)
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x).to(device)
    xt_prime = torch.from_numpy(x_prime).to(device)
    head.train()
    steps = 0
    loss = torch.tensor(math.nan)
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            if len(batch) < 2:  # BatchNorm needs two rows
                continue
            batch = batch.to(device)
            logits = head(torch.cat([xt[batch], xt_prime[batch]]))
            z, z_prime = logits.softmax(dim=1).chunk(2)
            loss = iic_loss(z, z_prime)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps += 1

    linear1, norm, _, linear2 = head
    weights = {
        "w1": linear1.weight,
        "b1": linear1.bias,
        "bn_weight": norm.weight,
        "bn_bias": norm.bias,
        "bn_mean": norm.running_mean,
        "bn_var": norm.running_var,
        "w2": linear2.weight,
        "b2": linear2.bias,
    }
    arrays = {
        key: value.detach().cpu().numpy().astype(np.float32) for key, value in weights.items()
    }
    placeholder = np.zeros((n_clusters, dim), np.float32)
    coarse, _ = ClusterModel(method="iic", centroids=placeholder, head=arrays).predict(x)
    centroids, empty = _cluster_means(x, coarse, n_clusters)

    fit: dict[str, Any] = {
        "method": "iic",
        "n_samples": n,
        "n_seen": seen,
        "epochs": epochs,
        "steps": steps,
        "seed": seed,
        "final_loss": float(loss),
        "empty_clusters": empty,
    }
    fine = None
    if n_fine:
        fine, unsplit = fit_fine_centroids(
            x, coarse, centroids, n_fine=n_fine, seed=seed, min_fine_samples=min_fine_samples
        )
        fit.update({"min_fine_samples": min_fine_samples, "unsplit_clusters": unsplit})
    return ClusterModel(
        method="iic", centroids=centroids, fine_centroids=fine, metadata={"fit": fit}, head=arrays
    )


def _pairs_of(
    data: EmbeddingReservoir | tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, int]:
    """Finite, C-contiguous float32 ``(x, x')`` rows and how many pairs the stream had."""
    if isinstance(data, EmbeddingReservoir):
        if data.neighbours is None:
            raise ValueError("IIC needs pairs: fill the reservoir with add(..., neighbours=...)")
        return data.samples, data.neighbours, data.count
    x, x_prime = (np.ascontiguousarray(a, dtype=np.float32) for a in data)
    if x.ndim != 2 or x.shape != x_prime.shape:
        raise ValueError(f"pairs must be two (N, D) arrays, got {x.shape} and {x_prime.shape}")
    finite = np.isfinite(x).all(axis=1) & np.isfinite(x_prime).all(axis=1)
    if not finite.all():
        x, x_prime = x[finite], x_prime[finite]
    return x, x_prime, len(x)


def _cluster_means(
    x: np.ndarray, labels: np.ndarray, n_clusters: int
) -> tuple[np.ndarray, list[int]]:
    """Mean row of each label (zeros where a label is unused) and the unused labels."""
    counts = np.bincount(labels, minlength=n_clusters)
    order = np.argsort(labels, kind="stable")
    ends = np.cumsum(counts)
    means = np.zeros((n_clusters, x.shape[1]), np.float32)
    # One cluster at a time: a sorted copy of the whole sample would double memory.
    for k in np.flatnonzero(counts):
        means[k] = x[order[ends[k] - counts[k] : ends[k]]].mean(axis=0, dtype=np.float64)
    return means, np.flatnonzero(counts == 0).tolist()
