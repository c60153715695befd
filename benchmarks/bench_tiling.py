"""Patch throughput of the training sampler against xbatcher and a numpy floor.

Each reader delivers every 32x32 patch of the Sentinel-2 sample as torch tensors
(batches of 64), pass after pass, for at least --seconds; every measurement runs in
its own process so that its peak RSS is its own.

* ours: PatchSampler (chunk reads, normalization, valid filter, shuffle pool);
* xbatcher: xbatcher 0.4 BatchGenerator(input_dims 32x32) over the same dask array;
* floor: compute the whole dask array, then reshape it into patches in numpy.

Scenes: the multi-file GeoTIFF sample (13 bands at 10/20/60 m, resampled lazily), the
Zarr sample, and the sample stacked into one 13-band GeoTIFF at 1x and mosaicked 2x2 (4x).

Run: .venv/bin/python benchmarks/bench_tiling.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, peak_rss_mb, today, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data_samples"
WORK = REPO / "benchmarks" / "out"
PATCH, BATCH = 32, 64


def stacked_geotiffs(*, sizes: tuple[int, ...] = (1, 2)) -> dict[str, Path]:
    """The sample stacked into one 13-band GeoTIFF (1x) and mosaicked n x n (e.g. 2: 4x).

    Args:
        sizes: Tiles along each axis; the key of each file is ``f"{n * n}x"``.
    """
    import rasterio
    from affine import Affine

    from sitfuse_byol.read import open_scene
    from sitfuse_byol.read.scene_list import parse_scene_entry

    WORK.mkdir(parents=True, exist_ok=True)
    scene = open_scene(parse_scene_entry(str(SAMPLES / "sentinel2_virginia.yaml"), base=REPO, where="s2"))
    data = scene.data.compute()
    out = {}
    for tiles in sizes:
        name = f"{tiles * tiles}x"
        mosaic = np.tile(data, (1, tiles, tiles))
        path = WORK / f"sentinel2_stack_{name}.tif"
        t = scene.grid.transform
        with rasterio.open(
            path, "w", driver="GTiff", width=mosaic.shape[2], height=mosaic.shape[1],
            count=mosaic.shape[0], dtype=mosaic.dtype, crs=scene.grid.crs,
            transform=Affine(t.a, t.b, t.c, t.d, t.e, t.f), nodata=0, tiled=True,
            blockxsize=128, blockysize=128, compress="deflate",
        ) as dst:
            dst.write(mosaic)
            for i, band in enumerate(scene.band_names, start=1):
                dst.set_band_description(i, band)
        out[name] = path
    return out


def scene_paths() -> dict[str, Path]:
    return {
        "geotiff-bands": SAMPLES / "sentinel2_virginia.yaml",
        "zarr": SAMPLES / "sentinel2_virginia.zarr",
        "stack-1x": WORK / "sentinel2_stack_1x.tif",
        "stack-4x": WORK / "sentinel2_stack_4x.tif",
    }


def open_bench_scene(name: str):
    from sitfuse_byol.read import open_scene
    from sitfuse_byol.read.scene_list import parse_scene_entry

    spec = parse_scene_entry(str(scene_paths()[name]), base=REPO, where=name)
    return open_scene(spec, nodata=0, patch_size=PATCH)


def run_ours(scene, seconds: float) -> int:
    from sitfuse_byol.normalize import compute_stats
    from sitfuse_byol.tile import PatchSampler

    stats = compute_stats([scene])
    sampler = PatchSampler(
        [scene], stats=stats, patch_size=PATCH, batch_size=BATCH, patches_per_chunk=None, seed=0
    )
    # The endless stream training uses: passes follow each other with read-ahead between them.
    return _timed((b.patches.shape[0] for b in sampler.batches(epoch=0)), seconds)


def run_xbatcher(scene, seconds: float) -> int:
    import torch
    import xarray as xr
    import xbatcher

    array = xr.DataArray(scene.data, dims=("band", "y", "x"))

    def one_pass(_epoch):
        generator = xbatcher.BatchGenerator(array, input_dims={"y": PATCH, "x": PATCH})
        batch = []
        for patch in generator:
            batch.append(torch.from_numpy(np.asarray(patch.values, dtype=np.float32)))
            if len(batch) == BATCH:
                yield torch.stack(batch).shape[0]
                batch = []

    return _timed(_passes(one_pass), seconds)


def run_floor(scene, seconds: float) -> int:
    import torch

    def one_pass(_epoch):
        whole = scene.data.compute().astype(np.float32)
        c, h, w = whole.shape
        ny, nx = h // PATCH, w // PATCH
        patches = whole[:, : ny * PATCH, : nx * PATCH].reshape(c, ny, PATCH, nx, PATCH)
        patches = patches.transpose(1, 3, 0, 2, 4).reshape(-1, c, PATCH, PATCH)
        for start in range(0, len(patches) - BATCH + 1, BATCH):
            yield torch.from_numpy(np.ascontiguousarray(patches[start : start + BATCH])).shape[0]

    return _timed(_passes(one_pass), seconds)


def _passes(one_pass):
    epoch = 0
    while True:
        yield from one_pass(epoch)
        epoch += 1


def _timed(batch_sizes, seconds: float) -> tuple[int, float]:
    """Patches delivered by a stream of batch sizes in about ``seconds``."""
    total, start = 0, time.perf_counter()
    for size in batch_sizes:
        total += size
        if time.perf_counter() - start >= seconds:
            break
    return total, time.perf_counter() - start


def worker(reader: str, scene_name: str, seconds: float) -> None:
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(2)
    scene = open_bench_scene(scene_name)
    runner = {"ours": run_ours, "xbatcher": run_xbatcher, "floor": run_floor}[reader]
    patches, elapsed = runner(scene, seconds)
    print(json.dumps({"patches": patches, "seconds": elapsed, "pps": patches / elapsed, "rss_mb": peak_rss_mb()}))


def measure(reader: str, scene_name: str, seconds: float) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", reader, scene_name, "--seconds", str(seconds)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="time per measurement")
    parser.add_argument("--worker", nargs=2, metavar=("READER", "SCENE"), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.seconds)
        return
    stacked_geotiffs()
    plan = [
        ("ours", "geotiff-bands"), ("xbatcher", "geotiff-bands"), ("floor", "geotiff-bands"),
        ("ours", "zarr"), ("xbatcher", "zarr"), ("floor", "zarr"),
        ("ours", "stack-1x"), ("floor", "stack-1x"),
        ("ours", "stack-4x"), ("floor", "stack-4x"),
    ]
    results = {}
    for reader, scene_name in plan:
        results[reader, scene_name] = measure(reader, scene_name, args.seconds)
        r = results[reader, scene_name]
        print(f"  {reader:<9} {scene_name:<14} {r['pps']:>10.0f} patches/s  peak RSS {r['rss_mb']:.0f} MiB", flush=True)

    rows = []
    for (reader, scene_name), r in results.items():
        floor = results.get(("floor", scene_name))
        xb = results.get(("xbatcher", scene_name))
        rows.append([
            scene_name, reader, f"{r['pps']:.0f}",
            f"{r['pps'] / xb['pps']:.1f}x" if xb and reader == "ours" else "",
            f"{r['pps'] / floor['pps']:.0%}" if floor and reader == "ours" else "",
            f"{r['rss_mb']:.0f}",
        ])
    table = markdown_table(
        ["scene", "reader", "patches/s", "vs xbatcher", "of floor", "peak RSS MiB"], rows
    )
    print()
    print(table)

    ours, xb, floor = (results[k, "geotiff-bands"] for k in ("ours", "xbatcher", "floor"))
    one, four = results["ours", "stack-1x"], results["ours", "stack-4x"]
    summary = {
        "ours_pps": round(ours["pps"], 1),
        "xbatcher_pps": round(xb["pps"], 1),
        "floor_pps": round(floor["pps"], 1),
        "rss_mb_1x": round(one["rss_mb"], 1),
        "rss_mb_4x": round(four["rss_mb"], 1),
        "pps_1x": round(one["pps"], 1),
        "pps_4x": round(four["pps"], 1),
    }
    goals = [
        ("ours / xbatcher >= 10", ours["pps"] / xb["pps"], ours["pps"] / xb["pps"] >= 10),
        ("ours / floor >= 25%", ours["pps"] / floor["pps"], ours["pps"] / floor["pps"] >= 0.25),
        ("pps 4x within 20% of 1x", four["pps"] / one["pps"], four["pps"] / one["pps"] >= 0.8),
        ("peak RSS 4x / 1x < 1.5", four["rss_mb"] / one["rss_mb"], four["rss_mb"] / one["rss_mb"] < 1.5),
    ]
    goal_rows = [[name, f"{value:.2f}", "met" if ok else "NOT met"] for name, value, ok in goals]
    if not args.no_write:
        write_section(
            "bench_tiling",
            "## Tiling: 32x32 patches/s as torch tensors (`benchmarks/bench_tiling.py`)\n\n"
            f"Command: `.venv/bin/python benchmarks/bench_tiling.py --seconds {args.seconds:g}`  \n"
            f"Machine: {machine()}  \nDate: {today()}\n\n"
            "Each row is its own process (peak RSS includes Python, torch and GDAL). "
            "`geotiff-bands` is the 13 single-band files at 10/20/60 m, resampled lazily onto 10 m; "
            "`stack-1x`/`stack-4x` are the sample stacked into one 13-band GeoTIFF and mosaicked 2x2.\n\n"
            f"{table}\n\n{markdown_table(['goal', 'value', 'status'], goal_rows)}\n",
        )
    print()
    print(markdown_table(["goal", "value", "status"], goal_rows))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
