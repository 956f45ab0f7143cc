#!/usr/bin/env python
"""QLoRA training throughput on real chat data: OpenSloth's packed rows against Unsloth's own modes (issue 7),
and the same under ``torchrun --nproc_per_node=N`` (issue 8).

One command runs every variant, each in its own process (Unsloth patches transformers globally; a crash or a hang
in one variant costs only that variant, under ``--timeout``), and prints one table::

    python benchmarks/bench_train_gpu.py                                   # all variants, random Qwen3-0.6B shape
    python benchmarks/bench_train_gpu.py --model_name Qwen/Qwen3-0.6B --variants opensloth_rows,unsloth_packing
    python benchmarks/bench_train_gpu.py --nproc 2 --scaling global        # DDP: fixed global batch in tokens
    python benchmarks/bench_train_gpu.py --probe                           # versions and FlashAttention checks
    python benchmarks/bench_train_gpu.py --tiny --backend hf --nproc 2     # CPU smoke test of the DDP path (gloo)

Setup (all variants): a Qwen3-0.6B-shaped model (hidden 1024, 28 layers, 16 query / 8 KV heads of 128,
intermediate 3072, tied embeddings), randomly initialised and saved with ``save_pretrained`` unless
``--model_name`` names a real one; loaded in 4 bits (``FastLanguageModel.from_pretrained(load_in_4bit=True)``, or
bitsandbytes NF4 + PEFT for the no-Unsloth reference); LoRA r 8, alpha 16, dropout 0 on q/k/v/o; Unsloth's gradient
checkpointing ("unsloth"); ``max_seq_length`` 4096; the shared alpaca + gsm8k + hh_rlhf + arena_hard chat records
mixed, shuffled (seed 0), rendered with the Qwen3 chat template, assistant-only labels. Every variant trains the
same number of optimizer steps with about the same real tokens per step: ``--rows_per_step`` packed rows of
``max_seq_length`` tokens, or, for the padded variants, ``--padded_batch`` samples per micro-batch with the
gradient accumulation that holds as many samples per step as the packed rows do.

Variants:

- ``unsloth_padded``: Unsloth, TRL's padded collator (padding-free off).
- ``unsloth_auto``: Unsloth's default (auto padding-free: one flattened row of the micro-batch's samples).
- ``unsloth_packing``: Unsloth with ``packing=True`` (TRL best-fit decreasing rows, flattened).
- ``opensloth_rows``: OpenSloth packed rows, fixed (P, max_seq_length) shapes, FlashAttention-2 varlen inside
  Unsloth's compiled blocks (`opensloth.patching.unsloth_attention`).
- ``opensloth_flat``: the same rows flattened into one (1, T) micro-batch, same attention route.
- ``opensloth_flat_v1``: flat + ``packed_seq_lengths`` with Unsloth's own varlen branch switched on
  (`patch_unsloth_torch_varlen`; eager blocks).
- ``opensloth_rows_unbalanced``: ``opensloth_rows`` without the rank-balanced sampler (for DDP runs).
- ``hf_padded``: plain transformers + PEFT (bitsandbytes 4-bit, SDPA, gradient checkpointing), padded: the
  no-Unsloth reference.

Figures: real (non-padding) tokens per second over the timed steps (after ``--warmup_steps``), the fraction of
computed token slots that were padding, peak GPU memory (allocated, during training), the loss of the last timed
steps, and the loss of every trained model on the same held-out samples (``eval loss``: same tokens for every
variant). Under ``--nproc`` each rank times its steps (synchronised), and the table adds the per-rank step time
max/mean and real tokens max/mean. ``--write_results`` writes benchmarks/results/gpu_train.md (``--results_md`` a
copy elsewhere). ``--profile`` adds a torch.profiler table of one timed step per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "unsloth_padded": "Unsloth, padded (padding-free off)",
    "unsloth_auto": "Unsloth default (auto padding-free)",
    "unsloth_packing": "Unsloth packing=True (TRL BFD)",
    "opensloth_rows": "OpenSloth rows (P x 4096, FA2 varlen, compiled)",
    "opensloth_flat": "OpenSloth flat (1 x T, FA2 varlen, compiled)",
    "opensloth_flat_v1": "OpenSloth flat + Unsloth varlen switch (eager)",
    "opensloth_rows_unbalanced": "OpenSloth rows, no rank balancing",
    "hf_padded": "transformers + PEFT, padded (no Unsloth)",
}
DEFAULT_VARIANTS = ("unsloth_padded", "unsloth_auto", "unsloth_packing", "opensloth_rows", "opensloth_flat",
                    "hf_padded")
HF_BACKEND_VARIANTS = ("hf_padded", "opensloth_rows", "opensloth_flat", "opensloth_rows_unbalanced")
QWEN3_06B_SHAPE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
TINY_SHAPE = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  tie_word_embeddings=True)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def say(*args: Any) -> None:
    print(*args, flush=True)


# ------------------------------------------------------------------------------------------------ configuration


@dataclass
class BenchConfig:
    variants: list[str]
    model_dir: str
    tokenizer_dir: str
    data_dir: str
    work_dir: str
    out_dir: str
    max_seq_length: int = 4096
    rows_per_step: int = 8
    padded_batch: int = 8
    padded_accum: int = 0  # 0: derived from the data
    warmup_steps: int = 2
    steps: int = 6
    num_samples: int = 4000
    eval_samples: int = 64
    learning_rate: float = 2e-4
    seed: int = 3407
    backend: str = "unsloth"
    nproc: int = 1
    scaling: str = "per_gpu"
    timeout: int = 600
    profile: bool = False
    tiny: bool = False
    random_model: bool = True
    data_info: dict = field(default_factory=dict)

    def per_rank(self, value: int) -> int:
        """A per-step quantity for one rank: the global value split over ranks (``--scaling global``)."""
        if self.scaling == "global" and self.nproc > 1:
            return max(1, math.ceil(value / self.nproc))
        return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--model_name", default=None, help="a real model (hub name or folder) instead of the random one")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's, or the shared Qwen3)")
    p.add_argument("--data_dir", default=None, help="folder of the shared chat JSONL files (default: shared data)")
    p.add_argument("--work_dir", default="/tmp/opensloth_bench", help="model, prepared data and runs")
    p.add_argument("--out_dir", default=None, help="per-variant logs and JSON (default: WORK_DIR/runs)")
    p.add_argument("--max_seq_length", type=int, default=4096)
    p.add_argument("--rows_per_step", type=int, default=8, help="packed rows per optimizer step (per GPU, or "
                   "global with --scaling global)")
    p.add_argument("--padded_batch", type=int, default=8, help="samples per micro-batch of the padded variants")
    p.add_argument("--padded_accum", type=int, default=0, help="gradient accumulation of the padded and auto "
                   "variants (0: as many samples per step as the packed rows hold)")
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps after the warm-up")
    p.add_argument("--num_samples", type=int, default=4000, help="training samples taken from the shuffled mix")
    p.add_argument("--eval_samples", type=int, default=64, help="held-out samples for the eval loss")
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--backend", choices=("unsloth", "hf"), default="unsloth",
                   help="hf: no Unsloth anywhere (transformers SDPA with position_ids masks); for CPU smoke tests")
    p.add_argument("--nproc", type=int, default=1, help="run each variant under torchrun --nproc_per_node=N")
    p.add_argument("--scaling", choices=("per_gpu", "global"), default="per_gpu",
                   help="per_gpu: the batch above per GPU; global: the batch above split over the GPUs")
    p.add_argument("--timeout", type=int, default=600, help="seconds per variant")
    p.add_argument("--tiny", action="store_true", help="tiny model, short rows, few samples (CPU smoke test)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one timed step per variant")
    p.add_argument("--probe", action="store_true", help="print versions and check FlashAttention varlen; no training")
    p.add_argument("--write_results", action="store_true", help="write benchmarks/results/gpu_train.md")
    p.add_argument("--results_md", default=None, help="also write the results markdown here")
    p.add_argument("--report_from", nargs="+", default=None, metavar="RUN_DIR",
                   help="no training: write the results markdown from earlier runs' out_dirs (config.json, "
                   "results.json, header.md), one section per run")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        for name, value in (("max_seq_length", 256), ("rows_per_step", 4), ("padded_batch", 4), ("warmup_steps", 1),
                            ("steps", 2), ("num_samples", 160), ("eval_samples", 8)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    return args


def build_config(args: argparse.Namespace) -> BenchConfig:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.backend == "hf":
        bad = [v for v in variants if v not in HF_BACKEND_VARIANTS]
        if bad:
            if args.variants == ",".join(DEFAULT_VARIANTS):
                variants = [v for v in variants if v in HF_BACKEND_VARIANTS]
            else:
                raise SystemExit(f"--backend hf runs no Unsloth: {bad} need it; choose from {HF_BACKEND_VARIANTS}")
    if args.nproc < 1 or args.rows_per_step < 1 or args.padded_batch < 1 or args.steps < 1 or args.warmup_steps < 0:
        raise SystemExit("--nproc, --rows_per_step, --padded_batch and --steps must be positive, --warmup_steps >= 0")
    if args.scaling == "global" and args.rows_per_step % args.nproc:
        raise SystemExit(f"--scaling global splits --rows_per_step {args.rows_per_step} over --nproc {args.nproc}: "
                         f"pick a multiple of {args.nproc}")
    from opensloth.data.shared import shared_data_dir

    shared = shared_data_dir()
    work = Path(args.work_dir)
    random_model = args.model_name is None
    model_dir = str(work / ("model_tiny" if args.tiny else "model_qwen3_06b_random")) if random_model \
        else args.model_name
    tokenizer_dir = args.tokenizer or (str(shared / "tokenizers" / "qwen3") if random_model else args.model_name)
    return BenchConfig(
        variants=variants, model_dir=model_dir, tokenizer_dir=tokenizer_dir,
        data_dir=args.data_dir or str(shared / "chat"), work_dir=str(work),
        out_dir=args.out_dir or str(work / "runs"), max_seq_length=args.max_seq_length,
        rows_per_step=args.rows_per_step, padded_batch=args.padded_batch, padded_accum=args.padded_accum,
        warmup_steps=args.warmup_steps, steps=args.steps, num_samples=args.num_samples,
        eval_samples=args.eval_samples, learning_rate=args.learning_rate, seed=args.seed, backend=args.backend,
        nproc=args.nproc, scaling=args.scaling, timeout=args.timeout, profile=args.profile, tiny=args.tiny,
        random_model=random_model,
    )


# ------------------------------------------------------------------------------------------------ preparation


def build_random_model(cfg: BenchConfig) -> None:
    """Save a randomly initialised Qwen3 of the benchmark's shape (and the tokenizer) once into cfg.model_dir."""
    if (Path(cfg.model_dir) / "config.json").exists():
        return
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    shape = TINY_SHAPE if cfg.tiny else QWEN3_06B_SHAPE
    config = Qwen3Config(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    tmp = Path(cfg.model_dir + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(cfg.model_dir)
    say(f"[bench] saved a random {'tiny' if cfg.tiny else 'Qwen3-0.6B-shaped'} model to {cfg.model_dir}")


def prepare_data(cfg: BenchConfig) -> dict:
    """Tokenise the shuffled mix once (train, eval, packed rows) under work_dir; returns paths and figures."""
    import hashlib

    key = hashlib.sha256(json.dumps([cfg.tokenizer_dir, cfg.data_dir, cfg.max_seq_length, cfg.num_samples,
                                     cfg.eval_samples, 2]).encode()).hexdigest()[:12]
    root = Path(cfg.work_dir) / f"data_{key}"
    info_path = root / "info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    import numpy as np
    from transformers import AutoTokenizer

    from opensloth.data.chat import tokenize_chat_dataset
    from opensloth.data.packed import build_packed_dataset, packing_stats
    from opensloth.data.shared import SHARED_CHAT_FILES, read_shared_chat

    try:
        records = [r for name in SHARED_CHAT_FILES for r in read_shared_chat(name, cfg.data_dir)]
    except FileNotFoundError as exc:
        raise SystemExit(f"{exc}; or pass --data_dir (the shared data's chat folder)") from None
    order = np.random.default_rng(0).permutation(len(records))
    want = cfg.num_samples + cfg.eval_samples
    picked = [records[i] for i in order[: min(len(records), int(want * 1.05) + 16)]]
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    ds = tokenize_chat_dataset(picked, tok, max_seq_length=cfg.max_seq_length, num_proc=min(8, os.cpu_count() or 1),
                               on_error="skip", desc="bench")
    trained = np.asarray([sum(1 for x in lab[1:] if x != -100) > 0 for lab in ds["labels"]])
    ds = ds.select(np.flatnonzero(trained)[:want].tolist())
    if len(ds) < want:
        raise SystemExit(f"only {len(ds)} usable samples, asked for {want}")
    train = ds.select(range(cfg.num_samples))
    evals = ds.select(range(cfg.num_samples, want))
    rows = build_packed_dataset(train, cfg.max_seq_length)
    stats = packing_stats(rows)
    lengths = np.asarray([len(x) for x in train["input_ids"]])
    root.mkdir(parents=True, exist_ok=True)
    train.save_to_disk(str(root / "train"))
    evals.save_to_disk(str(root / "eval"))
    rows.save_to_disk(str(root / "rows"))
    info = {
        "train": str(root / "train"), "eval": str(root / "eval"), "rows": str(root / "rows"),
        "n_samples": int(len(train)), "n_rows": int(len(rows)), "tokens": int(lengths.sum()),
        "mean_len": float(lengths.mean()), "max_len": int(lengths.max()),
        "trained_targets": int(sum(sum(1 for x in lab[1:] if x != -100) for lab in train["labels"])),
        "pack_efficiency": float(getattr(stats, "efficiency", lengths.sum() / (len(rows) * cfg.max_seq_length))),
        "eval_tokens": int(sum(len(x) for x in evals["input_ids"])),
    }
    info_path.write_text(json.dumps(info, indent=1))
    say(f"[bench] data: {info['n_samples']} samples, {info['tokens']:,} tokens (mean {info['mean_len']:.0f}), "
        f"{info['n_rows']} rows of {cfg.max_seq_length} ({100 * info['pack_efficiency']:.2f}% full); "
        f"{cfg.eval_samples} eval samples")
    return info


def padded_batch_accum(cfg: BenchConfig) -> tuple[int, int]:
    """(samples per micro-batch, micro-batches per step) of one rank for the padded variants: as many samples per
    step as ``rows_per_step`` packed rows hold (all ranks together with ``--scaling global``)."""
    info = cfg.data_info
    accum = cfg.padded_accum or max(1, round(cfg.rows_per_step * info["n_samples"] / info["n_rows"] / cfg.padded_batch))
    batch = cfg.padded_batch
    if cfg.scaling == "global" and cfg.nproc > 1:
        if accum >= cfg.nproc:
            accum = math.ceil(accum / cfg.nproc)  # a few more samples per step when accum does not divide
        else:
            batch = max(1, math.ceil(batch * accum / cfg.nproc))
            accum = 1
    return batch, accum


# ------------------------------------------------------------------------------------------------ the worker


def _dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class _Counter:
    """Real tokens and token slots of each micro-batch. Our collators record them (from the features) and the
    model's forward pre-hook takes them in the same order (one top-level forward per micro-batch: gradient
    checkpointing recomputes layers only); for TRL's own collators the pre-hook reads the batch (real tokens = the
    2-D attention_mask's ones, or every token of a padding-free row), accumulated on the device without a sync."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, int]] = []
        self.ours = False
        self.step_real: Any = 0
        self.step_slots = 0
        self.forwards = 0

    def wrap(self, collator):
        counter = self
        self.ours = True

        def collate(features, *args, **kwargs):
            batch = collator(features, *args, **kwargs)
            real = sum(len(f["input_ids"]) for f in features)
            counter.queue.append((real, int(batch["input_ids"].numel())))
            return batch

        return collate

    def pre_hook(self, module, args, kwargs):
        self.forwards += 1
        if self.ours:
            if self.queue:
                real, slots = self.queue.pop(0)
                self.step_real += real
                self.step_slots += slots
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        self.step_slots += ids.numel()
        self.step_real = self.step_real + (mask.sum() if mask is not None and mask.dim() == 2 else ids.numel())

    def take(self) -> tuple[int, int]:
        real, slots = int(self.step_real), self.step_slots
        self.step_real, self.step_slots = 0, 0
        return real, slots


def _callback_class():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self, counter: _Counter, cuda: bool, profile_step: int | None, out_prefix: str) -> None:
            self.counter, self.cuda = counter, cuda
            self.ends: list[float] = []
            self.real: list[int] = []
            self.slots: list[int] = []
            self.start = None
            self.profile_step, self.out_prefix = profile_step, out_prefix
            self.profiler = None
            self.compiles_at: list[int] = []

        def _sync(self):
            if self.cuda:
                import torch

                torch.cuda.synchronize()

        def on_train_begin(self, args, state, control, **kwargs):
            self._sync()
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if self.profile_step is not None and state.global_step == self.profile_step and self.profiler is None:
                import torch

                acts = [torch.profiler.ProfilerActivity.CPU]
                if self.cuda:
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=acts, record_shapes=False)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.ends.append(time.perf_counter())
            real, slots = self.counter.take()
            self.real.append(real)
            self.slots.append(slots)
            self.compiles_at.append(_compile_count())
            if self.profiler is not None and state.global_step == self.profile_step + 1:
                self.profiler.__exit__(None, None, None)
                sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
                table = self.profiler.key_averages().table(sort_by=sort, row_limit=40)
                table_cpu = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
                Path(self.out_prefix + "_profile.txt").write_text(table + "\n\n" + table_cpu)
                self.profiler = None

    return Timer


def _compile_count() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["stats"].get(k, 0) for k in ("unique_graphs",)))
    except Exception:
        return -1


def _load_unsloth(cfg: BenchConfig, local_rank: int):
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        cfg.model_dir, max_seq_length=cfg.max_seq_length, load_in_4bit=True, device_map=f"cuda:{local_rank}")
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
        use_gradient_checkpointing="unsloth", random_state=cfg.seed)
    return model, tokenizer


def _load_hf(cfg: BenchConfig, local_rank: int):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir if cfg.random_model else cfg.model_dir)
    if torch.cuda.is_available():
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", device_map={"": local_rank})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    return model, tokenizer


def _eval_loss(model, eval_ds, device) -> float:
    """Token-weighted mean loss of every held-out sample run alone (eval mode, no packing metadata)."""
    import torch

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for ids, lab in zip(eval_ds["input_ids"], eval_ds["labels"]):
            n = sum(1 for x in lab[1:] if x != -100)
            if n == 0:
                continue
            out = model(input_ids=torch.tensor([ids], device=device), labels=torch.tensor([lab], device=device),
                        use_cache=False)
            total += float(out.loss) * n
            count += n
    model.train()
    return total / count


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_worker(cfg: BenchConfig, variant: str) -> None:
    rank, world, local_rank = _dist_info()
    unsloth_backend = cfg.backend == "unsloth"
    uses_unsloth = unsloth_backend and variant != "hf_padded"
    if uses_unsloth:
        import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)
    import torch

    cuda = torch.cuda.is_available()
    opensloth = variant.startswith("opensloth")
    if opensloth:
        from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples

        device = ddp_patch(balance_ranks=variant != "opensloth_rows_unbalanced")
        patch_optimize_sft_trainer_batch_samples()
    elif cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    from datasets import load_from_disk
    from trl import SFTConfig

    t_load = time.perf_counter()
    model, tokenizer = (_load_unsloth if uses_unsloth else _load_hf)(cfg, local_rank)
    load_s = time.perf_counter() - t_load
    info = cfg.data_info
    packed_input = opensloth
    train_ds = load_from_disk(info["rows"] if packed_input else info["train"])
    eval_ds = load_from_disk(info["eval"])
    pad = tokenizer.pad_token_id

    collator = None
    kwargs: dict[str, Any] = {}
    batch, accum = cfg.per_rank(cfg.rows_per_step), 1
    note = ""
    if variant in ("unsloth_padded", "unsloth_auto", "hf_padded"):
        batch, accum = padded_batch_accum(cfg)
        if variant != "unsloth_auto":  # unsloth_auto leaves it unset: Unsloth decides (padding-free on sm90)
            kwargs["padding_free"] = False
    elif variant == "unsloth_packing":
        kwargs["packing"] = True
    else:
        from opensloth.collate import UNSLOTH_VARLEN_METADATA, PackedDataCollator

        kwargs.update(remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
        layout = "flat" if "flat" in variant else "rows"
        if not unsloth_backend:
            # transformers' SDPA builds the block-causal mask from position_ids (rows: P x L^2, flat: T^2).
            collator = PackedDataCollator(pad_token_id=pad, layout=layout, metadata=("use_cache",),
                                          capacity=cfg.max_seq_length if layout == "rows" else None)
            note = "transformers SDPA, mask from position_ids"
        elif variant == "opensloth_flat_v1":
            from opensloth.patching.unsloth_attention import patch_unsloth_torch_varlen

            note = f"V1 switch: {patch_unsloth_torch_varlen()}"
            collator = PackedDataCollator(pad_token_id=pad, layout="flat",
                                          metadata=("packed_seq_lengths", "use_cache"))
        else:
            from opensloth.patching.unsloth_attention import enable_unsloth_varlen

            enable_unsloth_varlen(model)
            collator = PackedDataCollator(
                pad_token_id=pad, layout=layout, metadata=UNSLOTH_VARLEN_METADATA,
                capacity=cfg.max_seq_length if layout == "rows" else None,
                max_seqlen=cfg.max_seq_length if layout == "flat" else None)
    counter = _Counter()
    if collator is not None:
        collator = counter.wrap(collator)  # ours: count from the features
    # --profile: one extra step after the timed ones, under torch.profiler (the timed window stays clean).
    total_steps = cfg.warmup_steps + cfg.steps + (1 if cfg.profile else 0)
    args = SFTConfig(
        output_dir=str(Path(cfg.work_dir) / "trainer" / variant), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, max_steps=total_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        max_length=cfg.max_seq_length, bf16=cuda, fp16=False, use_cpu=not cuda, seed=cfg.seed,
        dataloader_num_workers=0, dataloader_pin_memory=cuda, logging_nan_inf_filter=False,
        optim="adamw_torch", ddp_find_unused_parameters=False if world > 1 else None,
        gradient_checkpointing=cuda, **kwargs)
    from opensloth.patching.sft_trainer import sft_trainer_class

    trainer = sft_trainer_class()(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                                   data_collator=collator)
    model.register_forward_pre_hook(counter.pre_hook, with_kwargs=True)
    prefix = str(Path(cfg.out_dir) / variant)
    timer = _callback_class()(counter, cuda, cfg.warmup_steps + cfg.steps if cfg.profile else None, prefix)
    trainer.add_callback(timer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    peak_reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_loss = _eval_loss(model, eval_ds, device) if rank == 0 else float("nan")

    w = cfg.warmup_steps
    ends = [timer.start] + timer.ends
    step_s = [b - a for a, b in zip(ends[:-1], ends[1:])]
    mine = {"step_s": step_s, "real": timer.real, "slots": timer.slots}
    per_rank = [mine]
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        per_rank = [None] * world
        torch.distributed.all_gather_object(per_rank, mine)
    if rank != 0:
        return
    timed = slice(w, w + cfg.steps)
    wall = sum(max(r["step_s"][i] for r in per_rank) for i in range(w, w + cfg.steps))
    real = sum(sum(r["real"][timed]) for r in per_rank)
    slots = sum(sum(r["slots"][timed]) for r in per_rank)
    step_ratio = [max(r["step_s"][i] for r in per_rank) / (sum(r["step_s"][i] for r in per_rank) / world)
                  for i in range(w, w + cfg.steps)]
    tok_ratio = [max(r["real"][i] for r in per_rank) / max(1e-9, sum(r["real"][i] for r in per_rank) / world)
                 for i in range(w, w + cfg.steps)]
    status = {}
    if uses_unsloth and opensloth:
        from opensloth.patching.unsloth_attention import varlen_status

        status = varlen_status()
    result = {
        "variant": variant, "world": world, "batch": batch, "accum": accum, "note": note,
        "tokens_per_s": real / wall if wall else float("nan"), "real_tokens": real, "slots": slots,
        "wasted": 1 - real / slots if slots else float("nan"), "timed_s": wall, "step_s_mean": wall / cfg.steps,
        "peak_gb": peak, "peak_reserved_gb": peak_reserved, "steps": len(timer.ends), "warmup": w,
        "timed_steps": cfg.steps, "loss_first": losses[0] if losses else float("nan"),
        "loss_end": _mean(losses[max(w, w + cfg.steps - 3):w + cfg.steps]), "losses": losses,
        "eval_loss": eval_loss, "load_s": load_s, "train_s": train_s,
        "warmup_s": ends[w] - ends[0] if len(ends) > w else float("nan"),
        "step_max_over_mean": sum(step_ratio) / len(step_ratio),
        "tokens_max_over_mean": sum(tok_ratio) / len(tok_ratio),
        "graphs_total": _compile_count(),
        "graphs_during_timed": timer.compiles_at[-1] - timer.compiles_at[w - 1] if w >= 1 else None,
        "forwards": counter.forwards, "varlen_status": status,
    }
    Path(prefix + ".json").write_text(json.dumps(result, indent=1))
    say(f"[bench] {variant}: {result['tokens_per_s']:,.0f} real tokens/s, peak {peak:.2f} GB, "
        f"loss {result['loss_end']:.4f}, eval loss {eval_loss:.4f}")


# ------------------------------------------------------------------------------------------------ the parent


def worker_command(cfg_path: Path, variant: str, nproc: int) -> list[str]:
    script = str(Path(__file__).resolve())
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
                "--_worker", variant, "--_config", str(cfg_path)]
    return [sys.executable, script, "--_worker", variant, "--_config", str(cfg_path)]


def worker_env(variant: str, cfg: BenchConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
               OPENSLOTH_REPACK="0")
    for k, v in MULTICAST_OFF.items():
        env.setdefault(k, v)
    env.setdefault("TORCH_LOGS", "recompiles")
    env.setdefault("UNSLOTH_BLOCK_COMPILE_DEBUG", "1")
    if variant == "unsloth_padded":
        env["UNSLOTH_DISABLE_AUTO_PADDING_FREE"] = "1"
    pythonpath = [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return env


def run_variant(cfg: BenchConfig, cfg_path: Path, variant: str) -> dict:
    log = Path(cfg.out_dir) / f"{variant}.log"
    result_path = Path(cfg.out_dir) / f"{variant}.json"
    result_path.unlink(missing_ok=True)
    cmd = worker_command(cfg_path, variant, cfg.nproc)
    say(f"[bench] {variant}: {shlex.join(cmd[1:])} > {log}")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=worker_env(variant, cfg),
                                start_new_session=True, cwd=str(ROOT))
        try:
            rc = proc.wait(timeout=cfg.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - t0
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        say(f"[bench] {variant} failed (rc {rc}, {wall:.0f} s); last lines of {log}:\n  " + "\n  ".join(tail))
        result = {"variant": variant, "error": f"rc {rc}"}
    result["wall_s"] = wall
    return result


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def packing_reference(results: list[dict]) -> dict | None:
    """The run's Unsloth packing=True result, the reference of the speed-up column."""
    return next((r for r in results if r["variant"] == "unsloth_packing" and "error" not in r), None)


def results_table(cfg: BenchConfig, results: list[dict], refs: list[dict | None] | None = None) -> str:
    """One row per variant; ``refs`` gives each row its own packing=True reference (default: this run's)."""
    from benchmarks._report import markdown_table

    if refs is None:
        refs = [packing_reference(results)] * len(results)
    header = ["variant", "micro-batch x accum", "real tokens/s", "vs packing=True", "padding/wasted", "peak GB",
              "steps (warm-up+timed)", "real tokens timed", "s/step", "loss (last 3 timed)", "eval loss",
              "graphs in timed"]
    if cfg.nproc > 1:
        header += ["ranks", "step time max/mean", "tokens max/mean"]
    rows = []
    for r, ref in zip(results, refs):
        if "error" in r:
            rows.append([r["variant"], "failed: " + r["error"]] + ["-"] * (len(header) - 2))
            continue
        unit = "rows" if r["variant"].startswith(("opensloth", "unsloth_packing")) else "samples"
        row = [
            r["variant"], f"{r['batch']} {unit} x {r['accum']}", f"{r['tokens_per_s']:,.0f}",
            _fmt(r["tokens_per_s"] / ref["tokens_per_s"], ".2f") + "x" if ref else "-",
            f"{100 * r['wasted']:.1f}%", _fmt(r["peak_gb"], ".2f"),
            f"{r['warmup']}+{r.get('timed_steps', r['steps'] - r['warmup'])}",
            f"{r['real_tokens']:,}", _fmt(r["step_s_mean"], ".2f"), _fmt(r["loss_end"], ".4f"),
            _fmt(r["eval_loss"], ".4f"), _fmt(r.get("graphs_during_timed"), "d"),
        ]
        if cfg.nproc > 1:
            row += [r["world"], _fmt(r["step_max_over_mean"], ".3f"), _fmt(r["tokens_max_over_mean"], ".3f")]
        rows.append(row)
    return markdown_table(header, rows)


def machine_lines(cfg: BenchConfig) -> str:
    lines = []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        lines.append(f"- GPU: {out.splitlines()[0] if out else 'none'} (x{len(out.splitlines()) if out else 0})")
    except (OSError, subprocess.SubprocessError):
        lines.append("- GPU: none")
    info = cfg.data_info
    lines.append(
        f"- data: {info['n_samples']} training samples of the shuffled shared mix (alpaca, gsm8k, hh_rlhf, arena_hard; "
        f"{info['tokens']:,} tokens, mean {info['mean_len']:.0f}, max {info['max_len']}), packed into "
        f"{info['n_rows']} rows of {cfg.max_seq_length} ({100 * info['pack_efficiency']:.2f}% full); eval loss over "
        f"{cfg.eval_samples} held-out samples ({info['eval_tokens']:,} tokens), each run alone")
    shape = ("random Qwen3-0.6B-shaped (hidden 1024, 28 layers, 16/8 heads of 128, intermediate 3072, tied "
             "embeddings)") if cfg.random_model and not cfg.tiny else cfg.model_dir
    lines.append(f"- model: {shape}, 4-bit NF4, LoRA r 8 alpha 16 on q/k/v/o, gradient checkpointing; lr "
                 f"{cfg.learning_rate} constant, AdamW")
    pb, pa = padded_batch_accum(cfg)
    lines.append(f"- steps: {cfg.warmup_steps} warm-up + {cfg.steps} timed optimizer steps; {cfg.rows_per_step} rows "
                 f"per step ({cfg.scaling}); padded variants {pb} samples x {pa} micro-batches per step and GPU "
                 f"(about as many samples per step as the rows hold)")
    return "\n".join(lines)


PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "triton",
            "datasets")


def run_header(cfg: BenchConfig, command: str) -> str:
    """The machine, versions, command and setup of this run (markdown lines), written next to its results."""
    from benchmarks._report import machine_header

    return machine_header(PACKAGES, command=command) + "\n" + machine_lines(cfg)


def write_markdown(runs: list[tuple[BenchConfig, list[dict], str]], paths: list[Path]) -> None:
    """benchmarks/results/gpu_train.md (via benchmarks/_report.py): one section per run (its header and table),
    keeping any hand-written notes after a ``<!-- notes -->`` line."""
    from benchmarks._report import RESULTS, write_result

    sections = [(f"Run {i + 1}: {', '.join(r['variant'] for r in results)}",
                 header + "\n\n" + results_table(cfg, results)) for i, (cfg, results, header) in enumerate(runs)]
    if len(runs) > 1:
        # speed-ups are against the packing=True of the same run, or of the first run that has one
        run_refs = [packing_reference(results) for _, results, _ in runs]
        fallback = next((r for r in run_refs if r is not None), None)
        combined, refs = [], []
        for i, (_, results, _) in enumerate(runs):
            for r in results:
                combined.append(dict(r, variant=f"{r['variant']} (run {i + 1})"))
                refs.append(run_refs[i] or fallback)
        fallback_run = next((i + 1 for i, r in enumerate(run_refs) if r is not None), None)
        note = ("" if fallback_run is None else
                f"'vs packing=True' compares with Unsloth packing=True of the same run (run {fallback_run}'s for "
                "runs without one).\n\n")
        sections.insert(0, ("All runs (setup, versions and commands in each run's section below)",
                            note + results_table(runs[0][0], combined, refs)))
    title = "QLoRA training on one GPU: OpenSloth packed rows vs Unsloth's own modes"
    if runs and runs[0][0].nproc > 1:
        title = f"QLoRA training under torchrun on {runs[0][0].nproc} GPUs"
    for path in paths:
        notes = path.read_text().split("<!-- notes -->", 1)[1] if path.exists() and "<!-- notes -->" in \
            path.read_text() else None
        written = write_result(path.stem, title, sections, header="") if path.parent == RESULTS else None
        if written is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# {title}\n\n" + "\n".join(f"## {t}\n\n{b}\n" for t, b in sections))
        if notes is not None:
            path.write_text(path.read_text().rstrip() + "\n\n<!-- notes -->" + notes)
        say(f"[bench] wrote {path}")


def report_from(dirs: list[str], paths: list[Path]) -> int:
    runs = []
    for d in dirs:
        d = Path(d)
        cfg = BenchConfig(**json.loads((d / "config.json").read_text()))
        runs.append((cfg, json.loads((d / "results.json").read_text()), (d / "header.md").read_text()))
    for cfg, results, _ in runs:
        say(results_table(cfg, results))
    write_markdown(runs, paths or [ROOT / "benchmarks" / "results" / "gpu_train.md"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        cfg = BenchConfig(**json.loads(Path(args._config).read_text()))
        run_worker(cfg, args._worker)
        return 0
    if args.probe:
        return probe()
    if args.report_from:
        return report_from(args.report_from, [Path(args.results_md)] if args.results_md else [])
    cfg = build_config(args)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.random_model:
        build_random_model(cfg)
    cfg.data_info = prepare_data(cfg)
    cfg_path = Path(cfg.out_dir) / "config.json"
    cfg_path.write_text(json.dumps(asdict(cfg), indent=1))
    command = "python " + shlex.join(["benchmarks/bench_train_gpu.py"] + (argv if argv is not None else sys.argv[1:]))
    header = run_header(cfg, command)
    Path(cfg.out_dir, "header.md").write_text(header)
    results = []
    for variant in cfg.variants:
        results.append(run_variant(cfg, cfg_path, variant))
        Path(cfg.out_dir, "results.json").write_text(json.dumps(results, indent=1))
    table = results_table(cfg, results)
    say("\n" + machine_lines(cfg) + "\n\n" + table)
    paths = [ROOT / "benchmarks" / "results" / "gpu_train.md"] if args.write_results else []
    if args.results_md:
        paths.append(Path(args.results_md))
    if paths:
        write_markdown([(cfg, results, header)], paths)
    return 0 if all("error" not in r for r in results) else 1


# ------------------------------------------------------------------------------------------------ the probe


def probe() -> int:
    """Versions, the attention backends torch picks, and FlashAttention-2 varlen (GQA, causal) against per-segment
    SDPA in fp32: forward and backward, eager and under torch.compile(fullgraph=True); its speed against the
    per-segment loop Unsloth runs on torch < 2.12, and the cost of a constant max_seqlen bound."""
    import inspect

    try:
        import unsloth  # noqa: F401
        from unsloth.utils import attention_dispatch as ad

        unsloth_line = f"unsloth {unsloth.__version__}; _TORCH_VARLEN_ATTN = {ad._TORCH_VARLEN_ATTN}"
    except Exception as exc:  # noqa: BLE001
        unsloth_line = f"unsloth: {type(exc).__name__}: {exc}"
    import torch
    import torch.nn.functional as F

    say(f"torch {torch.__version__}, cuda {torch.version.cuda}, "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    say(unsloth_line)
    for name in ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "triton"):
        try:
            mod = __import__(name)
            say(f"{name} {mod.__version__}")
        except Exception as exc:  # noqa: BLE001
            say(f"{name}: {exc}")
    try:
        from torch.nn.attention.varlen import varlen_attn

        say(f"varlen_attn{inspect.signature(varlen_attn)}")
    except Exception as exc:  # noqa: BLE001
        say(f"varlen_attn: {exc}")
    if not torch.cuda.is_available():
        return 1
    from opensloth.patching.unsloth_attention import flash_varlen_attention

    dev = torch.device("cuda")
    q = torch.randn(1, 16, 2048, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 2048, 128, device=dev, dtype=torch.bfloat16)
    try:
        choice = torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=True)
        say(f"_fused_sdp_choice(bf16, 16/8 heads, hd 128, causal, gqa) = {choice} "
            f"({torch.nn.attention.SDPBackend(choice).name})")
    except Exception as exc:  # noqa: BLE001
        say(f"_fused_sdp_choice: {exc}")

    def reference(Q, K, V, lengths):
        outs, lo = [], 0
        for n in lengths:
            qs = Q[:, :, lo:lo + n].float()
            ks = K[:, :, lo:lo + n].float().repeat_interleave(2, 1)
            vs = V[:, :, lo:lo + n].float().repeat_interleave(2, 1)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
            lo += n
        return torch.cat(outs, 2).transpose(1, 2)

    gen = torch.Generator(device="cpu").manual_seed(0)
    for lengths in ([300, 1200, 50, 2000, 546], [4096], [1] * 7 + [4089]):
        total = sum(lengths)
        Q = torch.randn(1, 16, total, 128, generator=gen).to(dev, torch.bfloat16).requires_grad_()
        K = torch.randn(1, 8, total, 128, generator=gen).to(dev, torch.bfloat16).requires_grad_()
        V = torch.randn(1, 8, total, 128, generator=gen).to(dev, torch.bfloat16).requires_grad_()
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=dev)
        grad = torch.randn(1, total, 16, 128, generator=gen).to(dev, torch.bfloat16)
        ref = reference(Q, K, V, lengths)
        ref_grads = torch.autograd.grad(ref, (Q, K, V), grad.float())
        for mode in ("eager", "compiled"):
            fn = flash_varlen_attention
            if mode == "compiled":
                torch._dynamo.reset()
                fn = torch.compile(flash_varlen_attention, fullgraph=True, dynamic=None)
                torch._dynamo.maybe_mark_dynamic(cu, 0)
            out = fn(Q, K, V, cu, 4096)
            grads = torch.autograd.grad(out, (Q, K, V), grad)
            err = float((out.float() - ref).norm() / ref.norm())
            gerr = [float((g.float() - r).norm() / r.norm()) for g, r in zip(grads, ref_grads)]
            say(f"FA2 varlen {mode} lengths={lengths}: out rel err {err:.2e}, grad rel err "
                f"{', '.join(f'{e:.2e}' for e in gerr)}")

    # Speed: 8 rows x 4096 of data-like segments (~140 documents), fwd + bwd of one layer's attention.
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(8):
        row = []
        while True:
            n = int(min(4000, max(20, rng.lognormal(5.2, 0.7))))
            if sum(row) + n > 4096:
                break
            row.append(n)
        row.append(4096 - sum(row))  # padding tail
        lengths += [x for x in row if x > 0]
    total = sum(lengths)
    Q = torch.randn(1, 16, total, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    K = torch.randn(1, 8, total, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    V = torch.randn(1, 8, total, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32, device=dev)
    grad = torch.randn(1, total, 16, 128, device=dev, dtype=torch.bfloat16)

    def timed(fn, reps=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    def varlen(bound):
        return lambda: torch.autograd.grad(flash_varlen_attention(Q, K, V, cu, bound), (Q, K, V), grad)

    def segments():
        outs, lo = [], 0
        for n in lengths:
            outs.append(F.scaled_dot_product_attention(Q[:, :, lo:lo + n], K[:, :, lo:lo + n], V[:, :, lo:lo + n],
                                                       is_causal=True, enable_gqa=True))
            lo += n
        out = torch.cat(outs, 2).transpose(1, 2)
        return torch.autograd.grad(out, (Q, K, V), grad)

    longest = max(lengths)
    say(f"attention fwd+bwd, {len(lengths)} segments over {total} tokens (longest {longest}): "
        f"FA2 varlen max_seqlen={longest}: {timed(varlen(longest)):.2f} ms; max_seqlen=4096: "
        f"{timed(varlen(4096)):.2f} ms; per-segment SDPA loop: {timed(segments, 5):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
