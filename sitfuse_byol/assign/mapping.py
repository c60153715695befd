"""Context assignment: turn unsupervised clusters into named classes.

SIT-FUSE's recipe, made repeatable: count each cluster's pixels inside the
user's class polygons over all scenes (a zonal histogram), map a cluster to
the class holding at least ``threshold`` of those pixels (0.51 by default) and
to ``"uncertain"`` otherwise, write the mapping as a commented YAML file the
user can edit, and apply it to the label rasters to get class rasters that
QGIS shows with class names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import rasterio
import shapely
import yaml
from rasterio.errors import RasterioIOError

from sitfuse_byol.assign.polygons import (
    UNCERTAIN,
    ClassPolygons,
    burn_windows,
    class_order,
    read_class_polygons,
    reproject_polygons,
)
from sitfuse_byol.config import describe_yaml_error
from sitfuse_byol.errors import ConfigError, InputError
from sitfuse_byol.export.atomic import atomic_write_text
from sitfuse_byol.export.label_raster import label_dtype_and_nodata, write_label_raster
from sitfuse_byol.export.palette import label_colors
from sitfuse_byol.grid import Grid
from sitfuse_byol.read.geotiff import open_lazy

#: A cluster goes to a class holding at least this share of its polygon pixels (SIT-FUSE's value).
DEFAULT_THRESHOLD = 0.51

#: Colour of the "uncertain" class: a light grey that recedes behind real classes.
UNCERTAIN_COLOR = (200, 200, 200)

#: Rows and columns of the pieces a label raster is reclassified in.
APPLY_CHUNK = 1024

_MAPPING_KEYS = ("threshold", "n_labels", "model", "classes", "colors", "clusters")
_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass(frozen=True)
class CountTable:
    """Pixels of each cluster inside the polygons of each class, summed over scenes.

    Attributes:
        counts: ``(n_labels, n_classes)`` int64; ``counts[k, c]`` is the number
            of valid pixels of cluster ``k`` inside polygons of class ``c``.
        class_names: The classes, sorted; the columns of ``counts``.
        polygons_path: The polygon file the counts come from.
        scenes: Ids of the scenes that had polygon pixels.
        unplaced: Ids of the scenes left out of the count for want of a CRS.
        outside: Positions of the polygons (features) that overlap no georeferenced scene.
    """

    counts: np.ndarray
    class_names: list[str]
    polygons_path: Path
    scenes: list[str]
    unplaced: list[str] = dataclasses.field(default_factory=list)
    outside: list[int] = dataclasses.field(default_factory=list)

    @property
    def n_labels(self) -> int:
        return int(self.counts.shape[0])


@dataclass(frozen=True)
class ClusterMapping:
    """Which class each cluster stands for.

    Attributes:
        classes: The real classes, in class raster value order: sorted, or as a mapping
            file's ``classes`` lists them; :data:`UNCERTAIN` is not among them.
        clusters: The class of each cluster ``0 .. n_labels - 1``: one of
            ``classes`` or :data:`UNCERTAIN`.
        threshold: The share a class needed to win a cluster; ``None`` when a
            loaded file does not say.
        counts: The ``(n_labels, len(classes))`` polygon pixel counts the
            mapping was built from, or ``None`` for a mapping loaded from a file.
        notes: Things a user should know, e.g. clusters a file left out.
        model_hash: The clustering model whose labels the mapping was made from (the
            label rasters' ``model_hash`` tag); ``None`` when unknown.
        colors: Colours a mapping file gives some classes (``"#rrggbb"``); the others
            take the label palette's.
    """

    classes: list[str]
    clusters: list[str]
    threshold: float | None
    counts: np.ndarray | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    model_hash: str | None = None
    colors: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def n_labels(self) -> int:
        return len(self.clusters)

    @property
    def output_classes(self) -> list[str]:
        """The classes of the class rasters, by pixel value: real classes, then uncertain."""
        return [*self.classes, UNCERTAIN]

    def lookup(self) -> np.ndarray:
        """The class raster value of each cluster, as int64 indices into :attr:`output_classes`."""
        index = {name: i for i, name in enumerate(self.output_classes)}
        return np.array([index[name] for name in self.clusters], dtype=np.int64)

    def purity(self) -> np.ndarray | None:
        """Share of each cluster's polygon pixels held by its largest class (NaN for
        clusters without polygon pixels), or ``None`` without counts."""
        if self.counts is None:
            return None
        totals = self.counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, self.counts.max(axis=1, initial=0) / totals, np.nan)


@dataclass(frozen=True)
class AssignResult:
    """What :func:`run_assign` did.

    Attributes:
        mapping: The mapping that was applied.
        mapping_path: The mapping file written (when counting) or read (with ``apply``).
        class_paths: The class rasters written, one per label raster.
        table: The per-class summary of :func:`format_class_table`.
        counts: The polygon pixel counts, or ``None`` when an edited mapping was applied.
        notes: Things a user should know (skipped features, clusters left out, ...).
    """

    mapping: ClusterMapping
    mapping_path: Path
    class_paths: list[Path]
    table: str
    counts: CountTable | None
    notes: list[str]

    def report(self) -> str:
        """What a user reads after an assignment: the notes, the class table and where the files are."""
        lines = [f"note: {note}" for note in self.notes]
        lines += [self.table, f"mapping: {self.mapping_path}"]
        if self.class_paths:
            lines.append(f"class rasters: {self.class_paths[0].parent}")
        return "\n".join(lines)


# --- label rasters --------------------------------------------------------------------


@dataclass(frozen=True)
class _LabelInfo:
    grid: Grid
    n_labels: int
    nodata: int
    model_hash: str | None = None


@contextlib.contextmanager
def _open_labels(path: Path) -> Iterator[tuple[rasterio.DatasetReader, _LabelInfo]]:
    """Open a label raster and read what assignment needs from its header."""
    try:
        src = rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"cannot open label raster: {exc}", where=str(path)) from exc
    with src:
        if src.count != 1 or src.dtypes[0] not in ("uint8", "uint16"):
            raise InputError(
                f"not a label raster: {src.count} band(s) of {src.dtypes[0]}, "
                "expected one uint8 or uint16 band",
                where=str(path),
            )
        k_tag = src.tags().get("K")
        try:
            n_labels = int(k_tag) if k_tag is not None else 0
        except ValueError:
            n_labels = 0
        if n_labels < 1:
            raise InputError(
                "label raster has no valid 'K' tag (number of clusters); "
                "use the label rasters sitfuse wrote under labels/",
                where=str(path),
            )
        nodata = src.nodata if src.nodata is not None else label_dtype_and_nodata(n_labels)[1]
        grid = Grid(src.height, src.width, src.transform, src.crs)
        yield src, _LabelInfo(grid=grid, n_labels=n_labels, nodata=int(nodata), model_hash=src.tags().get("model_hash"))


def _common_clustering(label_paths: Sequence[Path]) -> tuple[int, str | None]:
    """The number of clusters and the clustering model all label rasters agree on."""
    if not label_paths:
        raise InputError("no label rasters to assign classes to")
    seen: dict[int, Path] = {}
    models: dict[str, Path] = {}
    for path in label_paths:
        with _open_labels(path) as (_, info):
            seen.setdefault(info.n_labels, path)
            if info.model_hash:
                models.setdefault(info.model_hash, path)
    if len(seen) > 1 or len(models) > 1:
        listed = (
            ", ".join(f"K={k} in {p.name}" for k, p in sorted(seen.items()))
            if len(seen) > 1
            else ", ".join(f"model {h[:12]} in {p.name}" for h, p in models.items())
        )
        raise InputError(
            f"label rasters come from different clusterings ({listed}); "
            "assign classes to one run's labels at a time",
            where=str(Path(label_paths[0]).parent),
        )
    return next(iter(seen)), next(iter(models), None)


def _invalid_label_error(value: int, info: _LabelInfo, path: Path) -> InputError:
    return InputError(
        f"label raster holds label {value}, outside clusters 0..{info.n_labels - 1} "
        f"and nodata {info.nodata}",
        where=str(path),
    )


# --- counting -------------------------------------------------------------------------


def count_cluster_classes(label_paths: Sequence[Path], polygons: ClassPolygons) -> CountTable:
    """Count each cluster's pixels inside each class's polygons, over all scenes.

    For each label raster the polygons are reprojected into its CRS and
    rasterized (pixel centres inside, ``all_touched=False``) only in windows
    around them (:func:`~sitfuse_byol.assign.polygons.burn_windows`), and the
    labels are read only there, so small polygons on a large scene cost little
    memory and I/O. Where polygons of different classes overlap, the feature
    later in the file wins. Label nodata pixels are not counted.

    Args:
        label_paths: Label rasters written by the pipeline: single band,
            integer, with a ``K`` tag and a CRS.
        polygons: The class polygons.

    Returns:
        The counts, summed over scenes.

    Raises:
        InputError: If a label raster cannot be read, every one lacks a CRS
            (one without among others is left out, in ``unplaced``), one lacks the ``K``
            tag, holds labels outside ``0..K-1`` and nodata, the rasters
            disagree on ``K``, or no polygon overlaps any scene.
    """
    n_labels, _ = _common_clustering(label_paths)
    n_classes = len(polygons.class_names)
    class_indices = polygons.class_indices()
    counts = np.zeros((n_labels, n_classes), dtype=np.int64)
    # Scenes of one run usually share a CRS; reproject the polygons once per CRS.
    reprojected: dict[str, list[Any]] = {}
    scenes = []
    # Why no pixel counted, for the message: outside every scene, between pixel centres,
    # or only over nodata.
    burnt_any = False
    touched = np.zeros(len(polygons.geometries), dtype=bool)  # overlaps some scene
    unplaced: list[Path] = []
    for path in map(Path, label_paths):
        with _open_labels(path) as (src, info):
            if info.grid.crs is None:
                # An ungeoreferenced scene among others does not stop the count.
                unplaced.append(path)
                continue
            key = info.grid.crs.to_wkt()
            if key not in reprojected:
                reprojected[key] = reproject_polygons(polygons, info.grid.crs)
            found = False
            touched |= shapely.intersects(shapely.box(*info.grid.bounds), reprojected[key])
            for window, burnt in burn_windows(reprojected[key], class_indices, grid=info.grid):
                burnt_any = True
                labels = src.read(1, window=window)
                inside = (burnt > 0) & (labels != info.nodata)
                values = labels[inside].astype(np.int64)
                if not values.size:
                    continue
                if values.max() >= n_labels:
                    raise _invalid_label_error(int(values.max()), info, path)
                found = True
                flat = values * n_classes + (burnt[inside] - 1)
                counts += np.bincount(flat, minlength=n_labels * n_classes).reshape(counts.shape)
            if found:
                scenes.append(path.stem)
    if len(unplaced) == len(label_paths):
        raise InputError("label raster has no CRS, so the polygons cannot be placed on it", where=str(unplaced[0]))
    if not scenes:
        if burnt_any:
            what = "the polygons cover only nodata pixels of the scenes"
        elif touched.any():
            what = "no polygon holds a pixel centre of a scene; draw them larger than a pixel"
        else:
            what = "no polygon overlaps any scene; check the polygons' CRS and extent"
        raise InputError(what, where=str(polygons.path))
    return CountTable(
        counts=counts,
        class_names=list(polygons.class_names),
        polygons_path=polygons.path,
        scenes=scenes,
        unplaced=[p.stem for p in unplaced],
        outside=np.flatnonzero(~touched).tolist(),
    )


# --- mapping --------------------------------------------------------------------------


def check_threshold(threshold: object) -> float:
    """The class share a cluster needs, as a float in (0, 1].

    Raises:
        ConfigError: Not a number, or outside (0, 1].
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ConfigError(
            f"threshold must be a number in (0, 1], got {threshold!r}", where="threshold"
        )
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold}", where="threshold")
    return float(threshold)


def build_mapping(counts: CountTable, *, threshold: float = DEFAULT_THRESHOLD) -> ClusterMapping:
    """Map each cluster to the class that dominates its polygon pixels.

    A cluster goes to the class with the most of its pixels inside polygons
    when that class's share is at least ``threshold``, and to
    :data:`UNCERTAIN` otherwise: when it has no pixel inside any polygon, or
    when two classes tie for the most (possible only with a threshold of 0.5
    or less).

    Args:
        counts: The polygon pixel counts.
        threshold: The share a class needs, in (0, 1].

    Returns:
        The mapping, keeping the counts for reporting.

    Raises:
        ConfigError: If ``threshold`` is not in (0, 1].
    """
    threshold = check_threshold(threshold)
    table = counts.counts
    totals = table.sum(axis=1)
    top = table.max(axis=1, initial=0)
    best = table.argmax(axis=1) if table.shape[1] else np.zeros(len(table), dtype=np.int64)
    ties = (table == top[:, None]).sum(axis=1) > 1
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(totals > 0, top / np.maximum(totals, 1), 0.0)
    mapped = (totals > 0) & ~ties & (share >= threshold)
    clusters = [
        counts.class_names[int(best[k])] if mapped[k] else UNCERTAIN for k in range(len(table))
    ]
    return ClusterMapping(
        classes=list(counts.class_names),
        clusters=clusters,
        threshold=threshold,
        counts=table.copy(),
    )


# --- mapping files --------------------------------------------------------------------


def _yaml_scalar(value: str | float) -> str:
    """``value`` as a YAML flow scalar: a string quoted only where YAML needs it (``"yes"``,
    ``"1"``), a float in a form YAML 1.1 reads as one (``5.0e-05``, not ``5e-05``)."""
    return yaml.safe_dump([value], default_flow_style=True, allow_unicode=True, width=1 << 30)[1:-2]


def _comment_text(text: str) -> str:
    # A line break inside a class name would end the comment and corrupt the file.
    return re.sub(r"[\r\n]+", " ", text)


def _percent(share: float) -> str:
    return f"{100 * share:.1f}".removesuffix(".0") + "%"


def _cluster_comment(mapping: ClusterMapping, cluster: int) -> str:
    if mapping.counts is None:
        return ""
    row = mapping.counts[cluster]
    total = int(row.sum())
    if total == 0:
        return "no pixels in polygons"
    order = [int(c) for c in np.argsort(-row, kind="stable") if row[c] > 0]
    if mapping.clusters[cluster] != UNCERTAIN:
        best = order[0]
        return f"{total} px in polygons, {_percent(row[best] / total)} {mapping.classes[best]}"
    shares = " / ".join(f"{_percent(row[c] / total)} {mapping.classes[c]}" for c in order[:3])
    more = f" / {len(order) - 3} more" if len(order) > 3 else ""
    return f"{total} px, {shares}{more}"


def mapping_yaml(mapping: ClusterMapping, *, source: str | None = None, path: Path | None = None) -> str:
    """The text of a mapping file, with a how-to header and a comment per cluster.

    Args:
        mapping: The mapping.
        source: Where the mapping came from (e.g. the polygon file), for the header.
        path: Where the file goes, for the header's re-apply command (works from any folder).

    Returns:
        YAML text that :func:`load_mapping` reads back to the same mapping.
    """
    header = [
        "# Cluster -> class mapping written by `sitfuse assign`.",
        *([f"# From: {_comment_text(source)}"] if source else []),
        "#",
        "# Each cluster maps to the class holding the largest share of its pixels inside the",
        "# class polygons, if that share is at least `threshold`; otherwise to uncertain.",
        "# The comment after each cluster gives its pixels inside polygons and their classes.",
        "#",
        "# To change the mapping, edit the class after a cluster id (a name from `classes`;",
        "# to create a class, add its name to `classes` too), then re-apply it without",
        "# recounting:",
        f"#     sitfuse assign -c CONFIG --apply {_comment_text(str(path.resolve())) if path else 'mapping.yaml'}",
        "# Clusters missing from `clusters` count as uncertain. `threshold` and the",
        "# comments are for information only. Colours of the class rasters can be set with",
        "# e.g. `colors: {water: '#1f78b4', forest: '#33a02c'}`.",
        "",
    ]
    classes = ", ".join(_yaml_scalar(c) for c in mapping.output_classes)
    body = []
    if mapping.threshold is not None:
        body.append(f"threshold: {_yaml_scalar(mapping.threshold)}")
    body.append(f"n_labels: {mapping.n_labels}")
    if mapping.model_hash:
        body.append(f"model: {mapping.model_hash}")
    body.append(f"classes: [{classes}]")
    if mapping.colors:
        body.append("colors: {" + ", ".join(f"{_yaml_scalar(c)}: '{v}'" for c, v in mapping.colors.items()) + "}")
    body.append("clusters:")
    entries = [f"  {k}: {_yaml_scalar(name)}" for k, name in enumerate(mapping.clusters)]
    width = max((len(e) for e in entries), default=0)
    for k, entry in enumerate(entries):
        comment = _cluster_comment(mapping, k)
        body.append(f"{entry:<{width}}  # {_comment_text(comment)}" if comment else entry)
    return "\n".join(header + body) + "\n"


def write_mapping(path: Path, mapping: ClusterMapping, *, source: str | None = None) -> Path:
    """Write a mapping as a commented, hand-editable YAML file, atomically.

    Args:
        path: The ``.yaml`` file to create or replace.
        mapping: The mapping.
        source: Where the mapping came from, for the header comment.

    Returns:
        ``path``.
    """
    path = Path(path)
    text = mapping_yaml(mapping, source=source, path=path)
    # The writer is ours, but a class name YAML misreads must fail here, not at --apply.
    parsed = yaml.safe_load(text)
    if [parsed["clusters"][k] for k in range(mapping.n_labels)] != mapping.clusters or (
        parsed.get("threshold") != mapping.threshold
    ):
        raise ValueError("the mapping YAML does not read back to the same mapping")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys, which plain YAML silently overwrites.

    A duplicated cluster line is an easy editing slip; the earlier line would be lost.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"key {key!r} appears twice (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("mapping file not found", where=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("mapping file is not UTF-8 text", where=str(path)) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(exc.what, where=str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"mapping file is not valid YAML: {describe_yaml_error(exc)}", where=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError("mapping file must be a YAML mapping with 'clusters'", where=str(path))
    unknown = sorted(str(k) for k in data if k not in _MAPPING_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)}; expected {', '.join(_MAPPING_KEYS)}",
            where=str(path),
        )
    return data


def _class_list(value: Any, path: Path) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value):
        raise ConfigError(
            f"'classes' must be a list of class names, got {value!r}", where=f"{path}: classes"
        )
    names = [c.strip() for c in value]
    duplicates = sorted({c for c in names if names.count(c) > 1})
    if duplicates:
        raise ConfigError(
            f"'classes' lists {', '.join(duplicates)} twice", where=f"{path}: classes"
        )
    return names


def _cluster_id(key: Any, n_labels: int, path: Path) -> int:
    if isinstance(key, str) and key.strip().isdigit():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int):
        raise ConfigError(f"cluster id {key!r} is not a whole number", where=f"{path}: clusters")
    if not 0 <= key < n_labels:
        raise ConfigError(
            f"unknown cluster id {key}; the label rasters have clusters 0..{n_labels - 1}",
            where=f"{path}: clusters",
        )
    return key


def _ranges(ids: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``"0-2, 5, 7-8"``."""
    parts = []
    start = prev = None
    for i in ids:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


def load_mapping(path: Path, *, n_labels: int, model_hash: str | None = None) -> ClusterMapping:
    """Read and check a mapping file, typically one a user edited.

    ``clusters`` maps cluster ids to class names; ``classes`` (optional)
    declares the class names, so a misspelt class is caught instead of becoming
    a new class; ``n_labels`` (optional) must match the label rasters;
    ``threshold`` is informational. Clusters missing from ``clusters`` map to
    :data:`UNCERTAIN`, with a note.

    Args:
        path: The YAML file.
        n_labels: The number of clusters of the label rasters it will be applied to.
        model_hash: Their clustering model; a mapping whose ``model`` differs was made
            from other clusters, even when their number agrees.

    Returns:
        The mapping, without counts.

    Raises:
        ConfigError: If the file is missing, not YAML, has unknown or duplicate
            keys, unknown cluster ids, classes that are not text, classes not
            listed in ``classes``, a ``threshold`` outside (0, 1] or an
            ``n_labels`` that differs from the label rasters'.
    """
    path = Path(path)
    data = _parse_yaml(path)
    threshold = data.get("threshold")
    if isinstance(threshold, str):
        # Earlier versions wrote e.g. 5e-05, which YAML 1.1 reads as a string.
        with contextlib.suppress(ValueError):
            threshold = float(threshold)
    if threshold is not None:
        try:
            threshold = check_threshold(threshold)
        except ConfigError as exc:
            raise ConfigError(exc.what, where=f"{path}: threshold") from exc
    declared_n = data.get("n_labels")
    if declared_n is not None and declared_n != n_labels:
        raise ConfigError(
            f"mapping is for {declared_n} clusters, but the label rasters have {n_labels}; "
            "it belongs to another clustering run",
            where=f"{path}: n_labels",
        )
    declared_model = data.get("model")
    if declared_model is not None and model_hash is not None and str(declared_model) != model_hash:
        raise ConfigError(
            f"mapping was made for clustering model {str(declared_model)[:12]}, but the label rasters "
            f"come from {model_hash[:12]}; run `sitfuse assign --labels` again (or delete the "
            "mapping's `model:` line to apply it anyway)",
            where=f"{path}: model",
        )
    declared = _class_list(data.get("classes"), path)
    raw_clusters = data.get("clusters")
    if raw_clusters is None:
        raw_clusters = {}
    if not isinstance(raw_clusters, dict):
        raise ConfigError(
            "'clusters' must map cluster ids to classes, e.g. '3: water'",
            where=f"{path}: clusters",
        )

    assigned: dict[int, str] = {}
    for key, value in raw_clusters.items():
        cluster = _cluster_id(key, n_labels, path)
        if cluster in assigned:
            raise ConfigError(f"cluster {cluster} appears twice", where=f"{path}: clusters")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"cluster {cluster}: the class must be a name, got {value!r}; "
                "put names YAML reads otherwise (yes, no, null, numbers) in quotes",
                where=f"{path}: clusters",
            )
        name = value.strip()
        if declared is not None and name != UNCERTAIN and name not in declared:
            close = difflib.get_close_matches(name, declared, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"cluster {cluster}: class {name!r} is not listed in 'classes' "
                f"[{', '.join(declared)}]{hint}; add it there to create a new class",
                where=f"{path}: clusters",
            )
        assigned[cluster] = name

    notes = []
    missing = [k for k in range(n_labels) if k not in assigned]
    if missing:
        notes.append(f"clusters {_ranges(missing)} are not in {path.name}; they count as uncertain")
    # A file's own class list keeps its order, so renaming a class there keeps every
    # class raster value; without one the order is class_order's (codes by value, then
    # names alphabetically), as when built.
    if declared is not None:
        classes = [c for c in declared if c != UNCERTAIN]
    else:
        classes = sorted({c for c in assigned.values() if c != UNCERTAIN}, key=class_order)
    return ClusterMapping(
        classes=classes,
        clusters=[assigned.get(k, UNCERTAIN) for k in range(n_labels)],
        threshold=threshold,
        notes=notes,
        model_hash=model_hash,
        colors=_class_colors_of(data.get("colors"), [*classes, UNCERTAIN], path),
    )


def _colors_in(path: Path) -> dict[str, str]:
    """The valid ``colors`` of an existing mapping file, read leniently (it is replaced)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    colors = data.get("colors") if isinstance(data, dict) else None
    if not isinstance(colors, dict):
        return {}
    return {
        str(name): color.lower()
        for name, color in colors.items()
        if isinstance(color, str) and _HEX_COLOR.fullmatch(color)
    }


def _class_colors_of(value: Any, classes: list[str], path: Path) -> dict[str, str]:
    """A mapping file's ``colors``: class name -> ``#rrggbb``, for classes it maps to."""
    if value is None:
        return {}
    where = f"{path}: colors"
    if not isinstance(value, dict):
        raise ConfigError("'colors' must map class names to colours, e.g. \"water: '#1f78b4'\"", where=where)
    colors = {}
    for name, color in value.items():
        if name not in classes:
            close = difflib.get_close_matches(str(name), classes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; classes are {', '.join(classes)}"
            raise ConfigError(f"colour for unknown class {name!r}{hint}", where=where)
        if not isinstance(color, str) or not _HEX_COLOR.fullmatch(color):
            raise ConfigError(
                f"class {name}: colour {color!r} is not '#rrggbb' (quote it: YAML reads # as a comment)",
                where=where,
            )
        colors[name] = color.lower()
    return colors


# --- applying -------------------------------------------------------------------------


def _reclassified(
    labels: np.ndarray, *, lut: np.ndarray, valid: np.ndarray, info: _LabelInfo, path: Path
) -> np.ndarray:
    """One piece of a class raster: the labels through ``lut``, refusing unknown labels."""
    bad = ~np.take(valid, labels)
    if bad.any():
        raise _invalid_label_error(int(labels[bad].flat[0]), info, path)
    return np.take(lut, labels)


def _class_array(path: Path, info: _LabelInfo, mapping: ClusterMapping) -> da.Array:
    """The class raster of one scene as a lazy array, read and reclassified piece by piece."""
    out_dtype, out_nodata = label_dtype_and_nodata(len(mapping.output_classes))
    size = int(np.iinfo(np.uint16).max) + 1
    lut = np.full(size, out_nodata, dtype=out_dtype)
    lut[: info.n_labels] = mapping.lookup()
    valid = np.zeros(size, dtype=bool)
    valid[: info.n_labels] = True
    valid[info.nodata] = True
    # Class rasters need no CRS; a label raster without one is applied all the same.
    array = open_lazy(path, chunks={"band": 1, "y": APPLY_CHUNK, "x": APPLY_CHUNK})
    return array[0].map_blocks(
        _reclassified, lut=lut, valid=valid, info=info, path=path, dtype=out_dtype
    )


def class_colors(mapping: ClusterMapping) -> np.ndarray:
    """``(len(output_classes), 3)`` uint8 colours: the mapping's own, else the label
    palette's, uncertain in grey."""
    colors = label_colors(len(mapping.output_classes))
    colors[-1] = UNCERTAIN_COLOR
    for i, name in enumerate(mapping.output_classes):
        if name in mapping.colors:
            colors[i] = [int(mapping.colors[name][k : k + 2], 16) for k in (1, 3, 5)]
    return colors


def apply_mapping(
    label_paths: Sequence[Path], mapping: ClusterMapping, *, out_dir: Path
) -> list[Path]:
    """Write a class raster for each label raster.

    Each pixel holds the index of its cluster's class in
    :attr:`ClusterMapping.output_classes` (sorted real classes, uncertain
    last), and nodata where the label raster is nodata. The rasters are COGs
    on the label rasters' grids, with class names in their QGIS style and
    attribute table. Labels are read and reclassified in pieces of
    :data:`APPLY_CHUNK` squared pixels, one scene at a time.

    Args:
        label_paths: Label rasters of one clustering run.
        mapping: The mapping; its number of clusters must match the rasters' ``K``.
        out_dir: Where ``<scene_id>.tif`` class rasters go.

    Returns:
        The class rasters written, in the order of ``label_paths``.

    Raises:
        InputError: If a label raster cannot be read, has a different ``K``, holds
            labels outside ``0..K-1`` and nodata, or two share a scene id.
    """
    paths = [Path(p) for p in label_paths]
    stems = [p.stem for p in paths]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise InputError(
            f"several label rasters are named {', '.join(duplicates)}; "
            "their class rasters would overwrite each other",
            where=str(out_dir),
        )
    out_dir = Path(out_dir)
    colors = class_colors(mapping)
    written = []
    for path in paths:
        with _open_labels(path) as (_, info):
            if info.n_labels != mapping.n_labels:
                raise InputError(
                    f"label raster has {info.n_labels} clusters, the mapping {mapping.n_labels}",
                    where=str(path),
                )
        written.append(
            write_label_raster(
                _class_array(path, info, mapping),
                grid=info.grid,
                path=out_dir / f"{path.stem}.tif",
                n_labels=len(mapping.output_classes),
                class_names=mapping.output_classes,
                colors=colors,
                tags={
                    "source_labels": path.name,
                    # JSON: a class name may hold a comma ("sea: deep, open").
                    "classes": json.dumps(mapping.output_classes),
                    # Export removes class rasters of another model's labels.
                    "model_hash": info.model_hash or "",
                },
                description="class",
            )
        )
    return written


# --- reporting ------------------------------------------------------------------------


def _short_ids(ids: Sequence[int], *, limit: int = 40) -> str:
    text = _ranges(ids)
    if len(text) <= limit:
        return text or "-"
    cut = text[:limit].rsplit(", ", 1)[0]
    return f"{cut}, … ({len(ids)} in all)"


def format_class_table(counts: CountTable | None, mapping: ClusterMapping) -> str:
    """A plain-text table of the classes, for the terminal.

    Columns: the class; how many clusters map to it and which; the pixels of
    those clusters inside polygons (of any class); purity, the share of those
    pixels inside polygons of this class; and recall, the share of this
    class's polygon pixels that fall into its clusters. Counts are matched to
    the mapping's classes by name, so an edited mapping can be judged against
    fresh counts. Without counts the pixel columns show ``-``.

    Args:
        counts: Polygon pixel counts, or ``None``.
        mapping: The mapping.

    Returns:
        The table, one line per class (uncertain last) plus a header and a summary line.
    """
    lookup = mapping.lookup()
    rows = [("class", "clusters", "cluster ids", "px in polygons", "purity", "recall")]
    for index, name in enumerate(mapping.output_classes):
        members = np.flatnonzero(lookup == index)
        pixels = purity = recall = "-"
        if counts is not None:
            table = counts.counts
            in_polygons = int(table[members].sum())
            pixels = str(in_polygons)
            if name in counts.class_names:
                column = counts.class_names.index(name)
                hits = int(table[members, column].sum())
                purity = _percent(hits / in_polygons) if in_polygons else "-"
                class_total = int(table[:, column].sum())
                recall = _percent(hits / class_total) if class_total else "-"
        rows.append((name, str(len(members)), _short_ids(members.tolist()), pixels, purity, recall))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = {1, 3, 4, 5}
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    n_uncertain = int((lookup == len(mapping.classes)).sum())
    lines.append(
        f"{mapping.n_labels - n_uncertain} of {mapping.n_labels} clusters mapped to a class, "
        f"{n_uncertain} uncertain"
    )
    return "\n".join(lines)


# --- the command ----------------------------------------------------------------------


#: Beside ``mapping.yaml``: the SHA-256 of the last mapping a count wrote there, which
#: tells a mapping untouched since (made again by counting again) from a hand-edited one.
COUNTED_DIGEST = ".counted.sha256"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _keep_previous(path: Path, *, replacement: str, counting: bool) -> Path | None:
    """Move a hand-edited (or applied) mapping aside before ``replacement`` takes its place,
    so that counting again never destroys a user's edits; returns where it went.

    A mapping that a count wrote and nobody changed is replaced when ``counting`` again
    makes it anew, as is one the replacement repeats word for word; a mapping applied
    over it (``counting`` false) moves it aside, since its counts need the polygons to
    be made again. What is kept goes to ``mapping.previous.yaml``, or, when that holds
    an earlier, different mapping, to the first free ``mapping.previous.N.yaml``:
    nothing kept is ever overwritten.
    """
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    counted = path.with_name(COUNTED_DIGEST)
    untouched_count = counted.exists() and counted.read_text().strip() == _digest(text)
    if text == replacement or (counting and untouched_count):
        return None
    for n in itertools.count(1):
        previous = path.with_name(f"{path.stem}.previous{'' if n == 1 else f'.{n}'}{path.suffix}")
        if not previous.exists():
            break
        if previous.read_text(encoding="utf-8", errors="replace") == text:
            return previous  # kept already
    os.replace(path, previous)
    return previous


def run_assign(
    *,
    label_paths: Sequence[Path],
    polygons_path: Path | None,
    field: str,
    threshold: float,
    out_dir: Path,
    apply: Path | None = None,
    layer: str | None = None,
    polygons: ClassPolygons | None = None,
) -> AssignResult:
    """Assign classes to clusters from polygons, or re-apply an edited mapping.

    Without ``apply``: read the polygons, count cluster pixels inside them over
    all label rasters, build the mapping, write it to
    ``out_dir/assign/mapping.yaml`` (an existing one that was edited or applied
    is kept as ``mapping.previous[.N].yaml``) and write class rasters to
    ``out_dir/classes/``. With ``apply``: read that mapping file instead and
    only write the class rasters; ``polygons_path``, ``field`` and
    ``threshold`` are then not used.

    Args:
        label_paths: The label rasters of one clustering run (``OUTDIR/labels/*.tif``).
        polygons_path: The class polygon file; required without ``apply``.
        field: The polygon attribute holding the class.
        threshold: The share a class needs to win a cluster, in (0, 1].
        out_dir: The run's output directory.
        apply: An edited mapping file to apply instead of counting.
        layer: The polygon layer, for files with several polygon layers.
        polygons: ``polygons_path`` already read (with ``field`` and ``layer``), by a
            caller that checked it before other work; then the file is not read again.

    Returns:
        The mapping, the files written, the per-class table and notes.

    Raises:
        InputError: For unusable polygons or label rasters.
        ConfigError: For a bad threshold, a missing polygon file argument or
            an invalid mapping file.
    """
    label_paths = [Path(p) for p in label_paths]
    out_dir = Path(out_dir)
    notes: list[str] = []
    if apply is not None:
        n_labels, model_hash = _common_clustering(label_paths)
        mapping = load_mapping(Path(apply), n_labels=n_labels, model_hash=model_hash)
        counts = None
        # The run's mapping is the one its class rasters come from, whichever file was applied.
        mapping_path = out_dir / "assign" / "mapping.yaml"
        if not (mapping_path.exists() and mapping_path.samefile(apply)):
            text = Path(apply).read_text(encoding="utf-8")
            previous = _keep_previous(mapping_path, replacement=text, counting=False)
            if previous is not None:
                notes.append(f"kept the earlier mapping as {previous}")
            atomic_write_text(mapping_path, text)
    else:
        threshold = check_threshold(threshold)
        if polygons_path is None:
            raise ConfigError(
                "give a class polygon file, or --apply an edited mapping", where="assign"
            )
        if polygons is None:
            polygons = read_class_polygons(Path(polygons_path), field=field, layer=layer)
        notes += polygons.notes
        counts = count_cluster_classes(label_paths, polygons)
        if counts.outside:
            classes = sorted({polygons.classes[i] for i in counts.outside})
            notes.append(
                f"{len(counts.outside)} of {len(polygons.geometries)} polygons (class {', '.join(classes)}) overlap "
                "no scene and are not counted; check their CRS and extent"
            )
        if counts.unplaced:
            notes.append(
                f"scene {', '.join(counts.unplaced)}: no CRS, so no polygon can be placed on it and its pixels "
                "are not counted; its class raster follows the mapping all the same"
            )
        # Colours the user gave the classes in the mapping this one replaces stay.
        earlier_colors = _colors_in(out_dir / "assign" / "mapping.yaml")
        # Counted zero everywhere: drawn off these scenes (or only over nodata), which the
        # per-class table alone leaves for the user to notice.
        missed = [name for name, total in zip(counts.class_names, counts.counts.sum(axis=0), strict=True) if not total]
        if missed:
            notes.append(
                f"class {', '.join(missed)}: no polygon covers a valid pixel of these scenes "
                "(drawn elsewhere, or over nodata); no cluster can go to it"
            )
        mapping = build_mapping(counts, threshold=threshold)
        mapping = dataclasses.replace(
            mapping,
            model_hash=_common_clustering(label_paths)[1],
            colors={c: v for c, v in earlier_colors.items() if c in mapping.output_classes},
        )
        mapping_path = out_dir / "assign" / "mapping.yaml"
        source = f"{polygons.path} (field {field!r}), threshold {threshold}"
        text = mapping_yaml(mapping, source=source, path=mapping_path)
        previous = _keep_previous(mapping_path, replacement=text, counting=True)
        if previous is not None:
            notes.append(f"kept the earlier mapping as {previous}")
        write_mapping(mapping_path, mapping, source=source)  # writes ``text``
        atomic_write_text(mapping_path.with_name(COUNTED_DIGEST), _digest(text))
    notes += mapping.notes
    class_paths = apply_mapping(label_paths, mapping, out_dir=out_dir / "classes")
    return AssignResult(
        mapping=mapping,
        mapping_path=mapping_path,
        class_paths=class_paths,
        table=format_class_table(counts, mapping),
        counts=counts,
        notes=notes,
    )
