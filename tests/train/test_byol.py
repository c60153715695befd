"""Tests for the BYOL model, its EMA target, loss and collapse diagnostics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sitfuse_byol.errors import ConfigError
from sitfuse_byol.train.augment import AugmentConfig, make_views
from sitfuse_byol.train.byol import BYOL, MLPHead, embedding_stats, loss_fn, tau_schedule
from sitfuse_byol.train.encoders import create_encoder
from sitfuse_byol.train.optim import create_optimizer, param_groups


def _model(norm: str = "batch", seed: int = 0) -> BYOL:
    torch.manual_seed(seed)
    enc = create_encoder("small_cnn", in_channels=4, norm=norm, width=16, out_channels=32)
    return BYOL(enc, projector_hidden=64, projection_dim=16, predictor_hidden=64)


def _batch(b: int = 8, p: int = 9) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(b, 4, p, p, generator=g), torch.randn(b, 4, p, p, generator=g)
    valid = torch.ones(b, p, p, dtype=torch.bool)
    return x1, x2, valid, valid.clone()


def test_tau_schedule_endpoints() -> None:
    assert tau_schedule(0, 100, 0.996) == pytest.approx(0.996)
    assert tau_schedule(50, 100, 0.996) == pytest.approx(1 - 0.004 / 2)
    assert tau_schedule(100, 100, 0.996) == pytest.approx(1.0)
    assert tau_schedule(150, 100, 0.996) == pytest.approx(1.0)
    taus = [tau_schedule(k, 10, 0.99) for k in range(11)]
    assert taus == sorted(taus)
    with pytest.raises(ConfigError):
        tau_schedule(0, 0, 0.99)


def test_mlp_head_shape_and_layers() -> None:
    head = MLPHead(32, hidden=64, out=16)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(5, 32)).shape == (5, 16)


def test_target_is_a_separate_frozen_copy() -> None:
    model = _model()
    online = {p.data_ptr() for p in model.online.parameters()} | {
        p.data_ptr() for p in model.predictor.parameters()
    }
    target = {p.data_ptr() for p in model.target.parameters()}
    assert target and online.isdisjoint(target)
    assert not any(p.requires_grad for p in model.target.parameters())
    for p_t, p_o in zip(model.target.parameters(), model.online.parameters(), strict=True):
        torch.testing.assert_close(p_t, p_o)  # starts as an exact copy


def test_backward_leaves_target_without_grad_and_optimizer_excludes_it() -> None:
    model = _model()
    model(*_batch()).loss.backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert all(p.grad is not None for p in model.online.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    opt = create_optimizer("adamw", param_groups(model, 1e-4), lr=1e-3, weight_decay=1e-4)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt.isdisjoint({id(p) for p in model.target.parameters()})
    assert len(in_opt) == len(list(model.online.parameters())) + len(list(model.predictor.parameters()))
    # Online network, then predictor: the order a checkpoint's optimizer state is keyed by,
    # the same as when the optimizer was built from those two modules alone.
    order = [id(p) for g in opt.param_groups for p in g["params"]]
    heads = nn.ModuleList([model.online, model.predictor])
    assert order == [id(p) for g in param_groups(heads, 1e-4) for p in g["params"]]


def test_update_target_is_the_ema_and_copies_bn_buffers() -> None:
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(*_batch()).loss.backward()
    opt.step()
    with torch.no_grad():
        for b in model.online.buffers():
            b.add_(torch.ones_like(b))  # make online BN buffers differ from the target's
    assert not any(torch.equal(b_t, b_o) for b_t, b_o in zip(
        model.target.buffers(), model.online.buffers(), strict=True))
    old = [p.clone() for p in model.target.parameters()]
    tau = 0.9
    model.update_target(tau)
    for new, before, online in zip(model.target.parameters(), old, model.online.parameters(),
                                   strict=True):
        torch.testing.assert_close(new, tau * before + (1 - tau) * online)
    moved = [not torch.equal(b, o) for b, o in zip(old, model.target.parameters(), strict=True)]
    assert all(moved)
    for (name, b_t), b_o in zip(model.target.named_buffers(), model.online.buffers(), strict=True):
        assert torch.equal(b_t, b_o), name
    assert any(n.endswith("num_batches_tracked") for n, _ in model.target.named_buffers())


def test_update_target_rejects_bad_tau() -> None:
    with pytest.raises(ValueError):
        _model().update_target(1.5)
    with pytest.raises(ConfigError, match="tau_base"):
        tau_schedule(0, 10, 2.0)


def test_loss_fn_values() -> None:
    v = torch.randn(6, 16)
    torch.testing.assert_close(loss_fn(v, 3 * v), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_fn(v, -v), torch.full((6,), 4.0))
    orthogonal = loss_fn(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    torch.testing.assert_close(orthogonal, torch.tensor([2.0]))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_loss_is_symmetric_in_the_views(norm: str) -> None:
    model = _model(norm)
    model.update_target(0.5)  # make target differ from online, else symmetry is trivial
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x1, x2, m1, m2 = _batch()
    m2[:, :3] = False
    a, b = model(x1, x2, m1, m2).loss, model(x2, x1, m2, m1).loss
    torch.testing.assert_close(a, b)
    assert 0 < a.item() < 8


def test_batch_of_one_is_refused() -> None:
    x1, x2, m1, m2 = _batch(b=1)
    with pytest.raises(ConfigError) as err:
        _model()(x1, x2, m1, m2)
    assert err.value.where == "train.batch_size"
    assert "at least 2" in str(err.value)


def test_output_exposes_detached_embeddings() -> None:
    out = _model()(*_batch())
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert out.online_embedding.shape == (8, 32) and not out.online_embedding.requires_grad
    assert out.online_projection.shape == (8, 16) and not out.online_projection.requires_grad


def test_embedding_stats_separate_healthy_from_collapsed() -> None:
    torch.manual_seed(0)
    healthy = embedding_stats(torch.randn(512, 32))
    assert healthy["std_sqrt_d"] == pytest.approx(1.0, abs=0.1)
    assert healthy["effective_rank"] > 25
    collapsed = embedding_stats(torch.ones(512, 32) + 1e-4 * torch.randn(512, 32))
    assert collapsed["std_sqrt_d"] < 0.01
    assert collapsed["effective_rank"] < 1.5


def _structured_patches(g: torch.Generator, spectra: torch.Tensor, b: int, p: int) -> torch.Tensor:
    """Noisy patches split by a random vertical edge into two of the given spectra."""
    k = spectra.shape[0]
    left, right = torch.randint(0, k, (2, b, 1, 1), generator=g)
    cut = torch.randint(2, p - 2, (b, 1, 1), generator=g)
    label = torch.where(torch.arange(p).view(1, 1, p) < cut, left, right).expand(b, p, p)
    x = spectra[label].permute(0, 3, 1, 2)
    return x + 0.3 * torch.randn(x.shape, generator=g)


def test_training_smoke_lowers_loss_without_collapse() -> None:
    torch.manual_seed(0)
    c, p, b, steps = 6, 9, 32, 30
    enc = create_encoder("small_cnn", in_channels=c, batch_size=128, width=32, out_channels=64)
    model = BYOL(enc, projector_hidden=256, projection_dim=64, predictor_hidden=256)
    opt = create_optimizer("adamw", param_groups(model, 1e-4), lr=1e-3, weight_decay=1e-4)
    cfg = AugmentConfig()
    g = torch.Generator().manual_seed(0)
    spectra = torch.randn(2, c, generator=g)  # two classes
    valid = torch.ones(b, p, p, dtype=torch.bool)
    losses = []
    for step in range(steps):
        x = _structured_patches(g, spectra, b, p)
        v1, m1, v2, m2 = make_views(x, valid, config=cfg, generator=g)
        out = model(v1, v2, m1, m2)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.update_target(tau_schedule(step, steps, 0.99))
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    model.eval()
    with torch.no_grad():
        x = _structured_patches(g, spectra, 256, p)
        everywhere = torch.ones(256, p, p, dtype=torch.bool)
        out = model(x, x, everywhere, everywhere)
    stats = embedding_stats(out.online_embedding)
    assert stats["std_sqrt_d"] > 0.1
    assert stats["effective_rank"] > 2
