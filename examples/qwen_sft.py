#!/usr/bin/env python
"""The canonical setup: an ordinary single-GPU Unsloth + TRL script, made multi-GPU by two OpenSloth calls.

    python examples/qwen_sft.py                                   # 1 GPU
    torchrun --nproc_per_node=2 examples/qwen_sft.py              # 2 GPUs, same effective batch (see below)

Compared with a single-GPU script, what differs is one import, two calls right after importing Unsloth
(`ddp_patch()` and `patch_optimize_sft_trainer_batch_samples()`), and `device_map=f"cuda:{local_rank}"` so that every
process loads its own copy of the model on its own GPU (with the line that reads `local_rank`). The data goes through
TRL as usual (conversations -> chat template -> tokens); Unsloth batches them padding-free. Environment variables
override the model, the data (a hub dataset or a JSONL file of chat records) and the step count.
"""

import os

from unsloth import FastLanguageModel, is_bfloat16_supported  # first: Unsloth patches transformers, trl, peft

# isort: split
from datasets import load_dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples  # noqa: E402

MODEL_NAME = os.environ.get("MODEL_NAME", "unsloth/Qwen3-0.6B-bnb-4bit")
DATASET = os.environ.get("DATASET", "trl-lib/Capybara")
MAX_SEQ_LENGTH = int(os.environ.get("MAX_SEQ_LENGTH", "4096"))
MAX_STEPS = int(os.environ.get("MAX_STEPS", "-1"))
NUM_EPOCHS = 1
TRAIN_SAMPLES = int(os.environ.get("TRAIN_SAMPLES", "1000"))
VAL_SAMPLES = 10
LEARNING_RATE = 2e-4
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
PER_DEVICE_BATCH_SIZE = 8 // WORLD_SIZE if WORLD_SIZE <= 8 else 1  # keeps the effective batch at 8 x GRAD_ACCUM
GRAD_ACCUM = 4


def load_split(start: int, stop: int):
    split = f"train[{start}:{stop}]"
    if os.path.isfile(DATASET):
        return load_dataset("json", data_files=DATASET, split=split)
    return load_dataset(DATASET, split=split)


if __name__ == "__main__":
    ddp_patch()
    patch_optimize_sft_trainer_batch_samples()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=MODEL_NAME,
        max_seq_length=MAX_SEQ_LENGTH,
        load_in_4bit=True,
        device_map=f"cuda:{local_rank}",
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_alpha=16,
        use_gradient_checkpointing="unsloth",
        random_state=42,
    )

    # Keep only the conversation: TRL renders it with the chat template and tokenises it.
    train_dataset = load_split(0, TRAIN_SAMPLES).select_columns(["messages"])
    val_dataset = load_split(TRAIN_SAMPLES, TRAIN_SAMPLES + VAL_SAMPLES).select_columns(["messages"])

    run_name = f"qwen_sft_ws{WORLD_SIZE}"
    args = SFTConfig(
        output_dir=f"outputs/{run_name}",
        run_name=run_name,
        per_device_train_batch_size=PER_DEVICE_BATCH_SIZE,
        gradient_accumulation_steps=GRAD_ACCUM,
        num_train_epochs=NUM_EPOCHS,
        max_steps=MAX_STEPS,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        save_strategy="epoch",
        eval_strategy="epoch",
        report_to="tensorboard",
        max_length=MAX_SEQ_LENGTH,
        ddp_find_unused_parameters=False,
        bf16=is_bfloat16_supported(),
        fp16=not is_bfloat16_supported(),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
