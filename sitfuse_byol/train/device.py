"""Device choice and the CUDA niceties (bf16 autocast, channels_last, pinned copies)."""

from __future__ import annotations

import contextlib
import ctypes

import torch

from sitfuse_byol.errors import ConfigError


def resolve_device(name: str, *, where: str = "--device") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but torch sees no CUDA GPU", where=where)
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda", where=where)
    return torch.device(name)


def keep_freed_heap() -> None:
    """Stop glibc returning freed heap to the OS after every step (Linux only, best effort).

    Each BYOL step frees and reallocates the same large activations; glibc's defaults
    hand them back and page-fault them in again, which cost about 20% of a CPU step.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(tensor: torch.Tensor, device: torch.device, *, image: bool = False) -> torch.Tensor:
    """Copy a host tensor to ``device``: pinned and non-blocking on CUDA, channels_last for images."""
    if device.type != "cuda":
        return tensor
    out = tensor.pin_memory().to(device, non_blocking=True)
    return out.contiguous(memory_format=torch.channels_last) if image else out
