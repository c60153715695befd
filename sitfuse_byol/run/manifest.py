"""``OUTDIR/run.json``: per scene, its status, stage timings, outputs and error.

A scene is redone only when its inputs or the settings that shape its outputs changed
(``key``), so an interrupted or partly failed batch resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sitfuse_byol.export.atomic import atomic_write_json
from sitfuse_byol.read import SceneRef
from sitfuse_byol.read.multifile import MultiFileSpec

#: Zarr v3 and v2 metadata files: rewritten whenever the store (or one of its arrays) is.
ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")


def _store_metadata(store: Path) -> list[Path]:
    """Metadata files of a store's root and arrays; chunk files are never walked."""
    folders = [store, *sorted(p for p in store.iterdir() if p.is_dir())]
    return [folder / name for folder in folders for name in ZARR_METADATA if (folder / name).is_file()]


def _file_fingerprint(path: Path) -> list:
    if path.is_dir():
        parts = _store_metadata(path)
        return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in parts]
    if path.exists():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    return ["missing"]


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def scene_fingerprint(ref: SceneRef) -> str:
    """Changes when any file of the scene changes (size or modification time)."""
    files = list(ref.spec.files) if isinstance(ref.spec, MultiFileSpec) else [Path(ref.spec)]
    text = json.dumps([[str(f), _file_fingerprint(f)] for f in files])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Manifest:
    """The batch record, saved atomically.

    A scene's record is written with the next save at most :attr:`SAVE_INTERVAL`
    seconds later (and by :meth:`flush` at the end of a run), not after every scene:
    rewriting the whole record per scene is quadratic in the scene count (about 10 GB
    written for 10,000 scenes). A record lost with a killed driver costs only a redone
    scene, whose outputs were renamed into place before it was recorded.
    """

    SAVE_INTERVAL: ClassVar[float] = 2.0

    path: Path
    scenes: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    _saved_at: float = field(default=-math.inf, init=False, repr=False, compare=False)
    _pending: bool = field(default=False, init=False, repr=False, compare=False)
    # The file as loaded (see changed_on_disk).
    _loaded: tuple[int, int, int] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        state = _file_state(path)
        try:
            data = json.loads(path.read_text()) if state is not None else {}
        except (json.JSONDecodeError, FileNotFoundError):
            data = {}
        manifest = cls(path=path, scenes=data.get("scenes", {}), stages=data.get("stages", {}))
        manifest._loaded = state
        return manifest

    def changed_on_disk(self) -> bool:
        """Whether another process replaced the file since it was loaded (every save
        renames a new file into place)."""
        return _file_state(self.path) != self._loaded

    def save(self) -> None:
        """Write the record now."""
        atomic_write_json(self.path, {"scenes": self.scenes, "stages": self.stages})
        self._saved_at = time.monotonic()
        self._loaded = _file_state(self.path)
        self._pending = False

    def flush(self) -> None:
        """Write records not yet saved."""
        if self._pending:
            self.save()

    def outputs(self, scene_id: str) -> dict[str, Path]:
        """A scene's recorded outputs, as paths (kept relative to the manifest's folder, so
        an output folder that is moved or copied still finds its own files)."""
        entry = self.scenes.get(scene_id) or {}
        return {kind: self.path.parent / p for kind, p in entry.get("outputs", {}).items()}

    def is_done(self, scene_id: str, key: str) -> bool:
        entry = self.scenes.get(scene_id)
        if not entry or entry.get("status") != "done" or entry.get("key") != key:
            return False
        return all(p.exists() for p in self.outputs(scene_id).values())

    def label_paths(self, scene_ids: set[str] | None = None) -> list[Path]:
        """Label rasters of the scenes that finished (of ``scene_ids`` when given)."""
        return [
            self.outputs(scene_id)["labels"]
            for scene_id, entry in self.scenes.items()
            if entry.get("status") == "done"
            and "labels" in entry.get("outputs", {})
            and (scene_ids is None or scene_id in scene_ids)
        ]

    def forget_outputs(self, scene_id: str) -> None:
        """Drop a scene's recorded outputs (they were removed) and the key they were made under."""
        entry = self.scenes[scene_id]
        entry["outputs"], entry["key"] = {}, ""
        self._pending = True

    def outdate(self, scene_id: str) -> None:
        """Make a scene's record no longer match any key: the next run redoes the scene.

        For a scene whose task was left running when a run stopped: it may still put new
        outputs in place, which the record would otherwise pass off as made under its key.
        """
        entry = self.scenes.get(scene_id)
        if entry and entry.get("key"):
            entry["key"] = ""
            self._pending = True

    def _relative(self, path: str) -> str:
        folder = self.path.parent.resolve()
        resolved = Path(path).resolve()
        return str(resolved.relative_to(folder)) if resolved.is_relative_to(folder) else str(resolved)

    def record(
        self,
        scene_id: str,
        *,
        status: str,
        key: str,
        timings: dict[str, float],
        outputs: dict[str, str] | None = None,
        error: str | None = None,
    ) -> None:
        self.scenes[scene_id] = {
            "status": status,
            "key": key,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "outputs": {kind: self._relative(p) for kind, p in (outputs or {}).items()},
            "error": error,
        }
        self._pending = True
        if time.monotonic() - self._saved_at >= self.SAVE_INTERVAL:
            self.save()
