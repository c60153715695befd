"""Fit one k-means model on embeddings sampled from every scene, in bounded memory.

Scenes stream through an :class:`EmbeddingReservoir`, a uniform random sample
of fixed size over everything added, so memory does not grow with the number of
scenes. :func:`fit_kmeans` then runs scikit-learn's ``MiniBatchKMeans`` over
shuffled minibatches of the sample.

Measured on 1M x 128 float32 (200 Gaussian blobs in a 20-d subspace plus
noise), 2 cores, batch 4096:

* one pass (244 minibatches) is within 0.1-0.2 % of the inertia of three
  passes, at a third of the time; the seed changes inertia by about 1 %;
* choosing the best of three k-means++ inits on held-out inertia (what
  ``MiniBatchKMeans.fit`` does with ``n_init=3``) did not lower the final
  inertia, and ``.fit`` took 2-3x as long as the ``partial_fit`` loop;
* a few Lloyd iterations afterwards gained under 0.5 %.

So a sample gets as many passes as it takes to reach about 200 minibatches,
capped by ``max_epochs``: one pass from about 800k rows (at batch 4096),
``max_epochs`` for small samples, where more passes are cheap and do help
(measured on 20k rows: 569 -> 559 -> 554 inertia after 1 -> 3 -> 20 passes).

A fit of 1M x 128 took 0.9-2 s (K=64) and 4-4.6 s (K=256) with one thread.
With other processes busy on the two cores, letting OpenMP use both threads
made it 5-10x *slower* (threads wait at barriers); a caller sharing the cores
should wrap the fit in ``threadpoolctl.threadpool_limits(1)``.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning

from sitfuse_byol.cluster.model import ClusterModel
from sitfuse_byol.errors import InputError

log = logging.getLogger(__name__)

# Sample rows looked at for fewer distinct values than clusters (see fit_kmeans).
_DISTINCT_CHECK_ROWS = 10_000

__all__ = [
    "MAX_FINE_SAMPLES",
    "EmbeddingReservoir",
    "check_enough_samples",
    "check_n_fine",
    "fit_fine_centroids",
    "fit_kmeans",
]

#: Members of a coarse cluster used to fit its fine centroids (a random subset beyond this).
MAX_FINE_SAMPLES = 5000

# Minibatch updates after which another pass no longer pays (see the module docstring).
_TARGET_STEPS = 200


class EmbeddingReservoir:
    """A uniform random sample of at most ``capacity`` rows over a stream of arrays.

    Reservoir sampling (Vitter's algorithm R, vectorised per added array):
    after any sequence of :meth:`add` calls every finite row seen so far is in
    the sample with the same probability ``min(1, capacity / count)``, whichever array
    it came from. Memory is ``capacity x D x 4`` bytes (twice that with
    neighbours), independent of the number of scenes.

    Rows with a non-finite value (in the row or its neighbour) are dropped on
    arrival and not counted: k-means cannot use them.

    Args:
        capacity: Most rows kept.
        seed: Seed of the sampling generator; the same stream and seed give
            the same sample.

    Raises:
        ValueError: If ``capacity`` is below 1.
    """

    def __init__(self, *, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = int(capacity)
        self._rng = np.random.default_rng(seed)
        self._count = 0
        self._samples: np.ndarray | None = None
        self._neighbours: np.ndarray | None = None

    @property
    def capacity(self) -> int:
        """Most rows kept."""
        return self._capacity

    @property
    def count(self) -> int:
        """Finite rows added so far, kept or not."""
        return self._count

    @property
    def dim(self) -> int | None:
        """Row length ``D``; None before the first :meth:`add`."""
        return None if self._samples is None else int(self._samples.shape[1])

    @property
    def samples(self) -> np.ndarray:
        """The kept rows, ``(min(count, capacity), D)`` float32 (a view, not a copy)."""
        if self._samples is None:
            return np.empty((0, 0), np.float32)
        return self._samples[: len(self)]

    @property
    def neighbours(self) -> np.ndarray | None:
        """Neighbour rows aligned with :attr:`samples`, or None when none were added."""
        return None if self._neighbours is None else self._neighbours[: len(self)]

    def __len__(self) -> int:
        return min(self._count, self._capacity)

    def add(self, embeddings: np.ndarray, *, neighbours: np.ndarray | None = None) -> None:
        """Offer rows to the sample.

        Args:
            embeddings: ``(n, D)`` rows, cast to float32.
            neighbours: ``(n, D)`` rows paired with ``embeddings`` (e.g. the
                embedding of a spatial neighbour, for IIC), kept or dropped
                together with their row. Either every call passes them or none.

        Raises:
            ValueError: On a wrong shape, a ``D`` differing from earlier calls,
                or neighbours passed in some calls but not in others.
        """
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be (n, D), got shape {x.shape}")
        y = None if neighbours is None else np.asarray(neighbours, dtype=np.float32)
        if y is not None and y.shape != x.shape:
            raise ValueError(f"neighbours have shape {y.shape}, embeddings {x.shape}")
        self._allocate(x.shape[1], paired=y is not None)
        finite = np.isfinite(x).all(axis=1)
        if y is not None:
            finite &= np.isfinite(y).all(axis=1)
        if not finite.all():
            x = x[finite]
            y = None if y is None else y[finite]

        held = len(self)
        fill = min(self._capacity - held, len(x))
        destinations = [np.arange(held, held + fill)]
        sources = [np.arange(fill)]
        # Row i of the rest is the t-th row of the stream (0-based); it replaces
        # slot j ~ U{0..t} when j < capacity.
        t = self._count + np.arange(fill, len(x))
        slots = self._rng.integers(0, t + 1) if t.size else t
        replace = np.flatnonzero(slots < self._capacity)
        # When several rows hit one slot the sequential algorithm keeps the last.
        slots_last_first = slots[replace][::-1]
        unique_slots, first = np.unique(slots_last_first, return_index=True)
        destinations.append(unique_slots)
        sources.append(fill + replace[::-1][first])

        dst = np.concatenate(destinations)
        src = np.concatenate(sources)
        assert self._samples is not None
        self._samples[dst] = x[src]
        if self._neighbours is not None and y is not None:
            self._neighbours[dst] = y[src]
        self._count += len(x)

    def _allocate(self, dim: int, *, paired: bool) -> None:
        if self._samples is None:
            self._samples = np.empty((self._capacity, dim), np.float32)
            if paired:
                self._neighbours = np.empty((self._capacity, dim), np.float32)
            return
        if dim != self._samples.shape[1]:
            raise ValueError(f"rows have {dim} values, earlier ones {self._samples.shape[1]}")
        if paired != (self._neighbours is not None):
            raise ValueError("pass neighbours to every add() or to none")


def check_enough_samples(n_clusters: int, n_samples: int) -> None:
    """Refuse to fit more clusters than there are samples.

    Args:
        n_clusters: Requested clusters.
        n_samples: Valid samples available.

    Raises:
        InputError: If ``n_samples < n_clusters``.
    """
    if n_samples < n_clusters:
        raise InputError(
            f"cluster.n_clusters is {n_clusters} but only {n_samples} valid pixels were "
            "sampled; lower n_clusters or raise cluster.samples_per_scene",
            where="cluster.n_clusters",
        )


def fit_kmeans(
    data: EmbeddingReservoir | np.ndarray,
    *,
    n_clusters: int,
    seed: int,
    batch_size: int = 4096,
    max_epochs: int = 3,
    n_fine: int = 0,
    min_fine_samples: int | None = None,
) -> ClusterModel:
    """Fit k-means (optionally hierarchical) on a sample of embeddings.

    ``MiniBatchKMeans.partial_fit`` runs over shuffled minibatches. The first
    minibatch holds at least ``3 * n_clusters`` rows, because ``partial_fit``
    runs its single k-means++ init on the first minibatch it sees. The number
    of passes is the fewest that reach about 200 minibatches, at most
    ``max_epochs`` (see the module docstring for the measurements).

    Every centroid is finite: k-means++ places each on a sample, and
    ``MiniBatchKMeans`` moves a centroid that receives (almost) no samples,
    fewer than 1 % of the busiest one's count, onto a random sample of the
    current minibatch (checked every ``10 * n_clusters`` samples, and at every
    step while some count is zero), instead of leaving it empty.

    Args:
        data: An :class:`EmbeddingReservoir` or an ``(N, D)`` array;
            non-finite rows of an array are ignored.
        n_clusters: ``K``, the number of (coarse) clusters.
        seed: Seed of the initialisation, the shuffling and the fine fits;
            the same data and seed give identical centroids.
        batch_size: Rows per minibatch.
        max_epochs: Most passes over the sample.
        n_fine: Fine clusters per coarse cluster (``>= 2``), or 0 for a flat model.
        min_fine_samples: A coarse cluster with fewer members than
            ``max(n_fine, min_fine_samples)`` is not split (see
            :func:`fit_fine_centroids`); None means ``n_fine``.

    Returns:
        A ``kmeans`` :class:`ClusterModel`; ``metadata["fit"]`` records the
        sample size, passes, seed and the coarse clusters left unsplit.

    Raises:
        InputError: If fewer valid samples than ``n_clusters`` are available.
        ValueError: On a non-positive ``n_clusters``, ``batch_size`` or
            ``max_epochs``, or ``n_fine`` of 1 or below 0.
    """
    if n_clusters < 1 or batch_size < 1 or max_epochs < 1:
        raise ValueError("n_clusters, batch_size and max_epochs must be at least 1")
    check_n_fine(n_fine)
    x, seen = _sample_of(data)
    check_enough_samples(n_clusters, len(x))
    n = len(x)
    rng = np.random.default_rng(seed)
    epochs = min(max_epochs, max(1, math.ceil(_TARGET_STEPS * batch_size / n)))
    kmeans = MiniBatchKMeans(
        n_clusters,
        init="k-means++",
        n_init=1,
        random_state=seed,
        batch_size=batch_size,
        compute_labels=False,
    )
    first = min(n, max(batch_size, 3 * n_clusters))
    for epoch in range(epochs):
        order = rng.permutation(n)
        lead = first if epoch == 0 else 0
        # array_split rather than fixed strides: no tiny last minibatch.
        batches = np.array_split(order[lead:], max(1, math.ceil((n - lead) / batch_size)))
        for batch in [order[:lead], *batches]:
            if len(batch):
                kmeans.partial_fit(x[batch])
    centroids = kmeans.cluster_centers_.astype(np.float32)
    # Fewer distinct samples than clusters (a constant scene) leave copies of centroids
    # that never win a pixel. Rows spread over the whole sample are a cheap first look;
    # only when they hold too few is the whole sample counted.
    distinct = len(np.unique(x[:: max(1, n // _DISTINCT_CHECK_ROWS)], axis=0))
    if distinct < n_clusters:
        distinct = len(np.unique(x, axis=0))
    if distinct < n_clusters:
        log.warning(
            "warning: the sampled embeddings give only %d distinct clusters of the %d asked for "
            "(a constant or nearly empty scene?); the other labels will not occur", distinct, n_clusters,
        )

    fit: dict[str, Any] = {
        "method": "kmeans",
        "n_samples": n,
        "n_seen": seen,
        "epochs": epochs,
        "seed": seed,
    }
    fine = None
    if n_fine:
        coarse, _ = ClusterModel(method="kmeans", centroids=centroids).predict(x)
        fine, unsplit = fit_fine_centroids(
            x, coarse, centroids, n_fine=n_fine, seed=seed, min_fine_samples=min_fine_samples
        )
        fit.update({"min_fine_samples": min_fine_samples, "unsplit_clusters": unsplit})
    return ClusterModel(
        method="kmeans", centroids=centroids, fine_centroids=fine, metadata={"fit": fit}
    )


def fit_fine_centroids(
    samples: np.ndarray,
    coarse: np.ndarray,
    centroids: np.ndarray,
    *,
    n_fine: int,
    seed: int,
    min_fine_samples: int | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Split every coarse cluster into ``n_fine`` sub-clusters.

    Each coarse cluster's members (a random :data:`MAX_FINE_SAMPLES` of them
    when there are more) are clustered with ``KMeans(n_fine)``. A cluster with
    fewer than ``max(n_fine, min_fine_samples)`` members is left unsplit: all
    its fine centroids equal its coarse centroid, so every pixel of it gets
    sub-label 0 (the first of equal distances wins), deterministically. A
    split cluster whose members have fewer than ``n_fine`` distinct values
    gets duplicate fine centroids, of which only the first is ever assigned.

    Args:
        samples: ``(N, D)`` float32 embeddings.
        coarse: ``(N,)`` coarse label of each sample.
        centroids: ``(K, D)`` coarse centroids.
        n_fine: Fine clusters per coarse cluster, at least 2.
        seed: Seed; cluster ``k`` uses a generator seeded with ``(seed, k)``,
            so results do not depend on the order clusters are processed in.
        min_fine_samples: Fewest members for a split; None means ``n_fine``.

    Returns:
        ``(fine_centroids (K, n_fine, D) float32, unsplit cluster indices)``.
    """
    check_n_fine(n_fine)
    n_clusters = len(centroids)
    fine = np.repeat(np.asarray(centroids, np.float32)[:, None, :], n_fine, axis=1)
    threshold = max(n_fine, min_fine_samples or 0)
    order = np.argsort(coarse, kind="stable")
    starts = np.searchsorted(coarse[order], np.arange(n_clusters + 1))
    unsplit = []
    for k in range(n_clusters):
        members = order[starts[k] : starts[k + 1]]
        if len(members) < threshold:
            unsplit.append(k)
            continue
        rng = np.random.default_rng([seed, k])
        if len(members) > MAX_FINE_SAMPLES:
            members = np.sort(rng.choice(members, MAX_FINE_SAMPLES, replace=False))
        with warnings.catch_warnings():
            # Too few distinct members: duplicates are documented above.
            warnings.simplefilter("ignore", ConvergenceWarning)
            kmeans = KMeans(n_fine, n_init=1, random_state=int(rng.integers(2**31 - 1)))
            fine[k] = kmeans.fit(samples[members]).cluster_centers_
    return fine, unsplit


def check_n_fine(n_fine: int) -> None:
    """Refuse an ``n_fine`` other than 0 (flat) or at least 2.

    Args:
        n_fine: Fine clusters per coarse cluster.

    Raises:
        ValueError: If ``n_fine`` is negative or 1.
    """
    if n_fine < 0 or n_fine == 1:
        raise ValueError(f"n_fine must be 0 (flat) or at least 2, got {n_fine}")


def _sample_of(data: EmbeddingReservoir | np.ndarray) -> tuple[np.ndarray, int]:
    """The finite float32 rows to fit on, and how many rows the stream had."""
    if isinstance(data, EmbeddingReservoir):
        return data.samples, data.count
    x = np.asarray(data, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    finite = np.isfinite(x).all(axis=1)
    return (x if finite.all() else x[finite]), int(finite.sum())
