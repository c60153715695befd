from __future__ import annotations

from sitfuse_byol.read.chunking import aligned_chunk


def test_chunk_is_multiple_of_block_and_patch():
    assert aligned_chunk(size=10000, block=256, patch=32, target=1000) == 1024
    assert aligned_chunk(size=10000, block=3, patch=16, target=1000) % 48 == 0


def test_small_axis_is_one_chunk_and_strips_use_patch():
    assert aligned_chunk(size=300, block=256, patch=32, target=1024) == 300
    # A strip spanning the whole width cannot be aligned to; the patch size rules.
    assert aligned_chunk(size=5000, block=5000, patch=32, target=1000) == 992
