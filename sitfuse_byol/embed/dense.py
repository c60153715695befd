"""Dense per-pixel embeddings of a whole scene, seamless across blocks.

The encoder is fully convolutional, so one forward pass over a block gives a feature
for every pixel. Blocks carry a halo of at least the encoder's receptive-field radius
(plus the smoothing window and upsampling margin) and are cropped after the pass, so
the tiled result equals the result on the whole (mirror-padded) scene, up to float32
rounding where the convolution kernels chosen depend on the block width; see
:mod:`sitfuse_byol.tile.blocks`.

Per-pixel embeddings are optionally averaged over a ``window`` x ``window``
neighbourhood: BYOL learns pooled patch embeddings, and this cheap average matches
exact sliding-window patch embeddings within noise at a fraction of the cost.

At ``stride`` s > 1 each embedding is the mean of the valid pixels' embeddings in its
s x s cell of the coarsened grid (:meth:`sitfuse_byol.grid.Grid.coarsened`), so the
value describes the cell's whole footprint (a point sample would sit (s - 1) / 2 pixels
off its centre), and a cell is valid when any of its pixels is.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import torch
import torch.nn.functional as F
import xarray as xr
import zarr

from sitfuse_byol.errors import InputError
from sitfuse_byol.export.atomic import atomic_path
from sitfuse_byol.grid import Grid
from sitfuse_byol.read import Scene
from sitfuse_byol.tile import apply_blocks
from sitfuse_byol.train.checkpoint import TrainedEncoder
from sitfuse_byol.train.device import autocast, to_device


@dataclass(frozen=True)
class SceneEmbedding:
    """Lazy embeddings of one scene.

    Attributes:
        scene_id: The scene id.
        data: ``(D, y, x)`` float32; NaN where the input pixel is invalid.
        valid: ``(y, x)`` bool.
        grid: The embedding grid (the scene grid, coarsened by the stride).
    """

    scene_id: str
    data: da.Array
    valid: da.Array
    grid: Grid

    @property
    def dim(self) -> int:
        return int(self.data.shape[0])


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def embedding_halo(trained: TrainedEncoder, *, window: int) -> int:
    """Pixels of context a block needs for exact per-pixel embeddings."""
    encoder = trained.encoder
    # Bilinear upsampling of a strided feature map reaches one feature pixel further; a
    # stride-1 map is not upsampled.
    upsampling = encoder.stride if encoder.stride > 1 else 0
    return _round_up(encoder.receptive_field + upsampling + window // 2, encoder.stride)


def _forward(trained: TrainedEncoder, block: np.ndarray, *, window: int) -> np.ndarray:
    """Embeddings of a ``(C + 1, h, w)`` block whose last channel is the valid mask.

    Returns:
        ``(D, h, w)`` float32, NaN where the input is invalid, as a view of a
        channels-last array: label prediction then reads each pixel's embedding as one
        contiguous row (at stride 1), and nothing pays for a transpose unless the
        embeddings are written to Zarr.
    """
    encoder, device = trained.encoder, trained.device
    h, w = block.shape[1:]
    with torch.inference_mode(), autocast(device):
        # Channels-last let oneDNN run the CPU convolutions about 25% faster (and the
        # window average 3x faster than scipy on the usual layout).
        x = to_device(torch.from_numpy(np.ascontiguousarray(block[:-1]))[None], device, image=True)
        # Float32 from here on: upsampling and averaging in bf16 would round twice more.
        features = encoder(x.contiguous(memory_format=torch.channels_last)).float()
        if encoder.stride > 1:
            features = F.interpolate(features, size=(h, w), mode="bilinear", align_corners=False)
        if window > 1:
            # The halo covers window // 2, so every kept pixel averages a full window;
            # only the cropped-away rim would see the block edge.
            features = F.avg_pool2d(features, window, stride=1, padding=window // 2, count_include_pad=False)
        # Invalid input stays invalid: NaN, so nothing downstream mistakes it for data.
        invalid = block[-1] < 0.5
        if invalid.any():
            features.masked_fill_(torch.from_numpy(invalid).to(device)[None, None], float("nan"))
        return features[0].cpu().numpy()


def _cell_chunks(chunks: tuple[int, ...], stride: int) -> tuple[int, ...]:
    return tuple(-(-c // stride) for c in chunks)


def _cell_mean(block: np.ndarray, *, stride: int) -> np.ndarray:
    """``(D, h, w)`` embeddings, NaN where invalid -> the mean of each cell's valid ones.

    A ragged last row or column of cells averages the pixels it has; a cell without a
    valid pixel is NaN.
    """
    with torch.inference_mode():
        x = torch.from_numpy(block)[None]
        valid = torch.isfinite(x[:, :1]).to(x.dtype)
        # Both pools divide by the same (clipped) cell area, which cancels.
        sums = F.avg_pool2d(torch.nan_to_num(x, nan=0.0), stride, stride=stride, ceil_mode=True)
        counts = F.avg_pool2d(valid, stride, stride=stride, ceil_mode=True)
        return (sums / counts)[0].numpy()


def cell_valid(valid: da.Array, *, stride: int) -> da.Array:
    """A ``(y, x)`` valid mask coarsened to stride cells: a cell is valid when any pixel is."""
    if stride == 1:
        return valid
    # Cells must not straddle chunks.
    valid = valid.rechunk(tuple(_round_up(max(axis), stride) for axis in valid.chunks))

    def any_in_cell(block: np.ndarray) -> np.ndarray:
        h, w = block.shape
        padded = np.zeros((_round_up(h, stride), _round_up(w, stride)), bool)
        padded[:h, :w] = block
        return np.asarray(padded.reshape(padded.shape[0] // stride, stride, -1, stride).any(axis=(1, 3)))

    return da.map_blocks(
        any_in_cell, valid, chunks=tuple(_cell_chunks(axis, stride) for axis in valid.chunks), dtype=bool
    )


def _block_edge(size: int, *, block: int, halo: int, multiple: int) -> int:
    """The block edge along an axis of ``size`` pixels: ``block``, or the nearest that works.

    A ragged last block narrower than the halo would have to borrow pixels from its
    neighbour (:func:`sitfuse_byol.tile.apply_blocks`), and the uneven chunks that leaves
    cannot be written to Zarr (all chunks but the last must be equal). So the edge moves,
    in steps of ``multiple``, alternately below and above ``block`` (up to twice it),
    until the remainder is 0 or at least the halo; failing that the axis is one block.
    """
    if size <= block:
        return block
    for step in range(block // multiple + 1):
        for edge in (block - step * multiple, block + step * multiple):
            if halo <= edge <= 2 * block and (size % edge == 0 or size % edge >= halo):
                return edge
    return _round_up(size, multiple)


def embed_scene(
    scene: Scene,
    trained: TrainedEncoder,
    *,
    stride: int = 1,
    window: int = 0,
    block_size: int = 512,
    sample_edge: int = 0,
) -> SceneEmbedding:
    """Lazily embed a scene, one embedding per pixel or per ``stride`` x ``stride`` cell.

    Args:
        scene: The scene; its band count must match the model's.
        trained: The trained encoder and its normalization statistics.
        stride: Average the embeddings of each ``stride`` x ``stride`` cell (valid pixels
            only); the grid transform is scaled.
        window: Average embeddings over this odd window (0 or 1: no averaging).
        block_size: Block edge for inference, rounded to a multiple of ``stride``, and
            shrunk where a scene edge would leave a sliver of a block (:func:`_block_edge`).
        sample_edge: Embed only one window of each block, this many pixels a side
            (rounded up to whole cells and encoder steps, at most the block), NaN
            elsewhere: a cluster sample drawn from a few blocks then costs a few
            windows' forward passes, while the graph keeps the blocks' size. The window
            is centred on a valid pixel drawn from the block, and embedded with the
            halo the whole-scene pass gives it, so its values are that pass's (within
            float32 rounding). 0: every pixel.

    Raises:
        ModelError: The scene's band count differs from the model's.
    """
    trained.check_bands(scene.band_names, where=scene.source)
    if window and window % 2 == 0:
        raise InputError(f"embedding window must be odd, got {window}", where="embed.window")
    stats = trained.stats
    halo = _round_up(embedding_halo(trained, window=window), stride)
    multiple = math.lcm(stride, trained.encoder.stride)
    # Block edges are whole cells and encoder steps (so blocks start where the whole
    # scene's cells and strided features do), and hold at least the halo.
    block = _round_up(max(block_size, halo), multiple)
    blocks = tuple(_block_edge(size, block=block, halo=halo, multiple=multiple) for size in scene.grid.shape)

    def normalize(raw: np.ndarray) -> np.ndarray:
        # The valid mask travels as one more channel, so each block masks its own
        # embeddings where they are made (a masking pass afterwards cost a full copy).
        valid = scene.valid_of(raw)
        return np.concatenate([stats.normalize(raw, valid), valid[None].astype(np.float32)])

    # Cut into blocks before normalizing: a pass that embeds a few blocks (a streamed
    # cluster sample) then normalizes just those, not every chunk they were read from.
    raw = scene.data.rechunk((-1, *blocks))
    normalized = da.map_blocks(normalize, raw, chunks=((scene.n_bands + 1,), *raw.chunks[1:]), dtype=np.float32)
    dim = trained.encoder.out_channels
    if sample_edge:
        edge = _round_up(sample_edge, multiple)
        if block - 2 * _round_up(halo, multiple) >= edge:
            # The window and its halo fit inside the block: no neighbour is read.
            features = da.map_blocks(
                lambda b: _window_forward(trained, b, window=window, halo=halo, rim=0, edge=edge, multiple=multiple),
                normalized, chunks=((dim,), *normalized.chunks[1:]), dtype=np.float32,
                meta=np.empty((0, 0, 0), dtype=np.float32),
            )
        else:
            features = apply_blocks(
                lambda b: _window_forward(trained, b, window=window, halo=halo, rim=halo, edge=edge, multiple=multiple),
                normalized, halo=halo, out_channels=dim,
            )
    else:
        features = apply_blocks(lambda b: _forward(trained, b, window=window), normalized, halo=halo, out_channels=dim)
    valid = scene.valid.rechunk(features.chunks[1:])
    if stride > 1:
        # Blocks start at multiples of the stride, so no cell straddles two.
        features = da.map_blocks(
            _cell_mean, features, stride=stride, dtype=np.float32,
            chunks=(features.chunks[0], *(_cell_chunks(axis, stride) for axis in features.chunks[1:])),
        )
        valid = cell_valid(valid, stride=stride)
    return SceneEmbedding(
        scene_id=scene.id,
        data=features,
        valid=valid,
        grid=scene.grid.coarsened(stride=stride),
    )


def _window_forward(
    trained: TrainedEncoder, array: np.ndarray, *, window: int, halo: int, rim: int, edge: int, multiple: int
) -> np.ndarray:
    """:func:`_forward` of one window of a block; NaN outside it (see :func:`embed_scene`).

    ``array`` is the block with ``rim`` pixels of halo around it (0: the block alone).
    The window keeps ``halo`` pixels of context inside ``array`` and starts on a whole
    cell and encoder step of the block, as the block itself does, so its embeddings are
    those of a whole-scene pass.
    """
    dim = trained.encoder.out_channels
    out = np.full((dim, *array.shape[1:]), np.nan, dtype=np.float32)
    margin = rim + _round_up(max(halo - rim, 0), multiple)
    inner_valid = array[-1, margin : array.shape[1] - margin, margin : array.shape[2] - margin] >= 0.5
    rows, cols = np.nonzero(inner_valid)
    if not len(rows):
        return out
    # Seeded by the block's pixels (its first band and mask: a hyperspectral block is
    # large), so the window does not depend on how blocks are scheduled, and differs
    # from block to block.
    pick = int(np.random.default_rng(zlib.crc32(array[[0, -1]].tobytes())).integers(len(rows)))
    origin = []
    for centre, size in ((rows[pick], inner_valid.shape[0]), (cols[pick], inner_valid.shape[1])):
        # Whole encoder steps, so the strided features are upsampled as in the block.
        extent = min(edge, size) // multiple * multiple
        if not extent:
            return out
        start = min(max(int(centre) - extent // 2, 0), size - extent) // multiple * multiple
        origin.append((margin + start, extent))
    (y0, ey), (x0, ex) = origin
    features = _forward(trained, array[:, y0 - halo : y0 + ey + halo, x0 - halo : x0 + ex + halo], window=window)
    out[:, y0 : y0 + ey, x0 : x0 + ex] = features[:, halo : halo + ey, halo : halo + ex]
    return out


def grid_coords(grid: Grid) -> dict[str, np.ndarray]:
    t = grid.transform
    return {
        "y": t.f + t.e * (np.arange(grid.height) + 0.5),
        "x": t.c + t.a * (np.arange(grid.width) + 0.5),
    }


#: Called with each block of embeddings ``(D, h, w)`` and its block index ``(i, j)``
#: while the block is written; see :func:`save_embedding`.
BlockHook = Callable[[np.ndarray, tuple[int, int]], Any]


def _store_block(
    block: np.ndarray, *, store: str, region: tuple[slice, slice], index: tuple[int, int], hook: BlockHook | None
) -> Any:
    zarr.open_array(store, mode="r+")[(slice(None), *region)] = block
    return hook(block, index) if hook is not None else None


#: The store attribute naming what the embeddings were made from (see :func:`save_embedding`).
KEY_ATTRIBUTE = "sitfuse_embedding_key"


def save_embedding(
    embedding: SceneEmbedding, path: Path, *, block_hook: BlockHook | None = None, key: str = ""
) -> list[Any]:
    """Write embeddings to a Zarr v3 store (atomically), CRS and transform included.

    Each block is computed once and written to its own Zarr chunk; ``block_hook`` sees
    it on the way (e.g. to draw the cluster sample without reading the store back).

    Args:
        embedding: The lazy embeddings.
        path: The ``.zarr`` store to create or replace.
        block_hook: Optional ``hook(block, (i, j))`` run on every block.
        key: What the embeddings were made from (input files, encoder, settings), kept
            as the store attribute :data:`KEY_ATTRIBUTE`; see :func:`saved_embedding_key`.

    Returns:
        The hook's results in block order (row-major); empty without a hook.
    """
    data = embedding.data.rechunk({0: -1})
    array = xr.DataArray(
        data,
        dims=("feature", "y", "x"),
        coords={"feature": np.arange(embedding.dim), **grid_coords(embedding.grid)},
        name="embedding",
        attrs={KEY_ATTRIBUTE: key},
    )
    if embedding.grid.crs is not None:
        array = array.rio.write_crs(embedding.grid.crs)
    array = array.rio.write_transform(embedding.grid.transform)
    blocks = data.to_delayed()
    row_edges, col_edges = np.cumsum((0, *data.chunks[1])), np.cumsum((0, *data.chunks[2]))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Float embeddings barely compress; compressing them cost 4x the write time. Set
        # on the variable's own encoding, which also holds rioxarray's grid mapping.
        array.encoding["compressors"] = None
        # Metadata and coordinates now; the chunks equal the blocks, so each block task
        # writes whole chunks of its own and the tasks never touch the same file.
        array.to_dataset().to_zarr(tmp, zarr_format=3, consolidated=False, mode="w", compute=False)
        tasks = [
            dask.delayed(_store_block, pure=False)(
                blocks[0, i, j],
                store=str(tmp / "embedding"),
                region=(slice(row_edges[i], row_edges[i + 1]), slice(col_edges[j], col_edges[j + 1])),
                index=(i, j),
                hook=block_hook,
            )
            for i in range(blocks.shape[1])
            for j in range(blocks.shape[2])
        ]
        results = list(dask.compute(*tasks))
    return results if block_hook is not None else []


def saved_embedding_key(path: Path) -> str | None:
    """The key :func:`save_embedding` stamped on a store; ``None`` without a readable store."""
    try:
        key = zarr.open_array(str(path / "embedding"), mode="r").attrs.get(KEY_ATTRIBUTE)
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError):
        return None
    return key if isinstance(key, str) else None


def open_embedding(path: Path) -> SceneEmbedding:
    """Reopen embeddings written by :func:`save_embedding`, lazily."""
    from sitfuse_byol.read.xarray_store import grid_of

    if not path.exists():
        raise InputError("embeddings not found; run `sitfuse embed` first", where=str(path))
    ds = xr.open_zarr(path, consolidated=False, decode_coords="all", mask_and_scale=False)
    array = ds["embedding"]
    grid = grid_of(array, where=str(path))
    data = array.data
    return SceneEmbedding(
        scene_id=path.stem,
        data=data,
        valid=da.isfinite(data[0]),
        grid=grid,
    )
