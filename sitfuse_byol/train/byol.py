"""Bootstrap Your Own Latent (Grill et al. 2020, arXiv:2006.07733) in one module.

Online network: encoder -> masked average pool -> projector -> predictor.
Target network: a separate deep copy of encoder + projector, never optimised,
moved towards the online weights by an exponential moving average whose rate
τ follows a cosine schedule from ``tau_base`` to 1.

Choices where the paper leaves room:

* **Target BatchNorm** follows the module's mode, as in the official code:
  during training it normalises with the statistics of its own batch. Its
  running buffers are *copied* from the online network at every
  :meth:`BYOL.update_target` (``num_batches_tracked`` too), so they are always
  the best available estimate should the target ever run in eval mode.
* **BatchNorm per view**: each view goes through the networks on its own, so
  batch statistics never mix the two views (as in the official code).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from sitfuse_byol.errors import ConfigError
from sitfuse_byol.train.encoders import Encoder, masked_avg_pool

__all__ = ["BYOL", "BYOLOutput", "MLPHead", "embedding_stats", "loss_fn", "tau_schedule"]


class MLPHead(nn.Sequential):
    """Projector / predictor: Linear - BatchNorm1d - ReLU - Linear.

    Args:
        in_dim: Input features.
        hidden: Hidden width (4096 in the paper; a few hundred is enough on CPU).
        out: Output features (256 in the paper).
    """

    def __init__(self, in_dim: int, hidden: int = 4096, out: int = 256) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out),
        )


@dataclass(frozen=True)
class BYOLOutput:
    """What one :meth:`BYOL.forward` returns.

    Attributes:
        loss: Scalar symmetric BYOL loss, in [0, 8]; backpropagate this.
        online_embedding: Detached ``(B, D)`` pooled encoder output of view 1,
            the representation that is later clustered.
        online_projection: Detached ``(B, projection_dim)`` projection of view 1,
            the one the training loop feeds to :func:`embedding_stats` to watch
            for collapse.
    """

    loss: torch.Tensor
    online_embedding: torch.Tensor
    online_projection: torch.Tensor


def loss_fn(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample BYOL regression loss ``2 - 2 cos(p, z)``, in [0, 4].

    Args:
        p: ``(B, K)`` online predictions.
        z: ``(B, K)`` target projections.

    Returns:
        ``(B,)`` losses.
    """
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1)


def tau_schedule(step: int, total_steps: int, tau_base: float) -> float:
    """EMA rate at an optimizer step: ``1 - (1 - τ_base)(cos(π k/K) + 1)/2``.

    τ is ``tau_base`` at step 0 and rises to 1 at ``total_steps``; steps past
    the end stay at 1.

    Args:
        step: The optimizer step k, counted from 0.
        total_steps: Steps K of the whole run.
        tau_base: EMA rate at step 0 (0.996 for long runs, 0.99 for short).

    Raises:
        ConfigError: ``total_steps`` is not positive, or ``tau_base`` is outside [0, 1].
    """
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be positive, got {total_steps}", where="train.steps")
    if not 0.0 <= tau_base <= 1.0:
        raise ConfigError(f"tau_base must be in [0, 1], got {tau_base}", where="train.tau_base")
    k = min(max(step, 0), total_steps)
    return 1 - (1 - tau_base) * (math.cos(math.pi * k / total_steps) + 1) / 2


class BYOL(nn.Module):
    """Online and target networks with the symmetric BYOL loss.

    The EMA rate is the caller's: pass :func:`tau_schedule`'s value to
    :meth:`update_target` after every optimizer step.

    Args:
        encoder: The online encoder; its deep copy becomes the target encoder.
        projector_hidden: Hidden width of the projector.
        projection_dim: Output width of projector and predictor.
        predictor_hidden: Hidden width of the predictor.
    """

    def __init__(
        self, encoder: Encoder, *, projector_hidden: int = 4096, projection_dim: int = 256,
        predictor_hidden: int = 4096,
    ) -> None:
        super().__init__()
        self.online = nn.ModuleDict({
            "encoder": encoder,
            "projector": MLPHead(encoder.out_channels, hidden=projector_hidden, out=projection_dim),
        })
        self.predictor = MLPHead(projection_dim, hidden=predictor_hidden, out=projection_dim)
        # A separate copy: sharing modules with the online side makes the EMA a no-op.
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    @property
    def encoder(self) -> Encoder:
        """The online encoder, the one to keep for inference."""
        return cast(Encoder, self.online["encoder"])

    def _embed(self, net: nn.ModuleDict, view: torch.Tensor, valid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = cast(Encoder, net["encoder"])
        pooled = masked_avg_pool(encoder(view), valid, stride=encoder.stride)
        return pooled, net["projector"](pooled)

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, valid1: torch.Tensor, valid2: torch.Tensor
    ) -> BYOLOutput:
        """Compute the symmetric loss for two augmented views of the same patches.

        Args:
            view1: ``(B, C, P, P)`` first view.
            view2: ``(B, C, P, P)`` second view.
            valid1: ``(B, P, P)`` bool validity of ``view1``'s pixels.
            valid2: ``(B, P, P)`` bool validity of ``view2``'s pixels.

        Returns:
            The batch-mean of ``loss_fn(p1, z2) + loss_fn(p2, z1)`` and detached
            view-1 embeddings for monitoring.

        Raises:
            ConfigError: The batch holds fewer than 2 patches.
        """
        if view1.shape[0] < 2:
            raise ConfigError(
                "BYOL needs a batch of at least 2 patches (BatchNorm and the loss are undefined for one)",
                where="train.batch_size",
            )
        # Target first: its activations are freed before the online graphs are
        # built, which keeps peak memory and (on CPU) allocator churn down; the
        # two sides are independent, so the result is the same in either order.
        with torch.no_grad():
            _, t1 = self._embed(self.target, view1, valid1)
            _, t2 = self._embed(self.target, view2, valid2)
        y1, z1 = self._embed(self.online, view1, valid1)
        _, z2 = self._embed(self.online, view2, valid2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = (loss_fn(p1, t2) + loss_fn(p2, t1)).mean()
        return BYOLOutput(loss=loss, online_embedding=y1.detach(), online_projection=z1.detach())

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """Move the target towards the online network: ``θ_t ← τ θ_t + (1 - τ) θ_o``.

        Buffers (BatchNorm running mean, variance and ``num_batches_tracked``)
        are copied from the online network rather than averaged.

        Args:
            tau: EMA rate in [0, 1], usually from :func:`tau_schedule`.

        Raises:
            ValueError: ``tau`` is outside [0, 1].
        """
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        target_params: list[torch.Tensor] = list(self.target.parameters())
        online_params: list[torch.Tensor] = list(self.online.parameters())
        # lerp(t, o, 1 - τ) = t + (1 - τ)(o - t) = τ t + (1 - τ) o, fused over all tensors.
        torch._foreach_lerp_(target_params, online_params, 1.0 - tau)
        target_buffers = list(self.target.buffers())
        if target_buffers:
            torch._foreach_copy_(target_buffers, list(self.online.buffers()))


@torch.no_grad()
def embedding_stats(z: torch.Tensor) -> dict[str, float]:
    """Collapse diagnostics of a batch of embeddings.

    Args:
        z: ``(B, D)`` embeddings, B >= 2.

    Returns:
        ``std_sqrt_d``: mean over dimensions of the per-dimension standard
        deviation of the L2-normalised embeddings, times sqrt(D); about 1 for
        embeddings spread over the sphere, near 0 when collapsed to a point.
        ``effective_rank``: exp of the entropy of the normalised singular
        values (Roy & Vetterli 2007), between 1 (collapsed to one direction)
        and min(B, D).
    """
    z = F.normalize(z.double(), dim=1)
    std = z.std(dim=0).mean().item() * math.sqrt(z.shape[1])
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum().item()
    return {"std_sqrt_d": std, "effective_rank": math.exp(entropy)}
