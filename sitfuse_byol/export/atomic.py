"""Atomic creation of output files and directories.

A reader (QGIS, a later pipeline stage, a half-finished rerun) must never see a
truncated GeoTIFF or a Zarr store with missing chunks. Everything is written to
a hidden sibling first and renamed onto the final name only once complete; a
rename within one directory is atomic on POSIX file systems.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_sibling(final: Path) -> Path:
    """A fresh hidden name next to ``final`` that keeps its suffix.

    The suffix is kept because GDAL and pyogrio choose a driver from it.

    Args:
        final: The path the temporary will eventually be renamed to.

    Returns:
        ``<dir>/.<name>.tmp-<pid>-<random><suffix>``.
    """
    final = Path(final)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    return final.with_name(f".{final.name}.tmp-{tag}{final.suffix}")


def remove_path(path: Path) -> None:
    """Remove a file, a symlink or a directory tree; do nothing if it is absent.

    Args:
        path: What to remove.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(source: Path, final: Path, *, move: Callable[[Path, Path], object] = os.replace) -> None:
    """Put ``source`` (a file or a directory) in place of ``final`` with ``move``.

    ``os.replace`` cannot overwrite a non-empty directory, so an existing one is moved
    aside first and put back if the move fails.
    """
    if source.is_dir() and final.is_dir() and not final.is_symlink():
        old = temporary_sibling(final)
        os.replace(final, old)
        try:
            move(source, final)
        except BaseException:
            os.replace(old, final)
            raise
        remove_path(old)
    else:
        move(source, final)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces ``final`` on success.

    The block writes a file or a directory (e.g. a Zarr store) at the yielded
    path. When the block finishes normally the temporary is renamed onto
    ``final`` with :func:`os.replace`; an existing directory at ``final`` is
    moved aside first, because ``os.replace`` cannot overwrite a non-empty
    directory. When the block raises anything, including
    :class:`KeyboardInterrupt`, the temporary and any file beside it whose
    name extends the temporary's are removed, and ``final`` is left untouched.

    Args:
        final: The path to create or replace.

    Yields:
        The temporary path to write to. It does not exist yet.

    Raises:
        FileNotFoundError: When the block finished without creating the path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {final}")
        replace_path(tmp, final)
    except BaseException:
        # Also what a writer put beside the temporary under its name, e.g. GDAL's
        # "<tmp>.ovr.tmp" when the COG driver was interrupted.
        for leftover in [tmp, *tmp.parent.glob(glob.escape(tmp.name) + ".*")]:
            remove_path(leftover)
        raise


def atomic_write_text(path: Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write a text file atomically.

    Args:
        path: The file to create or replace.
        text: Its content.
        encoding: The text encoding.

    Returns:
        ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return path


def atomic_write_json(path: Path, obj: Any, *, indent: int = 2) -> Path:
    """Write a JSON document atomically.

    Args:
        path: The file to create or replace.
        obj: A JSON-serialisable object.
        indent: Indentation of the output.

    Returns:
        ``path``.
    """
    # Serialise before opening anything, so an unserialisable object leaves no trace.
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)
