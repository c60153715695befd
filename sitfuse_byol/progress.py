"""Progress bars for the stages, on stderr, silenced by ``--quiet``."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column

# The training bar's extra column: the values `train()` reports after every step.
TRAIN_FIELDS = (
    "loss {task.fields[loss]:.4f}  τ {task.fields[tau]:.4f}  lr {task.fields[lr]:.2e}  "
    "{task.fields[patches_per_s]:.0f} patches/s  data wait {task.fields[data_wait]:.0%}"
)


@contextlib.contextmanager
def stage_progress(description: str, *, total: int, quiet: bool, fields: str = "") -> Iterator[Any]:
    """A progress bar whose ``update(advance=..., **fields)`` also fills ``fields`` (a format string).

    Yields a callable ``advance(n=1, *, completed=None, **values)``; ``n`` may be a
    fraction, and ``completed`` sets the count instead (a resumed training's step).
    """
    console = Console(stderr=True)
    # A bar is for a person at a terminal; in a log or a pipe it would only leave blank lines.
    if quiet or not console.is_terminal:
        yield lambda n=1, **values: None
        return
    # In a narrow terminal the values wrap; the name, counts and time are never cut to "12…".
    columns = [
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, min_width=len(description))),
        BarColumn(bar_width=20 if fields else 40),
        MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=2 * len(str(total)) + 1)),
        TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
    ]
    if fields:
        columns.append(TextColumn(fields, table_column=Column(overflow="fold")))
    else:
        # A scene's share done moves the bar before the scene counts as complete.
        columns.insert(3, TaskProgressColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(description, total=total, **_blank(fields))

        def advance(n: float = 1, *, completed: float | None = None, **values: Any) -> None:
            if completed is None:
                progress.update(task, advance=n, **values)
            else:
                progress.update(task, completed=completed, **values)

        yield advance


@contextlib.contextmanager
def train_progress(train_config: Mapping[str, Any], *, quiet: bool) -> Iterator[Callable[[dict], None]]:
    """The training bar, over ``epochs x steps_per_epoch`` steps of the ``train`` config section.

    Yields the ``progress`` callback for :func:`sitfuse_byol.train.loop.train`.
    """
    total = train_config["epochs"] * train_config["steps_per_epoch"]
    names = _placeholders(TRAIN_FIELDS)
    with stage_progress("train", total=total, quiet=quiet, fields=TRAIN_FIELDS) as advance:
        # Set from the global step, so a resumed training's bar starts where it stopped.
        yield lambda values: advance(completed=values["step"], **{name: values[name] for name in names})


def _placeholders(fields: str) -> list[str]:
    return re.findall(r"task\.fields\[(\w+)\]", fields)


def _blank(fields: str) -> dict[str, Any]:
    """Initial values for the ``{task.fields[...]}`` placeholders of a column format."""
    return {name: 0.0 for name in _placeholders(fields)}
