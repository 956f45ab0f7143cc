#!/usr/bin/env python
"""A CPU stand-in for examples/qwen_sft.py: tests/integration/test_recipe_driver.py runs it through the driver
tests/gpu/recipe_driver.py.

It has the recipe's shape without Unsloth, peft or triton (none imports here): the same environment variables,
``ddp_patch()`` and ``patch_optimize_sft_trainer_batch_samples()`` first, a model folder from MODEL_NAME (plain
transformers, full fine-tuning), a JSONL of chat records from DATASET, and the recipe's own ``SFTConfig`` arguments,
``report_to="tensorboard"`` included (tensorboard is not installed in the CPU environment, so the Trainer would refuse
it unless the driver's override took effect).
"""

import os

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples
from opensloth.patching.sft_trainer import sft_trainer_class

# TRL's SFTTrainer computes its loss with a triton kernel that the CPU build of torch cannot run; this is TRL's
# SFTTrainer with the model's own loss there (the recipe, under Unsloth, uses Unsloth's SFTTrainer).
SFTTrainer = sft_trainer_class()

MODEL_NAME = os.environ["MODEL_NAME"]
DATASET = os.environ["DATASET"]
MAX_SEQ_LENGTH = int(os.environ.get("MAX_SEQ_LENGTH", "256"))
MAX_STEPS = int(os.environ.get("MAX_STEPS", "-1"))
TRAIN_SAMPLES = int(os.environ.get("TRAIN_SAMPLES", "16"))
VAL_SAMPLES = 4
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
PER_DEVICE_BATCH_SIZE = 4 // WORLD_SIZE
GRAD_ACCUM = 2


if __name__ == "__main__":
    ddp_patch()
    patch_optimize_sft_trainer_batch_samples()
    model = AutoModelForCausalLM.from_pretrained(MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_NAME)
    train_dataset = load_dataset("json", data_files=DATASET, split=f"train[0:{TRAIN_SAMPLES}]")
    val_split = f"train[{TRAIN_SAMPLES}:{TRAIN_SAMPLES + VAL_SAMPLES}]"
    val_dataset = load_dataset("json", data_files=DATASET, split=val_split)
    run_name = f"qwen_sft_ws{WORLD_SIZE}"
    args = SFTConfig(
        output_dir=f"outputs/{run_name}",
        run_name=run_name,
        per_device_train_batch_size=PER_DEVICE_BATCH_SIZE,
        gradient_accumulation_steps=GRAD_ACCUM,
        num_train_epochs=1,
        max_steps=MAX_STEPS,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="epoch",
        eval_strategy="epoch",
        report_to="tensorboard",
        max_length=MAX_SEQ_LENGTH,
        ddp_find_unused_parameters=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset.select_columns(["messages"]),
        eval_dataset=val_dataset.select_columns(["messages"]),
        processing_class=tokenizer,
    )
    trainer.train()
