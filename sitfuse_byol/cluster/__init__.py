"""One clustering model shared by all scenes: k-means or an IIC head, flat or hierarchical.

:func:`fit_kmeans` and :func:`fit_iic` fit a :class:`ClusterModel` on an
:class:`EmbeddingReservoir`, a bounded uniform sample of embeddings from every
scene, so a label means the same surface in every scene's map.
"""

from __future__ import annotations

from sitfuse_byol.cluster.iic import fit_iic, iic_loss
from sitfuse_byol.cluster.kmeans import (
    EmbeddingReservoir,
    check_enough_samples,
    fit_fine_centroids,
    fit_kmeans,
)
from sitfuse_byol.cluster.model import FORMAT_VERSION, ClusterModel

__all__ = [
    "FORMAT_VERSION",
    "ClusterModel",
    "EmbeddingReservoir",
    "check_enough_samples",
    "fit_fine_centroids",
    "fit_iic",
    "fit_kmeans",
    "iic_loss",
]
