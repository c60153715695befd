"""BYOL pre-training: encoders, the BYOL model, augmentations and optimizers."""

from __future__ import annotations

from sitfuse_byol.train.augment import AugmentConfig, augment_view, make_views
from sitfuse_byol.train.byol import (
    BYOL,
    BYOLOutput,
    MLPHead,
    embedding_stats,
    loss_fn,
    tau_schedule,
)
from sitfuse_byol.train.encoders import (
    Encoder,
    create_encoder,
    list_encoders,
    masked_avg_pool,
    register_encoder,
)
from sitfuse_byol.train.optim import LARS, create_optimizer, param_groups, warmup_cosine

__all__ = [
    "BYOL",
    "LARS",
    "AugmentConfig",
    "BYOLOutput",
    "Encoder",
    "MLPHead",
    "augment_view",
    "create_encoder",
    "create_optimizer",
    "embedding_stats",
    "list_encoders",
    "loss_fn",
    "make_views",
    "masked_avg_pool",
    "param_groups",
    "register_encoder",
    "tau_schedule",
    "warmup_cosine",
]
