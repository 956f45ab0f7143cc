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


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_ctrl_c_is_one_line_from_rank_0_and_status_130(calls, capsys, monkeypatch, rank, said):
    monkeypatch.setenv("RANK", rank)

    def interrupted():
        raise cli.RunInterrupted("interrupted at step 3 of 9")

    assert cli.run_command("opensloth train", interrupted) == 130
    assert calls == ["destroy"]
    assert ("opensloth train: interrupted at step 3 of 9" in capsys.readouterr().err) is said

    def ctrl_c():
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", "0")
    assert cli.run_command("opensloth train", ctrl_c) == 130
    assert "opensloth train: interrupted" in capsys.readouterr().err


def test_the_interrupted_message_names_the_checkpoint_to_continue_from(tmp_path):
    from types import SimpleNamespace

    state = SimpleNamespace(global_step=7, max_steps=20)
    assert "no checkpoint was saved yet" in cli.interrupted_message(state, str(tmp_path / "none"))
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    msg = cli.interrupted_message(state, str(tmp_path))
    assert "interrupted at step 7 of 20" in msg and str(tmp_path / "checkpoint-6") in msg
    assert "--resume_from_checkpoint latest" in msg


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


def test_a_finished_run_frees_cyclic_garbage_before_the_final_barrier(calls, monkeypatch):
    import gc

    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect") or 0)
    assert cli.run_command("opensloth train", lambda: None) == 0
    assert calls == ["collect", "barrier", "destroy"]


def test_under_torchrun_a_fatal_signal_prints_python_stacks(monkeypatch):
    import faulthandler

    enabled = []
    monkeypatch.setattr(faulthandler, "is_enabled", lambda: False)
    monkeypatch.setattr(faulthandler, "enable", lambda **kw: enabled.append(kw))
    monkeypatch.setenv("WORLD_SIZE", "1")
    cli._stacks_on_fatal_signal()
    assert enabled == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli._stacks_on_fatal_signal()
    assert enabled == [{"all_threads": True}]


def test_the_launch_helpers_retry_a_teardown_abort_once_and_nothing_else():
    from tests.integration.shared_launch import TEARDOWN_ABORT, retry_launch_once

    def failing(messages):
        calls = []

        def launch():
            calls.append(1)
            if len(calls) <= len(messages):
                raise AssertionError(messages[len(calls) - 1])
            return "ok"

        return launch, calls

    launch, calls = failing([f"exit -6 ... {TEARDOWN_ABORT}"])
    with pytest.warns(UserWarning, match="aborted at teardown"):
        assert retry_launch_once(launch) == "ok"
    assert len(calls) == 2
    launch, calls = failing([TEARDOWN_ABORT, TEARDOWN_ABORT])
    with pytest.warns(UserWarning), pytest.raises(AssertionError):
        retry_launch_once(launch)
    launch, calls = failing(["exit 1: a real failure"])
    with pytest.raises(AssertionError, match="a real failure"):
        retry_launch_once(launch)
    assert len(calls) == 1


def test_the_public_helper_collects_waits_and_destroys_and_is_a_no_op_without_a_group(calls, monkeypatch):
    """`opensloth.distributed.shutdown_process_group` is what `opensloth train` and the torchrun test workers end
    with, and what a user's own script is told to end with."""
    import gc

    from opensloth.distributed import shutdown_process_group

    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect") or 0)
    shutdown_process_group()
    assert calls == ["collect", "barrier", "destroy"]
    calls.clear()
    shutdown_process_group(wait_for_peers=False)
    assert calls == ["collect", "destroy"]
    calls.clear()
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    shutdown_process_group()
    assert calls == []
