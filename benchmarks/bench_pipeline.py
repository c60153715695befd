"""End-to-end throughput, scaling and memory of embed + cluster + export.

1. **Efficiency**: Mpixel/s of the embed, cluster (sample + fit) and export stages on
   the Sentinel-2 sample (and on it mosaicked 2x2 and 4x4), divided by the encoder's
   pure forward throughput on the same normalized pixels in memory (no halo, no I/O),
   with embeddings saved to Zarr (the default) and streamed (``embed.save: false``).
   The goal is judged on the default encoder (``small_cnn`` with its default size);
   the demo's smaller encoder is shown beside it. ``pipeline forward`` is the embed
   graph alone (read, normalize, forward with halos, window average), the ceiling of
   the ratio if clustering and export cost nothing.
2. **Workers**: wall time of `sitfuse run` (embed + cluster + export, trained model
   reused) over sets of four scenes (small mixed ones; 1 Mpx saved; 4 Mpx streamed)
   with a LocalCluster of 1 and of 2 workers.
3. **Memory**: peak RSS of one process running a scene's embed, sample and export
   tasks, for the sample stacked into one GeoTIFF (1x) and mosaicked 2x2 (4x).

Run: .venv/bin/python benchmarks/bench_pipeline.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import stacked_geotiffs  # noqa: E402
from report import machine, markdown_table, peak_rss_mb, today, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "out" / "pipeline"
SAMPLE = REPO / "data_samples" / "sentinel2_virginia.yaml"


#: Timed runs of each side of the efficiency ratio (after a first, untimed one for the stages).
WARM_RUNS = 2

#: Encoders measured for efficiency: the schema's default, and the demo's smaller one.
ENCODERS = {"default": {}, "demo": None}


def base_config(scenes: list[Path], out: Path, *, encoder: str = "demo", **sections) -> dict:
    """The demo config with a very short training (speed does not need quality)."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["data"]["scenes"] = [str(s) for s in scenes]
    raw["train"].update({"epochs": 1, "steps_per_epoch": 5})
    if ENCODERS[encoder] is not None:
        raw["train"]["encoder_args"] = ENCODERS[encoder]
    raw["output"] = {**raw.get("output", {}), "dir": str(out)}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def write_yaml(raw: dict, path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def train_once(out: Path, *, encoder: str = "demo") -> Path:
    """A checkpoint shared by the measurements of one encoder."""
    from sitfuse_byol.config import load_config
    from sitfuse_byol.train.loop import train

    checkpoint = out / "checkpoints" / "last.pt"
    if not checkpoint.exists():
        train(load_config(raw=base_config([SAMPLE], out, encoder=encoder), base=REPO))
    return checkpoint


def forward_mpx_per_s(scene_path: Path, checkpoint: Path, *, block: int) -> tuple[float, float]:
    """Encoder forward alone on the normalized scene, block by block, all cores.

    Best of :data:`WARM_RUNS` runs in each memory layout (channels-first and channels-last input, as the
    pipeline feeds it), so the baseline is the fastest plain forward on this machine.

    Returns:
        ``(Mpx/s, Mpx)``.
    """
    import torch

    from sitfuse_byol.read import open_scene
    from sitfuse_byol.read.scene_list import parse_scene_entry
    from sitfuse_byol.train.checkpoint import load_encoder

    trained = load_encoder(checkpoint)
    scene = open_scene(parse_scene_entry(str(scene_path), base=REPO, where="bench"), nodata=0)
    raw = scene.data.compute()
    x = trained.stats.normalize(raw, scene.valid_of(raw))
    blocks = [
        torch.from_numpy(np.ascontiguousarray(x[None, :, r : r + block, c : c + block]))
        for r in range(0, x.shape[1], block)
        for c in range(0, x.shape[2], block)
    ]
    best = float("inf")
    threads_before = torch.get_num_threads()
    # All cores, whatever earlier work in this process left torch at.
    torch.set_num_threads(machine_cores())
    try:
        for layout in (torch.contiguous_format, torch.channels_last):
            inputs = [b.contiguous(memory_format=layout) for b in blocks]
            for _ in range(WARM_RUNS):
                start = time.perf_counter()
                with torch.inference_mode():
                    for b in inputs:
                        trained.encoder(b)
                best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads_before)
    mpx = x.shape[1] * x.shape[2] / 1e6
    return mpx / best, mpx


def pipeline_forward_s(config_path: Path) -> float:
    """Seconds of the embed graph alone (read, normalize, forward, window), as the export runs it."""
    from sitfuse_byol.config import load_config
    from sitfuse_byol.embed import embed_scene
    from sitfuse_byol.read import open_scene_from_config
    from sitfuse_byol.read.scene_list import SceneRef, parse_scene_entry
    from sitfuse_byol.run.tasks import Paths, local_compute
    from sitfuse_byol.train.checkpoint import load_encoder

    config = load_config(config_path)
    ref = SceneRef(spec=parse_scene_entry(config["data"]["scenes"][0], base=REPO, where="bench"), entry="bench")
    scene = open_scene_from_config(ref, data=config["data"], patch_size=config["tiling"]["patch_size"])
    trained = load_encoder(Paths(config.output_dir).checkpoint)
    embed = config["embed"]
    best = float("inf")
    with local_compute(machine_cores()):
        data = embed_scene(
            scene, trained, stride=embed["stride"], window=embed["window"], block_size=embed["block_size"]
        ).data
        # Each block reduced to one value, so nothing but the embeddings is computed.
        nothing = data.map_blocks(
            lambda b: np.zeros((1, 1, 1)), chunks=((1,), *(((1,) * len(c)) for c in data.chunks[1:])), dtype=float
        )
        for _ in range(2):
            start = time.perf_counter()
            nothing.compute()
            best = min(best, time.perf_counter() - start)
    return best


def linked_copies(path: Path, n: int) -> list[Path]:
    """``n`` symbolic links to one scene, each its own scene id."""
    links = []
    for k in range(n):
        link = WORK / f"{path.stem}_{chr(ord('a') + k)}{path.suffix}"
        link.unlink(missing_ok=True)
        link.symlink_to(path)
        links.append(link)
    return links


def machine_cores() -> int:
    import os

    return os.cpu_count() or 1


def stage_seconds(config_path: Path, *, workers: int | None = None, stages=("embed", "cluster", "export")) -> dict:
    """Run stages in-process (LocalCluster) and return seconds per stage."""
    from sitfuse_byol.config import load_config
    from sitfuse_byol.run.cluster_client import ClusterOptions
    from sitfuse_byol.run.pipeline import Pipeline, RunOptions

    config = load_config(config_path)
    options = RunOptions(quiet=True, force=True, stages=tuple(stages), cluster=ClusterOptions(workers=workers))
    pipeline = Pipeline(config, options)
    timings = {}
    original = {name: getattr(pipeline, f"stage_{name}") for name in stages}

    def timed(name):
        def run(*args):
            start = time.perf_counter()
            original[name](*args)
            timings[name] = time.perf_counter() - start

        return run

    for name in stages:
        setattr(pipeline, f"stage_{name}", timed(name))
    start = time.perf_counter()
    summary = pipeline.run()
    timings["wall"] = time.perf_counter() - start
    assert not summary.failed, summary.scenes
    return timings


def memory_worker(scene_path: str, config_path: str) -> None:
    """One process: embed, sample and export one scene with all cores; prints its peak RSS."""
    from sitfuse_byol.cluster import EmbeddingReservoir, fit_kmeans
    from sitfuse_byol.config import load_config
    from sitfuse_byol.read.scene_list import SceneRef, parse_scene_entry
    from sitfuse_byol.run.tasks import Paths, embed_task, export_task, sample_task

    config = load_config(Path(config_path))
    ref = SceneRef(spec=parse_scene_entry(scene_path, base=REPO, where="bench"), entry="bench")
    start = time.perf_counter()
    embed_task(config, ref, 2)
    samples, neighbours = sample_task(config, ref, 2)
    reservoir = EmbeddingReservoir(capacity=len(samples), seed=0)
    reservoir.add(samples, neighbours=neighbours)
    fit_kmeans(reservoir, n_clusters=config["cluster"]["n_clusters"], seed=0).save(Paths(config.output_dir).cluster_model)
    export_task(config, ref, 2)
    print(json.dumps({"rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - start}))


def measure_memory(scene: Path, config_path: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-worker", str(scene), str(config_path)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.memory_worker:
        memory_worker(*args.memory_worker)
        return

    shutil.rmtree(WORK, ignore_errors=True)
    stacks = stacked_geotiffs(sizes=(1, 2, 4))
    block = 256

    # (encoder, scene, saved?): the default encoder in both modes; streaming embeds
    # cluster.sample_blocks small blocks for the sample, a shrinking share as scenes grow.
    cases = [
        ("default", "sample 1x", True), ("default", "sample 1x", False),
        ("default", "mosaic 4x", True), ("default", "mosaic 4x", False),
        ("default", "mosaic 16x", True), ("default", "mosaic 16x", False),
        ("demo", "sample 1x", True), ("demo", "mosaic 4x", True),
    ]
    scenes = {"sample 1x": SAMPLE, "mosaic 4x": stacks["4x"], "mosaic 16x": stacks["16x"]}
    rows, efficiency, ceiling, forward_cache = [], {}, {}, {}
    for encoder, name, saved in cases:
        model_dir = WORK / f"model_{encoder}"
        checkpoint = train_once(model_dir, encoder=encoder)
        scene = scenes[name]
        out = WORK / f"{encoder}_{name.replace(' ', '_')}_{'saved' if saved else 'streamed'}"
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
        config_path = write_yaml(
            base_config([scene], out, encoder=encoder, embed={"block_size": block, "save": saved}),
            out / "config.yaml",
        )
        # Both sides warm, as in a long batch, and best of WARM_RUNS: the stages after a
        # first run in the same process (model, imports and caches loaded).
        cold = stage_seconds(config_path)
        timings = min(
            (stage_seconds(config_path) for _ in range(WARM_RUNS)),
            key=lambda t: t["embed"] + t["cluster"] + t["export"],
        )
        if (encoder, name) not in forward_cache:
            forward_cache[(encoder, name)] = (*forward_mpx_per_s(scene, checkpoint, block=block),
                                              pipeline_forward_s(config_path))
        forward, mpx, graph_s = forward_cache[(encoder, name)]
        stages_s = timings["embed"] + timings["cluster"] + timings["export"]
        cold_s = cold["embed"] + cold["cluster"] + cold["export"]
        end_to_end = mpx / stages_s
        efficiency[(encoder, name, saved)] = end_to_end / forward
        ceiling[(encoder, name)] = mpx / graph_s / forward
        rows.append([
            encoder, name, "saved" if saved else "streamed", f"{mpx:.2f}", f"{timings['embed']:.2f}",
            f"{timings['cluster']:.2f}", f"{timings['export']:.2f}", f"{cold_s:.2f}", f"{end_to_end:.3f}",
            f"{forward:.3f}", f"{end_to_end / forward:.2f}", f"{graph_s:.2f}", f"{ceiling[(encoder, name)]:.2f}",
        ])
        if encoder == "default" and name == "mosaic 16x" and saved:
            # 2 GB of float32 embeddings: not kept once measured.
            shutil.rmtree(out / "embeddings", ignore_errors=True)
    efficiency_table = markdown_table(
        ["encoder", "scene", "embeddings", "Mpx", "embed s", "cluster s", "export s", "first run of the case s",
         "end-to-end Mpx/s", "forward Mpx/s", "ratio", "pipeline forward s", "ceiling"],
        rows,
    )
    print(efficiency_table)
    model_dir = WORK / "model_demo"

    four = [SAMPLE, stacks["1x"], stacks["4x"], REPO / "data_samples" / "sentinel2_virginia.zarr"]
    # The zarr holds the same crop as the YAML scene; give it its own id through a copy.
    zarr_copy = WORK / "virginia_zarr.zarr"
    shutil.copytree(four[3], zarr_copy)
    four[3] = zarr_copy
    worker_sets = {
        "4 small scenes (0.25-1 Mpx), saved": (four, True),
        "4 x 1 Mpx, saved": (linked_copies(stacks["4x"], 4), True),
        "4 x 4 Mpx, streamed": (linked_copies(stacks["16x"], 4), False),
    }
    walls, stage_sums, worker_rows = {}, {}, []
    for number, (set_name, (set_scenes, saved)) in enumerate(worker_sets.items()):
        for workers in (1, 2):
            out = WORK / f"workers_{number}_{workers}"
            shutil.copytree(WORK / "model_default", out, dirs_exist_ok=True)
            config_path = write_yaml(
                base_config(set_scenes, out, encoder="default", embed={"block_size": block, "save": saved}),
                out / "config.yaml",
            )
            timings = stage_seconds(config_path, workers=workers)
            walls[(set_name, workers)] = timings["wall"]
            stage_sums[(set_name, workers)] = timings["embed"] + timings["cluster"] + timings["export"]
            shutil.rmtree(out / "embeddings", ignore_errors=True)
            worker_rows.append([
                set_name, str(workers), f"{walls[(set_name, workers)]:.1f}",
                f"{walls[(set_name, 1)] / walls[(set_name, workers)]:.2f}x",
                f"{stage_sums[(set_name, workers)]:.1f}",
                f"{stage_sums[(set_name, 1)] / stage_sums[(set_name, workers)]:.2f}x",
            ])
    worker_table = markdown_table(
        ["scenes", "workers", "wall s", "speed-up", "embed + cluster + export s", "speed-up"], worker_rows
    )
    print(worker_table)

    memory = {}
    for name in ("1x", "4x"):
        out = WORK / f"memory_{name}"
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
        config_path = write_yaml(base_config([stacks[name]], out, embed={"block_size": block}), out / "config.yaml")
        memory[name] = measure_memory(stacks[name], config_path)
    memory_table = markdown_table(
        ["scene", "peak RSS MiB", "seconds"],
        [[n, f"{m['rss_mb']:.0f}", f"{m['seconds']:.1f}"] for n, m in memory.items()],
    )
    print(memory_table)

    def best_mode(name: str) -> tuple[float, str]:
        return max((efficiency[("default", name, saved)], "saved" if saved else "streamed") for saved in (True, False))

    goals = []
    for name in ("sample 1x", "mosaic 4x", "mosaic 16x"):
        value, mode = best_mode(name)
        goals.append([f"end-to-end / forward >= 0.8 (default encoder, {name}, best mode: {mode})", f"{value:.2f}",
                      "met" if value >= 0.8 else "NOT met"])
    goals.append(["peak RSS 4x / 1x < 1.5", f"{memory['4x']['rss_mb'] / memory['1x']['rss_mb']:.2f}",
                  "met" if memory["4x"]["rss_mb"] / memory["1x"]["rss_mb"] < 1.5 else "NOT met"])
    goal_table = markdown_table(["goal", "value", "status"], goals)
    print(goal_table)
    if not args.no_write:
        import yaml

        from sitfuse_byol.config import SCHEMA
        from sitfuse_byol.run.cluster_client import ClusterOptions
        from sitfuse_byol.train.checkpoint import load_encoder

        dim = load_encoder(WORK / "model_default" / "checkpoints" / "last.pt").encoder.out_channels
        sample_blocks = SCHEMA["cluster"]["sample_blocks"].default
        sample_window = SCHEMA["cluster"]["sample_window"].default
        window = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["embed"]["window"]
        default_workers = ClusterOptions().sized_for(len(four)).workers
        write_section(
            "bench_pipeline",
            "## Pipeline: embed + cluster + export (`benchmarks/bench_pipeline.py`)\n\n"
            "Command: `.venv/bin/python benchmarks/bench_pipeline.py`  \n"
            f"Machine: {machine()}  \nDate: {today()}\n\n"
            f"Stage seconds are the best of {WARM_RUNS} runs after a first in the same process (model "
            "and imports loaded, as in a long batch; `first run of the case s` is that first run, which "
            "for a streamed case follows the saved case of the same scene); `forward` is the encoder "
            f"alone on the same normalized pixels in memory ({block}x{block} blocks, no halo, no I/O), all "
            f"cores, best of {WARM_RUNS} in each memory layout. `saved` writes float32 embeddings to Zarr "
            f"({4 * dim} bytes a pixel for {dim} features) and labels them from there; `streamed` "
            f"(`embed.save: false`) embeds a {sample_window}x{sample_window} window (plus halo) of each of "
            f"`cluster.sample_blocks` ({sample_blocks}) blocks spread over the scene for the cluster sample "
            "(in `cluster s`; the same pixels however large the scene), and the whole scene while "
            "labelling (in `export s`). "
            "`pipeline forward s` is the embed graph alone as "
            "the pipeline runs it (reading, normalizing, the forward over halo-padded blocks, one per "
            f"core, and the {window}x{window} window average); `ceiling` is the ratio if clustering and "
            "export cost nothing. The rest: the label and confidence COGs with overviews, the quicklook "
            "PNG, and per-run fixed costs (model load, matplotlib import), which dominate at 0.25 Mpx. "
            "Workers (default encoder): one worker runs in-process; two are processes and pay "
            "their start-up (imports) within the wall time, and the stage sums show the rest. By "
            "default a LocalCluster has one worker per 4 cores, at most one per scene "
            f"({default_workers} here).\n\n"
            f"{efficiency_table}\n\n{worker_table}\n\n{memory_table}\n\n{goal_table}\n",
        )
    print(json.dumps({
        "efficiency": round(best_mode("sample 1x")[0], 3),
        "efficiency_4x": round(best_mode("mosaic 4x")[0], 3),
        "efficiency_16x": round(best_mode("mosaic 16x")[0], 3),
        "efficiency_demo_encoder": round(efficiency[("demo", "sample 1x", True)], 3),
        "wall_s_1_worker": round(walls[(next(iter(worker_sets)), 1)], 2),
        "wall_s_2_workers": round(walls[(next(iter(worker_sets)), 2)], 2),
        "wall_s_4x4mpx_streamed": {w: round(walls[("4 x 4 Mpx, streamed", w)], 2) for w in (1, 2)},
        "rss_mb_1x": round(memory["1x"]["rss_mb"], 1),
        "rss_mb_4x": round(memory["4x"]["rss_mb"], 1),
    }))


if __name__ == "__main__":
    main()
