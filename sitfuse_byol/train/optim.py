"""Optimizers and learning-rate schedule for BYOL training.

BYOL's recipe is LARS (lr 0.2 x batch/256, weight decay 1.5e-6) with biases
and normalisation parameters excluded from both weight decay and the LARS
trust ratio, a linear warm-up and a cosine decay; AdamW at lr 3e-4 to 1e-3
works for small runs. Gradient clipping, if any, is the caller's job.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from sitfuse_byol.errors import ConfigError

__all__ = ["LARS", "OPTIMIZERS", "create_optimizer", "param_groups", "warmup_cosine"]

OPTIMIZERS = ("adamw", "lars")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    One-dimensional parameters (biases, BatchNorm/GroupNorm scales and shifts)
    get no weight decay and are flagged ``lars_exclude`` so LARS does not adapt
    them either. Frozen parameters (such as BYOL's target network) are left
    out entirely, so an optimizer built from the groups can never touch them.

    Args:
        model: The model to optimise.
        weight_decay: Weight decay of the decayed group.

    Returns:
        Parameter groups for a ``torch.optim`` optimizer; empty groups are dropped.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as used by BYOL.

    Per parameter ``p`` with gradient ``g``:
    ``u = g + wd * p``; unless excluded, ``u *= eta * ||p|| / ||u||`` (left
    unscaled when either norm is 0); ``v = momentum * v + u``; ``p -= lr * v``.
    A group is excluded from the trust ratio when its ``lars_exclude`` key is
    true or, lacking that key, when its weight decay is 0.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        weight_decay: Default weight decay.
        momentum: Momentum coefficient.
        eta: Trust coefficient.
    """

    def __init__(
        self, params: Iterable[Any], lr: float, *, weight_decay: float = 0.0,
        momentum: float = 0.9, eta: float = 0.001,
    ) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "eta": eta})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            exclude = group.get("lars_exclude", group["weight_decay"] == 0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if not exclude:
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (p_norm > 0) & (u_norm > 0), group["eta"] * p_norm / u_norm, 1.0
                    )
                    update.mul_(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def default_lr(name: str, *, global_batch: int) -> float:
    """The peak learning rate when ``train.lr`` is null: BYOL's LARS rule, 0.2 x the
    global batch / 256, or 1e-3 for AdamW (an AdamW rate would barely move LARS, whose
    steps are relative to each weight's norm)."""
    return 0.2 * global_batch / 256 if name == "lars" else 1e-3


def create_optimizer(
    name: str, params: Iterable[Any], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Build ``"adamw"`` or ``"lars"``.

    Args:
        name: Optimizer name.
        params: Parameters or groups, usually from :func:`param_groups`.
        lr: Base learning rate (BYOL LARS: 0.2 x batch / 256; AdamW: 3e-4 to 1e-3).
        weight_decay: Default weight decay for groups that do not set their own.

    Raises:
        ConfigError: Unknown name, or a non-positive lr or negative weight decay.
    """
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name, OPTIMIZERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ConfigError(f"unknown optimizer {name!r}{hint} Use one of: {', '.join(OPTIMIZERS)}",
                          where="train.optimizer")
    if not lr > 0:
        raise ConfigError(f"learning rate must be positive, got {lr}", where="train.lr")
    if not weight_decay >= 0:
        raise ConfigError(f"weight decay must be >= 0, got {weight_decay}", where="train.weight_decay")
    if name == "lars":
        return LARS(params, lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the base lr, then cosine decay to 0 at ``total_steps``.

    The factor is ``k / warmup_steps`` for step ``k < warmup_steps`` (0 at the
    first step, as in BYOL's code), ``(1 + cos(pi (k - W) / (K - W))) / 2``
    afterwards, and 0 past ``total_steps``. Call ``scheduler.step()`` after
    every ``optimizer.step()``.

    Raises:
        ConfigError: ``total_steps`` is not positive or ``warmup_steps`` not in
            ``[0, total_steps)``.
    """
    if total_steps <= 0:
        raise ConfigError(f"total steps must be positive, got {total_steps}", where="train.steps")
    if not 0 <= warmup_steps < total_steps:
        raise ConfigError(f"warm-up steps must be in [0, {total_steps}), got {warmup_steps}",
                          where="train.warmup_steps")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
