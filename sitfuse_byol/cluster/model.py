"""The one clustering model shared by every scene, and its on-disk format.

A :class:`ClusterModel` maps ``D``-dimensional embeddings to labels. Because a
single model is fitted on embeddings sampled from all scenes, label 7 means the
same thing in every scene's map.

Two methods share one interface:

* ``kmeans``: nearest of ``K`` centroids; the per-pixel *confidence* is the
  Euclidean distance to the assigned centroid (lower is more confident).
* ``iic``: a small MLP head (``Linear-BN-ReLU-Linear``, run here in NumPy with
  BatchNorm in eval mode) whose softmax argmax is the label; the confidence is
  ``1 - max softmax probability`` (lower is more confident, in ``[0, 1 - 1/K]``).
  Its ``centroids`` are the mean embedding of each cluster on the fitting
  sample, kept for ordering and colouring, not for assignment.

Either may be *hierarchical*: every coarse cluster ``k`` has ``n_fine`` fine
centroids; the fine label is ``k * n_fine + nearest fine centroid of k`` and the
confidence is the distance to that fine centroid.

On disk a model is a directory of plain ``.npy`` arrays and a ``model.json``
(no pickle anywhere), written atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sitfuse_byol.errors import ModelError
from sitfuse_byol.export.atomic import atomic_path

__all__ = ["BN_EPS", "FORMAT_VERSION", "HEAD_KEYS", "METHODS", "ClusterModel"]

#: Version of the on-disk layout; :meth:`ClusterModel.load` refuses any other.
FORMAT_VERSION = 1

#: The clustering methods a model can hold.
METHODS = ("kmeans", "iic")

#: Arrays of an IIC head: ``Linear(D, H)``, ``BatchNorm1d(H)``, ``Linear(H, K)``.
HEAD_KEYS = ("w1", "b1", "bn_weight", "bn_bias", "bn_mean", "bn_var", "w2", "b2")

#: BatchNorm epsilon of the IIC head; training and NumPy inference must agree.
BN_EPS = 1e-5

_MODEL_JSON = "model.json"
_FORMAT_NAME = "sitfuse-byol clustering model"

# Rows per slab: a slab's (rows, K) float32 scores stay within 4 MiB, near the
# caches, whatever N is (16384 rows measured fastest for D=64, K=32).
_SLAB_ELEMENTS = 1 << 20
_MAX_SLAB_ROWS = 16384
# Squared distance, relative to |x|^2 + |c|^2, below which float32 cancellation
# in the expanded form matters (see _nearest).
_CANCELLATION = 0.1
# Valid fraction of a block from which predict_block predicts every pixel.
_PREDICT_ALL = 0.5


@dataclass(eq=False)
class ClusterModel:
    """A fitted clustering model: centroids, optional fine centroids, optional IIC head.

    Attributes:
        method: ``"kmeans"`` or ``"iic"``.
        centroids: ``(K, D)`` float32. For ``kmeans`` the assignment centroids;
            for ``iic`` the mean embedding of each cluster on the fitting
            sample (zeros for a cluster that received no sample).
        fine_centroids: ``(K, n_fine, D)`` float32 when hierarchical, else None.
        metadata: Free-form JSON-serialisable information. The fitting
            functions put theirs under ``"fit"``; the caller adds the encoder
            hash (``"encoder_hash"``, read by :meth:`check_compatible`), band
            names, config hash and so on.
        head: For ``iic``, the head's float32 arrays keyed by :data:`HEAD_KEYS`
            (``w1 (H, D)``, ``b1 (H,)``, ``bn_* (H,)``, ``w2 (K, H)``,
            ``b2 (K,)``); None for ``kmeans``.

    Raises:
        ValueError: On an unknown method, inconsistent shapes or non-finite arrays.
    """

    method: str
    centroids: np.ndarray
    fine_centroids: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    head: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if self.centroids.ndim != 2 or min(self.centroids.shape) < 1:
            raise ValueError(f"centroids must be (K, D), got shape {self.centroids.shape}")
        k, d = self.centroids.shape
        if self.fine_centroids is not None:
            self.fine_centroids = np.ascontiguousarray(self.fine_centroids, dtype=np.float32)
            fine = self.fine_centroids.shape
            if len(fine) != 3 or fine[0] != k or fine[2] != d or fine[1] < 2:
                raise ValueError(f"fine_centroids must be ({k}, n_fine >= 2, {d}), got {fine}")
        if (self.method == "iic") != (self.head is not None):
            raise ValueError("an iic model needs a head, a kmeans model must not have one")
        if self.head is not None:
            self.head = _checked_head(self.head, k=k, d=d)
        for name, array in self._arrays().items():
            if not np.isfinite(array).all():
                raise ValueError(f"{name} has non-finite values")

    # ------------------------------------------------------------------ shape
    @property
    def n_clusters(self) -> int:
        """Number of (coarse) clusters ``K``."""
        return int(self.centroids.shape[0])

    @property
    def n_fine(self) -> int:
        """Fine clusters per coarse cluster; 0 for a flat model."""
        return 0 if self.fine_centroids is None else int(self.fine_centroids.shape[1])

    @property
    def n_labels(self) -> int:
        """Number of distinct labels of the finest level: ``K`` or ``K * n_fine``."""
        return self.n_clusters * max(self.n_fine, 1)

    @property
    def confidence_meaning(self) -> str:
        """What the per-pixel confidence value is (the confidence raster's band description)."""
        if self.n_fine:
            return "distance to fine cluster centroid"
        if self.method == "iic":
            return "1 - max cluster probability"
        return "distance to cluster centroid"

    @property
    def dim(self) -> int:
        """Embedding dimension ``D``."""
        return int(self.centroids.shape[1])

    @property
    def model_hash(self) -> str:
        """SHA-256 (hex) of the method and every array's name, dtype, shape and bytes."""
        digest = hashlib.sha256(self.method.encode())
        for name, array in sorted(self._arrays().items()):
            digest.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    # -------------------------------------------------------------- predict
    def predict(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Label embeddings at the finest level.

        Rows are processed in slabs of at most 16384, so the temporary
        ``(rows, K)`` scores stay within a few MiB whatever ``N`` is. A row
        with a non-finite value gets an arbitrary label and a non-finite
        confidence (:meth:`predict_block` masks such pixels).

        Args:
            embeddings: ``(N, D)`` array, cast to float32.

        Returns:
            ``(labels, distance)``: ``(N,)`` int64 labels in ``[0, n_labels)``
            and ``(N,)`` float32 confidences, lower meaning more confident:
            the Euclidean distance to the assigned (fine) centroid, or for a
            flat ``iic`` model ``1 - max softmax probability``.

        Raises:
            ModelError: If the embeddings' dimension is not the model's.
        """
        levels = self.predict_levels(embeddings)
        return levels["fine" if self.n_fine else "coarse"], levels["distance"]

    def predict_levels(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Label embeddings at every level.

        Args:
            embeddings: ``(N, D)`` array, cast to float32.

        Returns:
            ``{"coarse": (N,) int64 in [0, K), "distance": (N,) float32}``,
            plus ``"fine": (N,) int64 in [0, K * n_fine)`` with
            ``fine // n_fine == coarse`` when hierarchical. ``distance`` is the
            confidence of the finest level, as in :meth:`predict`.

        Raises:
            ModelError: If the embeddings' dimension is not the model's.
        """
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
        self._check_dim(x.shape[1])
        n = x.shape[0]
        coarse = np.empty(n, np.int64)
        distance = np.empty(n, np.float32)
        fine = np.empty(n, np.int64) if self.n_fine else None
        step = max(1, min(_MAX_SLAB_ROWS, _SLAB_ELEMENTS // max(self.n_clusters, self.n_fine)))
        centroid_sqnorms = np.einsum("kd,kd->k", self.centroids, self.centroids)
        fine_sqnorms = (
            None
            if self.fine_centroids is None
            else np.einsum("kfd,kfd->kf", self.fine_centroids, self.fine_centroids)
        )
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            slab = x[rows]
            if self.head is not None:
                coarse[rows], distance[rows] = _head_predict(self.head, slab)
            else:
                coarse[rows], distance[rows] = _nearest(slab, self.centroids, centroid_sqnorms)
            if fine is not None and fine_sqnorms is not None:
                fine[rows], distance[rows] = self._fine(slab, coarse[rows], fine_sqnorms)
        levels: dict[str, np.ndarray] = {"coarse": coarse, "distance": distance}
        if fine is not None:
            levels["fine"] = fine
        return levels

    def predict_block(
        self, block: np.ndarray, valid: np.ndarray, *, nodata: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Label one block of a scene's embedding raster.

        A pixel is labelled when ``valid`` is true there and its embedding is
        finite; every other pixel gets ``nodata`` and a NaN confidence.

        When most pixels are valid, every pixel is predicted straight from a
        ``(h*w, D)`` view of the block and the rest masked afterwards: copying
        the valid pixels out first costs more than predicting them (measured
        on 64 x 512 x 512, 90 % valid: the copy alone took 2-3x the prediction).

        Args:
            block: ``(D, h, w)`` embeddings.
            valid: ``(h, w)`` bool mask of pixels to label.
            nodata: Label written where a pixel is not labelled.

        Returns:
            ``(labels, confidence)``: ``(h, w)`` int64 finest-level labels and
            ``(h, w)`` float32 confidences as in :meth:`predict`.

        Raises:
            ModelError: If the block's band count is not the model's dimension.
        """
        block = np.asarray(block)
        if block.ndim != 3:
            raise ValueError(f"block must be (D, h, w), got shape {block.shape}")
        self._check_dim(block.shape[0])
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != block.shape[1:]:
            raise ValueError(f"valid has shape {valid.shape}, the block {block.shape[1:]}")
        labels = np.full(valid.size, nodata, np.int64)
        confidence = np.full(valid.size, np.nan, np.float32)
        # (D, h*w) -> (h*w, D) as a transposed view; BLAS takes it without a copy.
        pixels = block.reshape(block.shape[0], -1).T
        flat_valid = valid.ravel()
        if flat_valid.any():
            rows = slice(None) if flat_valid.mean() >= _PREDICT_ALL else np.flatnonzero(flat_valid)
            # Non-finite embeddings (e.g. NaN under nodata) come out with a
            # non-finite confidence; they are masked below, so no warnings.
            with np.errstate(invalid="ignore", over="ignore"):
                labels[rows], confidence[rows] = self.predict(pixels[rows])
        unlabelled = ~flat_valid | ~np.isfinite(confidence)
        labels[unlabelled] = nodata
        confidence[unlabelled] = np.nan
        return labels.reshape(valid.shape), confidence.reshape(valid.shape)

    # ---------------------------------------------------------- compatibility
    def check_compatible(
        self, *, dim: int, encoder_hash: str | None, where: str | None = None
    ) -> None:
        """Refuse embeddings this model was not fitted for.

        Args:
            dim: Dimension of the embeddings about to be labelled.
            encoder_hash: Hash of the encoder that produced them; None skips
                the check, as does a model without ``metadata["encoder_hash"]``.
            where: Place reported with the error, e.g. the model directory.

        Raises:
            ModelError: On a different dimension or a different encoder.
        """
        self._check_dim(dim, where=where)
        fitted_with = self.metadata.get("encoder_hash")
        if encoder_hash is not None and fitted_with is not None and fitted_with != encoder_hash:
            raise ModelError(
                "clustering model was fitted with another encoder "
                f"(model encoder {str(fitted_with)[:12]}, checkpoint {encoder_hash[:12]}); "
                "rerun `sitfuse cluster`",
                where=where,
            )

    # ------------------------------------------------------------------- disk
    def save(self, directory: Path) -> Path:
        """Write the model as ``.npy`` arrays plus ``model.json``, atomically.

        The directory is assembled under a temporary sibling name and renamed
        onto ``directory`` (replacing an existing model) only when complete.

        Args:
            directory: The model directory to create or replace.

        Returns:
            ``directory``.

        Raises:
            TypeError: If ``metadata`` is not JSON-serialisable (nothing is written).
        """
        directory = Path(directory)
        arrays = self._arrays()
        document = {
            "format": _FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "n_clusters": self.n_clusters,
            "n_fine": self.n_fine,
            "n_labels": self.n_labels,
            "dim": self.dim,
            "arrays": sorted(arrays),
            "model_hash": self.model_hash,
            "metadata": self.metadata,
        }
        # Serialise first, so unserialisable metadata leaves nothing behind.
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        directory.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", array, allow_pickle=False)
            (tmp / _MODEL_JSON).write_text(text, encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: Path) -> ClusterModel:
        """Read a model written by :meth:`save`.

        Args:
            directory: The model directory.

        Returns:
            The model; its hash is verified against ``model.json``.

        Raises:
            ModelError: If the directory or a file is missing, unreadable or
                inconsistent, or was written in another format version.
        """
        directory = Path(directory)
        where = str(directory)
        if not (directory / _MODEL_JSON).is_file():
            raise ModelError("no clustering model here; run `sitfuse cluster` first", where=where)
        try:
            document = json.loads((directory / _MODEL_JSON).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"clustering model.json is unreadable: {exc}", where=where) from exc
        if not isinstance(document, dict) or document.get("format") != _FORMAT_NAME:
            raise ModelError("model.json is not a sitfuse-byol clustering model", where=where)
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelError(
                f"clustering model has format version {version}, this sitfuse reads "
                f"{FORMAT_VERSION}; rerun `sitfuse cluster`",
                where=where,
            )
        names = document.get("arrays")
        known = {"centroids", "fine_centroids", *(f"head_{key}" for key in HEAD_KEYS)}
        if not isinstance(names, list) or not set(names) <= known:
            raise ModelError(f"model.json lists unknown arrays: {names}", where=where)
        try:
            arrays = {
                name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in names
            }
            head = (
                {key: arrays[f"head_{key}"] for key in HEAD_KEYS} if "head_w1" in arrays else None
            )
            model = cls(
                method=document["method"],
                centroids=arrays["centroids"],
                fine_centroids=arrays.get("fine_centroids"),
                metadata=document["metadata"],
                head=head,
            )
        except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
            raise ModelError(
                f"clustering model is incomplete or corrupt: {exc}", where=where
            ) from exc
        declared = {key: document.get(key) for key in ("n_clusters", "n_fine", "dim")}
        actual = {"n_clusters": model.n_clusters, "n_fine": model.n_fine, "dim": model.dim}
        if declared != actual or document.get("model_hash") != model.model_hash:
            raise ModelError(
                "clustering model arrays do not match model.json; rerun `sitfuse cluster`",
                where=where,
            )
        return model

    # ---------------------------------------------------------------- private
    def _arrays(self) -> dict[str, np.ndarray]:
        """Every array of the model under the name of its ``.npy`` file."""
        arrays = {"centroids": self.centroids}
        if self.fine_centroids is not None:
            arrays["fine_centroids"] = self.fine_centroids
        if self.head is not None:
            arrays.update({f"head_{key}": value for key, value in self.head.items()})
        return arrays

    def _check_dim(self, dim: int, *, where: str | None = None) -> None:
        if dim != self.dim:
            raise ModelError(
                f"clustering model was fitted on embeddings of dimension {self.dim}, "
                f"these have {dim}",
                where=where,
            )

    def _fine(
        self, x: np.ndarray, coarse: np.ndarray, sqnorms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Global fine labels and distances of rows whose coarse labels are known.

        ``sqnorms`` holds the ``(K, n_fine)`` squared norms of the fine centroids.
        """
        assert self.fine_centroids is not None
        fine = np.empty(len(x), np.int64)
        distance = np.empty(len(x), np.float32)
        # Group rows by coarse cluster so each group is one small matrix product.
        order = np.argsort(coarse, kind="stable")
        for rows in np.split(order, np.flatnonzero(np.diff(coarse[order])) + 1):
            if rows.size == 0:
                continue
            k = int(coarse[rows[0]])
            sub, distance[rows] = _nearest(x[rows], self.fine_centroids[k], sqnorms[k])
            fine[rows] = k * self.n_fine + sub
        return fine, distance


def _nearest(
    x: np.ndarray, centroids: np.ndarray, centroid_sqnorms: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row and the Euclidean distance to it.

    ``|x - c|^2 = |x|^2 - 2 x.c + |c|^2``: one matrix product for all rows and
    centroids, the argmin needing only ``|c|^2 - 2 x.c``. In float32 the
    expanded form cancels when the distance is small next to the norms, so
    rows with ``|x - c|^2 < 0.1 (|x|^2 + |c|^2)`` get their distance
    recomputed from ``x - c``. That is about twice as fast as recomputing
    every row (measured, D=64, K=32) and matches a float64 computation to
    1e-5 relative in the tests.
    """
    scores = x @ (-2.0 * centroids).T
    scores += centroid_sqnorms
    labels = scores.argmin(axis=1)
    row_sqnorms = np.einsum("nd,nd->n", x, x)
    squared = row_sqnorms + np.take_along_axis(scores, labels[:, None], axis=1)[:, 0]
    inexact = np.flatnonzero(squared < _CANCELLATION * (row_sqnorms + centroid_sqnorms[labels]))
    if inexact.size:
        diff = x[inexact] - centroids[labels[inexact]]
        squared[inexact] = np.einsum("nd,nd->n", diff, diff)
    return labels.astype(np.int64, copy=False), np.sqrt(np.maximum(squared, 0.0, out=squared))


def _head_predict(head: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax and ``1 - max softmax probability`` of the IIC head, BatchNorm in eval mode."""
    hidden = x @ head["w1"].T
    hidden += head["b1"]
    hidden -= head["bn_mean"]
    hidden *= head["bn_weight"] / np.sqrt(head["bn_var"] + np.float32(BN_EPS))
    hidden += head["bn_bias"]
    np.maximum(hidden, 0.0, out=hidden)
    logits = hidden @ head["w2"].T
    logits += head["b2"]
    labels = logits.argmax(axis=1)
    logits -= logits[np.arange(len(logits)), labels][:, None]
    # max softmax probability = 1 / sum(exp(logit - max logit))
    top = 1.0 / np.exp(logits).sum(axis=1)
    return labels.astype(np.int64, copy=False), (1.0 - top).astype(np.float32, copy=False)


def _checked_head(head: dict[str, np.ndarray], *, k: int, d: int) -> dict[str, np.ndarray]:
    """The head's arrays as contiguous float32, after checking keys and shapes."""
    if set(head) != set(HEAD_KEYS):
        raise ValueError(f"an iic head has arrays {HEAD_KEYS}, got {sorted(head)}")
    arrays = {key: np.ascontiguousarray(head[key], dtype=np.float32) for key in HEAD_KEYS}
    hidden = arrays["w1"].shape[0] if arrays["w1"].ndim == 2 else -1
    expected = {
        "w1": (hidden, d),
        "b1": (hidden,),
        "bn_weight": (hidden,),
        "bn_bias": (hidden,),
        "bn_mean": (hidden,),
        "bn_var": (hidden,),
        "w2": (k, hidden),
        "b2": (k,),
    }
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise ValueError(
                f"iic head array {key} has shape {arrays[key].shape}, expected {shape}"
            )
    if (arrays["bn_var"] < 0).any():
        raise ValueError("iic head has a negative BatchNorm running variance")
    return arrays
