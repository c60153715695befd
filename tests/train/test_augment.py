"""Tests for the batched multispectral augmentations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sitfuse_byol.errors import ConfigError
from sitfuse_byol.train.augment import AugmentConfig, augment_view, make_views

B, C, P = 16, 5, 12

# Only geometry: no crop, no spectral change, no blur, noise or solarisation.
GEOMETRY_ONLY = AugmentConfig(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, noise_std=0.0,
    blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0),
)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, P, P, generator=g)
    valid = torch.rand(B, P, P, generator=g) > 0.3
    return x, valid


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_views_keep_shapes_and_dtypes(dtype: torch.dtype) -> None:
    x, valid = _data()
    v1, m1, v2, m2 = make_views(x.to(dtype), valid, config=AugmentConfig(), generator=_gen(0))
    for v, m in ((v1, m1), (v2, m2)):
        assert v.shape == x.shape and v.dtype == dtype
        assert m.shape == valid.shape and m.dtype == torch.bool
        assert torch.isfinite(v).all()


def test_invalid_pixels_are_zero_and_nan_cannot_leak() -> None:
    x, valid = _data()
    x = x.masked_fill(~valid.unsqueeze(1), float("nan"))  # nodata may arrive as NaN
    v1, m1, v2, m2 = make_views(x, valid, config=AugmentConfig(crop_scale=(0.3, 1.0)),
                                generator=_gen(0))
    for v, m in ((v1, m1), (v2, m2)):
        assert torch.isfinite(v).all()
        assert (v.masked_select(~m.unsqueeze(1)) == 0).all()
        assert m.any() and not m.all()


def test_mask_follows_crop_geometry_exactly() -> None:
    # Bilinear resampling of a linear ramp returns the sampled coordinate itself,
    # so a first run on coordinate ramps reveals where each output pixel came from;
    # a second run with the same seed must carry the mask along the same map.
    _, valid = _data()
    cfg = dataclasses.replace(GEOMETRY_ONLY, crop_scale=(0.3, 0.9), crop_ratio=(0.5, 2.0))
    ramp = torch.arange(P, dtype=torch.float64)
    coords = torch.stack([ramp.view(P, 1).expand(P, P), ramp.view(1, P).expand(P, P)])
    coords = coords.expand(B, 2, P, P).contiguous()
    everywhere = torch.ones(B, P, P, dtype=torch.bool)
    where_from, _ = augment_view(coords, everywhere, config=cfg, generator=_gen(3), blur_p=0, solarize_p=0)
    v, m = augment_view(coords, valid, config=cfg, generator=_gen(3), blur_p=0, solarize_p=0)
    assert (v.masked_select(~m.unsqueeze(1)) == 0).all()  # what the mask drops is zeroed
    rows, cols = where_from[:, 0], where_from[:, 1]
    expected = valid[torch.arange(B).view(B, 1, 1), rows.round().long(), cols.round().long()]
    # Leave out samples that sit on a rounding tie between two input pixels.
    clear = ((rows % 1 - 0.5).abs() > 1e-3) & ((cols % 1 - 0.5).abs() > 1e-3)
    assert clear.float().mean() > 0.9
    assert torch.equal(m[clear], expected[clear])
    assert not torch.equal(m, valid)  # the crop really moved things


def _dihedral(n: int) -> list:
    """The 8 symmetries of an (n+1) x (n+1) square as maps of (row, col)."""
    return [
        lambda i, j: (i, j), lambda i, j: (i, n - j), lambda i, j: (n - i, j),
        lambda i, j: (n - i, n - j), lambda i, j: (j, i), lambda i, j: (j, n - i),
        lambda i, j: (n - j, i), lambda i, j: (n - j, n - i),
    ]


def test_flips_and_rot90_move_a_marked_pixel_with_its_mask() -> None:
    x = torch.zeros(B, C, P, P)
    valid = torch.ones(B, P, P, dtype=torch.bool)
    spectrum = torch.arange(1.0, C + 1.0)
    r, c = 2, 7  # its 8 images are distinct, so each pins down one symmetry
    x[:, :, r, c] = spectrum
    valid[:, 0, 1] = False
    v, m = augment_view(x, valid, config=GEOMETRY_ONLY, generator=_gen(1), blur_p=0.0, solarize_p=0.0)
    seen = set()
    for i in range(B):
        peak = [tuple(p) for p in torch.nonzero(v[i, 0] > 0.5).tolist()]
        assert len(peak) == 1
        (symmetry,) = [f for f in _dihedral(P - 1) if f(r, c) == peak[0]]
        torch.testing.assert_close(v[i, :, peak[0][0], peak[0][1]], spectrum, atol=1e-5, rtol=0)
        assert [tuple(p) for p in torch.nonzero(~m[i]).tolist()] == [symmetry(0, 1)]
        seen.add(peak[0])
    assert len(seen) >= 4  # flips and rotations really vary across the batch


def test_deterministic_under_a_seed_and_varies_across_seeds() -> None:
    x, valid = _data()
    cfg = AugmentConfig(band_dropout=0.2)
    a = make_views(x, valid, config=cfg, generator=_gen(5))
    b = make_views(x, valid, config=cfg, generator=_gen(5))
    c = make_views(x, valid, config=cfg, generator=_gen(6))
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta, tb)
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[2])  # the two views differ too


def test_band_dropout_zeroes_whole_bands() -> None:
    x, _ = _data()
    x = x.abs() + 1.0  # no pixel is 0 by chance
    valid = torch.ones(B, P, P, dtype=torch.bool)
    cfg = dataclasses.replace(GEOMETRY_ONLY, band_dropout=0.5)
    v, _ = augment_view(x, valid, config=cfg, generator=_gen(2), blur_p=0.0, solarize_p=0.0)
    zero = (v == 0).flatten(2)
    band_all_zero, band_any_zero = zero.all(2), zero.any(2)
    assert torch.equal(band_all_zero, band_any_zero)  # whole bands or nothing
    assert band_all_zero.any()
    heavy, _ = augment_view(x, valid, config=dataclasses.replace(cfg, band_dropout=0.9),
                       generator=_gen(2), blur_p=0.0, solarize_p=0.0)
    assert not (heavy == 0).flatten(1).all(1).any()  # no sample loses every band
    off, _ = augment_view(x, valid, config=GEOMETRY_ONLY, generator=_gen(2), blur_p=0.0, solarize_p=0.0)
    assert not (off == 0).any()


def test_spectral_jitter_is_mild_and_per_band() -> None:
    x, _ = _data()
    valid = torch.ones(B, P, P, dtype=torch.bool)
    cfg = dataclasses.replace(GEOMETRY_ONLY, jitter_p=1.0, crop_scale=(1.0, 1.0), hflip=0, vflip=0,
                              rot90=0)
    v, _ = augment_view(x, valid, config=cfg, generator=_gen(0), blur_p=0.0, solarize_p=0.0)
    diff = v - x
    assert 0 < diff.abs().mean() < 0.3
    # Per-band affine maps: each (sample, band) is an exact line through the data.
    fit = torch.linalg.lstsq(
        torch.stack([x.flatten(2), torch.ones_like(x.flatten(2))], dim=-1), v.flatten(2).unsqueeze(-1)
    )
    residual = torch.stack([x.flatten(2), torch.ones_like(x.flatten(2))], dim=-1) @ fit.solution
    torch.testing.assert_close(residual.squeeze(-1), v.flatten(2), atol=1e-4, rtol=1e-4)


def test_strong_jitter_never_inverts_a_band() -> None:
    """A gain draw below -1 (likely at band_gain 2) flattens a band instead of flipping
    its spectrum; contrast stays below 1, so its factor is positive too."""
    x, _ = _data()
    valid = torch.ones(B, P, P, dtype=torch.bool)
    cfg = dataclasses.replace(
        GEOMETRY_ONLY, jitter_p=1.0, band_gain=2.0, band_offset=0.0, brightness=0.0, contrast=0.99,
        hflip=0, vflip=0, rot90=0,
    )
    v, _ = augment_view(x, valid, config=cfg, generator=_gen(0), blur_p=0.0, solarize_p=0.0)
    # Each (sample, band) is an affine map of x: its slope must never be negative.
    centred_x = x.flatten(2) - x.flatten(2).mean(2, keepdim=True)
    centred_v = v.flatten(2) - v.flatten(2).mean(2, keepdim=True)
    slope = (centred_x * centred_v).sum(2) / (centred_x**2).sum(2)
    assert (slope >= -1e-5).all()
    assert (slope.abs() < 1e-5).any()  # some band was flattened, none inverted


def test_blur_smooths_and_solarize_mirrors() -> None:
    x, _ = _data()
    valid = torch.ones(B, P, P, dtype=torch.bool)
    cfg = dataclasses.replace(GEOMETRY_ONLY, hflip=0, vflip=0, rot90=0)
    blurred, _ = augment_view(x, valid, config=cfg, generator=_gen(0), blur_p=1.0, solarize_p=0.0)
    assert blurred.diff(dim=-1).abs().mean() < 0.8 * x.diff(dim=-1).abs().mean()
    torch.testing.assert_close(blurred.mean((2, 3)), x.mean((2, 3)), atol=0.15, rtol=0)
    flat = torch.ones(B, C, P, P) * torch.arange(C).view(1, C, 1, 1)
    still, _ = augment_view(flat, valid, config=cfg, generator=_gen(0), blur_p=1.0, solarize_p=0.0)
    torch.testing.assert_close(still, flat)  # normalised kernel, reflect edges: no darkening
    solar, _ = augment_view(x, valid, config=cfg, generator=_gen(0), blur_p=0.0, solarize_p=1.0)
    torch.testing.assert_close(solar, torch.where(x > 0, -x, x))


def test_fill_of_invalid_pixels_never_leaks_into_valid_ones() -> None:
    # Each band is one constant on the valid pixels, with nodata (0 after the fill) in
    # the left third of every patch: mask-weighted resampling and blur must keep every
    # valid output pixel at exactly that constant, right next to the nodata edge too.
    valid = torch.ones(B, P, P, dtype=torch.bool)
    valid[..., : P // 3] = False
    level = torch.linspace(-2.0, 3.0, C).view(1, C, 1, 1)
    x = torch.where(valid.unsqueeze(1), level.expand(B, C, P, P), float("nan"))
    cfg = dataclasses.replace(GEOMETRY_ONLY, crop_scale=(0.3, 0.9), crop_ratio=(0.5, 2.0),
                              blur_sigma=(1.0, 2.0))
    v, m = augment_view(x, valid, config=cfg, generator=_gen(3), blur_p=1.0, solarize_p=0.0)
    assert m.any() and not m.all()
    # Pixels beside the edge: with the 0 fill mixed in they would be pulled toward 0.
    near_nodata = torch.nn.functional.max_pool2d((~m).float().unsqueeze(1), 3, 1, 1).squeeze(1) > 0
    assert (m & near_nodata).any()
    expected = level.expand(B, C, P, P)
    torch.testing.assert_close(v.masked_select(m.unsqueeze(1)), expected.masked_select(m.unsqueeze(1)),
                               atol=1e-5, rtol=0)
    assert (v.masked_select(~m.unsqueeze(1)) == 0).all()


def test_spectral_jitter_before_the_blur_does_not_leak_into_valid_pixels() -> None:
    # The jitter's offset moves every pixel, the nodata fill too; the blur after it must
    # still average valid pixels only: each band of each sample stays one constant.
    valid = torch.ones(B, P, P, dtype=torch.bool)
    valid[..., : P // 3] = False
    level = torch.linspace(-2.0, 3.0, C).view(1, C, 1, 1)
    x = torch.where(valid.unsqueeze(1), level.expand(B, C, P, P), float("nan"))
    cfg = dataclasses.replace(GEOMETRY_ONLY, jitter_p=1.0, band_offset=1.0, brightness=1.0,
                              blur_sigma=(1.0, 2.0))
    v, m = augment_view(x, valid, config=cfg, generator=_gen(4), blur_p=1.0, solarize_p=0.0)
    near_nodata = torch.nn.functional.max_pool2d((~m).float().unsqueeze(1), 3, 1, 1).squeeze(1) > 0
    assert (m & near_nodata).any()
    kept = m.unsqueeze(1).expand_as(v)
    high = torch.where(kept, v, -torch.inf).amax(dim=(2, 3))
    low = torch.where(kept, v, torch.inf).amin(dim=(2, 3))
    torch.testing.assert_close(high, low, atol=1e-5, rtol=0)


def test_bad_inputs_are_refused() -> None:
    x, valid = _data()
    with pytest.raises(ValueError):
        make_views(x, valid.float(), config=AugmentConfig(), generator=_gen(0))
    with pytest.raises(ValueError):
        make_views(x[..., :-1], valid[..., :-1], config=AugmentConfig(), generator=_gen(0))


def test_view_asymmetry_defaults_follow_byol() -> None:
    cfg = AugmentConfig()
    assert cfg.blur_p == (1.0, 0.1) and cfg.solarize_p == (0.0, 0.2)
    assert cfg.band_dropout == 0.0


def test_from_dict_accepts_yaml_values() -> None:
    cfg = AugmentConfig.from_dict({"crop_scale": [0.5, 0.9], "band_gain": 0.1, "band_dropout": 0.1})
    assert cfg.crop_scale == (0.5, 0.9) and cfg.band_gain == 0.1 and cfg.band_dropout == 0.1
    assert AugmentConfig.from_dict(None) == AugmentConfig()


@pytest.mark.parametrize(
    ("d", "key"),
    [
        ({"band_gian": 0.1}, "band_gian"),
        ({"hflip": -0.1}, "hflip"),
        ({"jitter_p": 1.5}, "jitter_p"),
        ({"noise_std": -1}, "noise_std"),
        ({"crop_scale": [0.9, 0.5]}, "crop_scale"),
        ({"crop_scale": [0.5]}, "crop_scale"),
        ({"blur_sigma": "big"}, "blur_sigma"),
        ({"contrast": True}, "contrast"),
        ({"brightness": float("nan")}, "brightness"),
        ({"contrast": 1.0}, "contrast"),
    ],
)


def test_from_dict_rejects_bad_input(d: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        AugmentConfig.from_dict(d)
    assert err.value.where == f"augment.{key}"


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'band_gain'"):
        AugmentConfig.from_dict({"band_gian": 0.1})
