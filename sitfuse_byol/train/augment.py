"""Batched, on-device augmentations for z-scored multispectral patches.

Everything works on a whole batch at once in plain torch, with every random
draw taken from the caller's ``torch.Generator`` (which must live on the
data's device), so two calls with equally seeded generators give equal views.

Nodata handling: invalid pixels are set to 0 — the band mean after z-score
normalisation — so NaN or fill values never enter the arithmetic, and are set
to 0 again at the end. Bilinear resampling and blur are mask-weighted
(normalised convolution: the resampled ``x * valid`` over the resampled
``valid``), so a valid pixel next to nodata is a weighted mean of valid pixels
only and whatever invalid pixels hold never leaks into real spectra. Every geometric transform
moves the validity mask with the data (the mask is resampled with
nearest-neighbour on the same grid), and the mask is what keeps invalid pixels
out of pooling.

Per view, in order: random resized crop + flips + rot90 (one affine resample),
spectral jitter with probability ``jitter_p`` (per-band gain and offset, patch
brightness, per-band contrast), Gaussian blur, solarisation, Gaussian noise,
band dropout. The two views differ in their blur and solarize probabilities
(``blur_p`` and ``solarize_p``, one value per view), as in BYOL. There is no
hue or saturation: they have no meaning for more than three bands, and strong
spectral jitter destroys exactly the spectral shape that separates classes
(REFERENCE.md section 2), hence the mild defaults and band dropout off.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sitfuse_byol.errors import ConfigError

__all__ = ["AugmentConfig", "augment_view", "make_views"]

_PROBABILITIES = ("hflip", "vflip", "rot90", "jitter_p", "band_dropout")
_NON_NEGATIVE = ("band_gain", "band_offset", "brightness", "contrast", "noise_std")
_PAIRS = ("crop_scale", "crop_ratio", "blur_sigma", "blur_p", "solarize_p")


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; all spectral values are in z-score units.

    Attributes:
        crop_scale: Range of the crop's area as a fraction of the patch.
        crop_ratio: Range of the crop's aspect ratio (width / height), sampled
            log-uniformly.
        hflip: Probability of a horizontal flip.
        vflip: Probability of a vertical flip.
        rot90: Probability of a 90° rotation; with both flips at 0.5 this
            draws uniformly from all 8 symmetries of the square.
        band_gain: Std of the per-band gain g, applied as ``x * max(1 + g, 0)``: a
            large draw may flatten a band but never inverts its spectrum.
        band_offset: Std of the per-band additive offset.
        brightness: Half-width of the uniform offset added to all bands.
        contrast: Half-width of the uniform factor around 1 by which each band's
            deviations from its patch mean are scaled; below 1, so the factor stays
            positive.
        jitter_p: Probability that a sample gets the four spectral jitters above.
        noise_std: Std of additive per-pixel Gaussian noise.
        blur_sigma: Range of the Gaussian blur sigma, in pixels.
        band_dropout: Probability that a band is zeroed, per sample and band;
            a sample never loses all of its bands.
        solarize_threshold: Values above it are mirrored about it
            (``2t - x``, i.e. negated for t = 0): the z-score analogue of
            ``1 - x`` solarisation. Questionable for spectra; set
            ``solarize_p`` to (0, 0) to turn it off.
        blur_p: Blur probability of view 1 and view 2 (BYOL: 1.0 and 0.1).
        solarize_p: Solarize probability of view 1 and view 2 (BYOL: 0 and 0.2).
    """

    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5
    band_gain: float = 0.05
    band_offset: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    jitter_p: float = 0.8
    noise_std: float = 0.02
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    band_dropout: float = 0.0
    solarize_threshold: float = 0.0
    blur_p: tuple[float, float] = (1.0, 0.1)
    solarize_p: tuple[float, float] = (0.0, 0.2)

    def __post_init__(self) -> None:
        for key in _PROBABILITIES:
            _check(key, getattr(self, key), 0.0, 1.0)
        for key in _NON_NEGATIVE:
            _check(key, getattr(self, key), 0.0, math.inf)
        _check("solarize_threshold", self.solarize_threshold, -math.inf, math.inf)
        if self.contrast >= 1:
            # A factor 1 - contrast <= 0 would flatten or invert bands around their mean.
            raise ConfigError(f"contrast must be below 1, got {self.contrast!r}", where="augment.contrast")
        for key, (lo, hi) in {
            "crop_scale": (1e-6, 1.0), "crop_ratio": (1e-6, math.inf),
            "blur_sigma": (1e-6, math.inf), "blur_p": (0.0, 1.0), "solarize_p": (0.0, 1.0),
        }.items():
            pair = getattr(self, key)
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ConfigError(f"{key} must be a pair of numbers, got {pair!r}", where=f"augment.{key}")
            for value in pair:
                _check(key, value, lo, hi)
            if key in ("crop_scale", "crop_ratio", "blur_sigma") and pair[0] > pair[1]:
                raise ConfigError(f"{key} must be (low, high) with low <= high, got {pair!r}",
                                  where=f"augment.{key}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AugmentConfig:
        """Build a config from a (YAML) mapping; missing keys keep their defaults.

        Raises:
            ConfigError: Unknown key, or a value of the wrong type or range.
        """
        d = d or {}
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown augmentation option {key!r}{hint}", where=f"augment.{key}")
        # YAML gives lists; the dataclass wants tuples.
        values: dict[str, Any] = {
            k: tuple(v) if k in _PAIRS and isinstance(v, list) else v for k, v in d.items()
        }
        return cls(**values)


def _check(key: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}", where=f"augment.{key}")
    if not lo <= value <= hi:
        raise ConfigError(f"{key} must be in [{lo:g}, {hi:g}], got {value!r}", where=f"augment.{key}")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _geometry(
    x: torch.Tensor, valid: torch.Tensor, cfg: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop, flips and rot90 composed into one affine resample."""
    b, dev = x.shape[0], x.device
    area = _uniform(b, *cfg.crop_scale, g, dev)
    log_ratio = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g, dev)
    # Crop width/height as fractions of the patch; clipping stands in for
    # torchvision's retry loop when a ratio makes a side exceed the patch.
    cw = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    ch = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (1 - cw) * (2 * torch.rand(b, generator=g, device=dev) - 1)
    cy = (1 - ch) * (2 * torch.rand(b, generator=g, device=dev) - 1)
    sx = torch.where(torch.rand(b, generator=g, device=dev) < cfg.hflip, -cw, cw)
    sy = torch.where(torch.rand(b, generator=g, device=dev) < cfg.vflip, -ch, ch)
    rot = torch.rand(b, generator=g, device=dev) < cfg.rot90
    # Output (u, v) samples input (sx*u + cx, sy*v + cy); a 90° turn first maps (u, v) -> (-v, u).
    zero = torch.zeros_like(sx)
    theta = torch.stack([
        torch.stack([torch.where(rot, zero, sx), torch.where(rot, -sx, zero), cx], dim=1),
        torch.stack([torch.where(rot, sy, zero), torch.where(rot, zero, sy), cy], dim=1),
    ], dim=1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    weight = valid.unsqueeze(1).to(x.dtype)
    # Resampling [x * mask, mask] together gives the numerator and denominator of the
    # mask-weighted bilinear mean in one call.
    both = F.grid_sample(torch.cat([x * weight, weight], 1), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)
    m = F.grid_sample(weight, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    # Where the nearest input pixel is valid its bilinear weight is at least 1/4, so the
    # denominator of every kept pixel is far from 0.
    return both[:, :-1] / both[:, -1:].clamp(min=1e-6), m.squeeze(1) > 0.5


def _jitter(x: torch.Tensor, valid: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Gain, offset, brightness and contrast folded into one per-band affine map."""
    b, c, dev = x.shape[0], x.shape[1], x.device
    gain = (1 + cfg.band_gain * torch.randn(b, c, generator=g, device=dev)).clamp(min=0)
    shift = cfg.band_offset * torch.randn(b, c, generator=g, device=dev)
    shift = shift + _uniform(b, -cfg.brightness, cfg.brightness, g, dev).unsqueeze(1)
    contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, g, dev).unsqueeze(1)
    apply = (torch.rand(b, generator=g, device=dev) < cfg.jitter_p).unsqueeze(1)
    # x is 0 off the mask, so a plain sum gives the per-band mean over valid pixels.
    count = valid.flatten(1).sum(1, keepdim=True).clamp(min=1)
    mean = x.flatten(2).sum(2) / count
    # y = gain*x + shift; contrast c around the patch mean of y: c*y + (1 - c)*mean(y).
    scale = contrast * gain
    offset = contrast * shift + (1 - contrast) * (gain * mean + shift)
    scale = torch.where(apply, scale, torch.ones_like(scale)).to(x.dtype)
    offset = torch.where(apply, offset, torch.zeros_like(offset)).to(x.dtype)
    return torch.addcmul(offset[:, :, None, None], x, scale[:, :, None, None])


def _blur(
    x: torch.Tensor, valid: torch.Tensor, p: float, cfg: AugmentConfig, g: torch.Generator
) -> torch.Tensor:
    """Mask-weighted separable Gaussian blur with a per-sample sigma on a random subset of samples.

    Each sample's 1-D kernel, with reflect boundary handling, is written as a
    P x P matrix G, and the blur is ``G @ x @ G.T``: two batched matmuls, far
    faster on CPU than a depthwise conv with one group per sample and band.
    Blurring ``x * valid`` and dividing by the blurred mask makes each valid pixel a
    Gaussian-weighted mean of valid pixels only, whatever ``x`` holds off the mask (the
    spectral jitter before the blur moves the fill of invalid pixels too).
    """
    b, c, size, _ = x.shape
    dev = x.device
    sigma = _uniform(b, *cfg.blur_sigma, g, dev)
    chosen = torch.rand(b, generator=g, device=dev) < p
    idx = chosen.nonzero().squeeze(1)
    # Three sigmas of support, but reflection must stay inside the patch.
    radius = min(math.ceil(3 * cfg.blur_sigma[1]), size - 1)
    if idx.numel() == 0 or radius < 1:
        return x
    taps = torch.arange(-radius, radius + 1, device=dev)
    weights = torch.exp(-0.5 * (taps.to(x.dtype) / sigma[idx, None].to(x.dtype)) ** 2)
    weights = weights / weights.sum(1, keepdim=True)  # (n, K)
    src = torch.arange(size, device=dev)[:, None] + taps  # (P, K) input index per output row and tap
    src = torch.where(src < 0, -src, torch.where(src >= size, 2 * (size - 1) - src, src))
    n = idx.numel()
    blur = torch.zeros(n, size, size, device=dev, dtype=x.dtype)
    blur.scatter_add_(2, src.expand(n, size, -1), weights[:, None, :].expand(n, size, -1))
    blur = blur[:, None]  # (n, 1, P, P), broadcast over bands
    mask = valid[idx, None].to(x.dtype)
    weight = blur @ mask @ blur.transpose(-1, -2)
    # A valid pixel keeps its own (largest) tap, so its weight is far from 0; invalid
    # pixels with no valid neighbour are zeroed by the caller.
    return x.index_copy(0, idx, (blur @ (x[idx] * mask) @ blur.transpose(-1, -2)) / weight.clamp(min=1e-6))


@torch.no_grad()
def augment_view(
    x: torch.Tensor, valid: torch.Tensor, *, config: AugmentConfig, generator: torch.Generator,
    blur_p: float, solarize_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One randomly augmented view of a batch.

    Args:
        x: ``(B, C, P, P)`` float patches, z-scored per band.
        valid: ``(B, P, P)`` bool validity mask.
        config: Augmentation strengths.
        generator: Source of all randomness, on ``x``'s device.
        blur_p: Probability that a sample is blurred.
        solarize_p: Probability that a sample is solarised.

    Returns:
        The view ``(B, C, P, P)`` (same dtype, 0 where invalid) and its bool mask.

    Raises:
        ValueError: The shapes or dtypes of ``x`` and ``valid`` do not fit, or the
            patch is not square.
    """
    if x.ndim != 4 or x.shape[-1] != x.shape[-2] or valid.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"need x (B,C,P,P) and valid (B,P,P), got {tuple(x.shape)} and {tuple(valid.shape)}")
    if not x.is_floating_point() or valid.dtype != torch.bool:
        raise ValueError(f"need float x and bool valid, got {x.dtype} and {valid.dtype}")
    b, c, dev = x.shape[0], x.shape[1], x.device
    x = torch.where(valid.unsqueeze(1), x, 0.0)
    x, valid = _geometry(x, valid, config, generator)
    x = torch.where(valid.unsqueeze(1), x, 0.0)
    x = _jitter(x, valid, config, generator)
    x = _blur(x, valid, blur_p, config, generator)
    solarize = (torch.rand(b, generator=generator, device=dev) < solarize_p)[:, None, None, None]
    if solarize_p > 0:
        t = config.solarize_threshold
        x = torch.where(solarize & (x > t), 2 * t - x, x)
    if config.noise_std > 0:
        x = x + config.noise_std * torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    if config.band_dropout > 0:
        drop = torch.rand(b, c, generator=generator, device=dev) < config.band_dropout
        drop = drop & ~drop.all(1, keepdim=True)
        x = torch.where(drop[:, :, None, None], 0.0, x)
    return torch.where(valid.unsqueeze(1), x, 0.0), valid


def make_views(
    x: torch.Tensor, valid: torch.Tensor, *, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two asymmetric BYOL views of the same batch.

    View 1 uses ``config.blur_p[0]`` and ``config.solarize_p[0]`` (1.0 and 0 by
    default), view 2 the second values (0.1 and 0.2).

    Args:
        x: ``(B, C, P, P)`` float patches, z-scored per band.
        valid: ``(B, P, P)`` bool validity mask.
        config: Augmentation strengths.
        generator: Source of all randomness, on ``x``'s device.

    Returns:
        ``(view1, valid1, view2, valid2)``.
    """
    v1, m1 = augment_view(x, valid, config=config, generator=generator,
                     blur_p=config.blur_p[0], solarize_p=config.solarize_p[0])
    v2, m2 = augment_view(x, valid, config=config, generator=generator,
                     blur_p=config.blur_p[1], solarize_p=config.solarize_p[1])
    return v1, m1, v2, m2
