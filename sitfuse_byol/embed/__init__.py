"""Embed: dense per-pixel embeddings of whole scenes from halo-padded blocks."""

from sitfuse_byol.embed.dense import (
    SceneEmbedding,
    cell_valid,
    embed_scene,
    open_embedding,
    save_embedding,
    saved_embedding_key,
)

__all__ = ["SceneEmbedding", "cell_valid", "embed_scene", "open_embedding", "save_embedding", "saved_embedding_key"]
