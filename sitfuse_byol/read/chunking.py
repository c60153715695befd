"""Chunk sizes aligned to a file's blocks and to the patch size."""

from __future__ import annotations

import math

DEFAULT_CHUNK_TARGET = 512


def aligned_chunk(*, size: int, block: int, patch: int, target: int = DEFAULT_CHUNK_TARGET) -> int:
    """The chunk length along one axis.

    A chunk is a whole number of storage blocks, so every read decodes each block once,
    and, where that keeps it near ``target``, a whole number of patches, so that no
    pixel is left out of training (patches never straddle two chunks).

    Args:
        size: Length of the axis in pixels.
        block: The storage block length along the axis (a strip or tile edge).
        patch: Patch size of the training sampler.
        target: Preferred chunk length; the result is the aligned length closest to it.
    """
    # A block that spans (nearly) the whole axis cannot be aligned to usefully.
    base = math.lcm(block, patch) if 0 < block < size else patch
    if base > 2 * max(target, block, patch):
        # A patch size prime to the block (9 px patches in 512 px tiles: lcm 4608) would
        # make one chunk of a whole Sentinel-2 tile. Whole blocks then, at least a patch
        # long, and the sampler leaves the sliver past each chunk's last whole patch unused.
        n = max(math.ceil(patch / block), round(target / block))
        return min(n * block, size)
    if base >= size:
        return size
    n = max(1, round(target / base))
    return min(n * base, size)


def aligned_chunks(
    *, shape: tuple[int, int], block: tuple[int, int], patch: int, target: int = DEFAULT_CHUNK_TARGET
) -> tuple[int, int]:
    """(y, x) chunk lengths for a raster of ``shape`` stored in ``block`` units."""
    return (
        aligned_chunk(size=shape[0], block=block[0], patch=patch, target=target),
        aligned_chunk(size=shape[1], block=block[1], patch=patch, target=target),
    )
