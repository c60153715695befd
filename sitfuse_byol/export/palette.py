"""Deterministic colour palettes for label rasters.

A label's colour depends only on the label (and, for hierarchical labels, on
the number of fine labels per coarse one), never on the scene or the run, so
that cluster 7 looks the same in every map a user opens side by side.
"""

from __future__ import annotations

import numpy as np

#: The most labels a label raster can hold (uint16 with 65535 as nodata).
MAX_LABELS = 65535

# matplotlib's tab20, dark tones first and light tones second: in tab20 order
# labels 0 and 1 would be two blues, hard to tell apart next to each other.
_TAB20_REORDERED = np.array(
    [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
        (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
        (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
        (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
    ],
    dtype=np.uint8,
)  # fmt: skip

# Stepping the hue by the golden ratio conjugate spreads any number of hues
# evenly without knowing the count in advance.
_GOLDEN = 0.6180339887498949
# The same idea in three dimensions (hue, saturation, value): Roberts' R3
# low-discrepancy sequence steps by powers of 1/phi_3, where phi_3 ** 4 = phi_3 + 1.
# With tab20 it gives 65535 distinct 8-bit colours, where cycling a few fixed
# saturation/value levels produced near-duplicates within the first 255 labels.
_PHI_3 = 1.2207440846057596
_R3_STEPS = np.array([_PHI_3**-1, _PHI_3**-2, _PHI_3**-3])


def _check_count(n: int, what: str) -> None:
    if n < 0 or n > MAX_LABELS:
        raise ValueError(f"{what} must be between 0 and {MAX_LABELS}, got {n}")


def hsv_to_rgb8(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Convert HSV components in [0, 1] to 8-bit RGB.

    Args:
        h: Hues, any shape; wrapped into [0, 1).
        s: Saturations, broadcastable to ``h``.
        v: Values, broadcastable to ``h``.

    Returns:
        Array of shape ``h.shape + (3,)``, dtype uint8.
    """
    h, s, v = np.broadcast_arrays(np.mod(h, 1.0), np.asarray(s, float), np.asarray(v, float))
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    sector = sector.astype(int) % 6
    r = np.choose(sector, [v, q, p, p, t, v])
    g = np.choose(sector, [t, v, v, q, p, p])
    b = np.choose(sector, [p, p, t, v, v, q])
    return np.rint(np.stack([r, g, b], axis=-1) * 255.0).astype(np.uint8)


def label_colors(n: int) -> np.ndarray:
    """A fixed, visually distinct colour for each of ``n`` labels.

    Labels 0–19 get the tab20 colours (dark tones first); later labels walk a
    low-discrepancy sequence through hue, saturation (0.45–1) and value
    (0.5–1), so every colour is distinct and neighbouring labels differ
    clearly. Colours of existing labels never change when ``n`` grows.

    Args:
        n: Number of labels, at most :data:`MAX_LABELS`.

    Returns:
        Array of shape ``(n, 3)``, dtype uint8; row ``i`` is the colour of label ``i``.

    Raises:
        ValueError: If ``n`` is negative or above :data:`MAX_LABELS`.
    """
    _check_count(n, "number of labels")
    head = _TAB20_REORDERED[: min(n, len(_TAB20_REORDERED))]
    k = np.arange(max(n - len(_TAB20_REORDERED), 0))
    # Start 0.75 keeps the first 255 colours, tab20 included, furthest apart (of 0.05 steps).
    u = np.mod(0.75 + k[:, None] * _R3_STEPS, 1.0)
    tail = hsv_to_rgb8(u[:, 0], 0.45 + 0.55 * u[:, 1], 0.5 + 0.5 * u[:, 2])
    return np.concatenate([head, tail.reshape(-1, 3)], axis=0)


def hierarchical_colors(n_coarse: int, n_fine: int) -> np.ndarray:
    """Colours for hierarchical labels ``coarse * n_fine + fine``.

    All fine labels of one coarse cluster share a hue family (the coarse
    cluster's golden-ratio hue, jittered slightly) and differ in lightness and
    saturation, so a map reads as coarse regions with visible subdivisions.

    Args:
        n_coarse: Number of coarse clusters.
        n_fine: Number of fine clusters per coarse cluster.

    Returns:
        Array of shape ``(n_coarse * n_fine, 3)``, dtype uint8.

    Raises:
        ValueError: If a count is negative or there are more than
            :data:`MAX_LABELS` labels in all.
    """
    if n_coarse < 0 or n_fine < 0:
        raise ValueError(f"counts must not be negative, got {n_coarse} x {n_fine}")
    _check_count(n_coarse * n_fine, "number of hierarchical labels")
    coarse, fine = np.divmod(np.arange(n_coarse * n_fine), max(n_fine, 1))
    # Position of the fine label within its family, 0..1 (0.5 for a single one).
    t = fine / (n_fine - 1) if n_fine > 1 else np.full(fine.shape, 0.5)
    hue = 0.05 + coarse * _GOLDEN + 0.06 * (t - 0.5)
    value = 0.97 - 0.5 * t
    # Alternate saturation so adjacent fine labels differ even when n_fine is large.
    saturation = np.where(fine % 2 == 0, 0.85, 0.55)
    return hsv_to_rgb8(hue, saturation, value).reshape(-1, 3)
