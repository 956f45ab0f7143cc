"""`opensloth train`'s process-group shutdown: a finished run waits for its peers before leaving, a failed one does
not (its peers may never arrive), and a failing barrier does not turn a finished run into a crash."""

from __future__ import annotations

import logging

import pytest
import torch.distributed as dist

from opensloth.cli import train as cli


@pytest.fixture
def calls(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)  # the opensloth logger speaks on rank 0
    monkeypatch.setattr(dist, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: seen.append("destroy"))
    return seen


def test_a_finished_run_waits_for_its_peers_then_shuts_down(calls):
    assert cli.run_command("opensloth train", lambda: None) == 0
    assert calls == ["barrier", "destroy"]


def test_a_run_that_cannot_go_on_shuts_down_without_waiting(calls, capsys):
    def fail():
        raise cli.RunError("no such dataset")

    assert cli.run_command("opensloth train", fail) == 2
    assert calls == ["destroy"]
    assert "no such dataset" in capsys.readouterr().err


def test_a_crash_shuts_down_without_waiting_and_propagates(calls):
    def crash():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        cli.run_command("opensloth train", crash)
    assert calls == ["destroy"]


def test_a_failing_final_barrier_is_a_warning(calls, monkeypatch, caplog):
    def broken():
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "barrier", broken)
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        assert cli.run_command("opensloth train", lambda: None) == 0
    assert calls == ["destroy"] and "final barrier failed" in caplog.text


def test_one_process_has_no_barrier(calls, monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    assert cli.run_command("opensloth train", lambda: None) == 0
    assert calls == ["destroy"]
