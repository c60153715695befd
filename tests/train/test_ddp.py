"""DistributedDataParallel with two real CPU processes (gloo), launched by torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from sitfuse_byol.config import load_config
from sitfuse_byol.train.checkpoint import load_checkpoint
from sitfuse_byol.train.loop import train
from tests.train.test_loop import TINY

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from sitfuse_byol.config import load_config
    from sitfuse_byol.train.loop import train

    config = load_config(Path(sys.argv[1]))
    sums = []

    def after_step(values):
        # Gather a fingerprint of every rank's weights after each step, in float64
        # so that a divergence in the last bits of float32 weights still shows.
        model_sum = torch.tensor([float(sum(p.double().sum() for p in MODEL[0].parameters()))],
                                 dtype=torch.float64)
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, model_sum)
        sums.append([float(g) for g in gathered])

    import sitfuse_byol.train.loop as loop
    MODEL = []
    original = loop.build_model
    def capture(*args, **kwargs):
        model, spec = original(*args, **kwargs)
        MODEL.append(model)
        return model, spec
    loop.build_model = capture
    train(config, ddp=True, progress=after_step)
    # all_gather gives every rank the same lists, so rank 0's view is the whole story.
    if dist.get_rank() == 0:
        Path(sys.argv[2]).joinpath("rank0.json").write_text(json.dumps(sums))
    dist.destroy_process_group()
    """
)


# GroupNorm (what "auto" picks at this batch) and BatchNorm, which on CPU ranks stays
# plain BatchNorm (SyncBatchNorm runs on GPUs only).
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_two_ranks_stay_identical_and_checkpoint_loads_in_one_process(tmp_path, landsat_path, norm):
    raw = {
        "data": {"scenes": [str(landsat_path)]},
        **TINY,
        "output": {"dir": str(tmp_path / "out")},
    }
    raw["train"] = {**TINY["train"], "epochs": 1, "steps_per_epoch": 3, "norm": norm}
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(script), str(config_path), str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert len(rank0) == 3
    for step in rank0:
        assert step[0] == step[1], "ranks diverged"
    # The weights changed from step to step (the check above is not vacuous).
    assert rank0[0][0] != rank0[-1][0]

    # Only rank 0 wrote, and a single process continues from the DDP checkpoint.
    state = load_checkpoint(tmp_path / "out" / "checkpoints" / "last.pt")
    assert state["step"] == 3
    assert not any(k.startswith("module.") for k in state["model"])
    raw["train"]["epochs"] = 2
    resumed = train(load_config(raw=raw, base=tmp_path), resume=True)
    assert [r["epoch"] for r in resumed.metrics] == [0, 1]
    assert torch.is_tensor(load_checkpoint(resumed.checkpoint)["model"]["online.encoder.body.0.weight"])


def test_a_run_goes_on_from_a_torchrun_training_instead_of_training_again(tmp_path, landsat_path):
    from sitfuse_byol.cli import main

    raw = {"data": {"scenes": [str(landsat_path)]}, **TINY, "output": {"dir": str(tmp_path / "out")}}
    raw["train"] = {**TINY["train"], "epochs": 1, "steps_per_epoch": 2}
    raw["cluster"] = {"n_clusters": 4, "samples_per_scene": 2000}
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "sitfuse_byol.cli", "train", "-c", str(config_path), "--ddp", "--quiet",
        ],
        capture_output=True, text=True, timeout=240, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("checkpoint:") == 1  # rank 0 reports, once
    assert yaml.safe_load((tmp_path / "out" / "config.resolved.yaml").read_text())["train"]["steps_per_epoch"] == 2
    checkpoint = tmp_path / "out" / "checkpoints" / "last.pt"
    trained_at = checkpoint.stat().st_mtime_ns
    assert main(["run", "-c", str(config_path), "--quiet"]) == 0
    assert checkpoint.stat().st_mtime_ns == trained_at
    assert (tmp_path / "out" / "labels" / "landsat7_olinda.tif").exists()


@pytest.mark.slow  # three torchrun launches (about 50 s)
def test_torchrun_makes_statistics_again_for_other_data_settings_and_every_rank_fails_alike(
    tmp_path, landsat_path
):
    raw = {"data": {"scenes": [str(landsat_path)]}, **TINY, "output": {"dir": str(tmp_path / "out")}}
    raw["train"] = {**TINY["train"], "epochs": 1, "steps_per_epoch": 1}
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(raw))

    def torchrun(*overrides):
        sets = [arg for value in overrides for arg in ("--set", value)]
        return subprocess.run(
            [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "sitfuse_byol.cli", "train", "-c", str(config_path), "--ddp", "--quiet", *sets,
            ],
            capture_output=True, text=True, timeout=240, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        )

    assert torchrun().returncode == 0
    before = json.loads((tmp_path / "out" / "stats.json").read_text())
    proc = torchrun("data.valid_range=[20, 200]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert min(after["min"]) >= 20 and after["mean"] != before["mean"]
    assert load_checkpoint(tmp_path / "out" / "checkpoints" / "last.pt")["stats"]["mean"] == after["mean"]
    # An error only rank 0 can meet (it alone computes the statistics): every rank stops
    # with it, one prints it, none dies at a barrier with a gloo traceback.
    proc = torchrun("data.valid_range=[1000, 2000]")
    assert proc.returncode != 0
    assert proc.stderr.count("error: no valid pixel in any scene") == 1, proc.stderr[-3000:]
    assert "gloo" not in proc.stderr and "Connection closed" not in proc.stderr
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == after


def test_train_under_torchrun_without_ddp_or_ddp_without_torchrun_is_refused(tmp_path, landsat_path, capsys, monkeypatch):
    from sitfuse_byol.cli import main

    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump({"data": {"scenes": [str(landsat_path)]}, "output": {"dir": "out"}}))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "-c", str(config_path), "--ddp", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: --ddp needs the environment torchrun sets")
    # What torchrun sets for rank 0 of 2 (the rank that prints errors): each rank would
    # otherwise run the whole pipeline.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "-c", str(config_path), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "error: under torchrun, train with --ddp (sitfuse train)"
    assert not (tmp_path / "out").exists()


CRASH_SCRIPT = textwrap.dedent(
    """
    import os

    import torch
    from sitfuse_byol.errors import SitfuseError
    from sitfuse_byol.train.loop import _from_rank_zero, init_distributed

    ctx = init_distributed(enable=True, device=torch.device("cpu"))

    def statistics():
        raise OSError(28, "No space left on device")

    def say(line):
        # One write of a whole line: the two ranks share the pipe, and print's text and
        # newline can reach it apart, interleaving the lines.
        os.write(1, (line + "\\n").encode())

    try:
        _from_rank_zero(ctx, statistics)
    except SitfuseError as err:
        say(f"rank {ctx.rank}: SitfuseError: {err}")
    except OSError as err:
        say(f"rank {ctx.rank}: OSError: {err}")
    """
)


def test_an_unexpected_error_on_rank_zero_stops_every_rank(tmp_path):
    """Not only a SitfuseError: the other ranks must not wait at a barrier for rank 0."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0: OSError: [Errno 28] No space left on device",
        "rank 1: SitfuseError: rank 0 failed: OSError: [Errno 28] No space left on device (rank 1)",
    ], proc.stdout + proc.stderr[-3000:]


@pytest.mark.slow  # two torchrun processes for one message; the suite keeps under 10 minutes
def test_an_error_of_one_ranks_share_is_said_by_that_rank(tmp_path, landsat_path):
    """Chunks are dealt out: rank 1 gets the scene that gives no valid patch, rank 0 the
    good one; rank 1 says why, rank 0 that its peer stopped, neither with a traceback."""
    import os

    import rasterio

    with rasterio.open(landsat_path) as src:
        profile = src.profile | {"width": 64, "height": 64, "nodata": 0, "blockxsize": 64, "blockysize": 64}
        good = src.read(window=((0, 64), (0, 64)))
    holes = good.copy()
    holes[:, 4:, :] = 0
    for name, data in (("a_good.tif", good), ("b_holes.tif", holes)):
        with rasterio.open(tmp_path / name, "w", **profile) as dst:
            dst.write(data)
    raw = {
        "data": {"scenes": [str(tmp_path / "a_good.tif"), str(tmp_path / "b_holes.tif")], "nodata": 0},
        **TINY, "output": {"dir": str(tmp_path / "out")},
    }
    raw["train"] = {**TINY["train"], "epochs": 1, "steps_per_epoch": 3}
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "sitfuse_byol.cli", "train", "-c", str(config_path), "--ddp", "--quiet",
        ],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert len(errors) == 2, proc.stderr[-3000:]
    assert errors[0].startswith("error: another training process stopped (its error is printed above; here: ")
    assert errors[0].endswith(" (rank 0)")
    assert errors[1] == "error: no patch has at least 90% valid pixels (tiling.min_valid_fraction) (b_holes) [rank 1]"
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
