"""The tiny preset end to end on the CPU: one process, resume from a checkpoint, and torchrun with 2 processes (gloo).

Each run is `train_scripts/train_configurable.py --preset tiny` in a subprocess with few, small steps; the checks read
its run_summary.json, TensorBoard event files and checkpoints. About a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "train_scripts" / "train_configurable.py"
STEPS, SAVE_EVERY, LOG_EVERY = 6, 3, 4
# Global batch 8 samples per optimizer step in both layouts: 4 x 2 accumulation x 1 process = 4 x 1 x 2 processes.
COMMON = ["--preset", "tiny", "--train_samples", "64", "--test_samples", "8", "--max_steps", str(STEPS),
          "--per_device_batch_size", "4", "--logging_steps", "1", "--save_strategy", "steps",
          "--save_steps", str(SAVE_EVERY), "--eval_strategy", "no", "--backend", "hf"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1")
    return env


def _train(args: list[str], cwd: Path, *, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}"]
    out = subprocess.run(launcher + [str(SCRIPT)] + args, cwd=cwd, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n" \
                                f"{out.stderr[-8000:]}"
    return out


def _summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "run_summary.json").read_text())


def _tb_losses(output_dir: Path) -> dict[int, float]:
    """train/loss scalars of the run's TensorBoard event files (the final evaluation, after training, opens a second
    file); all written by one process (rank 0: the file names end in .<pid>.<n>)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(output_dir.glob("runs/*/events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {output_dir}/runs"
    assert len({f.name.split(".")[-2] for f in files}) == 1, files
    losses: dict[int, float] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            losses.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return losses


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_tiny")


@pytest.fixture(scope="module")
def single(workdir):
    """One process, logging every LOG_EVERY steps only (the 2-process run logs every step): the last step is logged
    on its own all the same, so both runs' final losses are step 6's."""
    out_dir = workdir / "ws1"
    args = [str(LOG_EVERY) if i and COMMON[i - 1] == "--logging_steps" else a for i, a in enumerate(COMMON)]
    proc = _train(args + ["--grad_accum", "2", "--output_dir", str(out_dir), "--cache_dir", str(workdir / "cache"),
                          "--debug_dataloader", "1"], workdir)
    return out_dir, _summary(out_dir), proc.stdout, workdir


@pytest.fixture(scope="module")
def resumed(workdir, single):
    src = single[0]
    out_dir = workdir / "resumed"
    _train(COMMON + ["--grad_accum", "2", "--output_dir", str(out_dir), "--cache_dir", str(workdir / "cache"),
                     "--resume_from_checkpoint", str(src / f"checkpoint-{SAVE_EVERY}")], workdir)
    return out_dir, _summary(out_dir)


@pytest.fixture(scope="module")
def ddp(workdir):
    out_dir = workdir / "ws2"
    _train(COMMON + ["--grad_accum", "1", "--output_dir", str(out_dir), "--cache_dir", str(workdir / "cache"),
                     "--debug_dataloader", "1"], workdir, nproc=2)
    return out_dir, _summary(out_dir)


def _check_figures(s: dict, world_size: int) -> None:
    assert s["world_size"] == world_size and s["global_step"] == STEPS and s["backend"] == "hf"
    # a random model starts near ln(vocab) and the templated data is quickly learnt
    assert abs(s["first_train_loss"] - math.log(1024)) < 0.5
    assert s["final_train_loss"] < s["first_train_loss"] - 0.3
    assert math.isfinite(s["final_eval_loss"]) and s["final_eval_loss"] < s["first_train_loss"]
    assert s["tokens_per_sec_per_gpu"] > 0
    assert 0.5 < s["real_token_fraction"] <= 1.0  # padding-free: every computed slot is a real token
    assert s["rank_work_max_over_mean"] >= 1.0 - 1e-9
    assert 0 < s["train_runtime_s"] <= s["wall_time_s"]


def test_single_process_trains(single):
    out_dir, s, stdout, workdir = single
    _check_figures(s, 1)
    assert s["rank_work_max_over_mean"] == pytest.approx(1.0)
    assert s["data"]["built_here"] is True
    assert "OpenSloth training configuration:" in stdout and "OpenSloth run summary:" in stdout
    page = workdir / ".log" / "tiny_ws1_rank0_batch_000.html"  # --debug_dataloader 1, relative to the working dir
    assert page.is_file() and "<html" in page.read_text(encoding="utf-8").lower()


def test_single_process_writes_tensorboard_and_checkpoints(single):
    out_dir, s = single[:2]
    losses = _tb_losses(out_dir)
    # the first step, every LOG_EVERY-th, and the last two: the last log covers the last step alone
    assert sorted(losses) == [1, LOG_EVERY, STEPS - 1, STEPS] and s["final_logged_step"] == STEPS
    assert losses[1] == pytest.approx(s["first_train_loss"], rel=1e-4)
    assert losses[STEPS] == pytest.approx(s["final_train_loss"], rel=1e-4)
    for step in (SAVE_EVERY, STEPS):
        ckpt = out_dir / f"checkpoint-{step}"
        assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    assert [Path(p).name for p in s["checkpoints"]] == [f"checkpoint-{SAVE_EVERY}", f"checkpoint-{STEPS}"]
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()


def test_resume_continues_from_the_saved_step(single, resumed):
    s_full = single[1]
    out_dir, s = resumed
    assert s["resumed_from_step"] == SAVE_EVERY and s["global_step"] == STEPS
    assert s["data"]["built_here"] is False  # the prepared data came from the cache the first run wrote
    # this run trained (and logged) only the steps after the checkpoint...
    own = _tb_losses(out_dir)
    assert sorted(own) == list(range(SAVE_EVERY + 1, STEPS + 1))
    # the mean covers the logged steps: step 1 (the checkpoint's only log; steps 2-3 were never logged) and its own
    assert s["train_loss_mean"] == pytest.approx((s_full["first_train_loss"] + sum(own.values())) / (1 + len(own)),
                                                 rel=1e-4)
    # ...and, restoring weights, optimizer, scheduler, RNG and data position, ends where the uninterrupted run did
    assert s["final_train_loss"] == pytest.approx(s_full["final_train_loss"], rel=1e-3)
    assert s["final_eval_loss"] == pytest.approx(s_full["final_eval_loss"], rel=1e-3)
    assert (out_dir / f"checkpoint-{STEPS}" / "trainer_state.json").is_file()


def test_torchrun_two_processes(single, ddp):
    s_full = single[1]
    out_dir, s = ddp
    _check_figures(s, 2)
    assert s["run_name"] == "tiny_ws2" and s["patches"] is True
    # same global batch as the single-process run (8 samples per step), and DDP averages gradients exactly; this run
    # logs every step, the single one every LOG_EVERY-th: both final losses are the last step's alone
    assert s["final_train_loss"] == pytest.approx(s_full["final_train_loss"], rel=1e-3)
    assert s["final_eval_loss"] == pytest.approx(s_full["final_eval_loss"], rel=1e-3)
    assert sorted(_tb_losses(out_dir)) == list(range(1, STEPS + 1))  # rank 0 alone writes events
    assert (out_dir / f"checkpoint-{STEPS}" / "trainer_state.json").is_file()
    # every rank wrote its own batch preview, of its own micro-batch
    pages = [out_dir.parent / ".log" / f"tiny_ws2_rank{r}_batch_000.html" for r in (0, 1)]
    assert all(p.is_file() for p in pages)
    assert pages[0].read_text(encoding="utf-8") != pages[1].read_text(encoding="utf-8")


@pytest.mark.parametrize("source", ["ws2", "ws1"])
def test_torchrun_resumes_from_a_checkpoint_of_any_world_size(workdir, single, ddp, source):
    """Two processes on the CPU resume from a two-process checkpoint and from a one-process one (same global batch)
    and end where the uninterrupted runs did (issue 15: this failed restoring the optimizer onto cpu:0)."""
    src = (ddp if source == "ws2" else single)[0]
    out_dir = workdir / f"resumed_ws2_from_{source}"
    _train(COMMON + ["--grad_accum", "1", "--output_dir", str(out_dir), "--cache_dir", str(workdir / "cache"),
                     "--resume_from_checkpoint", str(src / f"checkpoint-{SAVE_EVERY}")], workdir, nproc=2)
    s = _summary(out_dir)
    assert s["resumed_from_step"] == SAVE_EVERY and s["global_step"] == STEPS and s["world_size"] == 2
    assert s["final_train_loss"] == pytest.approx(ddp[1]["final_train_loss"], rel=1e-3)
    assert s["final_eval_loss"] == pytest.approx(ddp[1]["final_eval_loss"], rel=1e-3)

