"""Per-epoch training metrics: ``metrics.csv`` and ``curves.png``."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from sitfuse_byol.export.atomic import atomic_path, atomic_write_text

COLUMNS = (
    "epoch",
    "step",
    "loss",
    "tau",
    "lr",
    "std_sqrt_d",
    "effective_rank",
    "patches_per_s",
    "data_wait",
    "seconds",
)
# Below this the embeddings have (nearly) collapsed onto one point: std·√d is about 1
# for embeddings spread over the sphere and tends to 0 at collapse.
COLLAPSE_STD = 0.1


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        # Counters stay integers, so a resumed run rewrites its earlier rows as they were.
        return [
            {k: int(v) if k in ("epoch", "step") else float(v) for k, v in row.items()} for row in csv.DictReader(f)
        ]


def write_metrics(path: Path, rows: Sequence[dict[str, float]]) -> None:
    """Rewrite the whole CSV atomically, so a resumed run never duplicates epochs."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def plot_curves(path: Path, rows: Sequence[dict[str, float]]) -> None:
    """Loss, τ, embedding std·√d and effective rank against epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 6), dpi=100)
    FigureCanvasAgg(figure)
    epochs = [r["epoch"] for r in rows]
    panels = [
        ("loss", "BYOL loss"),
        ("tau", "target EMA τ"),
        ("std_sqrt_d", "embedding std·√d (collapse → 0)"),
        ("effective_rank", "effective rank"),
    ]
    for i, (key, title) in enumerate(panels, start=1):
        axes = figure.add_subplot(2, 2, i)
        axes.plot(epochs, [r[key] for r in rows], marker="o")
        axes.set_title(title)
        axes.set_xlabel("epoch")
        if key == "std_sqrt_d":
            axes.axhline(COLLAPSE_STD, color="red", linestyle="--", linewidth=1)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
