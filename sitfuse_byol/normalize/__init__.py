"""Normalize: per-band statistics over the valid pixels of all scenes."""

from sitfuse_byol.normalize.stats import BandStats, compute_stats

__all__ = ["BandStats", "compute_stats"]
