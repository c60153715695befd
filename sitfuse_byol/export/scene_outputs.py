"""Everything a scene gets from the clustering: label rasters, confidence, sidecars, extras.

Labels are predicted once into a temporary Zarr store beside the outputs (bounded
memory, one pass over the embeddings), then written as COGs on the input's exact grid:
with ``embed.stride`` > 1 each label covers its stride x stride cell (whose embedding
is the mean of the cell's valid pixels), and nodata follows the input's valid mask
pixel for pixel. That mask reads every input
band, so it is stored beside the predictions in the same pass, and only with a stride:
at stride 1 the embeddings already carry it (see :func:`_to_scene_grid`).
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from sitfuse_byol.cluster.model import ClusterModel
from sitfuse_byol.embed import SceneEmbedding
from sitfuse_byol.errors import ConfigError
from sitfuse_byol.export.atomic import remove_path, replace_path
from sitfuse_byol.export.float_raster import write_float_raster
from sitfuse_byol.export.label_raster import label_dtype_and_nodata, write_label_raster
from sitfuse_byol.export.palette import hierarchical_colors, label_colors
from sitfuse_byol.export.sidecars import aux_xml_path_for, qml_path_for
from sitfuse_byol.read import Scene

RGB_GUESSES = (("B04", "B03", "B02"), ("B4", "B3", "B2"), ("red", "green", "blue"), ("B3", "B2", "B1"))
#: Red, green and blue, in nanometres, for bands named by wavelength.
VISIBLE_NM = (640.0, 550.0, 470.0)


@dataclass(frozen=True)
class OutputOptions:
    """What to write besides the label COG (the ``output`` config section)."""

    polygons: bool = False
    min_polygon_px: int = 16
    zarr: bool = False
    quicklook: bool = True
    rgb_bands: Sequence[int | str] | None = None
    class_names: Sequence[str] | None = None

    @classmethod
    def from_config(cls, output: Mapping) -> OutputOptions:
        return cls(
            polygons=output["polygons"],
            min_polygon_px=output["min_polygon_px"],
            zarr=output["zarr"],
            quicklook=output["quicklook"],
            rgb_bands=output["rgb_bands"],
            class_names=output["class_names"],
        )


def _predict_block(
    block: np.ndarray, *, model: ClusterModel, nodata: int, coarse_nodata: int
) -> np.ndarray:
    """Labels, confidence and (hierarchical models) coarse labels of one embedding block.

    Args:
        block: ``(D, h, w)`` embeddings, NaN where the input is invalid.
        model: The clustering model.
        nodata: Nodata of the (finest) label raster.
        coarse_nodata: Nodata of the coarse label raster.

    Returns:
        ``(2 or 3, h, w)`` float32: labels, confidence and coarse labels, each
        already holding its own raster's nodata (NaN for confidence).
    """
    # No NaN-free copy of the block: predict_block masks non-finite pixels itself, and
    # the copy cost 2-3x the prediction (see ClusterModel.predict_block).
    labels, confidence = model.predict_block(block, np.isfinite(block[0]), nodata=nodata)
    layers = [labels.astype(np.float32), confidence]
    if model.n_fine:
        # The coarse raster's own nodata, not the fine one cast down to its dtype.
        coarse = np.where(labels == nodata, coarse_nodata, labels // model.n_fine)
        layers.append(coarse.astype(np.float32))
    return np.stack(layers)


def _to_scene_grid(
    layer: da.Array, *, stride: int, valid: da.Array, fill: float | np.generic
) -> da.Array:
    """A strided layer on the scene's pixels: nearest-neighbour expansion, then the mask.

    This is the only place the scene's valid mask is applied. At stride 1 it changes
    nothing: embeddings are NaN exactly where the input is invalid, and prediction
    already wrote nodata there; skipping it spares a read of every input band. At a
    larger stride a value covers a stride x stride cell whose pixels need not all be
    valid (a cell is labelled when any is), so invalid pixels get ``fill`` here.

    Args:
        layer: ``(h, w)`` values on the embedding grid, in the output dtype.
        stride: The embedding stride.
        valid: ``(H, W)`` bool valid mask of the scene; not read at stride 1.
        fill: Value of invalid pixels, in the output dtype.

    Returns:
        ``(H, W)`` values on the scene grid, chunked like ``valid`` when ``stride`` > 1.
    """
    if stride == 1:
        return layer
    full = da.repeat(da.repeat(layer, stride, axis=0), stride, axis=1)
    full = full[: valid.shape[0], : valid.shape[1]].rechunk(valid.chunks)
    return da.where(valid, full, fill)


def _rgb_positions(scene: Scene, rgb_bands: Sequence[int | str] | None) -> list[int]:
    from sitfuse_byol.read.bands import select_bands

    if rgb_bands is not None:
        return select_bands(scene.band_names, rgb_bands, where="output.rgb_bands")
    if {f"B{i}" for i in (1, 2, 3, 4, 5, 7)} <= set(scene.band_names) and "B6" not in scene.band_names:
        # The reflective bands of Landsat TM/ETM+ (thermal B6 left out), where red is B3, not
        # OLI's B4 (which has a B6, shortwave infrared, in every reflective stack).
        return [scene.band_names.index(name) for name in ("B3", "B2", "B1")]
    for guess in RGB_GUESSES:
        if all(name in scene.band_names for name in guess):
            return [scene.band_names.index(name) for name in guess]
    by_wavelength = _nearest_to_visible(scene.band_names)
    if by_wavelength is not None:
        return by_wavelength
    return [0, 0, 0] if scene.n_bands < 3 else [2, 1, 0]


def _nearest_to_visible(names: Sequence[str]) -> list[int] | None:
    """The bands nearest red, green and blue where the band names are wavelengths, as a
    hyperspectral cube's band coordinate often is (nm, or µm with decimals); else ``None``."""
    try:
        values = np.array([float(name) for name in names])
    except ValueError:
        return None
    if values.max() < 3 and not np.all(values == np.round(values)):
        values = values * 1000  # micrometres
    # Band numbers (1..224) are no wavelengths; the visible range must be inside.
    if values.min() > VISIBLE_NM[-1] or values.max() < VISIBLE_NM[0] or values.min() < 300:
        return None
    return [int(np.abs(values - target).argmin()) for target in VISIBLE_NM]


def check_class_names(names: Sequence[str] | None, *, n_labels: int) -> None:
    """``output.class_names``, when given, must name every label.

    Raises:
        ConfigError: Another number of names.
    """
    if names and len(names) != n_labels:
        raise ConfigError(
            f"{len(names)} class names for {n_labels} cluster labels; give one name per label",
            where="output.class_names",
        )


def write_scene_outputs(
    *,
    scene: Scene,
    embedding: SceneEmbedding,
    model: ClusterModel,
    out_dir: Path,
    stride: int,
    options: OutputOptions,
    tags: Mapping[str, str],
) -> dict[str, str]:
    """Predict labels for one scene and write all of its outputs.

    Args:
        scene: The scene; outputs are written on its grid.
        embedding: The scene's embeddings, NaN where the input is invalid.
        model: The clustering model.
        out_dir: The run's output directory. Everything is written into a temporary
            ``.work`` folder there first and moved into place only once every output
            of the scene is complete, so a failure part-way (a bad quicklook band, a
            full disk) leaves the scene's earlier outputs as they were, not a mix.
        stride: The embedding stride (1: one embedding per scene pixel).
        options: Which extra outputs to write.
        tags: Dataset tags of the rasters.

    Returns:
        The paths written, by kind: ``labels``, ``confidence``, and when asked for
        ``labels_coarse``, ``quicklook``, ``polygons``, ``labels_zarr``.
    """
    n_labels = model.n_labels
    check_class_names(options.class_names, n_labels=n_labels)
    dtype, nodata = label_dtype_and_nodata(n_labels)
    coarse_dtype, coarse_nodata = label_dtype_and_nodata(model.n_clusters)
    layers = 3 if model.n_fine else 2
    data = embedding.data.rechunk({0: -1})
    predicted = data.map_blocks(
        _predict_block,
        model=model,
        nodata=nodata,
        coarse_nodata=coarse_nodata,
        chunks=((layers,), *data.chunks[1:]),
        dtype=np.float32,
    )
    work = out_dir / ".work" / f"{scene.id}.export"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    staged = work / "out"
    outputs: dict[str, str] = {}
    try:
        stores = [predicted.to_zarr(str(work / "predicted.zarr"), compute=False, compressors=None)]
        if stride > 1:
            # Every expanded layer needs the full-resolution mask, which reads every
            # input band; stored once (beside the predictions, sharing the input read
            # when the embeddings are computed on the fly), it is read back cheaply.
            stores.append(scene.valid.to_zarr(str(work / "valid.zarr"), compute=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dask.compute(*stores)
        stored = da.from_zarr(str(work / "predicted.zarr"))
        valid = da.from_zarr(str(work / "valid.zarr")) if stride > 1 else scene.valid

        def layer(index: int, kind: np.dtype, fill: float | np.generic) -> da.Array:
            # Cast on the strided grid: stride**2 fewer values than after expanding.
            return _to_scene_grid(stored[index].astype(kind), stride=stride, valid=valid, fill=fill)

        names = list(options.class_names) if options.class_names else None
        colors = hierarchical_colors(model.n_clusters, model.n_fine) if model.n_fine else label_colors(n_labels)
        labels = layer(0, dtype, dtype.type(nodata))
        label_path = staged / "labels" / f"{scene.id}.tif"
        write_label_raster(
            labels, grid=scene.grid, path=label_path, n_labels=n_labels,
            class_names=names, colors=colors, tags=dict(tags), description="cluster",
        )
        outputs["labels"] = str(label_path)
        confidence = layer(1, np.dtype(np.float32), np.float32(np.nan))
        confidence_path = staged / "confidence" / f"{scene.id}.tif"
        write_float_raster(
            confidence, grid=scene.grid, path=confidence_path,
            description=model.confidence_meaning, tags=dict(tags),
        )
        outputs["confidence"] = str(confidence_path)
        if model.n_fine:
            coarse = layer(2, coarse_dtype, coarse_dtype.type(coarse_nodata))
            coarse_path = staged / "labels" / f"{scene.id}_coarse.tif"
            write_label_raster(
                coarse, grid=scene.grid, path=coarse_path, n_labels=model.n_clusters,
                tags=dict(tags), description="coarse cluster",
            )
            outputs["labels_coarse"] = str(coarse_path)
        if options.quicklook:
            outputs["quicklook"] = str(
                _write_quicklook(scene, labels, nodata=nodata, colors=colors, out_dir=staged, options=options)
            )
        if options.polygons:
            from sitfuse_byol.export.polygons import write_polygons

            polygon_path = staged / "labels" / f"{scene.id}.gpkg"
            write_polygons(
                polygon_path, labels=labels.compute(), grid=scene.grid, nodata=nodata,
                min_size_px=options.min_polygon_px, class_names=names,
            )
            outputs["polygons"] = str(polygon_path)
        if options.zarr:
            zarr_layers = {"labels": (labels, nodata)}
            if model.n_fine:
                zarr_layers["labels_coarse"] = (coarse, coarse_nodata)
            outputs["labels_zarr"] = str(_write_label_zarr(scene, zarr_layers, out_dir=staged))
        _publish(staged, out_dir)
        _remove_outdated_outputs(scene.id, out_dir=out_dir, written=set(outputs), model_hash=model.model_hash)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {kind: str(out_dir / Path(path).relative_to(staged)) for kind, path in outputs.items()}


def _publish(staged: Path, out_dir: Path) -> None:
    """Move every complete output from ``staged/<folder>/`` onto ``out_dir/<folder>/``.

    Each move is a rename within one file system (``.work`` is inside ``out_dir``), so
    each file appears whole; a Zarr store replaces the old one through
    :func:`~sitfuse_byol.export.atomic.replace_path`, as in ``atomic_path``.
    """
    for folder in sorted(p for p in staged.iterdir() if p.is_dir()):
        target = out_dir / folder.name
        target.mkdir(parents=True, exist_ok=True)
        names = {item.name for item in folder.iterdir()}
        for item in sorted(folder.iterdir()):
            final = target / item.name
            if item.suffix == ".tif":
                # A sidecar this export did not write (QGIS's statistics .aux.xml) would
                # describe the old raster.
                for sidecar in (aux_xml_path_for(final), qml_path_for(final)):
                    if sidecar.name not in names:
                        remove_path(sidecar)
            replace_path(item, final, move=_move)


def _move(source: Path, final: Path) -> None:
    """A rename; a copy where ``final`` is on another file system (a symlinked folder)."""
    try:
        os.replace(source, final)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        shutil.move(source, final)


def _output_paths(scene_id: str, out_dir: Path) -> dict[str, list[Path]]:
    """Every file a scene's export (and `sitfuse assign`) can leave, by output kind."""
    def with_sidecars(raster: Path) -> list[Path]:
        return [raster, qml_path_for(raster), aux_xml_path_for(raster)]

    labels = out_dir / "labels"
    return {
        "labels": with_sidecars(labels / f"{scene_id}.tif"),
        "confidence": with_sidecars(out_dir / "confidence" / f"{scene_id}.tif"),
        "labels_coarse": with_sidecars(labels / f"{scene_id}_coarse.tif"),
        "quicklook": [labels / f"{scene_id}.png"],
        "polygons": [labels / f"{scene_id}.gpkg"],
        "labels_zarr": [labels / f"{scene_id}.zarr"],
        "classes": with_sidecars(out_dir / "classes" / f"{scene_id}.tif"),
    }


def remove_scene_outputs(scene_id: str, *, out_dir: Path) -> None:
    """Remove everything a scene's export and class assignment wrote."""
    for paths in _output_paths(scene_id, out_dir).values():
        for path in paths:
            remove_path(path)


def _remove_outdated_outputs(scene_id: str, *, out_dir: Path, written: set[str], model_hash: str) -> None:
    """What an earlier export of the scene left that this one did not write (an option
    turned off, a flat model after a hierarchical one), and its class rasters when
    `sitfuse assign` made them from another clustering model's labels: beside the new
    labels they would pass for results of this run."""
    paths = _output_paths(scene_id, out_dir)
    optional = ("labels_coarse", "quicklook", "polygons", "labels_zarr")
    outdated = [path for kind in optional if kind not in written for path in paths[kind]]
    class_raster = paths["classes"][0]
    # Class rasters older than the tag are left alone: nothing says which labels made them.
    made_from = _tag(class_raster, "model_hash") if class_raster.exists() else None
    if made_from and made_from != model_hash:
        outdated += paths["classes"]
    for path in outdated:
        remove_path(path)


def _write_quicklook(
    scene: Scene, labels: da.Array, *, nodata: int, colors: np.ndarray, out_dir: Path, options: OutputOptions
) -> Path:
    from sitfuse_byol.export.quicklook import quicklook_step, write_quicklook

    # Subsampled here, lazily, with write_quicklook's own step, so only what the PNG
    # shows is computed and write_quicklook has nothing left to subsample.
    step = quicklook_step(scene.grid.shape)
    positions = _rgb_positions(scene, options.rgb_bands)
    # Labels are nodata exactly where the input is invalid, so they give the mask: the
    # input's own mask would read every band where the RGB needs three.
    rgb, shown = dask.compute(scene.data[positions][:, ::step, ::step], labels[::step, ::step])
    valid = shown != nodata
    path = out_dir / "labels" / f"{scene.id}.png"
    write_quicklook(
        path, rgb=rgb, valid=valid, labels=shown, nodata=nodata, colors=colors, title=scene.id,
    )
    return path


def _write_label_zarr(scene: Scene, layers: dict[str, tuple[da.Array, int]], *, out_dir: Path) -> Path:
    """One Zarr store of the label layers (``name: (labels, nodata)``): the labels, and a
    hierarchical model's coarse labels beside them."""
    import rioxarray  # noqa: F401
    import xarray as xr

    from sitfuse_byol.embed.dense import grid_coords
    from sitfuse_byol.export.atomic import atomic_path

    variables = {}
    for name, (labels, nodata) in layers.items():
        array = xr.DataArray(labels, dims=("y", "x"), coords=grid_coords(scene.grid), name=name)
        if scene.grid.crs is not None:
            array = array.rio.write_crs(scene.grid.crs)
        variables[name] = array.rio.write_transform(scene.grid.transform).rio.write_nodata(nodata)
    path = out_dir / "labels" / f"{scene.id}.zarr"
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xr.Dataset(variables).to_zarr(tmp, zarr_format=3, consolidated=False, mode="w")
    return path


def _tag(path: Path, name: str) -> str | None:
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        with rasterio.open(path) as src:
            return src.tags().get(name)
    except RasterioIOError:
        return None
