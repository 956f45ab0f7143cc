"""Collate 8 packed rows of 4096 tokens: opensloth's collator (flat and rows) vs TRL's padding-free collator,
transformers' DataCollatorWithFlattening, and dense 4-D block-causal masks.

Rows: real samples (the shared hh-rlhf chats under the Qwen3 chat template, or lognormal lengths when the shared
data is absent) packed at capacity 4096 with ``pack_lengths``; the 8 fullest rows form the batch. Every collator
gets the same tokens, as the features a Trainer's DataLoader hands it: Python lists (a ``datasets.Dataset``
without a format), numpy arrays (``with_format("numpy")``) or torch tensors.

Run: ``python benchmarks/bench_collate.py`` (writes the "Collate" section of benchmarks/results/collate.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import machine_header, markdown_table, write_section  # noqa: E402
from benchmarks._shared_data import chat_template_token_ids, read_shared_chat, shared_data_dir  # noqa: E402
from opensloth.collate import PackedDataCollator  # noqa: E402
from opensloth.masks import block_causal_mask  # noqa: E402
from opensloth.packing import pack_lengths  # noqa: E402

CAPACITY = 4096
N_ROWS = 8
SHARED = shared_data_dir()


def load_samples(seed: int = 0) -> tuple[list[list[int]], str]:
    """Token id lists of real chat samples (Qwen3 template), else lognormal-length random ids."""
    chat = SHARED / "chat" / "hh_rlhf_helpful_base_test.jsonl"
    tok_dir = SHARED / "tokenizers" / "qwen3"
    if chat.is_file() and tok_dir.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        ids = chat_template_token_ids(read_shared_chat("hh_rlhf", SHARED / "chat"), tok)
        return [x[:CAPACITY] for x in ids], f"shared hh-rlhf ({len(ids)} chats, Qwen3 template)"
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.2, 0.7, size=2000).astype(int), 1, CAPACITY)
    return [rng.integers(0, 150_000, size=n).tolist() for n in lengths], "lognormal lengths (no shared data)"


def build_rows(samples: list[list[int]]):
    plan = pack_lengths([len(s) for s in samples], CAPACITY)
    fullest = np.argsort(-plan.bin_lengths, kind="stable")[:N_ROWS]
    rows, unpacked = [], []
    for b in fullest:
        members = [samples[i] for i in plan.bin(int(b))]
        labels = []
        for s in members:
            cut = len(s) // 3  # a prompt part that is not trained
            labels.append([-100] * cut + s[cut:])
            unpacked.append({"input_ids": s, "labels": labels[-1]})
        rows.append({
            "input_ids": [t for s in members for t in s],
            "labels": [t for lab in labels for t in lab],
            "seq_lengths": [len(s) for s in members],
        })
    return rows, unpacked


def as_format(features: list[dict], fmt: str) -> list[dict]:
    if fmt == "list":
        return features
    conv = (lambda v: np.asarray(v, dtype=np.int64)) if fmt == "numpy" else (lambda v: torch.tensor(v))
    return [{k: conv(v) for k, v in f.items()} for f in features]


def timed(fn, repeat: int, number: int) -> tuple[float, float]:
    """(median, min) milliseconds per call over ``repeat`` rounds of ``number`` calls."""
    fn()
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - t0) / number * 1e3)
    return statistics.median(rounds), min(rounds)


def hf_packed_mask(position_ids: torch.Tensor, impl: str):
    """transformers' own per-forward mask construction from packed position_ids (what sdpa/eager models do)."""
    from transformers import Qwen3Config
    from transformers.masking_utils import create_causal_mask

    config = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_hidden_layers=1, vocab_size=256)
    config._attn_implementation = impl
    embeds = torch.empty(position_ids.shape[0], position_ids.shape[1], 1)
    return lambda: create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None,
                                      past_key_values=None, position_ids=position_ids)


def run(repeat: int, number: int) -> tuple[list[list[object]], str]:
    from transformers import DataCollatorWithFlattening
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    samples, source = load_samples()
    rows, unpacked = build_rows(samples)
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    n_samples = len(unpacked)
    ours_flat = PackedDataCollator(pad_token_id=0)
    ours_rows = PackedDataCollator(pad_token_id=0, layout="rows", capacity=CAPACITY)
    ours_dense = PackedDataCollator(pad_token_id=0, layout="rows", capacity=CAPACITY, metadata=("attention_mask",))
    trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    flattening = DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    results = []
    dense_n, dense_repeat = 1, min(repeat, 3)  # dense masks take 0.1-5 s per call

    def add(name, features_desc, fn, n=number):
        med, best = timed(fn, repeat if n == number else dense_repeat, n)
        results.append([name, features_desc, med, best])
        print(f"{name:58s} {features_desc:28s} median {med:9.3f} ms  min {best:9.3f} ms", flush=True)

    for fmt in ("numpy", "torch", "list"):
        packed = as_format(rows, fmt)
        add("opensloth flat (position_ids + packed_seq_lengths + cu)", f"8 packed rows, {fmt}",
            lambda p=packed: ours_flat(p))
        add("opensloth rows (8 x 4096, same metadata)", f"8 packed rows, {fmt}", lambda p=packed: ours_rows(p))
    for fmt in ("numpy", "list"):
        single = as_format(unpacked, fmt)
        add("opensloth flat, padding-free from samples", f"{n_samples} samples, {fmt}",
            lambda s=single: ours_flat(s))
    ours_pack = PackedDataCollator(pad_token_id=0, layout="rows", capacity=CAPACITY, pack=True)
    unpacked_np, rows_np = as_format(unpacked, "numpy"), as_format(rows, "numpy")
    add("opensloth rows, samples repacked by pack_lengths (pack=True)", f"{n_samples} samples, numpy",
        lambda: ours_pack(unpacked_np))
    add("TRL DataCollatorForLanguageModeling(padding_free=True)", "8 packed rows, list", lambda: trl(rows))
    add("TRL DataCollatorForLanguageModeling(padding_free=True)", f"{n_samples} samples, list",
        lambda: trl([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in unpacked]))
    add("transformers DataCollatorWithFlattening(flash kwargs)", f"{n_samples} samples, list",
        lambda: flattening(unpacked))
    lengths = [r["seq_lengths"] for r in rows]
    add("opensloth block_causal_mask bool (8, 1, 4096, 4096)", "lengths only",
        lambda: block_causal_mask(lengths, CAPACITY), dense_n)
    add("opensloth block_causal_mask float32 (8, 1, 4096, 4096)", "lengths only",
        lambda: block_causal_mask(lengths, CAPACITY, dtype=torch.float32), dense_n)
    add("opensloth rows + dense bool mask (collator)", "8 packed rows, numpy",
        lambda: ours_dense(rows_np), dense_n)
    pos = ours_rows(rows_np)["position_ids"]
    for impl in ("sdpa", "eager"):
        add(f"transformers create_causal_mask from packed position_ids ({impl})", "(8, 4096) position_ids",
            hf_packed_mask(pos, impl), dense_n)
    note = (f"Batch: {N_ROWS} rows, {n_tokens} tokens ({n_tokens / (N_ROWS * CAPACITY):.2%} of 8 x {CAPACITY}), "
            f"{n_samples} samples from {source}. ms per call: median and min over "
            f"{repeat} rounds "
            f"(collators: {number} calls per round; dense masks: {dense_repeat} rounds of {dense_n} call).")
    return results, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timing rounds (median and min reported)")
    parser.add_argument("--number", type=int, default=50, help="collator calls per round")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results, note = run(args.repeat, args.number)
    table = markdown_table(["what", "input", "median ms", "min ms"], results)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OPENSLOTH_BACKEND",) if os.environ.get(k))
    command = " ".join(([env] if env else []) + ["python", Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = "\n\n".join([machine_header(command=command),
                        f"{note} torch threads: 1. Load average after the run (1, 5, 15 min): {load}.", table])
    if not args.no_write:
        path = write_section("collate", "Collate and packed-dataset benchmarks", "Collate", body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
