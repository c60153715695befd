"""PNG quicklooks rendered with matplotlib's Agg canvas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from sitfuse_byol.export.palette import label_colors
from sitfuse_byol.export.quicklook import colorize_labels, stretch_rgb, write_quicklook

NODATA = 255


def scene(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rgb = rng.normal(1000.0, 200.0, size=(3, height, width)).astype(np.float32)
    valid = np.ones((height, width), bool)
    valid[: height // 4, : width // 4] = False
    labels = np.where(np.arange(width) < width // 2, 2, 5)[None].repeat(height, 0).astype(np.uint8)
    labels[~valid] = NODATA
    return rgb, valid, labels


def test_quicklook_shows_rgb_and_labels_side_by_side(tmp_path: Path) -> None:
    rgb, valid, labels = scene(300, 500)
    colors = label_colors(8)
    path = write_quicklook(
        tmp_path / "scene.png", rgb=rgb, valid=valid, labels=labels, nodata=NODATA,
        colors=colors, title="scene 1",
    )  # fmt: skip
    image = imread(path)
    # Two 500 x 300 panels, a 10 px gap and a 40 px title strip, pixel for pixel.
    assert image.shape == (340, 1010, 4)
    pixels = np.rint(image[..., :3] * 255).astype(int)
    top, right = 40, 510
    np.testing.assert_array_equal(pixels[top + 200, right + 100], colors[2])
    np.testing.assert_array_equal(pixels[top + 200, right + 400], colors[5])
    np.testing.assert_array_equal(pixels[top + 10, right + 10], [255, 255, 255])  # nodata
    np.testing.assert_array_equal(pixels[top + 10, 10], [0, 0, 0])  # invalid RGB
    assert pixels[top + 200 :, :500].std() > 20  # the stretched noise is visible
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.png"]


def test_large_scenes_are_strided_and_small_ones_enlarged(tmp_path: Path) -> None:
    rgb, valid, labels = scene(3000, 2000)
    big = write_quicklook(
        tmp_path / "big.png", rgb=rgb, valid=valid, labels=labels, nodata=NODATA,
        colors=label_colors(8), title="big", max_size=512,
    )  # fmt: skip
    height, width = imread(big).shape[:2]
    # Stride ceil(3000 / 512) = 6: panels of 500 x 334.
    assert (height, width) == (540, 2 * 334 + 10)
    rgb, valid, labels = scene(30, 60)
    small = write_quicklook(
        tmp_path / "small.png", rgb=rgb, valid=valid, labels=labels, nodata=NODATA,
        colors=label_colors(8), title="small",
    )  # fmt: skip
    height, width = imread(small).shape[:2]
    assert (height, width) == (128 + 40, 2 * 256 + 10)


def test_quicklook_refuses_mismatched_shapes(tmp_path: Path) -> None:
    rgb, valid, labels = scene(30, 60)
    with pytest.raises(ValueError, match="disagree"):
        write_quicklook(
            tmp_path / "x.png", rgb=rgb, valid=valid, labels=labels[:, :50], nodata=NODATA,
            colors=label_colors(8), title="x",
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        write_quicklook(
            tmp_path / "x.png", rgb=rgb[:2], valid=valid, labels=labels, nodata=NODATA,
            colors=label_colors(8), title="x",
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_stretch_uses_valid_percentiles() -> None:
    values = np.arange(100, dtype=float).reshape(1, 10, 10).repeat(3, 0)
    valid = np.ones((10, 10), bool)
    valid[0, 0] = False
    values[:, 0, 0] = 1e9  # an invalid outlier must not move the stretch
    out = stretch_rgb(values, valid)
    assert out.shape == (10, 10, 3) and out.dtype == np.float32
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[9, 9, 0] == 1.0 and out[0, 1, 0] == 0.0
    assert 0.4 < out[5, 0, 0] < 0.6
    assert not stretch_rgb(values, np.zeros((10, 10), bool)).any()


def test_colorize_labels_makes_nodata_and_unknown_labels_transparent() -> None:
    colors = label_colors(3)
    rgba = colorize_labels(np.array([[0, 2, 255, 7]]), nodata=255, colors=colors)
    np.testing.assert_array_equal(rgba[0, :2, :3], colors[[0, 2]])
    assert rgba[0, :, 3].tolist() == [255, 255, 0, 0]


def test_a_constant_band_is_mid_grey_without_overflow() -> None:
    rgb = np.stack([np.full((4, 5), 7.0), np.arange(20.0).reshape(4, 5), np.full((4, 5), 7.0)])
    rgb[0, 0, 0] = 1e308  # an invalid pixel far outside the band's (constant) valid values
    valid = np.ones((4, 5), bool)
    valid[0, 0] = False
    with np.errstate(all="raise"):
        out = stretch_rgb(rgb, valid)
    assert (out[..., 0][valid] == 0.5).all() and (out[..., 2][valid] == 0.5).all()
    assert out[0, 0].tolist() == [0.0, 0.0, 0.0]
    assert out[..., 1][valid].min() == 0.0 and out[..., 1][valid].max() == 1.0


def test_a_band_of_one_value_but_a_few_pixels_still_shows_them() -> None:
    """The 2nd and 98th percentiles agree (over 98% water); the island must not vanish in grey."""
    band = np.zeros((10, 10))
    band[0, 0] = 5.0
    rgb = np.stack([band, band, band])
    out = stretch_rgb(rgb, np.ones((10, 10), bool))
    assert out[0, 0].tolist() == [1.0, 1.0, 1.0]
    assert (out.reshape(-1, 3)[1:] == 0.0).all()
