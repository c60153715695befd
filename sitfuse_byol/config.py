"""YAML configuration: one schema with defaults, strict validation, overrides.

Every key a user may write is declared in :data:`SCHEMA`. Loading fills in defaults,
refuses unknown keys (with a did-you-mean) and wrong types or values with one line:
``config: train.epochs: must be a positive integer (got 'ten')``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sitfuse_byol.errors import ConfigError

REQUIRED = object()

#: Seeds reach NumPy's legacy RandomState (scikit-learn's random_state), which takes 32 bits.
SEED_MAX = 2**32 - 1

_FLOAT_TAG = "tag:yaml.org,2002:float"


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads floats the YAML 1.2 way.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so
    ``5e-4``, ``1e5`` and ``1.0e6`` load as strings. People write those all the time
    (learning rates, augmentation strengths), at any depth of a config, an override or
    a scene list, so the float resolver is replaced here instead of patching values
    after loading. Everything else is ``yaml.safe_load``'s behaviour.
    """


# Copy the resolver table before editing it, so yaml.SafeLoader itself is left alone.
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _mapping_without_duplicate_keys(loader: YamlLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    # A key written twice would silently keep only its last value (a second `data:`
    # section dropping the first one's scenes); say so instead.
    seen: set[Any] = set()
    for key_node, _ in node.value:
        # Merge keys (`<<: *defaults`) and non-scalar keys are SafeLoader's business.
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


YamlLoader.construct_mapping = _mapping_without_duplicate_keys  # type: ignore[method-assign,assignment]


def load_yaml(text: str) -> Any:
    """Parse YAML text safely, with YAML 1.2 floats (see :class:`YamlLoader`).

    Raises:
        yaml.YAMLError: The text is not valid YAML.
    """
    # A safe loader: only plain data, never arbitrary Python objects.
    return yaml.load(text, Loader=YamlLoader)


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """A YAML error in one line, its problem and line, without PyYAML's excerpt of the text."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
    return f"{problem} at line {mark.line + 1}" if mark is not None else problem


@dataclass(frozen=True)
class Key:
    """One configuration key.

    Attributes:
        kind: ``int``, ``float``, ``bool``, ``str``, ``list``, ``mapping`` or ``scenes``
            (a list or a string).
        default: The default value, or :data:`REQUIRED`.
        doc: One line for the config reference.
        nullable: Whether ``null`` is accepted.
        choices: Allowed values.
        minimum: Inclusive lower bound for numbers.
        maximum: Inclusive upper bound for numbers.
        exclusive_minimum: Whether ``minimum`` itself is refused.
        check: Extra validation returning an error message or ``None``.
        placement: The key says where work runs, not what it computes, so change
            detection (:meth:`Config.digest`) leaves it out.
        added_later: The key is hashed only when it differs from its default, so adding
            it left the keys of earlier runs as they were.
    """

    kind: str
    default: Any
    doc: str
    nullable: bool = False
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    check: Callable[[Any], str | None] | None = None
    placement: bool = False
    added_later: bool = False


def _pair(value: Any) -> str | None:
    if not (isinstance(value, list) and len(value) == 2):
        return "must be a list [min, max]"
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return "must hold two numbers"
    return None if value[0] <= value[1] else "min must not exceed max"


def _bands(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of band indices (from 1) or names"
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | str):
            hint = f"; quote a name that looks like a number ('{v}')" if isinstance(v, float) else ""
            return f"must hold band indices (from 1) or names, not {v!r}{hint}"
    return None


def _rgb_bands(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) != 3:
        return "must list three bands (red, green, blue) by index (from 1) or name"
    return _bands(value)


def _class_names(value: Any) -> str | None:
    if not all(isinstance(v, str) and v.strip() for v in value):
        return "must be a list of non-empty names"
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
        return f"names must differ; {', '.join(map(repr, repeated))} appears more than once"
    return None


def _augment(value: Any) -> str | None:
    # Imported here: the augmentation module pulls in torch, which config loading need not.
    from sitfuse_byol.train.augment import AugmentConfig

    try:
        AugmentConfig.from_dict(dict(value))
    except ConfigError as err:
        return err.what
    return None


SCHEMA: dict[str, dict[str, Key]] = {
    "data": {
        "scenes": Key("scenes", REQUIRED, "Scene list: a list of paths or multi-file scenes, a text file, a YAML file or a glob."),
        "bands": Key("list", None, "Bands to use: 1-based indices or names; all when null.", nullable=True, check=_bands),
        "nodata": Key("float", None, "Nodata value; overrides the files' own.", nullable=True),
        "valid_range": Key("list", None, "Inclusive [min, max] of valid values.", nullable=True, check=_pair),
        "variable": Key("str", None, "Zarr/NetCDF variable to read; guessed when null.", nullable=True),
        "unscale": Key("bool", False, "Apply each file's scale and offset (GDAL scale/offset, CF scale_factor/add_offset): values in physical units as float32, nodata and invalid pixels NaN, valid_range in those units. Needed to mix scenes packed differently; false keeps stored values, with nodata and valid_range in stored units.", added_later=True),
        "chunk_size": Key("int", 512, "Preferred Dask chunk edge in pixels (aligned to blocks and patches).", minimum=16),
    },
    "tiling": {
        "patch_size": Key("int", 16, "Training patch edge in pixels.", minimum=4),
        "min_valid_fraction": Key("float", 0.9, "Patches with fewer valid pixels are skipped.", minimum=0.0, maximum=1.0, exclusive_minimum=True),
        "shuffle_buffer": Key("int", 2048, "Patches held for shuffling; bounds sampler memory with prefetch.", minimum=1),
        "prefetch_chunks": Key("int", 3, "Chunks read ahead in background threads.", minimum=1),
    },
    "train": {
        "encoder": Key("str", "small_cnn", "Encoder name from the registry (see `sitfuse_byol.train.encoders`)."),
        "encoder_args": Key("mapping", {}, "Extra keyword arguments for the encoder."),
        "norm": Key("str", "auto", "Normalisation layers: auto (GroupNorm+WS below batch 64, the BYOL rule), batch or group. GroupNorm normalises each patch on its own, which loses absolute spectral levels; see BENCHMARKS.md.", choices=("auto", "batch", "group")),
        "epochs": Key("int", 10, "Training epochs.", minimum=1),
        "steps_per_epoch": Key("int", 100, "Optimizer steps per epoch.", minimum=1),
        "batch_size": Key("int", 64, "Patches per step (per device); at least 2.", minimum=2),
        "optimizer": Key("str", "adamw", "adamw or lars.", choices=("adamw", "lars")),
        "lr": Key("float", None, "Peak learning rate; null: 0.2 x global batch / 256 with LARS (BYOL's rule), 1e-3 with AdamW.", nullable=True, minimum=0.0, exclusive_minimum=True),
        "weight_decay": Key("float", 1e-4, "Weight decay (bias and norm parameters excluded).", minimum=0.0),
        "warmup_steps": Key("int", 50, "Linear warm-up steps before the cosine decay (at most a fifth of the run).", minimum=0),
        "grad_clip": Key("float", 3.0, "Gradient norm clip; null disables.", nullable=True, minimum=0.0, exclusive_minimum=True),
        "tau_base": Key("float", 0.99, "Base EMA rate of the target; rises to 1 on a cosine.", minimum=0.0, maximum=1.0),
        "projector_hidden": Key("int", 1024, "Hidden width of projector and predictor (paper: 4096).", minimum=8),
        "projection_dim": Key("int", 128, "Projection size (paper: 256).", minimum=2),
        "seed": Key(
            "int", 0, "Seed for sampling, augmentation and initialisation.", minimum=0, maximum=SEED_MAX
        ),
        "device": Key("str", "auto", "auto, cpu or cuda.", choices=("auto", "cpu", "cuda"), placement=True),
        "compile": Key("bool", False, "Use torch.compile.", placement=True),
        "threads": Key("int", None, "CPU threads for torch; null: the cores this process may use, shared among the torchrun processes of the node.", nullable=True, minimum=1, placement=True),
        "augment": Key("mapping", {}, "Augmentation strengths (see `sitfuse_byol/train/augment.py`); mild spectral jitter, no band dropout by default.", check=_augment),
    },
    "embed": {
        "stride": Key("int", 1, "Embed n x n pixel cells (the mean of their valid pixels) instead of pixels: saved embeddings are on the n-times coarser grid (transform scaled to match); label rasters stay on the input grid, each cell's label on its n x n pixels.", minimum=1),
        "block_size": Key("int", 256, "Inference block edge in pixels (plus halo); blocks run in parallel threads.", minimum=16),
        "window": Key("int", 0, "Average embeddings over an odd window (BYOL learns pooled patches); 0 disables.", minimum=0, check=lambda v: "must be odd or 0" if v and v % 2 == 0 else None),
        "save": Key("bool", True, "Write embeddings to Zarr; false streams them into clustering."),
        "device": Key("str", "auto", "auto (CUDA when the worker has a GPU, bf16 autocast), cpu or cuda.", choices=("auto", "cpu", "cuda"), placement=True),
    },
    "cluster": {
        "n_clusters": Key("int", 16, "Number of clusters (coarse clusters when hierarchical).", minimum=2, maximum=65534),
        "method": Key("str", "kmeans", "kmeans (streaming MiniBatchKMeans) or iic (deep-clustering head).", choices=("kmeans", "iic")),
        "samples_per_scene": Key("int", 20000, "Embeddings sampled from each scene to fit the model.", minimum=1),
        "sample_blocks": Key("int", 32, "Streamed embeddings (embed.save false): draw a scene's sample from this many inference blocks, one at random holding valid pixels from each of as many bands of the scene, embedding a cluster.sample_window window of each; 0: every block, whole.", minimum=0),
        "sample_window": Key("int", 64, "Streamed embeddings: edge, in embeddings (pixels at embed.stride 1), of the window embedded in each sample block, around a random valid pixel; grown until the windows hold twice samples_per_scene, and at most the block.", minimum=8, added_later=True),
        "hierarchical": Key("bool", False, "Also split every cluster into n_fine sub-clusters."),
        "n_fine": Key("int", 4, "Sub-clusters per cluster when hierarchical.", minimum=2),
        "seed": Key("int", 0, "Seed for sampling and initialisation.", minimum=0, maximum=SEED_MAX),
    },
    "output": {
        "dir": Key("str", "outputs", "Output folder (relative to the config file)."),
        "polygons": Key("bool", False, "Also write sieved polygons as GeoPackage."),
        "min_polygon_px": Key("int", 16, "Sieve size in pixels for polygons.", minimum=1),
        "zarr": Key("bool", False, "Also write labels as Zarr (labels/<scene>.zarr; a hierarchical model adds labels_coarse)."),
        "quicklook": Key("bool", True, "Write a PNG quicklook beside each label raster."),
        "rgb_bands": Key("list", None, "Three bands for quicklooks; guessed when null.", nullable=True, check=_rgb_bands),
        "class_names": Key("list", None, "Names for cluster labels; 'cluster N' when null.", nullable=True, check=_class_names),
    },
    "dask": {
        "workers": Key("int", None, "LocalCluster workers; null: one per 4 cores, at most one per scene.", nullable=True, minimum=1),
        "threads_per_worker": Key("int", None, "Threads per worker, each running blocks with one torch thread; null: the cores shared out.", nullable=True, minimum=1),
        "scheduler": Key("str", None, "Address of an existing scheduler, tcp://HOST:PORT.", nullable=True),
        "gpus_per_worker": Key("int", 0, "GPUs each worker advertises as a resource.", minimum=0),
        "retries": Key("int", 2, "Retries of a per-scene task after a lost worker or transient error; bad input is not retried.", minimum=0),
    },
}

_DESCRIBE = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list",
    "mapping": "a mapping",
    "scenes": "a list of scenes or a path/glob",
}


def yaml_text(value: Any) -> str:
    """A config value as the user would write it in YAML (null, true, [1, 2]); strings
    quoted, so that ``'ten'`` shows it was read as text."""
    if isinstance(value, str):
        return repr(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text.removesuffix("...").strip()


def _check_value(dotted: str, key: Key, value: Any) -> Any:
    """Validate one value; returns it (ints widened to float for float keys)."""

    def fail(message: str) -> ConfigError:
        # A message that shows the wrong part (one augmentation) or says null needs no more.
        shown = "" if value is None or "(got " in message else f" (got {yaml_text(value)})"
        return ConfigError(f"config: {dotted}: {message}{shown}")

    if value is None:
        if key.nullable:
            return None
        raise fail(f"must be {_describe(key)}, not null")
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list),
        "mapping": isinstance(value, Mapping),
        "scenes": isinstance(value, list | str) and bool(value),
    }[key.kind]
    if not ok:
        # YAML reads a folder named 2024 or a band named 865 as a number.
        quote = f"; quote it: '{value}'" if key.kind == "str" and isinstance(value, int | float) else ""
        raise fail(f"must be {_describe(key)}{quote}")
    if key.kind == "float":
        value = float(value)
        if math.isnan(value) and dotted == "data.nodata":
            raise fail("must be a finite number; NaN pixels are invalid anyway (leave it null)")
        if not math.isfinite(value):
            raise fail("must be a finite number")
    if key.choices is not None and value not in key.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in key.choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise fail(f"must be one of {', '.join(map(str, key.choices))}{hint}")
    if key.minimum is not None and (
        value < key.minimum or (key.exclusive_minimum and value == key.minimum)
    ):
        raise fail(f"must be {_describe(key)}")
    if key.maximum is not None and value > key.maximum:
        raise fail(f"must be at most {key.maximum}")
    if key.check is not None:
        problem = key.check(value)
        if problem:
            raise fail(problem)
    return value


def _describe(key: Key) -> str:
    if key.kind == "int" and key.minimum == 1:
        return "a positive integer"
    if key.kind == "int" and key.minimum == 0:
        return "a non-negative integer"
    if key.kind in ("int", "float") and key.minimum is not None:
        op = ">" if key.exclusive_minimum else ">="
        return f"{_DESCRIBE[key.kind]} {op} {key.minimum:g}"
    return _DESCRIBE.get(key.kind, key.kind)


def _unknown(dotted: str, name: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"config: {dotted}: unknown key{hint}")


def validate(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate a raw config mapping and fill in defaults."""
    if not isinstance(raw, Mapping):
        raise ConfigError("config: the top level must be a mapping of sections")
    resolved: dict[str, dict[str, Any]] = {}
    for section in raw:
        if section not in SCHEMA:
            raise _unknown(str(section), str(section), SCHEMA)
    for section, keys in SCHEMA.items():
        given = raw.get(section)
        if given is None:  # `train:` with nothing under it
            given = {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"config: {section}: must be a mapping (got {given!r})")
        for name in given:
            if name not in keys:
                raise _unknown(f"{section}.{name}", str(name), keys)
        resolved[section] = {}
        for name, key in keys.items():
            dotted = f"{section}.{name}"
            if name in given:
                resolved[section][name] = _check_value(dotted, key, given[name])
            elif key.default is REQUIRED:
                raise ConfigError(f"config: {dotted}: required key is missing")
            else:
                resolved[section][name] = copy.deepcopy(key.default)
    return resolved


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``key.path=value`` to a raw config; the value is parsed as YAML.

    The path is a section and a key (``train.epochs``), or goes on into a mapping key
    (``train.encoder_args.width``), whose other entries are kept.
    """
    if "=" not in assignment:
        raise ConfigError(f"config: --set {assignment!r}: expected key.path=value")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"config: --set {dotted!r}: expected section.key (or section.key.entry)")
    try:
        value = load_yaml(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"config: --set {dotted}: value is not valid YAML ({text!r})") from err
    node = raw
    for depth, name in enumerate(parts[:-1]):
        # A section written with nothing under it (`train:`) is an empty one.
        if node.get(name) is None:
            node[name] = {}
        node = node[name]
        if not isinstance(node, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"config: {where}: must be a mapping to --set {dotted} (got {node!r})")
    node[parts[-1]] = value


@dataclass(frozen=True)
class Config:
    """A validated configuration.

    Attributes:
        values: Sections of resolved keys, defaults filled in.
        base: Folder relative paths are taken from (the config file's folder).
    """

    values: dict[str, dict[str, Any]]
    base: Path

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    @property
    def output_dir(self) -> Path:
        out = Path(self.values["output"]["dir"]).expanduser()
        return (out if out.is_absolute() else self.base / out).resolve()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.values, sort_keys=False)

    def digest(self, *sections: str, leave_out: Iterable[str] = ()) -> str:
        """A short hash of the named sections (all when none), for change detection.

        Placement keys (``embed.device``) are left out: moving work to a GPU is no reason
        to redo finished scenes.

        Args:
            sections: Top-level sections to hash.
            leave_out: Dotted keys (``"data.scenes"``) not to hash either.
        """
        chosen = {s: _without_placement(s, self.values[s]) for s in (sections or tuple(self.values))}
        for dotted in leave_out:
            section, _, key = dotted.partition(".")
            if isinstance(chosen.get(section), dict):
                chosen[section] = {k: v for k, v in chosen[section].items() if k != key}
        text = json.dumps(chosen, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def settings_digest(self) -> str:
        """A short hash of what a scene's outputs depend on, for provenance tags.

        Which scenes are in the list, where outputs go and how work is spread over Dask
        are left out: label rasters made with the same settings carry the same hash, in
        whichever folder or batch they were made.
        """
        sections = [s for s in self.values if s != "dask"]
        return self.digest(*sections, leave_out=("data.scenes", "output.dir"))


def _without_placement(section: str, values: Any) -> Any:
    keys = SCHEMA.get(section, {})
    if not isinstance(values, dict):
        return values
    return {
        k: v
        for k, v in values.items()
        if not (k in keys and (keys[k].placement or (keys[k].added_later and v == keys[k].default)))
    }


def load_config(
    path: Path | None = None,
    *,
    overrides: Iterable[str] = (),
    raw: Mapping[str, Any] | None = None,
    base: Path | None = None,
) -> Config:
    """Load, override and validate a config.

    Args:
        path: A YAML file; relative paths inside it are taken from its folder.
        overrides: ``key.path=value`` assignments (``--set``), applied in order.
        raw: A mapping to use instead of a file.
        base: Folder for relative paths when ``raw`` is given (default: current folder).
    """
    if path is not None:
        if not path.exists():
            raise ConfigError("config file not found", where=str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else (err.strerror or str(err)).lower()
            raise ConfigError(f"config: cannot read the file: {reason}", where=str(path)) from err
        try:
            loaded = load_yaml(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None)
            detail = f": {problem}" if problem and "duplicate key" in problem else ""
            raise ConfigError(f"config: invalid YAML{line}{detail}", where=str(path)) from err
        data = copy.deepcopy(loaded) if loaded is not None else {}
        base = path.resolve().parent
    else:
        data = copy.deepcopy(dict(raw or {}))
        base = (base or Path.cwd()).resolve()
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping of sections", where=str(path))
    for assignment in overrides:
        apply_override(data, assignment)
    return Config(values=_absolute_paths(validate(data), base=base), base=base)


def _absolute(path: str, base: Path) -> str:
    if not path.strip():
        return path  # the scene reader names an empty entry as such
    expanded = Path(path).expanduser()
    return os.path.normpath(expanded if expanded.is_absolute() else base / expanded)


def _absolute_paths(values: dict[str, dict[str, Any]], *, base: Path) -> dict[str, dict[str, Any]]:
    """Scene paths (globs, list files, multi-file bands) and ``output.dir`` made absolute.

    Relative paths are the config file's business; once resolved, the config means the
    same from any folder, so ``config.resolved.yaml`` can be run again as it is.
    """

    def entry(scene: Any) -> Any:
        if isinstance(scene, str):
            return _absolute(scene, base)
        if isinstance(scene, Mapping) and isinstance(scene.get("bands"), list):
            return {**scene, "bands": [_absolute(f, base) if isinstance(f, str) else f for f in scene["bands"]]}
        return scene  # left for the scene reader to refuse, where it says what is wrong

    scenes = values["data"]["scenes"]
    values["data"]["scenes"] = entry(scenes) if isinstance(scenes, str) else [entry(s) for s in scenes]
    values["output"]["dir"] = _absolute(values["output"]["dir"], base)
    return values


def reference_markdown() -> str:
    """The config reference as a Markdown table, generated from :data:`SCHEMA`."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            default = "required" if key.default is REQUIRED else json.dumps(key.default)
            kind = key.kind + (" or null" if key.nullable else "")
            if key.choices:
                kind = " \\| ".join(map(str, key.choices))
            lines.append(f"| `{section}.{name}` | {kind} | `{default}` | {key.doc} |")
    return "\n".join(lines)
