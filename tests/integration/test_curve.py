"""One loss curve on 1, 2 and 4 processes with the rank-balanced sampler on (CPU, gloo, fp32).

For a fixed global batch (world size x grad_accum x micro-batch = 8), tests/integration/curve_worker.py trains a tiny
LoRA Qwen3 under torchrun at world sizes 1, 2 and 4, in three layouts (padded samples, padding-free samples, packed
rows), with the balanced sampler and the window re-cut on. Every optimizer step must train the same dataset items
and log the same loss (within 1e-5) at every world size, and the eval loss must be the token-weighted mean over the
eval set (a float64 one-sample-at-a-time reference) within 1e-6 at every world size and at two eval batch sizes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import curve_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(curve_worker.__file__)
WORLD_SIZES = (1, 2, 4)
LAYOUTS = ("padded", "flat", "rows")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    """world size -> every rank's report."""
    out = {}
    for world in WORLD_SIZES:
        folder = tmp_path_factory.mktemp(f"curve_ws{world}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={world}",
               f"--master_port={_free_port()}", str(WORKER), str(folder)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"torchrun (ws {world}) did not finish in {exc.timeout} s:\n{(exc.stderr or '')[-4000:]}")
        if proc.returncode != 0:
            pytest.fail(f"torchrun (ws {world}) failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                        f"{proc.stderr[-6000:]}")
        out[world] = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]
    return out


def _step_items(reports: list[dict], layout: str) -> list[list[int]]:
    """The dataset items each optimizer step trained, over all ranks (accelerate's loader collates one batch ahead:
    the batches after the last step are left out)."""
    per_rank = []
    for rep in reports:
        accum = rep[layout]["grad_accum"]
        seen = rep[layout]["seen"][: len(rep[layout]["losses"]) * accum]
        per_rank.append([sorted(i for mb in seen[k : k + accum] for i in mb) for k in range(0, len(seen), accum)])
    steps = len(per_rank[0])
    assert all(len(p) == steps for p in per_rank)
    return [sorted(i for p in per_rank for i in p[k]) for k in range(steps)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_step_trains_the_same_items_at_every_world_size(runs, layout):
    reference = _step_items(runs[1], layout)
    expected_steps = curve_worker.STEPS if layout != "rows" else 3
    assert len(reference) == expected_steps
    assert all(len(step) == curve_worker.GLOBAL_BATCH for step in reference)
    for world in WORLD_SIZES[1:]:
        assert _step_items(runs[world], layout) == reference, world
        # the ranks of a step hold different items (the step is split, not repeated)
        first = [sorted(i for mb in rep[layout]["seen"][: rep[layout]["grad_accum"]] for i in mb)
                 for rep in runs[world]]
        assert len({i for items in first for i in items}) == curve_worker.GLOBAL_BATCH


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_step_losses_equal_at_every_world_size(runs, layout):
    reference = runs[1][0][layout]["losses"]
    assert len(reference) == (curve_worker.STEPS if layout != "rows" else 3)
    assert all(math.isfinite(x) for x in reference)
    assert len(set(reference)) == len(reference)  # the steps differ: the comparison below is not vacuous
    for world in WORLD_SIZES[1:]:
        losses = runs[world][0][layout]["losses"]
        assert len(losses) == len(reference)
        for step, (a, b) in enumerate(zip(reference, losses), start=1):
            assert abs(a - b) <= 1e-5, (layout, world, step, a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_loss_is_the_token_weighted_mean_at_every_world_size_and_batch(runs, layout):
    reference = runs[1][0][layout]["reference_eval"]
    for world in WORLD_SIZES:
        # the same final weights at every world size (up to fp32 rounding)
        assert abs(runs[world][0][layout]["reference_eval"] - reference) <= 1e-6
        for rank_report in runs[world]:
            evals = rank_report[layout]["eval"]
            assert set(evals) == {str(bs) for bs in curve_worker.EVAL_BATCH_SIZES}
            for bs, loss in evals.items():
                assert math.isfinite(loss), (layout, world, bs)
                assert abs(loss - reference) <= 1e-6, (layout, world, bs, loss, reference)
