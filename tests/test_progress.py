"""The training progress bar shows what `train()` reports after each step."""

from __future__ import annotations

import pytest

from sitfuse_byol.progress import train_progress

STEP = {"epoch": 0, "step": 1, "loss": 0.4321, "tau": 0.9912, "lr": 2.5e-4, "patches_per_s": 812.4, "data_wait": 0.03}


def test_train_bar_counts_epochs_times_steps_and_shows_the_step_values(monkeypatch, capsys) -> None:
    # A terminal, so rich draws the bar and leaves its last frame.
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "200")
    with train_progress({"epochs": 2, "steps_per_epoch": 3}, quiet=False) as on_step:
        for step in range(1, 7):
            on_step(STEP | {"step": step})
    err = capsys.readouterr().err
    for text in ("6/6", "loss 0.4321", "τ 0.9912", "lr 2.50e-04", "812 patches/s", "data wait 3%"):
        assert text in err


def test_a_resumed_training_bar_starts_at_its_step(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm")
    with train_progress({"epochs": 4, "steps_per_epoch": 3}, quiet=False) as on_step:
        for step in (10, 11, 12):  # resumed after epoch 3 of 4
            on_step(STEP | {"step": step})
    err = capsys.readouterr().err
    assert "12/12" in err and "1/12" not in err and "3/12" not in err
    # In an 80-column terminal the values wrap; the counts and time are never cut.
    monkeypatch.setenv("COLUMNS", "80")
    with train_progress({"epochs": 100, "steps_per_epoch": 150}, quiet=False) as on_step:
        on_step(STEP | {"step": 9000})
    err = capsys.readouterr().err
    assert "9000/15000" in err and "0:00:00" in err and "…" not in err


def test_quiet_bar_prints_nothing(capsys) -> None:
    with train_progress({"epochs": 1, "steps_per_epoch": 2}, quiet=True) as on_step:
        on_step(STEP)
    assert capsys.readouterr().err == ""


def test_a_missing_value_is_an_error_not_a_blank(monkeypatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    with (
        train_progress({"epochs": 1, "steps_per_epoch": 1}, quiet=False) as on_step,
        pytest.raises(KeyError, match="data_wait"),
    ):
        on_step({k: v for k, v in STEP.items() if k != "data_wait"})


def test_no_bar_and_no_blank_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    with train_progress({"epochs": 1, "steps_per_epoch": 2}, quiet=False) as on_step:
        on_step(STEP)
        on_step(STEP)
    assert capsys.readouterr().err == ""
