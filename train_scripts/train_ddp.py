#!/usr/bin/env python
"""OpenSloth, minimal: Unsloth QLoRA SFT on packed rows, on 1..N GPUs.

    torchrun --nproc_per_node=4 train_scripts/train_ddp.py        # or: python train_scripts/train_ddp.py

Every setting is a constant below (environment variables override the model, data and length). The data path is
OpenSloth's: chat records -> assistant-only labels (opensloth.data.chat) -> rows of whole samples packed best-fit
decreasing (opensloth.data.packed) -> Unsloth's own packed batch format (opensloth.wiring: position_ids restarting
per sample + packed_seq_lengths; Unsloth's FlashAttention-2 varlen branch switched on where torch < 2.12), checked
once to keep packed samples apart (padded rows for a model that does not). Works for every text architecture
Unsloth trains (Llama, Qwen2.5, Qwen3, Mistral, Gemma 2/3). For every flag and mode, use train_configurable.py.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from unsloth import FastLanguageModel, is_bfloat16_supported  # noqa: E402  (first: it patches transformers, trl, peft)

# isort: split
from trl import SFTConfig, SFTTrainer  # noqa: E402

from opensloth.data.chat import tokenize_chat_dataset  # noqa: E402
from opensloth.data.packed import build_packed_dataset  # noqa: E402
from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples  # noqa: E402
from opensloth.wiring import wire_batches  # noqa: E402

MODEL_NAME = os.environ.get("MODEL_NAME", "unsloth/Qwen3-0.6B-bnb-4bit")
DATASET = os.environ.get("DATASET", "trl-lib/Capybara")  # a hub dataset, or a JSONL file of chat records
MAX_SEQ_LENGTH = int(os.environ.get("MAX_SEQ_LENGTH", "4096"))  # also the packed row capacity
TRAIN_SAMPLES = int(os.environ.get("TRAIN_SAMPLES", "2000"))
MAX_STEPS = int(os.environ.get("MAX_STEPS", "-1"))  # -1: run NUM_EPOCHS
NUM_EPOCHS = 1
LORA_RANK = 8
LEARNING_RATE = 2e-4
PER_DEVICE_BATCH_SIZE = 1  # packed rows of MAX_SEQ_LENGTH tokens per micro-batch
GRAD_ACCUM = 4


def load_records():
    from datasets import load_dataset

    if Path(DATASET).is_file():
        return load_dataset("json", data_files=DATASET, split=f"train[:{TRAIN_SAMPLES}]")
    return load_dataset(DATASET, split=f"train[:{TRAIN_SAMPLES}]")


def main() -> None:
    device = ddp_patch()  # validates the torchrun environment, pins cuda:LOCAL_RANK, fixes the loss scaling
    patch_optimize_sft_trainer_batch_samples()  # evens out each gradient-accumulation window's micro-batches
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=MODEL_NAME, max_seq_length=MAX_SEQ_LENGTH, load_in_4bit=True, device_map=f"cuda:{device.index}"
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_gradient_checkpointing="unsloth",
        random_state=42,
    )
    # Packed rows in Unsloth's own format; checks that the model keeps the packed samples apart.
    wiring = wire_batches(model, backend="unsloth", packing="packed", max_seq_length=MAX_SEQ_LENGTH,
                          pad_token_id=tokenizer.pad_token_id)

    # Every rank prepares the same rows (deterministic); train_configurable.py builds them once on rank 0 instead.
    samples = tokenize_chat_dataset(load_records(), tokenizer, max_seq_length=MAX_SEQ_LENGTH)
    rows = build_packed_dataset(samples, MAX_SEQ_LENGTH, strategy="best")  # the fewer rows of BFD and exact fit

    args = SFTConfig(
        output_dir=f"outputs/train_ddp_ws{world_size}",
        per_device_train_batch_size=PER_DEVICE_BATCH_SIZE,
        gradient_accumulation_steps=GRAD_ACCUM,
        num_train_epochs=NUM_EPOCHS,
        max_steps=MAX_STEPS,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        save_strategy="no",
        report_to="tensorboard",
        max_length=MAX_SEQ_LENGTH,
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenised, labelled and packed
        ddp_find_unused_parameters=False,
        bf16=is_bfloat16_supported(),
        fp16=not is_bfloat16_supported(),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        data_collator=wiring.collator,
    )
    wiring.attach(trainer)  # what Unsloth's own packing=True sets up on its trainer (FA3 / FA4 where installed)
    trainer.train()


if __name__ == "__main__":
    main()
