"""The cores a process may use, and the torch threads training takes from them."""

from __future__ import annotations

import os

import pytest

from sitfuse_byol.cores import usable_cores
from sitfuse_byol.train.loop import training_threads


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_usable_cores_follow_the_affinity_mask_not_the_machine():
    allowed = os.sched_getaffinity(0)
    try:
        # What a batch scheduler does to a job given one core of a larger node.
        os.sched_setaffinity(0, {min(allowed)})
        assert usable_cores() == 1
        assert training_threads() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert usable_cores() == len(allowed)


def test_training_takes_every_core_shared_among_the_node_s_torchrun_processes(monkeypatch):
    monkeypatch.setattr("sitfuse_byol.train.loop.usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert training_threads() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert training_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert training_threads() == 1
