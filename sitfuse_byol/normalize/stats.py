"""Per-band statistics over the valid pixels of every scene, computed with Dask.

Two passes over the data, each a set of small per-chunk partial results:

1. count, mean, M2 (sum of squared deviations), min and max per band, merged with
   Chan's parallel formula, which stays accurate where a naive sum of squares would not;
2. a fixed-size histogram per band between the global min and max, from which the
   percentiles are read. For integer data with a range under ``MAX_BINS`` the bins are
   one value wide, so the percentiles equal ``numpy.percentile`` exactly; for float
   data they are within one bin width of it.

Only one scene's task graph exists at a time and every partial result is a few
kilobytes, so memory does not grow with the number of scenes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import numpy as np

from sitfuse_byol.errors import InputError
from sitfuse_byol.read import Scene, reading, valid_block
from sitfuse_byol.read.scene import bands_without_data

MAX_BINS = 65536
PERCENTILES = (2.0, 98.0)


@dataclass(frozen=True)
class BandStats:
    """Statistics of each band over all valid pixels.

    All sequences hold one value per band, in ``band_names`` order.
    """

    band_names: tuple[str, ...]
    count: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    p2: tuple[float, ...]
    p98: tuple[float, ...]
    min: tuple[float, ...]
    max: tuple[float, ...]
    scenes: tuple[str, ...] = ()

    @property
    def n_bands(self) -> int:
        return len(self.band_names)

    def normalize(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Z-score a ``(band, y, x)`` block to float32; invalid pixels become 0 (the mean).

        Zero is the neutral value for the encoder, and the valid mask keeps those pixels
        out of pooled features and of clustering.
        """
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        scale = np.asarray([1.0 / s if s > 0 else 1.0 for s in self.std], dtype=np.float32)
        out = (block.astype(np.float32) - mean) * scale[:, None, None]
        out[:, ~valid] = 0.0
        return out

    def constant_bands(self) -> list[str]:
        """Bands with one value over every valid pixel: nothing for the encoder to learn."""
        # min == max, not std == 0: a float band's computed std is a rounding error away from 0.
        return [name for name, low, high in zip(self.band_names, self.min, self.max, strict=True) if low == high]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: Path) -> None:
        from sitfuse_byol.export.atomic import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: dict) -> BandStats:
        return cls(**{k: tuple(v) for k, v in data.items()})

    @classmethod
    def load(cls, path: Path) -> BandStats:
        if not path.exists():
            raise InputError("statistics not found; run `sitfuse stats` first", where=str(path))
        return cls.from_dict(json.loads(path.read_text()))


def _moments(
    block: np.ndarray, *, nodata: float | None, valid_range: tuple[float, float] | None
) -> np.ndarray:
    """``(band, 5)`` rows of count, mean, M2, min, max over the valid pixels of a block."""
    valid = valid_block(block, nodata=nodata, valid_range=valid_range)
    out = np.zeros((block.shape[0], 5))
    n = int(valid.sum())
    out[:, 3], out[:, 4] = np.inf, -np.inf
    if n == 0:
        return out
    values = block[:, valid].astype(np.float64)
    mean = values.mean(axis=1)
    out[:, 0] = n
    out[:, 1] = mean
    out[:, 2] = ((values - mean[:, None]) ** 2).sum(axis=1)
    out[:, 3] = values.min(axis=1)
    out[:, 4] = values.max(axis=1)
    return out


def _merge_moments(parts: Iterable[np.ndarray]) -> np.ndarray:
    total: np.ndarray | None = None
    for part in parts:
        if total is None:
            total = part.copy()
            continue
        n_a, n_b = total[:, 0], part[:, 0]
        n = n_a + n_b
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = part[:, 1] - total[:, 1]
            mean = np.where(n > 0, total[:, 1] + delta * n_b / n, 0.0)
            m2 = total[:, 2] + part[:, 2] + np.where(n > 0, delta**2 * n_a * n_b / n, 0.0)
        total = np.stack(
            [n, mean, m2, np.minimum(total[:, 3], part[:, 3]), np.maximum(total[:, 4], part[:, 4])],
            axis=1,
        )
    assert total is not None
    return total


def _histogram(
    block: np.ndarray,
    *,
    nodata: float | None,
    valid_range: tuple[float, float] | None,
    lows: np.ndarray,
    widths: np.ndarray,
    bins: np.ndarray,
) -> np.ndarray:
    """``(band, MAX_BINS)`` counts; bin ``i`` of band ``b`` starts at ``lows[b] + i*widths[b]``."""
    valid = valid_block(block, nodata=nodata, valid_range=valid_range)
    out = np.zeros((block.shape[0], MAX_BINS), dtype=np.int64)
    for b in range(block.shape[0]):
        values = block[b][valid].astype(np.float64)
        index = np.floor((values - lows[b]) / widths[b]).astype(np.int64)
        np.clip(index, 0, bins[b] - 1, out=index)
        out[b] = np.bincount(index, minlength=MAX_BINS)[:MAX_BINS]
    return out


def _blocks(scene: Scene) -> list:
    """The delayed ``(band, y, x)`` data blocks of a scene, one per spatial chunk.

    Only the data is handed out: the per-block functions derive the valid mask from the
    pixels in hand, because ``scene.valid`` is its own graph over the same reads and
    computing it beside the data would decode every chunk twice. Every reader puts all
    bands in one chunk, hence the single band index.
    """
    return list(scene.data.to_delayed()[0].ravel())


def _percentile_from_histogram(
    counts: np.ndarray, q: float, *, low: float, width: float, integer: bool
) -> float:
    """``numpy.percentile`` (linear) from a histogram: exact when bins are single values."""
    n = int(counts.sum())
    rank = q / 100.0 * (n - 1)
    cumulative = np.cumsum(counts)

    def value_at(k: int) -> float:
        i = int(np.searchsorted(cumulative, k + 1))
        if integer:
            return low + i * width
        # Spread the bin's values evenly over it.
        before = cumulative[i - 1] if i > 0 else 0
        return low + (i + (k - before + 0.5) / counts[i]) * width

    lo, hi = int(np.floor(rank)), int(np.ceil(rank))
    return value_at(lo) + (rank - lo) * (value_at(hi) - value_at(lo))


def scene_moment_parts(scene: Scene) -> list[np.ndarray]:
    """Pass 1 over one scene: per-chunk ``(band, 5)`` count, mean, M2, min, max rows.

    Raises:
        InputError: A chunk cannot be read (corrupt or truncated file).
    """
    tasks = [
        dask.delayed(_moments)(d, nodata=scene.nodata, valid_range=scene.valid_range)
        for d in _blocks(scene)
    ]
    with reading(scene.source):
        return list(dask.compute(*tasks))


@dataclass(frozen=True)
class HistogramBins:
    """The pass-2 histogram layout, fixed by the merged pass-1 moments of all scenes.

    Bin ``i`` of band ``b`` starts at ``lows[b] + i * widths[b]``; ``bins[b]`` bins are
    used. ``integer``: one value per bin, so percentiles are exact.
    """

    lows: np.ndarray
    widths: np.ndarray
    bins: np.ndarray
    integer: bool

    @classmethod
    def from_moments(cls, moments: np.ndarray, *, integer_data: bool) -> HistogramBins:
        lows, highs = moments[:, 3], moments[:, 4]
        span = np.where(np.isfinite(highs - lows), highs - lows, 0.0)
        integer = integer_data and bool((span < MAX_BINS).all())
        if integer:
            widths = np.ones_like(span)
            bins = (span + 1).astype(np.int64)
        else:
            widths = np.where(span > 0, span / MAX_BINS, 1.0)
            bins = np.full(span.shape, MAX_BINS, dtype=np.int64)
        return cls(lows=np.where(np.isfinite(lows), lows, 0.0), widths=widths, bins=bins, integer=integer)


def scene_histogram(scene: Scene, bins: HistogramBins) -> np.ndarray:
    """Pass 2 over one scene: ``(band, MAX_BINS)`` counts of its valid pixels.

    Raises:
        InputError: A chunk cannot be read (corrupt or truncated file).
    """
    tasks = [
        dask.delayed(_histogram)(
            d,
            nodata=scene.nodata,
            valid_range=scene.valid_range,
            lows=bins.lows,
            widths=bins.widths,
            bins=bins.bins,
        )
        for d in _blocks(scene)
    ]
    histogram = np.zeros((scene.n_bands, MAX_BINS), dtype=np.int64)
    with reading(scene.source):
        for part in dask.compute(*tasks):
            histogram += part
    return histogram


def merged_moments(parts: Iterable[np.ndarray], *, scenes: Sequence[Scene]) -> np.ndarray:
    """Pass-1 parts of ``scenes`` merged in the order given.

    Raises:
        InputError: No scene has a valid pixel; the message names the bands that have
            none in any scene, when that is why.
    """
    moments = _merge_moments(parts)
    if not moments[:, 0].any():
        empty = set.intersection(*(set(bands_without_data(scene)) for scene in scenes))
        # Some bands empty everywhere, not all: those bands are why (every band empty is no data).
        named = [name for name in scenes[0].band_names if name in empty]
        why = (
            f"band{'s' if len(named) > 1 else ''} {', '.join(named)} {'have' if len(named) > 1 else 'has'} no valid "
            f"pixel in any scene; leave {'them' if len(named) > 1 else 'it'} out with data.bands"
            if 0 < len(named) < scenes[0].n_bands
            else "every pixel is nodata, not finite or outside data.valid_range"
        )
        raise InputError(f"no valid pixel in any scene: {why}", where=", ".join(s.id for s in scenes))
    return moments


def stats_from(
    *,
    band_names: tuple[str, ...],
    scene_ids: Sequence[str],
    moments: np.ndarray,
    histogram: np.ndarray,
    bins: HistogramBins,
) -> BandStats:
    """The statistics from merged pass-1 moments and the summed pass-2 histogram."""
    count = moments[:, 0]

    def percentile(q: float) -> tuple[float, ...]:
        return tuple(
            float(
                _percentile_from_histogram(
                    histogram[b], q, low=bins.lows[b], width=bins.widths[b], integer=bins.integer
                )
            )
            if count[b] > 0
            else float("nan")
            for b in range(len(band_names))
        )

    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.where(count > 0, moments[:, 2] / count, np.nan))
    return BandStats(
        band_names=band_names,
        count=tuple(int(c) for c in count),
        mean=tuple(float(m) for m in moments[:, 1]),
        std=tuple(float(s) for s in std),
        p2=percentile(PERCENTILES[0]),
        p98=percentile(PERCENTILES[1]),
        min=tuple(float(v) for v in moments[:, 3]),
        max=tuple(float(v) for v in moments[:, 4]),
        scenes=tuple(scene_ids),
    )


def compute_stats(scenes: Sequence[Scene]) -> BandStats:
    """Count, mean, std, 2nd and 98th percentile of each band over all valid pixels.

    The two passes run scene by scene here; ``sitfuse run`` runs the same per-scene
    passes (:func:`scene_moment_parts`, :func:`scene_histogram`) as Dask tasks.

    Raises:
        InputError: Scenes disagree on the band count, or no scene has a valid pixel.
    """
    if not scenes:
        raise InputError("no scenes to compute statistics on")
    first = scenes[0]
    for scene in scenes[1:]:
        if scene.n_bands != first.n_bands:
            raise InputError(
                f"scene has {scene.n_bands} bands but {first.id} has {first.n_bands}",
                where=scene.source,
            )
    moments = merged_moments((part for scene in scenes for part in scene_moment_parts(scene)), scenes=scenes)
    # Integer bins only if every scene is integer: one float scene's values fall between them.
    bins = HistogramBins.from_moments(moments, integer_data=all(np.issubdtype(s.dtype, np.integer) for s in scenes))
    histogram = sum((scene_histogram(scene, bins) for scene in scenes), np.zeros((first.n_bands, MAX_BINS), np.int64))
    return stats_from(
        band_names=first.band_names, scene_ids=[s.id for s in scenes], moments=moments, histogram=histogram, bins=bins
    )
