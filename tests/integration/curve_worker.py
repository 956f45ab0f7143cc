"""Worker for tests/integration/test_curve.py: one loss curve at every world size, with the balanced sampler on.

``python -m torch.distributed.run --nproc_per_node=N tests/integration/curve_worker.py OUT_DIR`` trains a tiny fp32
Qwen3 with LoRA for a few optimizer steps of a fixed global batch (world size x grad_accum x micro-batch = 8) in
three layouts (padded samples, padding-free samples, packed rows), with the rank-balanced sampler and the window
re-cut on, then evaluates at two eval batch sizes. Each rank writes ``rank{r}.json``: per layout the logged
per-step losses, the dataset items it trained per step, the eval losses, and (rank 0) the token-weighted reference
eval loss computed one sample at a time in float64 from the final weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GLOBAL_BATCH = 8
MICRO_BATCH = 2
STEPS = 4
EVAL_BATCH_SIZES = (2, 3)
ROW_CAPACITY = 96


def train_samples(n: int = 40, seed: int = 0) -> list[dict]:
    """Samples of very different lengths (3 to 90 tokens), so balancing moves items between ranks and micro-batches;
    every third sample trains only its second half (a prompt span)."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(n) < 0.3, rng.integers(50, 91, n), rng.integers(3, 25, n))
    out = []
    for i, length in enumerate(lengths):
        ids = rng.integers(1, 250, int(length)).tolist()
        labels = list(ids)
        if i % 3 == 0:
            labels[: len(ids) // 2] = [-100] * (len(ids) // 2)
        out.append({"input_ids": ids, "labels": labels, "idx": i})
    return out


def packed_rows(samples: list[dict]) -> list[dict]:
    """The samples packed into rows of ROW_CAPACITY tokens (best-fit decreasing), each with its seq_lengths."""
    from opensloth.packing import pack_lengths

    plan = pack_lengths([len(s["input_ids"]) for s in samples], ROW_CAPACITY)
    rows = []
    for r, items in enumerate(plan.bins()):
        parts = [samples[i] for i in items]
        rows.append({"input_ids": [t for p in parts for t in p["input_ids"]],
                     "labels": [t for p in parts for t in p["labels"]],
                     "seq_lengths": [len(p["input_ids"]) for p in parts], "idx": r})
    return rows


def eval_samples() -> list[dict]:
    """11 samples; items 3 and 4 have no trained target (one eval batch of 2 holds no trained token)."""
    data = train_samples(11, seed=9)
    for i in (3, 4):
        data[i]["labels"] = [-100] * len(data[i]["labels"])
    return data


class Recorder:
    """Wraps a collator and records the dataset items of every training batch, in order."""

    def __init__(self, collate):
        self.collate = collate
        self.seen: list[list[int]] = []
        self.on = True

    def __call__(self, features):
        if self.on:
            self.seen.append([int(f["idx"]) for f in features])
        return self.collate([{k: v for k, v in f.items() if k != "idx"} for f in features])


def padded_collate(features: list[dict]) -> dict:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    labels = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collator(layout: str):
    from opensloth.collate import PackedDataCollator

    if layout == "padded":
        return padded_collate
    if layout == "flat":
        return PackedDataCollator(layout="flat", metadata=("packed_seq_lengths", "use_cache"))
    return PackedDataCollator(layout="rows", capacity=ROW_CAPACITY, metadata=("packed_seq_lengths", "use_cache"))


def lora_model():
    from peft import LoraConfig, get_peft_model

    from tests._models import tiny_qwen3

    model = tiny_qwen3(seed=0)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))


def reference_eval_loss(model, data: list[dict]) -> float:
    """Cross-entropy summed over every trained target, one sample at a time, in float64 / the target count."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for f in data:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1].double()
            labels = torch.tensor(f["labels"][1:])
            keep = labels != -100
            if keep.any():
                total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
                count += int(keep.sum())
    return total / count


def run_layout(layout: str, out: Path, world: int) -> dict:
    from transformers import Trainer, TrainingArguments

    from opensloth.patching.dataloader import use_balanced_sampler

    data = packed_rows(train_samples(80)) if layout == "rows" else train_samples()  # 26 rows, 40 samples
    recorder = Recorder(collator(layout))
    grad_accum = GLOBAL_BATCH // (MICRO_BATCH * world)
    args = TrainingArguments(
        output_dir=str(out / layout), per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=grad_accum,
        max_steps=STEPS if layout != "rows" else 3, learning_rate=5e-3, optim="adamw_torch",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, remove_unused_columns=False,
        save_strategy="no", logging_strategy="steps", logging_steps=1, report_to=[], seed=0, data_seed=3,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=True, dataloader_drop_last=True,
    )
    model = lora_model()
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=recorder)
    sampler = use_balanced_sampler(trainer)  # at every world size, 1 included: the same plan per global batch
    trainer.train()
    recorder.on = False
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"losses": losses, "seen": recorder.seen, "grad_accum": grad_accum,
              "balanced": type(sampler).__name__, "eval": {}}
    evaluation = eval_samples()
    for bs in EVAL_BATCH_SIZES:
        trainer.args.per_device_eval_batch_size = bs
        result["eval"][str(bs)] = trainer.evaluate(evaluation)["eval_loss"]
    if int(os.environ.get("RANK", "0")) == 0:
        result["reference_eval"] = reference_eval_loss(trainer.model, evaluation)
    return result


def main(out_dir: str) -> None:
    from opensloth.distributed import read_dist_env
    from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples

    torch.set_num_threads(1)
    out = Path(out_dir)
    ddp_patch(balance_ranks=False)  # the sampler is installed explicitly (world size 1 too)
    patch_optimize_sft_trainer_batch_samples()
    env = read_dist_env()
    report = {"rank": env.rank, "world_size": env.world_size}
    for layout in ("padded", "flat", "rows"):
        report[layout] = run_layout(layout, out, env.world_size)
    with open(out / f"rank{env.rank}.json", "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
    from opensloth.distributed import shutdown_process_group

    shutdown_process_group()  # the trainers are out of reach now: collected before the group goes
