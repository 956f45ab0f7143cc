"""Unsloth under torchrun: two ranks sharing the one GPU follow the one-process loss curve with the balanced sampler.

``train_scripts/train_configurable.py --backend unsloth --preset tiny --lora_r 8 --packing balanced`` (a tiny random
Qwen3 that the script saves to a folder under the test's temporary cache dir and loads with
``FastLanguageModel.from_pretrained``, LoRA r 8, packed rows with the rank-balanced sampler and the window re-cut)
runs once as one process (grad_accum 2) and once as two single-process torchrun "nodes" on 127.0.0.1 (``--nnodes 2
--node_rank i --nproc_per_node 1``: each rank is LOCAL_RANK 0, so both use cuda:0; ``--ddp_backend gloo``, since
NCCL refuses two ranks on one device) with grad_accum 1: the same global batch of 4 rows per optimizer step. Both
ranks must train, and the per-step losses and the final eval loss must equal the one-process run's within bf16
tolerance.

Run it alone: ``python -m pytest tests/gpu/test_ddp_shared_gpu.py`` (skipped without CUDA or Unsloth).

Tolerance: every optimizer step trains the same rows in both runs (the sampler's plan is world-size invariant) from
the same seeded LoRA initialisation, so the runs differ only in rounding: the rows are grouped into other
micro-batches (bf16 activations rounded in other GEMM shapes, at most 2^-8 relative per rounding, zero-mean and
averaged over the ~1,000 trained tokens of a step) and the LoRA gradients are summed in another order (DDP's
all-reduce against local accumulation), then compounded by AdamW over the steps. The issue that asked for this test
measured one process against two ranks sharing an H100 (Unsloth, the README recipe, no balancer) equal within 1e-4
over 8 steps. The effect this test guards against, balancing that mixes rows across steps
(``OPENSLOTH_BALANCE_ACROSS_STEPS=1``), moved these per-step losses by 0.018 to 0.089 on the CPU twin
(tests/integration/test_train_shared_launch.py, fp32, the same flags). ATOL = 5e-3 (about 7e-4 relative at the
random model's ln(1024) = 6.93) is 50x the bf16 difference measured in the issue and 3.6x to 18x below the effect
of mixing steps.
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

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1800)]

STEPS = 6
ATOL = 5e-3


def _common(workdir) -> list[str]:
    return tiny_run_flags(workdir, "unsloth", STEPS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp_shared_gpu")


@pytest.fixture(scope="module")
def env():
    return launch_env()


@pytest.fixture(scope="module")
def single(workdir, env):
    # first, alone: it writes the tiny model folder and Unsloth's compiled cache that the two ranks then reuse
    out = workdir / "ws1"
    run_one_process(_common(workdir) + ["--grad_accum", "2", "--output_dir", str(out)], workdir, env, timeout=900)
    return step_losses(out, STEPS), summary(out)


def test_two_ranks_sharing_the_gpu_follow_the_one_process_curve(workdir, env, single):
    reference, s1 = single
    assert s1["backend"] == "unsloth" and s1["world_size"] == 1
    out = workdir / "ws2"
    procs = run_two_nodes(_common(workdir) + ["--grad_accum", "1", "--ddp_backend", "gloo", "--output_dir", str(out)],
                          workdir, env, timeout=900)
    for rank, proc in enumerate(procs):  # both ranks trained, each as local rank 0 of its node, on the one GPU
        assert f"rank {rank} of 2 (local rank 0 of 1) on cuda:0" in proc.stderr + proc.stdout
    s2 = summary(out)
    assert s2["backend"] == "unsloth" and s2["world_size"] == 2 and s2["global_step"] == STEPS
    assert s2["packing"] == "balanced"
    losses = step_losses(out, STEPS)
    assert all(math.isfinite(x) for x in reference + losses)
    assert reference[-1] < reference[0]  # it trains
    diffs = [abs(a - b) for a, b in zip(reference, losses)]
    print("per-step losses, one process:", reference)
    print("per-step losses, two ranks:  ", losses)
    print("differences:", diffs)
    assert max(diffs) <= ATOL, list(zip(range(1, STEPS + 1), reference, losses))
    # the final eval loss (token-weighted over the eval rows, each counted once) agrees too
    assert math.isfinite(s2["final_eval_loss"])
    assert abs(s2["final_eval_loss"] - s1["final_eval_loss"]) <= ATOL, (s1["final_eval_loss"], s2["final_eval_loss"])
