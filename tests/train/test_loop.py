"""The training loop on the real Landsat sample: learning, checkpoints, exact resume."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from sitfuse_byol.cli import main
from sitfuse_byol.config import load_config
from sitfuse_byol.errors import ModelError
from sitfuse_byol.train.checkpoint import load_checkpoint, load_encoder
from sitfuse_byol.train.loop import train
from tests.conftest import write_tif

TINY = {
    "tiling": {"patch_size": 8, "shuffle_buffer": 256},
    "train": {
        "epochs": 2,
        "steps_per_epoch": 3,
        "batch_size": 8,
        "encoder_args": {"width": 8, "depth": 2, "out_channels": 16},
        "projector_hidden": 32,
        "projection_dim": 16,
        "warmup_steps": 1,
        "seed": 5,
    },
}


def tiny_config(tmp_path, scenes, out="out", **train):
    raw = {
        "data": {"scenes": [str(s) for s in scenes]},
        "tiling": TINY["tiling"],
        "train": {**TINY["train"], **train},
        "output": {"dir": str(tmp_path / out)},
    }
    return load_config(raw=raw, base=tmp_path)


def model_weights(path):
    return load_checkpoint(path)["model"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, landsat_path):
    straight = train(tiny_config(tmp_path, [landsat_path], out="a"))
    resumed_config = tiny_config(tmp_path, [landsat_path], out="b")
    first = train(resumed_config, stop_after_epochs=1)
    assert len(first.metrics) == 1
    second = train(resumed_config, resume=True)
    assert [r["epoch"] for r in second.metrics] == [0, 1]
    a, b = model_weights(straight.checkpoint), model_weights(second.checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The target really differs from the online network (a shared module would make them equal).
    assert not torch.equal(a["online.encoder.body.0.weight"], a["target.encoder.body.0.weight"])


def test_training_gives_the_process_its_torch_threads_back(tmp_path, landsat_path):
    torch.set_num_threads(3)
    train(tiny_config(tmp_path, [landsat_path], epochs=1, steps_per_epoch=1, threads=1))
    assert torch.get_num_threads() == 3


def test_checkpoint_contents_metrics_and_curves(tmp_path, landsat_path):
    config = tiny_config(tmp_path, [landsat_path])
    result = train(config)
    state = torch.load(result.checkpoint, weights_only=True)
    for key in ("model", "optimizer", "scheduler", "step", "rng", "config", "stats", "band_names"):
        assert key in state
    assert state["step"] == 6 and state["epoch"] == 1
    assert state["band_names"] == ["B1", "B2", "B3", "B4", "B5", "B7"]
    ckpt_dir = config.output_dir / "checkpoints"
    assert (ckpt_dir / "epoch_000.pt").exists()
    # last.pt is a copy of the newest epoch's file, and no temporary is left behind.
    assert result.checkpoint.read_bytes() == (ckpt_dir / "epoch_001.pt").read_bytes()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch_000.pt", "epoch_001.pt", "last.pt"]
    rows = list(csv.DictReader((config.output_dir / "train" / "metrics.csv").read_text().splitlines()))
    assert [int(float(r["epoch"])) for r in rows] == [0, 1]
    assert float(rows[1]["tau"]) > float(rows[0]["tau"])
    png = (config.output_dir / "train" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    trained = load_encoder(result.checkpoint)
    assert not trained.encoder.training
    assert trained.stats.n_bands == 6
    # The loaded encoder refuses a scene with another band count.
    with pytest.raises(ModelError, match="trained on 6 bands .* but this scene has 13"):
        trained.check_bands([f"B{i}" for i in range(1, 14)], where="sentinel2")
    # And one holding its bands in another order, which would pass by count.
    trained.check_bands(trained.band_names, where="landsat")
    with pytest.raises(ModelError, match=r"are the model's \(.*\) in another order; list them in data.bands"):
        trained.check_bands(trained.band_names[::-1], where="landsat")

    # Damaged files: one line each, never a KeyError or a size-mismatch traceback.
    broken = tmp_path / "broken.pt"
    broken.write_bytes(result.checkpoint.read_bytes()[:5000])
    with pytest.raises(ModelError, match="cannot read checkpoint: the file is truncated or corrupt"):
        load_checkpoint(broken)
    # A pickle of other Python objects: never loaded unsafely, and said in one plain line.
    torch.save({**state, "extra": collections.OrderedDict(a=Path("x"))}, broken)
    with pytest.raises(ModelError) as err:
        load_checkpoint(broken)
    assert err.value.what == (
        "cannot read checkpoint: it holds Python objects other than tensors, so it is not one of ours "
        "(it is not loaded unsafely)"
    )
    torch.save({k: v for k, v in state.items() if k != "encoder"}, broken)
    with pytest.raises(ModelError, match="incomplete checkpoint: no encoder"):
        load_checkpoint(broken)
    torch.save({**state, "model": {k: v for k, v in state["model"].items() if "body.0" not in k}}, broken)
    with pytest.raises(ModelError, match="the checkpoint's weights do not fit its encoder"):
        load_encoder(broken)


@pytest.mark.slow
def test_two_epochs_on_landsat_lower_the_loss_without_collapse(tmp_path, landsat_path):
    config = tiny_config(
        tmp_path, [landsat_path], epochs=2, steps_per_epoch=40, batch_size=32,
        encoder_args={"width": 32, "depth": 3, "out_channels": 32}, lr=2e-3,
    )
    result = train(config)
    first, last = result.metrics
    assert last["loss"] < first["loss"]
    assert last["std_sqrt_d"] > 0.1 and not result.collapsed


def test_short_training_lowers_the_loss(tmp_path, landsat_path):
    config = tiny_config(tmp_path, [landsat_path], epochs=2, steps_per_epoch=8, lr=3e-3)
    result = train(config)
    assert result.metrics[1]["loss"] < result.metrics[0]["loss"]
    assert result.metrics[1]["std_sqrt_d"] > 0.1


def test_resume_with_other_bands_is_refused(tmp_path, landsat_path):
    config = tiny_config(tmp_path, [landsat_path], epochs=1, steps_per_epoch=1)
    train(config)
    other = write_tif(tmp_path / "four.tif", np.random.default_rng(0).integers(1, 200, (4, 64, 64)).astype(np.uint8))
    (config.output_dir / "stats.json").unlink()
    with pytest.raises(ModelError, match="trained on bands B1, B2, B3, B4, B5, B7"):
        train(tiny_config(tmp_path, [other], epochs=2, steps_per_epoch=1), resume=True)


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"optimizer": "lars"}, "train.optimizer was 'adamw' when the checkpoint was trained, now 'lars'"),
        ({"lr": 0.05}, "train.lr was null when the checkpoint was trained, now 0.05"),
        ({"projector_hidden": 64}, "train.projector_hidden was 32"),
        ({"epochs": 1}, "the checkpoint has trained 2 epochs, more than train.epochs \\(1\\)"),
    ],
)
def test_resume_refuses_settings_it_would_ignore(tmp_path, landsat_path, changed, message):
    train(tiny_config(tmp_path, [landsat_path], steps_per_epoch=1))
    with pytest.raises(ModelError, match=f"cannot resume: {message}"):
        train(tiny_config(tmp_path, [landsat_path], steps_per_epoch=1, **{"epochs": 3, **changed}), resume=True)
    # Only the length of the run may change.
    train(tiny_config(tmp_path, [landsat_path], steps_per_epoch=1, epochs=3), resume=True)
    assert load_checkpoint(tmp_path / "out" / "checkpoints" / "last.pt")["epoch"] == 2


def test_an_earlier_epoch_put_in_place_of_the_checkpoint_is_continued(tmp_path, landsat_path):
    import shutil

    import yaml

    config = tmp_path / "c.yaml"
    raw = {"data": {"scenes": [str(landsat_path)]}, **TINY, "output": {"dir": "out"}}
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    checkpoints = tmp_path / "out" / "checkpoints"
    straight = model_weights(checkpoints / "last.pt")
    shutil.copy(checkpoints / "epoch_000.pt", checkpoints / "last.pt")
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    resumed = load_checkpoint(checkpoints / "last.pt")
    assert resumed["epoch"] == 1
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight.items())


def test_train_command_and_batch_of_one(capsys, tmp_path, landsat_path):
    import yaml

    config = tmp_path / "c.yaml"
    raw = {"data": {"scenes": [str(landsat_path)]}, **TINY, "output": {"dir": "out"}}
    raw["train"] = {**TINY["train"], "epochs": 1, "steps_per_epoch": 1}
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    code = main(["train", "-c", str(config), "--quiet", "--set", "train.batch_size=1"])
    assert code == 2
    assert "train.batch_size" in capsys.readouterr().err
    # --resume with nothing to resume is an error, not a silent fresh start.
    (tmp_path / "out" / "checkpoints" / "last.pt").unlink()
    assert main(["train", "-c", str(config), "--quiet", "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: nothing to resume: copy epoch_000.pt (or another epoch) to last.pt to resume from it "
        f"({tmp_path / 'out' / 'checkpoints' / 'last.pt'})"
    )
    (tmp_path / "out" / "checkpoints" / "epoch_000.pt").unlink()
    assert main(["train", "-c", str(config), "--quiet", "--resume"]) == 2
    assert "nothing to resume: no checkpoint yet (run without --resume)" in capsys.readouterr().err


def test_statistics_of_other_scenes_or_bands_are_computed_again(tmp_path, landsat_path):
    from sitfuse_byol.read import open_scene
    from sitfuse_byol.train.loop import training_stats

    config = tiny_config(tmp_path, [landsat_path])
    saved = config.output_dir / "stats.json"
    first, computed = training_stats(config, [open_scene(landsat_path)])
    assert computed and not saved.exists()  # computed, and saved only by train() once it may go on
    saved.parent.mkdir(parents=True)
    first.save(saved)
    assert training_stats(config, [open_scene(landsat_path)]) == (first, False)
    # Six other bands of another scene: the count agrees, nothing else does.
    data = np.random.default_rng(0).integers(1, 200, (6, 64, 64)).astype(np.uint8)
    other = write_tif(tmp_path / "other.tif", data)
    again, computed = training_stats(config, [open_scene(other)])
    assert computed and again.scenes == ("other",) and again.mean != first.mean
    # Told the data settings changed, the same scenes and bands are computed again too.
    assert training_stats(config, [open_scene(landsat_path)], reuse=False)[1]


def test_resume_under_other_data_or_tiling_settings_is_refused_and_changes_nothing(tmp_path, landsat_path):
    config = tiny_config(tmp_path, [landsat_path], epochs=1, steps_per_epoch=1)
    train(config)
    stats = (config.output_dir / "stats.json").read_bytes()
    checkpoint = (config.output_dir / "checkpoints" / "last.pt").read_bytes()
    # Other statistics: the rest of the training would see differently normalised pixels.
    other_range = load_config(
        raw={**config.values, "data": {**config["data"], "valid_range": [20, 200]},
             "train": {**config["train"], "epochs": 2}},
        base=tmp_path,
    )
    with pytest.raises(ModelError, match="the band statistics differ from the checkpoint's"):
        train(other_range, resume=True, reuse_stats=False)
    other_patch = load_config(
        raw={**config.values, "tiling": {**config["tiling"], "patch_size": 12},
             "train": {**config["train"], "epochs": 2}},
        base=tmp_path,
    )
    with pytest.raises(ModelError, match="cannot resume: tiling.patch_size was 8 when the checkpoint was trained"):
        train(other_patch, resume=True)
    assert (config.output_dir / "stats.json").read_bytes() == stats
    assert (config.output_dir / "checkpoints" / "last.pt").read_bytes() == checkpoint


def test_an_interrupt_before_last_pt_keeps_every_epochs_metrics_row(tmp_path, landsat_path, monkeypatch):
    """Stopped after epoch 1 wrote its row but before last.pt moved on: the resumed run
    trains epoch 1 again and the CSV ends with one row per epoch."""
    import sitfuse_byol.train.loop as loop

    config = tiny_config(tmp_path, [landsat_path], steps_per_epoch=1)
    real_plot = loop.plot_curves

    def interrupted_at_epoch_1(path, history):
        real_plot(path, history)
        if len(history) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "plot_curves", interrupted_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert load_checkpoint(config.output_dir / "checkpoints" / "last.pt")["epoch"] == 0
    monkeypatch.setattr(loop, "plot_curves", real_plot)
    result = train(config, resume=True)
    with open(config.output_dir / "train" / "metrics.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1]
    assert [row["epoch"] for row in result.metrics] == [0, 1]


def test_metrics_keep_their_counters_integers(tmp_path, landsat_path):
    from sitfuse_byol.train.metrics import read_metrics

    result = train(tiny_config(tmp_path, [landsat_path], epochs=1, steps_per_epoch=2))
    rows = read_metrics(result.checkpoint.parent.parent / "train" / "metrics.csv")
    assert [(type(r["epoch"]), type(r["step"])) for r in rows] == [(int, int)]
    assert rows[0]["step"] == 2


def test_metrics_log_the_lr_and_tau_of_each_epochs_last_step(tmp_path, landsat_path):
    import math

    from sitfuse_byol.train.byol import tau_schedule
    from sitfuse_byol.train.metrics import read_metrics

    # 2 x 3 steps, 1 warm-up step: the last steps are 2 and 5, and step k >= 1 runs at
    # the cosine factor of (k - 1) / 5; the schedule's next value would be logged wrongly.
    config = tiny_config(tmp_path, [landsat_path], optimizer="adamw", lr=1e-3)
    rows = read_metrics(train(config).checkpoint.parent.parent / "train" / "metrics.csv")
    last_steps = [2, 5]
    expected_lr = [1e-3 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 5)) for k in last_steps]
    assert [r["lr"] for r in rows] == pytest.approx(expected_lr)
    tau_base = config["train"]["tau_base"]
    assert [r["tau"] for r in rows] == pytest.approx([tau_schedule(k, 6, tau_base) for k in last_steps])


@pytest.mark.parametrize(("optimizer", "expected"), [("lars", 0.2 * 8 * 2 / 256), ("adamw", 1e-3)])
def test_a_null_lr_takes_the_optimizers_default_for_the_global_batch(tmp_path, landsat_path, optimizer, expected):
    from sitfuse_byol.train.loop import build_model, build_optimizer

    config = tiny_config(tmp_path, [landsat_path], optimizer=optimizer)
    assert config["train"]["lr"] is None
    model, _ = build_model(config, in_channels=6, device=torch.device("cpu"))
    built, _ = build_optimizer(model, train_config=config["train"], total_steps=10, world_size=2)
    assert [group["initial_lr"] for group in built.param_groups] == pytest.approx([expected] * len(built.param_groups))


def test_statistics_of_other_bands_never_normalise_the_same():
    from dataclasses import asdict

    from sitfuse_byol.normalize.stats import BandStats
    from sitfuse_byol.train.loop import same_normalization

    def stats(names):
        n = len(names)
        return BandStats(
            band_names=tuple(names), count=(10,) * n, mean=(1.0,) * n, std=(2.0,) * n, p2=(0.0,) * n,
            p98=(3.0,) * n, min=(0.0,) * n, max=(4.0,) * n, scenes=("a",),
        )

    saved = asdict(stats(["B1", "B2"]))
    assert same_normalization(saved, stats(["B1", "B2"]))
    # One more band (a regenerated file): no comparison of unequal arrays, just "other".
    assert not same_normalization(saved, stats(["B1", "B2", "B3"]))
    assert not same_normalization(saved, stats(["B2", "B1"]))
