"""Tests for parameter groups, LARS and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sitfuse_byol.errors import ConfigError
from sitfuse_byol.train.optim import LARS, create_optimizer, default_lr, param_groups, warmup_cosine


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    net[0].requires_grad_(False).weight.requires_grad_(True)  # only the conv bias is frozen
    return net


def test_param_groups_exclude_biases_norms_and_frozen() -> None:
    net = _net()
    groups = {g["weight_decay"]: g for g in param_groups(net, 0.05)}
    decayed = {id(p) for p in groups[0.05]["params"]}
    plain = {id(p) for p in groups[0.0]["params"]}
    assert decayed == {id(net[0].weight), id(net[4].weight)}
    assert plain == {id(net[1].weight), id(net[1].bias), id(net[4].bias)}
    assert groups[0.0]["lars_exclude"] and not groups[0.05]["lars_exclude"]


@pytest.mark.parametrize("name", ["adamw", "lars"])
def test_optimizers_step_and_change_params(name: str) -> None:
    net = _net()
    opt = create_optimizer(name, param_groups(net, 1e-4), lr=0.1, weight_decay=1e-4)
    before = [p.clone() for p in net.parameters()]
    net(torch.randn(4, 3, 3, 3)).square().sum().backward()
    opt.step()
    after = list(net.parameters())
    assert not torch.equal(before[0], after[0])  # conv weight
    assert torch.equal(before[1], after[1])  # frozen conv bias
    assert not torch.equal(before[-1], after[-1])  # linear bias


def test_lars_update_matches_the_formula() -> None:
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
               lr=2.0, eta=0.01)
    w.grad = torch.tensor([0.0, 1.0])
    b.grad = torch.tensor([0.5])
    opt.step()
    update = torch.tensor([0.0, 1.0]) + 0.1 * torch.tensor([3.0, 4.0])
    trust = 0.01 * 5.0 / update.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 2.0 * trust * update)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 2.0 * 0.5]))  # not adapted
    w.grad = torch.zeros(2)
    b.grad = torch.zeros(1)
    opt.step()  # momentum 0.9 carries the previous update on
    torch.testing.assert_close(b.detach(), torch.tensor([0.0 - 2.0 * 0.9 * 0.5]))


def test_unknown_optimizer_and_bad_values() -> None:
    params = list(_net().parameters())
    with pytest.raises(ConfigError, match="did you mean 'lars'"):
        create_optimizer("lasr", params, lr=0.1, weight_decay=0.0)
    with pytest.raises(ConfigError) as err:
        create_optimizer("adamw", params, lr=0.0, weight_decay=0.0)
    assert err.value.where == "train.lr"
    with pytest.raises(ConfigError):
        create_optimizer("adamw", params, lr=0.1, weight_decay=-1.0)


def test_warmup_cosine_lr_at_key_steps() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.8)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.4)
    assert lrs[10] == pytest.approx(0.8)
    assert lrs[60] == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)
    assert lrs[119] == pytest.approx(0.0, abs=1e-12)
    assert lrs[10:111] == sorted(lrs[10:111], reverse=True)


def test_warmup_cosine_rejects_bad_steps() -> None:
    opt = torch.optim.SGD(_net().parameters(), lr=0.1)
    with pytest.raises(ConfigError):
        warmup_cosine(opt, warmup_steps=10, total_steps=10)
    with pytest.raises(ConfigError):
        warmup_cosine(opt, warmup_steps=0, total_steps=0)


def test_default_lr_follows_byol_for_lars_and_is_1e3_for_adamw() -> None:
    assert default_lr("lars", global_batch=256) == pytest.approx(0.2)
    assert default_lr("lars", global_batch=2 * 64) == pytest.approx(0.1)
    assert default_lr("adamw", global_batch=4096) == pytest.approx(1e-3)
