from __future__ import annotations

from sitfuse_byol.read.chunking import aligned_chunk


def test_chunk_is_multiple_of_block_and_patch():
    assert aligned_chunk(size=10000, block=256, patch=32, target=1000) == 1024
    assert aligned_chunk(size=10000, block=3, patch=16, target=1000) % 48 == 0


def test_small_axis_is_one_chunk_and_strips_use_patch():
    assert aligned_chunk(size=300, block=256, patch=32, target=1024) == 300
    # A strip spanning the whole width cannot be aligned to; the patch size rules.
    assert aligned_chunk(size=5000, block=5000, patch=32, target=1000) == 992


def test_patch_sizes_prime_to_the_block_keep_chunks_near_the_target():
    # lcm(512, 9) = 4608 and lcm(1024, 15) = 15360: whole blocks instead, never the whole tile.
    assert aligned_chunk(size=4608, block=512, patch=9) == 512
    assert aligned_chunk(size=10980, block=1024, patch=15) == 1024
    assert aligned_chunk(size=10980, block=256, patch=9, target=1000) == 1024
    # Where the lcm stays near the target, chunks still hold whole patches.
    assert aligned_chunk(size=10000, block=256, patch=48, target=1000) == 768


def test_chunks_hold_at_least_one_patch():
    for size, block, patch, target in [(10980, 512, 520, 512), (10980, 256, 300, 512), (4608, 512, 9, 512)]:
        chunk = aligned_chunk(size=size, block=block, patch=patch, target=target)
        assert chunk >= patch and chunk % block == 0, (size, block, patch, chunk)
