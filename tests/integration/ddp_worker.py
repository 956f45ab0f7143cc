"""Worker for tests/integration/test_torchrun.py: run under ``torchrun --nproc_per_node=2`` (CPU, gloo).

``python -m torch.distributed.run --nproc_per_node=2 tests/integration/ddp_worker.py OUT_DIR`` writes, per rank,
``rank{r}.json`` (what that rank saw and checked) and, on rank 0, ``lora_{tag}.pt`` (LoRA weights after one
optimizer step) for each DDP-equality configuration. The single-process references come from the same functions
(``lora_step``) called with world size 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Sequential batches of 2: [40, 3], [4, 38], [39, 5], [6, 37]. Every window of 2 or 4 micro-batches (world size 1)
# and every rank's window of 2 (world size 2) is re-cut by the repack; a window of 1 is not.
LENGTHS = [40, 3, 4, 38, 39, 5, 6, 37]


def make_samples(n: int, seed: int = 0, lengths=None) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = LENGTHS[:n] if lengths is None else lengths
    out = []
    for i, length in enumerate(lengths):
        ids = rng.integers(1, 250, int(length)).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:], "idx": i})
    return out


def collate(features: list[dict]) -> dict:
    """Right-padded batch (pad id 0) that records which dataset items it holds."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    labels = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features])
    collate.seen.append([int(f["idx"]) for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


collate.seen = []


def lora_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from tests._models import tiny_qwen3

    model = tiny_qwen3(seed=seed)
    torch.manual_seed(seed + 1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(model, config)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.named_parameters() if "lora_" in k}


def training_args(out_dir, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        remove_unused_columns=False, save_strategy="no", logging_strategy="no", report_to=[], seed=0,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def lora_step(out_dir, *, grad_accum: int, repack: bool, n_samples: int) -> tuple[dict, dict]:
    """One optimizer step of LoRA on the first ``n_samples`` samples in order; returns (initial, final) weights."""
    from transformers import Trainer

    from opensloth.patching.batch_samples import install_on_trainer
    from opensloth.patching.state import trainer_state

    model = lora_model()
    initial = lora_state(model)
    args = training_args(out_dir, gradient_accumulation_steps=grad_accum, train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=args, train_dataset=make_samples(n_samples), data_collator=collate)
    if repack:
        install_on_trainer(trainer)
    trainer.train()
    stats = trainer_state(trainer).window_stats
    return initial, lora_state(model), bool(stats is not None and stats.changed)


def _plan_digest(plan) -> str:
    h = hashlib.sha256()
    for step in plan.steps:
        for rank in step:
            for mb in rank:
                h.update(np.asarray(mb, dtype=np.int64).tobytes())
                h.update(b"|")
    return h.hexdigest()


def main(out_dir: str) -> None:
    from transformers import Trainer, TrainerCallback

    from opensloth.distributed import read_dist_env
    from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples
    from opensloth.patching.state import trainer_state
    from opensloth.sampler import BalancedBatchSampler

    out = Path(out_dir)
    device = ddp_patch()
    env = read_dist_env()
    report: dict = {"rank": env.rank, "world_size": env.world_size, "device": str(device)}

    # 1. DDP == single process: one LoRA step, with and without the window repack.
    for grad_accum in (1, 2):
        for repack in (False, True):
            n = 2 * grad_accum * env.world_size
            initial, final, changed = lora_step(out / f"run_ga{grad_accum}_{int(repack)}", grad_accum=grad_accum,
                                                repack=repack, n_samples=n)
            report[f"recut_ga{grad_accum}_{int(repack)}"] = changed
            if env.rank == 0:
                torch.save({"initial": initial, "final": final}, out / f"lora_ga{grad_accum}_{int(repack)}.pt")

    # 2. The sampler's plan, computed independently on each rank.
    lengths = np.random.default_rng(1).integers(1, 300, 101)
    sampler = BalancedBatchSampler(lengths, batch_size=2, grad_accum=2, world_size=env.world_size, seed=3)
    report["plan_digest"] = [_plan_digest(sampler.plan(e)) for e in (0, 1)]

    # 3. A trainer built first, the repack patch called after; default (random) sampling, so ddp_patch's hook
    #    installs the balanced sampler; per-step figures in the logs.
    collate.seen.clear()
    windows = []

    class Windows(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stats = trainer_state(trainer).window_stats
            windows.append(None if stats is None else [stats.layout, stats.changed, stats.slots_before,
                                                       stats.slots])

    # Three long samples among short ones: a rank's window holding a long one re-cuts to fewer padded slots (the long
    # one alone in its micro-batch).
    lengths = [60, 55, 50] + [int(x) for x in np.random.default_rng(2).integers(2, 12, 21)]
    data = make_samples(24, seed=5, lengths=lengths)
    args = training_args(out / "after", gradient_accumulation_steps=2, max_steps=3, logging_steps=1,
                         logging_strategy="steps", learning_rate=1e-3, data_seed=11)
    trainer = Trainer(model=lora_model(), args=args, train_dataset=data, data_collator=collate,
                      callbacks=[Windows()])
    patch_optimize_sft_trainer_batch_samples()
    trainer.train()
    sampler = trainer_state(trainer).sampler
    report["after"] = {
        "windows": windows,
        "seen": collate.seen[:],
        "planned": None if sampler is None else [mb.tolist() for mb in sampler.plan(0).rank_batches(env.rank)],
        "find_unused_args": trainer.args.ddp_find_unused_parameters,
        "ddp_find_unused": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "ddp_wrapped": type(trainer.model_wrapped).__name__,
        "repack_on": trainer_state(trainer).repack,
        "log_history": trainer.state.log_history,
    }
    with open(out / f"rank{env.rank}.json", "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
    from opensloth.distributed import shutdown_process_group

    shutdown_process_group()  # the trainers are out of reach now: collected before the group goes
