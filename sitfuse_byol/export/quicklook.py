"""A PNG quicklook: the scene in true colour beside its label map.

matplotlib is driven through :class:`~matplotlib.figure.Figure` and the Agg
canvas directly, never through pyplot, so no global backend or figure state is
touched and it works headless and in worker threads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sitfuse_byol.export.atomic import atomic_path

_DPI = 100
_TITLE_IN = 0.4  # height of the title strip, inches
_GAP_IN = 0.1  # gap between the two panels, inches
_MIN_PANEL_PX = 256  # small scenes are enlarged to this long side to stay legible

#: Longest side of each quicklook panel, in pixels.
MAX_SIZE = 1024


def quicklook_step(shape: tuple[int, ...], *, max_size: int = MAX_SIZE) -> int:
    """The subsampling step that fits a scene of ``shape`` into a ``max_size`` panel.

    Callers holding a lazy scene subsample with it before computing, so that only
    what the PNG shows is read; :func:`write_quicklook` then finds nothing left to
    subsample.

    Args:
        shape: ``(H, W)`` of the scene.
        max_size: Longest side of each panel, in pixels.

    Returns:
        Keep every ``step``-th row and column (1: all).
    """
    return max(1, math.ceil(max(shape) / max_size))


def stretch_rgb(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Stretch each band linearly between its 2nd and 98th percentile over valid pixels.

    Args:
        rgb: ``(3, H, W)`` red, green and blue, any numeric dtype.
        valid: ``(H, W)`` bool, true where the scene has data.

    Returns:
        ``(H, W, 3)`` float32 in [0, 1], black where not valid.
    """
    out = np.zeros((*rgb.shape[1:], 3), dtype=np.float32)
    if not valid.any():
        return out
    for band in range(3):
        values = rgb[band][valid].astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        low, high = np.percentile(values, [2, 98])
        if high <= low:
            # Over 96% of one value: stretch over the whole range, so the few others
            # (a cloud, an island) still show; a constant band is mid grey.
            low, high = values.min(), values.max()
            if high <= low:
                out[..., band] = 0.5
                continue
        scaled = (rgb[band].astype(np.float64) - low) / (high - low)
        out[..., band] = np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0)
    out[~valid] = 0.0
    return out


def colorize_labels(labels: np.ndarray, *, nodata: int, colors: np.ndarray) -> np.ndarray:
    """Paint labels with a palette.

    Args:
        labels: ``(H, W)`` integer labels.
        nodata: Label value that stays transparent.
        colors: ``(K, 3)`` uint8 palette; labels outside ``0..K-1`` are transparent too.

    Returns:
        ``(H, W, 4)`` uint8 RGBA.
    """
    colors = np.asarray(colors, dtype=np.uint8)
    shown = (labels != nodata) & (labels >= 0) & (labels < len(colors))
    rgba = np.zeros((*labels.shape, 4), dtype=np.uint8)
    rgba[shown, :3] = colors[labels[shown]]
    rgba[shown, 3] = 255
    return rgba


def write_quicklook(
    path_png: Path,
    *,
    rgb: np.ndarray,
    valid: np.ndarray,
    labels: np.ndarray,
    nodata: int,
    colors: np.ndarray,
    title: str,
    max_size: int = MAX_SIZE,
) -> Path:
    """Write a PNG with the stretched RGB scene on the left and the label map on the right.

    Large scenes are subsampled by striding (nearest neighbour, which keeps
    labels categorical) so that neither panel exceeds ``max_size`` pixels on
    its long side; small scenes are enlarged. Invalid pixels are black in the
    RGB panel; nodata is white (transparent over the white figure) in the
    label panel.

    Args:
        path_png: The ``.png`` to create or replace.
        rgb: ``(3, H, W)`` red, green and blue bands, float or integer.
        valid: ``(H, W)`` bool, true where the scene has data.
        labels: ``(H, W)`` integer labels.
        nodata: The label nodata value.
        colors: ``(K, 3)`` uint8 palette.
        title: Text above the panels.
        max_size: Longest side of each panel, in pixels.

    Returns:
        ``path_png``.

    Raises:
        ValueError: If the shapes of ``rgb``, ``valid`` and ``labels`` disagree.
    """
    rgb, valid, labels = np.asarray(rgb), np.asarray(valid, dtype=bool), np.asarray(labels)
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"rgb must have shape (3, H, W), got {rgb.shape}")
    if valid.shape != rgb.shape[1:] or labels.shape != rgb.shape[1:]:
        raise ValueError(f"rgb {rgb.shape}, valid {valid.shape} and labels {labels.shape} disagree")
    step = quicklook_step(labels.shape, max_size=max_size)
    rgb, valid, labels = rgb[:, ::step, ::step], valid[::step, ::step], labels[::step, ::step]
    height, width = labels.shape

    zoom = max(1.0, _MIN_PANEL_PX / max(height, width))
    panel_w, panel_h = zoom * width / _DPI, zoom * height / _DPI
    fig_w, fig_h = 2 * panel_w + _GAP_IN, panel_h + _TITLE_IN
    fig = Figure(figsize=(fig_w, fig_h), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    # Axes placed by hand (in figure fractions) so each image maps 1:1 onto PNG pixels.
    for index, image in enumerate(
        (stretch_rgb(rgb, valid), colorize_labels(labels, nodata=nodata, colors=colors))
    ):
        left = index * (panel_w + _GAP_IN) / fig_w
        ax = fig.add_axes((left, 0.0, panel_w / fig_w, panel_h / fig_h))
        ax.imshow(image, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
    fig.suptitle(title, y=1.0 - 0.5 * _TITLE_IN / fig_h, va="center", fontsize=10)

    path_png = Path(path_png)
    with atomic_path(path_png) as tmp:
        # zlib level 1: a third of the default's encoding time for a few % more bytes.
        fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white", pil_kwargs={"compress_level": 1})
    return path_png
