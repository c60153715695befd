"""Tests for the encoder registry, the encoders and masked average pooling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sitfuse_byol.errors import ConfigError, ModelError
from sitfuse_byol.train.encoders import (
    Encoder,
    TrackedGroupNorm,
    WSConv2d,
    create_encoder,
    list_encoders,
    masked_avg_pool,
)


def test_registry_lists_required_encoders() -> None:
    assert {"small_cnn", "resnet18", "resnet34", "resnet50"} <= set(list_encoders())


@pytest.mark.parametrize("name", list_encoders())
@pytest.mark.parametrize("bands", [6, 13])
def test_every_encoder_builds_and_keeps_resolution(name: str, bands: int) -> None:
    enc = create_encoder(name, in_channels=bands, norm="batch").eval()
    assert isinstance(enc, Encoder)
    assert enc.stride <= 4
    # 11 divides by no stride > 1: the output must still be ceil(H / stride).
    for size in (11, 16):
        out = enc(torch.randn(2, bands, size, size))
        side = math.ceil(size / enc.stride)
        assert out.shape == (2, enc.out_channels, side, side)


def test_resnet_output_channels() -> None:
    assert create_encoder("resnet18", in_channels=6).out_channels == 512
    assert create_encoder("resnet50", in_channels=6, width=16).out_channels == 16 * 8 * 4


def _norm_kinds(enc: nn.Module) -> set[type]:
    return {type(m) for m in enc.modules() if isinstance(m, nn.BatchNorm2d | nn.GroupNorm)}


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_auto_norm_follows_batch_size(name: str) -> None:
    small = create_encoder(name, in_channels=6, batch_size=8)
    assert _norm_kinds(small) == {TrackedGroupNorm}
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, WSConv2d) for m in convs)
    large = create_encoder(name, in_channels=6, batch_size=128)
    assert _norm_kinds(large) == {nn.BatchNorm2d}
    assert not any(isinstance(m, WSConv2d) for m in large.modules())
    assert _norm_kinds(create_encoder(name, in_channels=6)) == {nn.BatchNorm2d}


def test_group_norm_groups_divide_channels() -> None:
    enc = create_encoder("small_cnn", in_channels=6, norm="group", width=48, out_channels=100)
    for m in enc.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and m.num_groups <= 32
    assert {m.num_groups for m in enc.modules() if isinstance(m, nn.GroupNorm)} == {24, 25}


def test_weight_standardisation_normalises_filters() -> None:
    conv = WSConv2d(3, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(7).add_(3)
    x = torch.randn(1, 3, 5, 5)
    w = conv.weight
    w_std = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True, correction=0)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, w_std, padding=1), atol=1e-4, rtol=1e-4)


def test_unknown_encoder_suggests_close_name() -> None:
    with pytest.raises(ConfigError) as err:
        create_encoder("resnet19", in_channels=6)
    assert err.value.where == "train.encoder"
    assert "did you mean 'resnet18'" in str(err.value)
    assert "small_cnn" in str(err.value)


def test_bad_norm_and_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="norm"):
        create_encoder("small_cnn", in_channels=6, norm="layer")
    with pytest.raises(ConfigError) as err:
        create_encoder("small_cnn", in_channels=6, widht=32)
    assert err.value.where == "train.encoder_args.widht"
    with pytest.raises(ConfigError):
        create_encoder("small_cnn", in_channels=0)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [("small_cnn", "width", -3), ("small_cnn", "width", "abc"), ("small_cnn", "depth", 2.5),
     ("small_cnn", "out_channels", True), ("resnet18", "width", 0)],
)
def test_encoder_sizes_must_be_positive_integers(name: str, option: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        create_encoder(name, in_channels=6, norm="batch", **{option: value})
    assert str(err.value) == f"must be a positive integer (got {value!r}) (train.encoder_args.{option})"


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("small_cnn", {}), ("small_cnn", {"stride": 2, "depth": 5}), ("resnet18", {"width": 8})],
)


def test_receptive_field_is_exact(name: str, kwargs: dict[str, int]) -> None:
    torch.manual_seed(0)
    enc = create_encoder(name, in_channels=3, norm="batch", **kwargs).double().eval()
    s, r = enc.stride, enc.receptive_field
    size = 2 * r + 4 * s + 8
    pix = r + 2 * s  # (pix - r) divides by s, so some output sits exactly r away
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    y = x.clone()
    y[0, :, pix, pix] += 100.0
    with torch.no_grad():
        changed = (enc(x) - enc(y)).abs().amax(dim=(0, 1)) > 1e-9
    rows, cols = torch.nonzero(changed, as_tuple=True)
    dist = torch.maximum((rows * s - pix).abs(), (cols * s - pix).abs())
    assert dist.max().item() == r


@pytest.fixture
def features() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 5, 4, 4)


def test_masked_avg_pool_ignores_invalid_pixels(features: torch.Tensor) -> None:
    valid = torch.rand(3, 4, 4) > 0.5
    valid[:, 0, 0] = True
    poisoned = features.masked_fill(~valid.unsqueeze(1), 1e30)
    pooled = masked_avg_pool(poisoned, valid, stride=1)
    expected = torch.stack([features[i][:, valid[i]].mean(1) for i in range(3)])
    torch.testing.assert_close(pooled, expected)


def test_masked_avg_pool_all_valid_is_mean(features: torch.Tensor) -> None:
    pooled = masked_avg_pool(features, torch.ones(3, 4, 4, dtype=torch.bool), stride=1)
    torch.testing.assert_close(pooled, features.mean((2, 3)))


def test_masked_avg_pool_no_valid_pixel_falls_back_to_mean(features: torch.Tensor) -> None:
    valid = torch.ones(3, 4, 4, dtype=torch.bool)
    valid[1] = False
    pooled = masked_avg_pool(features, valid, stride=1)
    torch.testing.assert_close(pooled, features.mean((2, 3)))


def test_masked_avg_pool_downsamples_by_majority(features: torch.Tensor) -> None:
    # 14 px at stride 4 -> 4 feature px; the last covers only input rows/cols 12-13.
    valid = torch.zeros(3, 14, 14, dtype=torch.bool)
    valid[:, :2, :4] = True  # half of feature pixel (0, 0): valid
    valid[:, 4:5, 4:8] = True  # a quarter of feature pixel (1, 1): invalid
    valid[:, 12, 12:14] = True  # half of the 2x2 edge feature pixel (3, 3): valid
    pooled = masked_avg_pool(features, valid, stride=4)
    expected = (features[:, :, 0, 0] + features[:, :, 3, 3]) / 2
    torch.testing.assert_close(pooled, expected)


def test_masked_avg_pool_rejects_wrong_stride(features: torch.Tensor) -> None:
    with pytest.raises(ModelError, match="stride"):
        masked_avg_pool(features[:, :, :3, :3], torch.ones(3, 9, 9, dtype=torch.bool), stride=2)
    with pytest.raises(ModelError):
        masked_avg_pool(features, torch.ones(3, 9, 9, dtype=torch.bool), stride=2)


def test_tracked_group_norm_trains_like_group_norm_and_infers_locally() -> None:
    torch.manual_seed(0)
    tracked, plain = TrackedGroupNorm(4, 16), nn.GroupNorm(4, 16)
    x = torch.randn(8, 16, 10, 10) * 3 + 1
    torch.testing.assert_close(tracked(x), plain(x))
    assert not torch.allclose(tracked.running_mean, torch.zeros(4))
    tracked.eval()
    # In eval mode each pixel is normalized alone: a crop gives the crop of the output.
    torch.testing.assert_close(tracked(x)[..., 2:5, 3:7], tracked(x[..., 2:5, 3:7]))


@pytest.mark.parametrize("channels_last", [False, True])
def test_tracked_group_norm_running_stats_match_var_mean(channels_last: bool) -> None:
    # The running statistics come from the normalisation kernel; they must be the
    # biased per-group variance and mean of the input, averaged over the batch.
    torch.manual_seed(0)
    layer = TrackedGroupNorm(4, 16, momentum=0.3)
    plain = nn.GroupNorm(4, 16)
    with torch.no_grad():
        layer.running_mean.fill_(0.5)
        # From 0, so the running variance is 0.3 x the batch's and a small one is not hidden.
        layer.running_var.fill_(0.0)
        for norm in (layer, plain):
            norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
            norm.bias.copy_(torch.linspace(-1.0, 1.0, 16))
    x = torch.randn(8, 16, 10, 10) * 3 + 1
    x[:, :4] = 7.0  # a constant group: variance 0, never negative
    x[:, 4:8] = 1e-2 * torch.randn(8, 4, 10, 10)  # variance 1e-4: an eps slip would show
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = layer(x)
    var, mean = torch.var_mean(x.detach().reshape(8, 4, -1), dim=2, correction=0)
    torch.testing.assert_close(layer.running_mean, torch.full((4,), 0.5).lerp(mean.mean(0), 0.3))
    torch.testing.assert_close(layer.running_var, 0.3 * var.mean(0), rtol=1e-5, atol=1e-10)
    assert (layer.running_var >= 0).all()
    # Output and gradients are those of plain GroupNorm, exactly.
    grad = torch.randn(out.shape)
    (g_layer,) = torch.autograd.grad(out, x, grad)
    expected = plain(x)
    (g_plain,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(out, expected)
    assert torch.equal(g_layer, g_plain)


def test_masked_avg_pool_gradient_is_exact() -> None:
    torch.manual_seed(0)
    features = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(3, 8, 8) > 0.4
    valid[2] = False  # the plain-mean fallback needs its gradient too
    assert torch.autograd.gradcheck(lambda f: masked_avg_pool(f, valid, stride=2), (features,))
    grad, = torch.autograd.grad(masked_avg_pool(features, valid, stride=2).sum(), features)
    assert grad.is_contiguous()  # NCHW, as the encoder's backward expects
