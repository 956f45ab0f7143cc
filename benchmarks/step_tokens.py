#!/usr/bin/env python
"""Tokens per micro-batch, step by step, of the variants `bench_train_gpu.py` compares (CPU, seconds).

Why: every variant trains flat micro-batches (one row of all their tokens), so the row's length T changes every step,
and on the GPU a step whose T is the largest its process has met so far was slow (Qwen3-8B, H100 and H200,
2026-12-07: every slow timed step fell on one, for Unsloth's anchor and for ours). This prints each variant's T per
micro-batch, from the benchmark's data, seed and batch sizes, and the steps where the running maximum grows::

    python benchmarks/step_tokens.py --num_samples 1920 --eval_samples 8 --micro_rows 16 --warmup_steps 2 --steps 4 \\
        --variants unsloth_packing,opensloth

The batches come from the data loader of an SFTTrainer built as the benchmark builds it for one process (the same
trainer class, dataset, collator layout, batch size and seed) on a tiny random model on the CPU: ``opensloth``
OpenSloth's rows through its flat collator, ``opensloth_padding_free`` the samples through it, ``unsloth_packing``
TRL's ``packing=True`` (best-fit decreasing rows, padding-free, what Unsloth's ``packing=True`` trains),
``unsloth_auto`` TRL's padding-free batches of samples (Unsloth's default). `bench_train_gpu.py` reads the largest
micro-batch from here to size its prime. Under ``--nproc`` > 1 the ranks' batches differ from these.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAT_VARIANTS = ("opensloth", "opensloth_padding_free", "unsloth_packing", "unsloth_auto")


def growth_steps(tokens: list[int]) -> list[int]:
    """1-based steps whose value is larger than every earlier one (the first step included)."""
    out, best = [], None
    for i, t in enumerate(tokens):
        if best is None or t > best:
            out.append(i + 1)
            best = t
    return out


def variant_tokens(cfg: Any, variant: str, tokenizer: Any, micro_batches: int | None = None) -> list[int]:
    """Tokens of each micro-batch ``variant`` trains in one process, in training order: the first ``micro_batches``,
    or the whole epoch. ``cfg``: a `bench_train_gpu.BenchConfig` whose ``data_info`` is set."""
    import logging
    import warnings

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from benchmarks.bench_train_gpu import _sft_trainer, variant_data
    from opensloth.collate import PackedDataCollator

    if variant not in FLAT_VARIANTS:
        raise ValueError(f"variant = {variant!r}; choose from {FLAT_VARIANTS}")
    dataset, batch, kwargs = variant_data(cfg, variant)
    collator = None
    if variant.startswith("opensloth"):
        collator = PackedDataCollator(pad_token_id=tokenizer.pad_token_id, layout="flat")
    elif variant == "unsloth_auto":  # what Unsloth's default does by itself; TRL cuts none of these samples
        kwargs.update(padding_free=True, max_length=None)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=8))
    trl_logger = logging.getLogger("trl")
    level = trl_logger.level
    trl_logger.setLevel(logging.ERROR)  # TRL warns that the tiny model's SDPA is no flash kernel: irrelevant here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _sft_trainer(cfg, "step_tokens", variant, model, tokenizer, dataset, batch, 1, 1,
                                   collator=collator, cpu=True, **kwargs)
    finally:
        trl_logger.setLevel(level)
    out = []
    for b in trainer.get_train_dataloader():
        out.append(int(b["input_ids"].numel()))
        if micro_batches is not None and len(out) == micro_batches:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from benchmarks.bench_train_gpu import build_config, parse_args, prepare_data

    cfg = build_config(parse_args(argv))
    cfg.data_info = prepare_data(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    n = cfg.trained_steps * cfg.grad_accum
    print(f"micro-batch tokens in training order (seed {cfg.seed}, {cfg.grad_accum} per step; timed steps "
          f"{cfg.warmup_steps + 1}-{cfg.warmup_steps + cfg.steps})")
    for variant in dict.fromkeys(v for v in cfg.variants if v in FLAT_VARIANTS):
        tokens = variant_tokens(cfg, variant, tokenizer, n)
        print(f"  {variant:23s} {', '.join(f'{t:,}' for t in tokens)}; a new largest at micro-batches "
              f"{', '.join(map(str, growth_steps(tokens)))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
