"""Smoke test of benchmarks/bench_train_gpu.py's multi-process path on the CPU: torchrun, gloo, 2 ranks (issue 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_bench_runs_under_torchrun_with_two_ranks(shared_data, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train_gpu.py"), "--tiny", "--backend", "hf",
           "--nproc", "2", "--scaling", "global", "--variants", "opensloth_rows", "--warmup_steps", "1",
           "--steps", "1", "--num_samples", "64", "--eval_samples", "4", "--work_dir", str(tmp_path),
           "--data_dir", str(shared_data / "chat"), "--tokenizer", str(shared_data / "tokenizers" / "qwen3"),
           "--timeout", "300"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert result["world"] == 2 and result["steps"] == 2
    # --scaling global: 4 rows per step split over 2 ranks, 2 rows of 256 slots each, one timed step.
    assert result["batch"] == 2 and result["slots"] == 2 * 2 * 256
    assert 0.5 * result["slots"] < result["real_tokens"] <= result["slots"]
    assert result["tokens_per_s"] > 0 and result["step_max_over_mean"] >= 1.0
    assert "| opensloth_rows | 2 rows x 1 |" in proc.stdout
