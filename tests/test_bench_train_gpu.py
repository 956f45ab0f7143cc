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


def _fake_result(variant: str, tokens_per_s: float) -> dict:
    return {"variant": variant, "batch": 8, "accum": 1, "tokens_per_s": tokens_per_s, "wasted": 0.0, "peak_gb": 1.0,
            "warmup": 1, "timed_steps": 2, "steps": 3, "real_tokens": 100, "step_s_mean": 0.5, "loss_end": 1.0,
            "eval_loss": 1.0, "graphs_during_timed": 0}


def test_combined_table_compares_each_run_with_its_own_packing_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.bench_train_gpu import BenchConfig, write_markdown

    cfg = BenchConfig(variants=[], model_dir="", tokenizer_dir="", data_dir="", work_dir="", out_dir="")
    runs = [(cfg, [_fake_result("opensloth_rows", 800.0)], "- header 1"),
            (cfg, [_fake_result("unsloth_packing", 100.0), _fake_result("opensloth_rows", 700.0)], "- header 2"),
            (cfg, [_fake_result("unsloth_packing", 200.0), _fake_result("opensloth_flat", 500.0)], "- header 3")]
    out = tmp_path / "gpu.md"
    write_markdown(runs, [out])
    combined = out.read_text().split("## Run 1")[0]
    # run 1 has no packing=True run: it falls back to run 2's; runs 2 and 3 use their own
    assert "| opensloth_rows (run 1) | 8 rows x 1 | 800 | 8.00x |" in combined
    assert "| opensloth_rows (run 2) | 8 rows x 1 | 700 | 7.00x |" in combined
    assert "| opensloth_flat (run 3) | 8 rows x 1 | 500 | 2.50x |" in combined
    assert "| unsloth_packing (run 3) | 8 rows x 1 | 200 | 1.00x |" in combined
    assert combined.count("| unsloth_packing") == 2
