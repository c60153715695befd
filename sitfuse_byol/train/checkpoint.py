"""Checkpoints: atomic writes, safe loads (``weights_only=True``), and the trained encoder.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(..., weights_only=True)`` and never runs code from the file.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sitfuse_byol.errors import ModelError
from sitfuse_byol.export.atomic import atomic_path
from sitfuse_byol.normalize import BandStats
from sitfuse_byol.read.bands import in_another_order
from sitfuse_byol.train.encoders import Encoder, create_encoder

FORMAT_VERSION = 1

#: What every checkpoint holds (see the training loop), checked on loading.
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "rng", "config", "stats", "band_names", "encoder")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({**state, "format_version": FORMAT_VERSION}, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely onto the CPU.

    Raises:
        ModelError: The file is missing, unreadable, or not one of ours.
    """
    if not path.exists():
        raise ModelError("checkpoint not found; run `sitfuse train` first", where=str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise ModelError(f"cannot read checkpoint: {_load_failure(err)}", where=str(path)) from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ModelError("not a sitfuse-byol checkpoint (or an incompatible version)", where=str(path))
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ModelError(f"incomplete checkpoint: no {', '.join(missing)}", where=str(path))
    return state


def _load_failure(err: Exception) -> str:
    """Why ``torch.load`` failed, in words: a truncated file surfaces as the zip reader's
    ``Invalid argument`` or "central directory" error, or as an ``EOFError``."""
    text = str(err).strip()
    damaged = (
        isinstance(err, EOFError)
        or (isinstance(err, OSError) and err.errno == errno.EINVAL)
        or (isinstance(err, RuntimeError) and ("central directory" in text or "zip archive" in text))
    )
    if damaged:
        return "the file is truncated or corrupt"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in text.replace(" ", "_").lower():
        # torch's own text is a page of advice (with terminal colour codes) on loading
        # the file unsafely, which is the one thing not to do with a file of unknown origin.
        return "it holds Python objects other than tensors, so it is not one of ours (it is not loaded unsafely)"
    return text.splitlines()[0] if text else type(err).__name__


def file_hash(path: Path) -> str:
    """A short SHA-256 of a file, identifying a trained model."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _checkpoint_hash_cached(path: str, mtime_ns: int) -> str:
    return file_hash(Path(path))


def checkpoint_hash(path: Path) -> str:
    """:func:`file_hash` of a checkpoint, computed once per process while the file is unchanged."""
    return _checkpoint_hash_cached(str(path.resolve()), path.stat().st_mtime_ns)


@dataclass(frozen=True)
class TrainedEncoder:
    """The online encoder of a checkpoint, ready for inference.

    Attributes:
        encoder: The encoder in eval mode, channels-last, on the device it was loaded to.
        stats: The normalization statistics it was trained with.
        band_names: The bands it expects, in order.
        checkpoint_hash: Identifies the checkpoint (clustering models record it).
    """

    encoder: Encoder
    stats: BandStats
    band_names: tuple[str, ...]
    checkpoint_hash: str

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def check_bands(self, band_names: Sequence[str], *, where: str) -> None:
        """Refuse a scene whose band count differs from the training data's, or whose
        bands are the training bands in another order."""
        if len(band_names) != len(self.band_names):
            raise ModelError(
                f"the model was trained on {len(self.band_names)} bands "
                f"({', '.join(self.band_names)}) but this scene has {len(band_names)}",
                where=where,
            )
        if in_another_order(band_names, self.band_names):
            raise ModelError(
                f"the scene's bands ({', '.join(band_names)}) are the model's ({', '.join(self.band_names)}) "
                "in another order; list them in data.bands to read them in the model's order",
                where=where,
            )


def build_encoder(spec: dict[str, Any]) -> Encoder:
    """Build the encoder an encoder spec describes, with fresh weights.

    Training builds its encoder from the spec it then stores in the checkpoint
    (``state["encoder"]``), and loading rebuilds it from there, both through
    this function, so the two constructions cannot drift apart.

    Args:
        spec: ``{"name", "in_channels", "norm", "kwargs"}``, ``norm`` already
            resolved to ``"batch"`` or ``"group"``.

    Returns:
        The encoder, in training mode.
    """
    return create_encoder(
        spec["name"], in_channels=spec["in_channels"], norm=spec["norm"], **spec["kwargs"]
    )


@functools.lru_cache(maxsize=4)
def _load_encoder_cached(path: str, mtime_ns: int, device: str) -> TrainedEncoder:
    state = load_checkpoint(Path(path))
    encoder = build_encoder(state["encoder"])
    prefix = "online.encoder."
    weights = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as err:  # missing, unexpected or misshapen weights
        raise ModelError(
            f"the checkpoint's weights do not fit its encoder: {str(err).splitlines()[0]}", where=path
        ) from err
    encoder.eval().requires_grad_(False)
    # Inference feeds channels-last blocks (see sitfuse_byol.embed.dense); weights in the
    # same layout spare oneDNN (and cuDNN) a reorder per call.
    encoder = encoder.to(device=torch.device(device), memory_format=torch.channels_last)  # type: ignore[call-overload]
    return TrainedEncoder(
        encoder=encoder,
        stats=BandStats.from_dict(state["stats"]),
        band_names=tuple(state["band_names"]),
        checkpoint_hash=checkpoint_hash(Path(path)),
    )


def load_encoder(path: Path, *, device: torch.device | str = "cpu") -> TrainedEncoder:
    """The trained encoder of a checkpoint on ``device``; loaded once per process and device
    (Dask workers reuse it)."""
    if not path.exists():
        raise ModelError("checkpoint not found; run `sitfuse train` first", where=str(path))
    return _load_encoder_cached(str(path.resolve()), path.stat().st_mtime_ns, str(torch.device(device)))
