"""The `opensloth` command under torchrun on the CPU (gloo, 2 processes): `torchrun --no-python ... opensloth train`
(the console script) and `torchrun ... -m opensloth inspect` (python -m). Tiny preset, 2 optimizer steps; the
console script is the one pip writes from pyproject.toml's entry, put first on PATH, so this checkout's code runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.shared_launch import retry_launch_once

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--preset", "tiny", "--backend", "hf", "--train_samples", "32", "--test_samples", "0",
         "--per_device_batch_size", "2", "--grad_accum", "1", "--eval_strategy", "no", "--report_to", "none"]


def _env(tmp_path: Path) -> dict:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    scripts = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    module, func = re.search(r'^opensloth\s*=\s*"([^"]+)"', scripts, re.M).group(1).split(":")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "opensloth"
    exe.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\n"
                   f"if __name__ == '__main__':\n    sys.exit({func}())\n")
    exe.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", PATH=str(bindir) + os.pathsep + env.get("PATH", ""),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    def launch():
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=500)
        assert out.returncode == 0, f"exit {out.returncode}: {' '.join(cmd)}\n--- stdout\n{out.stdout[-3000:]}\n" \
                                    f"--- stderr\n{out.stderr[-6000:]}"
        return out

    return retry_launch_once(launch)


def test_torchrun_runs_the_console_command_and_python_m(tmp_path):
    env = _env(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cache = ["--cache_dir", str(tmp_path / "cache")]

    _run([*torchrun, "--no-python", "opensloth", "train", *FLAGS, "--max_steps", "2", "--save_strategy", "no",
          "--output_dir", str(tmp_path / "run"), *cache], tmp_path, env)
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2 and summary["max_steps"] == 2

    _run([*torchrun, "-m", "opensloth", "inspect", *FLAGS, "--batches", "1", "--pages_dir", "pages", *cache],
         tmp_path, env)
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == [
        "tiny_ws2_rank0_batch_000.html", "tiny_ws2_rank1_batch_000.html"]  # each rank its own micro-batch
    assert not (tmp_path / "outputs").exists()
