"""Halo-padded inference blocks: apply a neighbourhood function over a whole scene, seamlessly.

Each Dask block is extended by ``halo`` pixels of its neighbours before the function
runs and cropped back afterwards, so a function whose output at a pixel depends only on
inputs within ``halo`` pixels gives exactly what it would give on the whole array at
once: no seams at block edges.

**Edge padding.** At the outer edges of the scene there are no neighbours; the scene is
extended by mirroring (``numpy.pad(..., mode="symmetric")``: the edge pixel is repeated,
then the pixels behind it). The result therefore equals
``func(numpy.pad(array, halo, mode="symmetric"))`` cropped by ``halo`` on every side.
Mirroring keeps edge statistics natural, where zero padding would put a dark frame
around every scene.
"""

from __future__ import annotations

from collections.abc import Callable

import dask.array as da
import numpy as np
from dask.array.overlap import ensure_minimum_chunksize


def apply_blocks(
    func: Callable[[np.ndarray], np.ndarray],
    array: da.Array,
    *,
    halo: int,
    out_channels: int,
) -> da.Array:
    """Apply ``func`` over a ``(C, Y, X)`` array block by block, with a halo.

    Args:
        func: Maps a ``(C, h, w)`` block to a float32 ``(out_channels, h, w)`` one; sees
            padded blocks.
        array: The input, chunked in (y, x).
        halo: Pixels of context each side; at least ``func``'s receptive-field radius.
        out_channels: Channels ``func`` returns.

    Returns:
        A lazy float32 ``(out_channels, Y, X)`` array with the (y, x) chunks of the input,
        except that a chunk narrower than ``halo`` (a ragged last one) is merged into its
        neighbour. An array smaller than the halo is one block.

    Raises:
        ValueError: ``halo`` is negative.
    """
    if halo < 0:
        raise ValueError("halo must be non-negative")
    if halo > min(array.shape[1:]):
        return _apply_whole(func, array, halo=halo, out_channels=out_channels)
    # func needs every channel of a pixel at once.
    if len(array.chunks[0]) > 1:
        array = array.rechunk({0: -1})
    # Dask can only borrow a halo from a neighbour at least as large as the halo.
    # map_overlap would merge narrower chunks itself, but then the output chunks declared
    # below (needed because the channel count changes) would no longer match the blocks,
    # so the same merge is done here, first.
    array = array.rechunk(
        {axis: ensure_minimum_chunksize(halo, array.chunks[axis]) for axis in (1, 2)}
    )

    def run(block: np.ndarray) -> np.ndarray:
        out = func(block)
        # A compact copy in the output's own memory order: a cropped view of a
        # channels-last output could not be flattened to (pixels, channels) later
        # without a transposing copy.
        return np.copy(out[:, halo : out.shape[1] - halo, halo : out.shape[2] - halo], order="K")

    return da.map_overlap(
        run,
        array,
        depth={0: 0, 1: halo, 2: halo},
        # Dask's "reflect" repeats the edge pixel, as np.pad's "symmetric" (see _apply_whole).
        boundary={1: "reflect", 2: "reflect"},
        trim=False,
        chunks=((out_channels,), array.chunks[1], array.chunks[2]),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )


def _apply_whole(
    func: Callable[[np.ndarray], np.ndarray], array: da.Array, *, halo: int, out_channels: int
) -> da.Array:
    """:func:`apply_blocks` for an array smaller than its halo (Dask borrows a halo only from
    a chunk at least as large): one block, mirrored at its edges as map_overlap's boundary
    is, repeatedly where the halo exceeds it."""

    def run(block: np.ndarray) -> np.ndarray:
        padded = np.pad(block, ((0, 0), (halo, halo), (halo, halo)), mode="symmetric")
        out = func(padded)
        return np.copy(out[:, halo : out.shape[1] - halo, halo : out.shape[2] - halo], order="K")

    whole = array.rechunk(-1)
    return whole.map_blocks(
        run, chunks=((out_channels,), whole.chunks[1], whole.chunks[2]), dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )
