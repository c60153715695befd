"""Scene lists: a YAML list, a text file (one scene per line), or a glob."""

from __future__ import annotations

import glob
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from sitfuse_byol.config import describe_yaml_error, load_yaml
from sitfuse_byol.errors import InputError
from sitfuse_byol.read.multifile import MultiFileSpec

SceneSpec = Path | MultiFileSpec
LIST_SUFFIXES = (".txt", ".lst", ".list")
YAML_SUFFIXES = (".yaml", ".yml")
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SceneRef:
    """A scene named in a list, not yet opened.

    Attributes:
        spec: A raster path (GeoTIFF, Zarr, NetCDF) or a multi-file scene.
        entry: Where the scene was named (``scenes.txt:3``), for messages.
    """

    spec: SceneSpec
    entry: str

    @property
    def id(self) -> str:
        """The scene id: file stem (store name for Zarr), or the multi-file scene's ``id``."""
        return self.spec.id if isinstance(self.spec, MultiFileSpec) else self.spec.stem


def parse_scene_entry(entry: object, *, base: Path, where: str) -> SceneSpec:
    """One entry of a scene list: a path string or a multi-file mapping."""
    if isinstance(entry, Mapping):
        return MultiFileSpec.from_mapping(entry, base=base, where=where)
    if isinstance(entry, str | Path) and str(entry).strip():
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else base / path
        if path.suffix.lower() in YAML_SUFFIXES:
            return _load_scene_yaml(path, where=where)
        return path
    raise InputError(f"scene entry {entry!r} is neither a path nor a multi-file scene", where=where)


def _read_yaml(path: Path, *, where: str) -> object:
    """The parsed content of a scene YAML or YAML scene list.

    Args:
        path: The YAML file.
        where: Where the file was named, for the not-found message.

    Raises:
        InputError: The file is missing or is not valid YAML.
    """
    if not path.exists():
        raise InputError("file not found", where=f"{where}: {path}")
    try:
        return load_yaml(_read_text(path))
    except yaml.YAMLError as err:
        raise InputError(f"invalid YAML: {describe_yaml_error(err)}", where=str(path)) from err


def _multifile_from_yaml(content: object, *, path: Path) -> MultiFileSpec:
    """The multi-file scene a scene YAML holds; band files are relative to its folder."""
    if not isinstance(content, Mapping):
        raise InputError("a scene YAML must hold a mapping {id, bands}", where=str(path))
    return MultiFileSpec.from_mapping(content, base=path.parent, where=str(path))


def _load_scene_yaml(path: Path, *, where: str) -> MultiFileSpec:
    """The multi-file scene in the YAML file ``path``, named at ``where``."""
    return _multifile_from_yaml(_read_yaml(path, where=where), path=path)


def resolve_scene_list(scenes: object, *, base: Path) -> list[SceneRef]:
    """Expand a scene list into :class:`SceneRef` objects, in order, duplicates refused.

    Args:
        scenes: A list of entries, or one string: a glob, a text file of scenes, a
            YAML file holding a list or one multi-file scene, or one raster path.
        base: Folder that relative paths are taken from (the config file's folder).
    """
    refs: list[SceneRef] = []
    if isinstance(scenes, str | Path):
        text = str(scenes)
        path = Path(text).expanduser()
        path = path if path.is_absolute() else base / path
        matched = _glob_refs(text, base=base, where=text)
        if matched is not None:
            refs = matched
        elif path.suffix.lower() in LIST_SUFFIXES:
            refs = _read_text_list(path)
        elif path.suffix.lower() in YAML_SUFFIXES and path.exists():
            content = _read_yaml(path, where=text)
            if isinstance(content, list):
                refs = _entries(content, base=path.parent, label=str(path))
            else:
                # One multi-file scene: built from the content in hand, not parsed again.
                refs = [SceneRef(spec=_multifile_from_yaml(content, path=path), entry=text)]
        else:
            refs = [SceneRef(spec=parse_scene_entry(path, base=base, where=text), entry=text)]
    elif isinstance(scenes, Sequence):
        refs = _entries(scenes, base=base, label="data.scenes")
    else:
        raise InputError("scenes must be a list, a glob, or a file", where="data.scenes")
    if not refs:
        raise InputError("the scene list is empty", where=str(scenes))
    seen: dict[str, str] = {}
    for ref in refs:
        _check_scene_id(ref)
        if ref.id in seen:
            raise InputError(
                f"two scenes share the id {ref.id!r} ({seen[ref.id]}); outputs would collide",
                where=ref.entry,
            )
        seen[ref.id] = ref.entry
    return refs


def _check_scene_id(ref: SceneRef) -> None:
    """Scene ids name output files (``labels/<id>.tif``), so they must be plain file names."""
    scene_id = ref.id
    if scene_id in ("", ".", "..") or "/" in scene_id or "\\" in scene_id or scene_id.startswith("."):
        raise InputError(
            f"scene id {scene_id!r} cannot name output files; use letters, digits, '-', '_' and inner dots",
            where=ref.entry,
        )


def _read_text(path: Path) -> str:
    try:
        # Windows editors start UTF-8 files with a byte-order mark; it is not part of a path.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError("not UTF-8 text", where=str(path)) from err
    except IsADirectoryError as err:
        raise InputError("a folder, not a file; name its scenes with a glob such as folder/*.tif", where=str(path)) from err


def _entries(entries: Sequence, *, base: Path, label: str) -> list[SceneRef]:
    refs = []
    for i, entry in enumerate(entries, start=1):
        where = f"{label}[{i}]"
        matched = _glob_refs(entry, base=base, where=f"{where}: {entry}") if isinstance(entry, str) else None
        if matched is not None:
            refs += matched
        else:
            refs.append(SceneRef(spec=parse_scene_entry(entry, base=base, where=where), entry=where))
    return refs


def _glob_refs(text: str, *, base: Path, where: str) -> list[SceneRef] | None:
    """The scenes a glob matches, in name order; ``None`` when ``text`` is no glob
    (a file whose name holds "[" is that file, not a pattern)."""
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base / path
    if not GLOB_CHARS & set(text) or path.exists():
        return None
    matches = sorted(glob.glob(str(path)))
    if not matches:
        raise InputError("glob matches no file", where=where)
    return [SceneRef(spec=parse_scene_entry(m, base=base, where=m), entry=m) for m in matches]


def _read_text_list(path: Path) -> list[SceneRef]:
    if not path.exists():
        raise InputError("scene list not found", where=str(path))
    refs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        # A comment starts a line or follows a space; "#" inside a file name is kept.
        text = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
        if text:
            where = f"{path}:{number}"
            refs.append(SceneRef(spec=parse_scene_entry(text, base=path.parent, where=where), entry=where))
    return refs
