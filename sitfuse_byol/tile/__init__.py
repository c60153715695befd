"""Tile: the patch index, the streaming training sampler and halo-padded inference blocks."""

from sitfuse_byol.tile.blocks import apply_blocks
from sitfuse_byol.tile.index import PatchIndex
from sitfuse_byol.tile.sampler import PatchBatch, PatchSampler

__all__ = ["PatchBatch", "PatchIndex", "PatchSampler", "apply_blocks"]
