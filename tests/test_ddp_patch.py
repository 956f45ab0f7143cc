"""ddp_patch(): environment errors name the variable and value (and never hang), the device it returns, calling it
twice, importing no Unsloth/TRL; patch_optimize_sft_trainer_batch_samples() before or after the trainer is built, over
an Unsloth-style get_batch_samples installed later, and on TRL's SFTTrainer."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from opensloth.distributed import DistributedEnvironmentError
from opensloth.patching import batch_samples as bs
from opensloth.patching import ddp_patch as dp
from opensloth.patching.state import trainer_state

ROOT = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "ACCELERATE_USE_CPU")


@pytest.fixture
def fresh(monkeypatch):
    """A clean slate: no torchrun variables, no ddp_patch state, transformers.Trainer restored afterwards."""
    from transformers import Trainer

    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    saved = {k: Trainer.__dict__[k] for k in ("train", "compute_loss", "get_batch_samples", "_build_accelerator_args")
             if k in Trainer.__dict__}
    hooks = Trainer.__dict__.get("_opensloth_pre_train_hooks")
    saved_hooks = list(hooks) if hooks is not None else None
    monkeypatch.setattr(dp, "_state", None)
    if hooks is not None:
        hooks.clear()
    yield Trainer
    for k in ("train", "compute_loss", "get_batch_samples", "_build_accelerator_args"):
        if k in saved:
            setattr(Trainer, k, saved[k])
    if saved_hooks is None:
        if "_opensloth_pre_train_hooks" in Trainer.__dict__:
            del Trainer._opensloth_pre_train_hooks
    else:
        Trainer._opensloth_pre_train_hooks[:] = saved_hooks


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env,match", [
    ({"LOCAL_RANK": "abc"}, r"LOCAL_RANK='abc' is not an integer"),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, r"RANK=2 must be below WORLD_SIZE=2"),
    ({"RANK": "-1"}, r"RANK=-1 is negative"),
    ({"RANK": "1", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, r"LOCAL_RANK=3 must be below"),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, r"MASTER_ADDR is not set"),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, r"MASTER_PORT is not set"),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "http"},
     r"MASTER_PORT='http' is not a TCP port"),
])
def test_environment_errors_name_variable_and_value(fresh, monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DistributedEnvironmentError, match=match):
        dp.ddp_patch()
    assert dp._state is None  # nothing was pinned or patched


def test_missing_master_addr_under_torchrun_like_env_fails_fast_in_a_real_process():
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_PORT="29511",
               TORCHELASTIC_RUN_ID="test", PYTHONPATH=str(ROOT))
    code = "from opensloth.patching.ddp_patch import ddp_patch; ddp_patch(); print('returned')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # bounded: a hang fails the test instead of blocking the suite
    assert proc.returncode != 0 and "returned" not in proc.stdout
    assert "DistributedEnvironmentError: MASTER_ADDR is not set but WORLD_SIZE=2" in proc.stderr


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_single_process_cpu_device_twice_logs_once(fresh):
    records = _Records()
    logger = logging.getLogger("opensloth")  # ddp_patch's setup_logging stops propagation to the root logger
    logger.addHandler(records)
    try:
        first = dp.ddp_patch()
        second = dp.ddp_patch()
    finally:
        logger.removeHandler(records)
    assert first == second == torch.device("cpu")
    assert sum("rank 0 of 1 (local rank 0 of 1) on cpu" in m for m in records.messages) == 1
    from opensloth.patching.loss_scaling import loss_scaling_status

    assert loss_scaling_status(fresh) == "patched"
    hooks = fresh._opensloth_pre_train_hooks
    assert len(hooks) == len(set(hooks)) == 3  # balanced sampler, step figures, token-weighted eval: each once


def test_torchrun_like_cpu_env_selects_gloo_and_does_not_block(fresh, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29512")
    assert dp.ddp_patch() == torch.device("cpu")  # returns at once: no rendezvous here
    assert os.environ["ACCELERATE_USE_CPU"] == "true"  # accelerate then runs MULTI_CPU with gloo
    assert not torch.distributed.is_initialized()
    assert getattr(fresh._build_accelerator_args, dp._DDP_DEFAULTS_MARK, False)


def _torchrun_env(monkeypatch, rank, world):
    for k, v in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=29513).items():
        monkeypatch.setenv(k, str(v))


def test_cuda_pins_the_local_rank(fresh, monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", pinned.append)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"FakeGPU{i}")
    _torchrun_env(monkeypatch, 1, 2)
    assert dp.ddp_patch() == torch.device("cuda", 1)
    assert pinned == [1]
    assert "ACCELERATE_USE_CPU" not in os.environ  # accelerate picks nccl for CUDA by itself


def test_cuda_local_rank_beyond_visible_devices(fresh, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    _torchrun_env(monkeypatch, 1, 2)
    with pytest.raises(DistributedEnvironmentError, match=r"LOCAL_RANK=1 but only 1 CUDA device\(s\) are visible "
                                                          r"\(CUDA_VISIBLE_DEVICES=3\)"):
        dp.ddp_patch()


def test_importing_loads_nothing_heavy():
    code = ("import sys, opensloth.patching, opensloth.patching.ddp_patch; "
            "print(sorted(m for m in ('unsloth', 'unsloth_zoo', 'trl', 'datasets', 'transformers') "
            "if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


class _Blocker:
    """A meta-path finder that fails any import of unsloth or trl."""

    def __init__(self):
        self.attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("unsloth", "unsloth_zoo", "trl"):
            self.attempts.append(name)
            raise ImportError(f"blocked: {name}")
        return None


def test_patches_import_no_unsloth_or_trl(fresh, monkeypatch):
    blocker = _Blocker()
    for name in [m for m in sys.modules if m.split(".")[0] in ("unsloth", "unsloth_zoo", "trl")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [blocker] + sys.meta_path)
    dp.ddp_patch()
    dp.patch_optimize_sft_trainer_batch_samples()
    assert blocker.attempts == []


# ---------------------------------------------------------------------------------------------------------------
# The repack patch: before or after the trainer, over an Unsloth-style get_batch_samples, on SFTTrainer
# ---------------------------------------------------------------------------------------------------------------


def _samples():
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate([40, 3, 4, 38]):
        ids = rng.integers(1, 250, n).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:], "idx": i})
    return out


def _collate(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    labels = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(f["input_ids"]) for f in features])[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tests._models import tiny_qwen3

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=1, remove_unused_columns=False,
                             train_sampling_strategy="sequential", save_strategy="no", disable_tqdm=True,
                             learning_rate=1e-3)
    return Trainer(model=tiny_qwen3(), args=args, train_dataset=_samples(), data_collator=_collate)


def _assert_recut(trainer):
    fn = trainer.get_batch_samples
    assert getattr(fn.__func__, bs._MARK, False)
    stats = trainer_state(trainer).window_stats
    assert stats.layout == "padded" and stats.changed
    assert (stats.slots_before, stats.slots) == (80 + 76, 80 + 8)  # [40,3][4,38] -> [40,38][4,3]


def test_patch_before_trainer_is_built(fresh, tmp_path):
    dp.patch_optimize_sft_trainer_batch_samples()
    trainer = _trainer(tmp_path)
    trainer.train()
    _assert_recut(trainer)


def test_patch_after_trainer_is_built(fresh, tmp_path):
    trainer = _trainer(tmp_path)
    dp.patch_optimize_sft_trainer_batch_samples()
    dp.patch_optimize_sft_trainer_batch_samples()  # twice: still one hook, one wrapper
    assert fresh._opensloth_pre_train_hooks.count(bs._repack_hook) == 1
    trainer.train()
    _assert_recut(trainer)
    inner = trainer.get_batch_samples.__func__.__wrapped__
    assert not getattr(getattr(inner, "__func__", inner), bs._MARK, False)  # did not wrap itself


def test_wraps_an_unsloth_style_get_batch_samples_installed_later(fresh, tmp_path):
    """Unsloth replaces Trainer.get_batch_samples when a model loads (after the seed's patch call), with a function
    that does not call the one it replaces; the repack must still apply, around Unsloth's."""
    dp.patch_optimize_sft_trainer_batch_samples()
    calls = []
    original = fresh.get_batch_samples

    def _unsloth_get_batch_samples(self, epoch_iterator, num_batches, device=None, *args, **kwargs):
        calls.append(num_batches)
        return original(self, epoch_iterator, num_batches, device)

    fresh.get_batch_samples = _unsloth_get_batch_samples
    trainer = _trainer(tmp_path)
    trainer.train()
    assert calls == [2]
    _assert_recut(trainer)


def test_explicit_trainer_argument_wraps_now(fresh, tmp_path):
    trainer = _trainer(tmp_path)
    dp.patch_optimize_sft_trainer_batch_samples(trainer)
    assert getattr(trainer.get_batch_samples.__func__, bs._MARK, False)
    batches = [_collate(_samples()[:2]), _collate(_samples()[2:])]
    out, count = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    assert int(count) == sum(len(s["input_ids"]) - 1 for s in _samples())
    assert sum(b["input_ids"].numel() for b in out) == 88


def test_sft_trainer_padding_free_windows(fresh, tmp_path, shared_data, monkeypatch):
    """TRL's SFTTrainer (padding_free=True): the train-time hook wraps its get_batch_samples and re-cuts the flat
    batches its own collator makes, keeping num_items_in_batch. (Training SFTTrainer needs triton for TRL's fused
    LM head, which the CPU build of torch lacks, so the windows are fed directly.)"""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tests._models import tiny_qwen3

    tok = AutoTokenizer.from_pretrained(str(shared_data / "tokenizers" / "qwen3"))
    rng = np.random.default_rng(1)
    rows = [{"input_ids": rng.integers(1, 250, n).tolist()} for n in (60, 50, 5, 6, 7, 4)]
    cfg = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3,
                    padding_free=True, max_length=None, report_to=[], use_cpu=True, save_strategy="no")
    trainer = SFTTrainer(model=tiny_qwen3(), args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batches = [trainer.data_collator(rows[i : i + 2]) for i in range(0, 6, 2)]
    plain, plain_count = trainer.get_batch_samples(iter(batches), 3, torch.device("cpu"))
    dp.patch_optimize_sft_trainer_batch_samples()
    for hook in list(fresh._opensloth_pre_train_hooks):
        hook(trainer)  # what Trainer.train runs first
    out, count = trainer.get_batch_samples(iter(batches), 3, torch.device("cpu"))
    stats = trainer_state(trainer).window_stats
    assert stats.layout == "flat" and stats.changed, stats.reason
    assert int(count) == int(plain_count) == int(trainer._get_num_items_in_batch(out, torch.device("cpu")))
    tokens = sorted(t for b in out for t in b["input_ids"][0].tolist())
    assert tokens == sorted(t for b in plain for t in b["input_ids"][0].tolist())
    assert stats.max_batch_work_after < stats.max_batch_work_before
