"""DDP under torchrun (CPU, gloo, 2 processes) against a single process: the same LoRA weights after one optimizer
step with and without the window repack, one sampler plan on every rank fed through accelerate's sharding, the
repack patch applied after the trainer is built, find_unused_parameters=False, and the per-step figures logged.

One torchrun launch runs every scenario (tests/integration/ddp_worker.py); the tests read what it wrote.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration import ddp_worker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(ddp_worker.__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(WORKER), str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in {exc.timeout} s:\n{(exc.stderr or '')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def _report(out: Path, rank: int) -> dict:
    with open(out / f"rank{rank}.json") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict:
    """World size 1 references: the same global batch as world size 2, with twice the gradient accumulation."""
    out = tmp_path_factory.mktemp("single")
    refs = {}
    for ddp_accum in (1, 2):
        for repack in (False, True):
            refs[(ddp_accum, repack)] = ddp_worker.lora_step(
                out / f"{ddp_accum}_{repack}", grad_accum=2 * ddp_accum, repack=repack, n_samples=4 * ddp_accum)
    return refs


@pytest.mark.parametrize("repack", [False, True], ids=["plain", "repack"])
@pytest.mark.parametrize("ddp_accum", [1, 2], ids=["ws2-ga1-vs-ws1-ga2", "ws2-ga2-vs-ws1-ga4"])
def test_ddp_step_equals_single_process(torchrun_out, single_process, ddp_accum, repack):
    ddp = torch.load(torchrun_out / f"lora_ga{ddp_accum}_{int(repack)}.pt")
    initial, final, recut = single_process[(ddp_accum, repack)]
    assert recut == repack  # the single-process window (2 or 4 micro-batches) was re-cut when the patch was on
    assert set(ddp["final"]) == set(final) and len(final) == 8  # 2 layers x (q, v) x (A, B)
    moved = 0
    for name in final:
        torch.testing.assert_close(ddp["initial"][name], initial[name], rtol=0, atol=0)
        torch.testing.assert_close(ddp["final"][name], final[name], rtol=0, atol=1e-5, msg=name)
        moved += int(not torch.equal(final[name], initial[name]))
    assert moved >= 4  # every lora_B moved (lora_A has no gradient while B is zero)
    if repack and ddp_accum == 2:
        assert _report(torchrun_out, 0)["recut_ga2_1"] and _report(torchrun_out, 1)["recut_ga2_1"]


def test_repack_and_plain_runs_agree(single_process):
    for ddp_accum in (1, 2):
        _, plain, _ = single_process[(ddp_accum, False)]
        _, recut, _ = single_process[(ddp_accum, True)]
        for name in plain:
            torch.testing.assert_close(plain[name], recut[name], rtol=0, atol=1e-5)


def test_sampler_plan_identical_on_every_rank(torchrun_out):
    r0, r1 = _report(torchrun_out, 0), _report(torchrun_out, 1)
    assert r0["plan_digest"] == r1["plan_digest"]
    assert r0["plan_digest"][0] != r0["plan_digest"][1]  # epochs differ
    import numpy as np

    from opensloth.sampler import BalancedBatchSampler

    lengths = np.random.default_rng(1).integers(1, 300, 101)
    local = BalancedBatchSampler(lengths, batch_size=2, grad_accum=2, world_size=2, seed=3)
    assert ddp_worker._plan_digest(local.plan(0)) == r0["plan_digest"][0]  # and the same as in this process


def test_balanced_sampler_through_trainer_and_accelerate(torchrun_out):
    """ddp_patch's train hook installed the balanced sampler; accelerate's sharding gave each rank exactly its
    plan, and together the ranks saw every dataset item exactly once (24 items = 3 steps x 2 ranks x 2 x 2)."""
    after = [_report(torchrun_out, r)["after"] for r in (0, 1)]
    for a in after:
        assert a["planned"] is not None, "balanced sampler not installed"
        assert a["seen"] == a["planned"]
        assert len(a["seen"]) == 3 * 2  # 3 optimizer steps x 2 micro-batches
    items = sorted(i for a in after for mb in a["seen"] for i in mb)
    assert items == list(range(24))


def test_patch_after_trainer_built_recuts_windows(torchrun_out):
    for rank in (0, 1):
        after = _report(torchrun_out, rank)["after"]
        assert after["repack_on"]
        windows = after["windows"]
        assert len(windows) == 3 and all(w is not None and w[0] == "padded" for w in windows)
        assert all(w[3] <= w[2] for w in windows)  # never more padded slots than before
    assert any(w[1] for r in (0, 1) for w in _report(torchrun_out, r)["after"]["windows"])


def test_find_unused_parameters_false_under_ddp(torchrun_out):
    for rank in (0, 1):
        after = _report(torchrun_out, rank)["after"]
        assert after["ddp_wrapped"] == "DistributedDataParallel"
        assert after["find_unused_args"] is False and after["ddp_find_unused"] is False


def test_step_figures_logged_on_rank_zero(torchrun_out):
    history = _report(torchrun_out, 0)["after"]["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 3
    for h in steps:
        assert h["opensloth/tokens_per_sec_per_gpu"] > 0
        assert 0 < h["opensloth/real_token_fraction"] <= 1
        assert 1.0 <= h["opensloth/rank_work_max_over_mean"] <= h["opensloth/rank_work_max_over_mean_worst"] + 1e-9
