"""One writing command at a time per output folder, with real processes."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from sitfuse_byol.cli import main
from sitfuse_byol.run.lock import output_folder_lock
from tests.run.conftest import write_config

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sitfuse_byol.run.lock import output_folder_lock

    with output_folder_lock(Path(sys.argv[1]), command="sitfuse run"):
        print("held", flush=True)
        time.sleep(300)
    """
)


@contextlib.contextmanager
def held(out):
    """``out`` held by another process, as a running `sitfuse run` holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def held_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with held(out) as holder:
        yield out, holder


def test_a_second_command_is_refused_while_another_writes_and_touches_nothing(held_folder, crop_scenes, capsys):
    out, holder = held_folder
    # The holder's output in progress: a second run would clear it as a killed run's leftover.
    in_progress = out / ".olinda_a.tif.tmp-1234"
    in_progress.write_text("half-written")
    config = write_config(out.parent, [crop_scenes["olinda_a"]], out="out")

    assert main(["stats", "-c", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.fullmatch(
        rf"error: another sitfuse command is writing to this output folder \(sitfuse run, pid {holder.pid} on \S+, "
        rf"since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it to end, or give this one another --out "
        rf"\({re.escape(str(out))}\)",
        err[0],
    ), err[0]
    assert in_progress.read_text() == "half-written"
    assert sorted(p.name for p in out.iterdir()) == [".olinda_a.tif.tmp-1234", ".sitfuse.lock"]


def test_assign_waits_its_turn_too(base_run, tmp_path, crop_scenes, capsys):
    from tests.run.test_pipeline import _write_class_polygons

    folder, *_ = base_run
    shutil.copytree(folder / "out", tmp_path / "out")
    config = write_config(tmp_path, crop_scenes.values())
    polygons = _write_class_polygons(tmp_path / "classes.gpkg", crop_scenes["olinda_a"])
    with held(tmp_path / "out"):
        assert main(["assign", "-c", str(config), "--labels", str(polygons)]) == 2
        assert "another sitfuse command is writing to this output folder" in capsys.readouterr().err
        assert not (tmp_path / "out" / "assign").exists()
    assert main(["assign", "-c", str(config), "--labels", str(polygons)]) == 0
    assert (tmp_path / "out" / "assign" / "mapping.yaml").exists()


def test_the_folder_is_free_once_its_holder_is_killed(held_folder, crop_scenes, capsys):
    out, holder = held_folder
    holder.kill()  # SIGKILL: no clean-up of its own
    holder.wait()
    config = write_config(out.parent, [crop_scenes["olinda_a"]], out="out")
    assert main(["stats", "-c", str(config), "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "run.json").exists() and (out / "stats.json").exists()
    # And this process let it go when its run ended.
    with output_folder_lock(out, command="test"):
        pass


def test_a_run_started_while_another_wrote_is_refused(base_run, tmp_path, crop_scenes, capsys, monkeypatch):
    """Between loading run.json and taking the lock, another command rewrote run.json."""
    from sitfuse_byol.run import pipeline
    from sitfuse_byol.run.manifest import Manifest

    config = write_config(tmp_path, [crop_scenes["olinda_a"]], out="out")
    assert main(["stats", "-c", str(config), "--quiet"]) == 0
    capsys.readouterr()
    stats_before = (tmp_path / "out" / "stats.json").read_bytes()
    original = pipeline.output_folder_lock

    def lock_after_another_wrote(out, *, command):
        other = Manifest.load(out / "run.json")
        other.stages["stats"]["seconds"] = 99.0
        other.save()
        return original(out, command=command)

    monkeypatch.setattr(pipeline, "output_folder_lock", lock_after_another_wrote)
    assert main(["stats", "-c", str(config), "--quiet", "--force"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: another sitfuse command changed this output folder while this one started; run it again "
        f"({tmp_path / 'out'})"
    )
    assert (tmp_path / "out" / "stats.json").read_bytes() == stats_before
