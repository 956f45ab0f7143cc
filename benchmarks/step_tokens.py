#!/usr/bin/env python
"""Tokens per micro-batch, step by step, of the two flat layouts `bench_train_gpu.py` compares (CPU, seconds).

Why: a flat micro-batch is one row of all its tokens, so its length T changes every step, and on the GPU a step
whose T is the largest so far was slow (Qwen3-8B, H100 and H200, 2026-12-07: every slow timed step fell on one,
for Unsloth's anchor and for ours). This prints each variant's T per step from the benchmark's own data, seed and
batch size, and the steps where the running maximum grows::

    python benchmarks/step_tokens.py --num_samples 1920 --eval_samples 8 --micro_rows 16 --steps 6

``opensloth``: `opensloth.sampler.BalancedBatchSampler` over OpenSloth's rows (one rank, as the benchmark runs).
``unsloth_packing``: TRL's ``SFTTrainer(packing=True)`` data loader (best-fit decreasing rows, padding-free), which
Unsloth's ``packing=True`` uses, built here on a tiny random model. The flags are the benchmark's.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def growth_steps(tokens: list[int]) -> list[int]:
    """1-based steps whose value is larger than every earlier one (the first step included)."""
    out, best = [], None
    for i, t in enumerate(tokens):
        if best is None or t > best:
            out.append(i + 1)
            best = t
    return out


def opensloth_tokens(rows, micro_rows: int, seed: int, steps: int) -> list[int]:
    from opensloth.sampler import BalancedBatchSampler

    seq = rows["seq_lengths"]
    sampler = BalancedBatchSampler(seq_lengths=seq, batch_size=micro_rows, seed=seed)
    return [int(sum(sum(seq[i]) for i in batch)) for batch in list(sampler)[:steps]]


def trl_packing_tokens(train, tokenizer, micro_rows: int, max_len: int, seed: int, steps: int, work: Path) -> list[int]:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=8))
    args = SFTConfig(output_dir=str(work), per_device_train_batch_size=micro_rows, max_steps=steps, packing=True,
                     max_length=max_len, seed=seed, use_cpu=True, report_to="none", dataloader_num_workers=0)
    loader = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).get_train_dataloader()
    out = []
    for batch in loader:
        out.append(int(batch["input_ids"].numel()))
        if len(out) == steps:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    from benchmarks.bench_train_gpu import build_config, parse_args, prepare_data

    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--steps_shown", type=int, default=None, help="steps to show (default: warm-up + timed)")
    known, rest = own.parse_known_args(argv)
    cfg = build_config(parse_args(rest))
    info = prepare_data(cfg)
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    steps = known.steps_shown or cfg.warmup_steps + cfg.steps
    ours = opensloth_tokens(load_from_disk(info["rows"]), cfg.micro_rows, cfg.seed, steps)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    trl = trl_packing_tokens(load_from_disk(info["train"]), tokenizer, cfg.micro_rows, cfg.max_seq_length, cfg.seed,
                             steps, Path(cfg.work_dir) / "step_tokens")
    print(f"micro-batch tokens by step ({cfg.micro_rows} rows of {cfg.max_seq_length}, seed {cfg.seed}; "
          f"timed steps {cfg.warmup_steps + 1}-{cfg.warmup_steps + cfg.steps})")
    for name, tokens in (("opensloth", ours), ("unsloth_packing", trl)):
        print(f"  {name:16s} {', '.join(f'{t:,}' for t in tokens)}; a new largest at steps "
              f"{', '.join(map(str, growth_steps(tokens)))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
