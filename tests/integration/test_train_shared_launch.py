"""The training script as two single-process torchrun "nodes" (gloo) against one process, on the CPU (hf backend).

The CPU twin of tests/gpu/test_ddp_shared_gpu.py: the same launch (``torchrun --nnodes 2 --node_rank i
--nproc_per_node 1 --master_addr 127.0.0.1``, each rank LOCAL_RANK 0, ``--ddp_backend gloo``), with LoRA and the
balanced sampler (``--packing balanced``) at the same global batch as a one-process run. In fp32 the per-step losses
must agree within 1e-5 and the final eval loss within 1e-6; two identical one-process runs (``--seed``) must log
identical losses.
"""

from __future__ import annotations

import math

import pytest

from tests.integration.shared_launch import (
    launch_env,
    run_one_process,
    run_two_nodes,
    step_losses,
    summary,
    tiny_run_flags,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

STEPS = 6


def common(workdir) -> list[str]:
    return tiny_run_flags(workdir, "hf", STEPS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("shared_launch")


@pytest.fixture(scope="module")
def env():
    return launch_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def single(workdir, env):
    out = workdir / "ws1"
    run_one_process(common(workdir) + ["--grad_accum", "2", "--output_dir", str(out)], workdir, env)
    return step_losses(out, STEPS), summary(out)


def test_two_identical_runs_log_identical_losses(workdir, env, single):
    out = workdir / "ws1_again"
    run_one_process(common(workdir) + ["--grad_accum", "2", "--output_dir", str(out)], workdir, env)
    assert step_losses(out, STEPS) == single[0]
    assert summary(out)["final_eval_loss"] == single[1]["final_eval_loss"]


def test_two_nodes_sharing_a_machine_follow_the_one_process_curve(workdir, env, single):
    out = workdir / "ws2"
    procs = run_two_nodes(common(workdir) + ["--grad_accum", "1", "--ddp_backend", "gloo", "--output_dir", str(out)],
                          workdir, env)
    for rank, proc in enumerate(procs):  # both ranks ran, each as local rank 0 of its own node
        assert f"rank {rank} of 2 (local rank 0 of 1)" in proc.stderr + proc.stdout
    s = summary(out)
    assert s["world_size"] == 2 and s["global_step"] == STEPS and s["packing"] == "balanced"
    reference, losses = single[0], step_losses(out, STEPS)
    assert len(set(reference)) == STEPS and reference[-1] < reference[0]  # it trains: not a flat curve
    for step, (a, b) in enumerate(zip(reference, losses), start=1):
        assert abs(a - b) <= 1e-5, (step, a, b)
    assert math.isfinite(s["final_eval_loss"])
    assert abs(s["final_eval_loss"] - single[1]["final_eval_loss"]) <= 1e-6
