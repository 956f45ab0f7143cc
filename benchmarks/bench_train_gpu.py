#!/usr/bin/env python
"""QLoRA training throughput on real chat data: OpenSloth's GPU path against Unsloth as its users run it.

One command per shape group. One worker process (``--isolate``: one per shape) loads each shape's model once and
trains every variant in turn from the same LoRA initialisation (a failed variant is reported and the others go on),
then the parent prints one table::

    python benchmarks/bench_train_gpu.py --shapes qwen3_0.6b                          # the 0.6B anchors and ours
    python benchmarks/bench_train_gpu.py --shapes qwen3_8b,llama31_8b --lora_targets all --micro_rows 8
    python benchmarks/bench_train_gpu.py --shapes arch                               # a small model per family
    python benchmarks/bench_train_gpu.py --shapes cpu_tiny --backend hf --nproc 2    # CPU smoke test (gloo)

Variants (each trains the same number of optimizer steps of about the same real tokens, after a warm-up):

- ``unsloth_packing``: Unsloth ``SFTTrainer(packing=True)`` (TRL best-fit decreasing rows, flattened).
- ``unsloth_auto``: Unsloth's default (auto padding-free: one flattened row of the micro-batch's samples).
- ``opensloth``: OpenSloth's packed rows through `opensloth.wiring.wire_batches` (Unsloth's own packed protocol:
  one flat row per micro-batch, ``position_ids`` + ``packed_seq_lengths``; padded rows for a family whose attention
  does not keep packed samples apart, as the table's ``layout`` column says).
- ``opensloth_padding_free``: OpenSloth's padding-free micro-batches of unpacked samples (same wiring).
- ``hf_opensloth``: transformers + PEFT with OpenSloth's rows (``--backend hf``, the CPU smoke test).

Unsloth as its users run it: on torch >= 2.12 (what ``pip install unsloth`` brings) Unsloth packs through its own
FlashAttention-2 varlen branch; where torch is older, `opensloth.patching.unsloth_varlen.switch_on_unsloth_varlen`
switches that branch on for every variant, anchors included (``--unsloth_fallback`` leaves it off and labels the
figures as the torch < 2.12 fallback).

Shapes: random weights from the config of a real architecture (saved once with ``save_pretrained``), 4-bit NF4
(QLoRA; ``--no_4bit`` for 16-bit LoRA), LoRA r 16 alpha 16 on ``--lora_targets`` (``attn``: q/k/v/o; ``all``: every
linear layer of the blocks), Unsloth's offloaded gradient checkpointing (``--gradient_checkpointing``), the real
Qwen3 tokenizer (so every shape uses Qwen3's vocabulary of 151,936 for its embedding and LM head; the Llama-3.1-8B
shape's own is 128,256).

Order matters: the first variant of a process compiles what Unsloth compiles (each transformer block, per new
shape), and a recompile that falls inside its timed steps slows it, not the later variants. So does a step whose
micro-batch is the largest its process has met (see ``_prime``): each process first trains one untimed step
of micro-batches as large as the largest any listed variant trains (``--no_prime`` leaves it out). Name an anchor twice
(``--variants unsloth_packing,unsloth_auto,opensloth,unsloth_packing``): its second run is labelled
``unsloth_packing #2`` and the speed-up columns compare against an anchor's last run. The ``median step tok/s``
column (the median of the timed steps' rates) stays put where one slow step moves the total; a gap between the two
columns shows such a step.

Figures: real (non-padding) tokens per second over the timed steps, peak GPU memory (allocated), the mean loss of
the last timed steps, the eval loss of every trained model on the same held-out samples (each run alone), and MFU:
model FLOPs per real token = 4 N (N the matmul weights of the blocks plus the LM head: forward and input-gradient
backward; LoRA's own matmuls add 6 per LoRA weight) + 12 x layers x heads x head_dim x (causal pairs per token of
the training samples), the convention of ``unsloth/utils/mfu.py`` (recompute excluded), over the bf16 dense peak
(989 TFLOP/s for H100 and H200 SXM). ``--work_timings`` adds timings of micro-batches of controlled composition
(``SHAPE_work_timings.json``, the input of ``benchmarks/sim_scaling.py``). ``--write_results`` writes
benchmarks/results/gpu_train.md (one section per shape group).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "unsloth_packing": "Unsloth packing=True",
    "unsloth_auto": "Unsloth default (auto padding-free)",
    "opensloth": "OpenSloth packed rows",
    "opensloth_padding_free": "OpenSloth padding-free samples",
    "hf_opensloth": "transformers + PEFT, OpenSloth rows",
}
UNSLOTH_VARIANTS = ("unsloth_packing", "unsloth_auto", "opensloth", "opensloth_padding_free")
DEFAULT_VARIANTS = ("unsloth_packing", "unsloth_auto", "opensloth")
PEAK_TFLOPS = (("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.5), ("H200", 989.0))
VOCAB = 151936
_SMALL = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, max_position_embeddings=8192, initializer_range=0.02)
SHAPES: dict[str, tuple[str, dict]] = {
    "qwen3_0.6b": ("qwen3", dict(vocab_size=VOCAB, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=1_000_000.0,
                                 rms_norm_eps=1e-6)),
    "qwen3_8b": ("qwen3", dict(vocab_size=VOCAB, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=40960, tie_word_embeddings=False, rope_theta=1_000_000.0,
                               rms_norm_eps=1e-6)),
    "llama31_8b": ("llama", dict(vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=131072, tie_word_embeddings=False, rope_theta=500_000.0,
                                 rms_norm_eps=1e-5)),
    "small_llama": ("llama", dict(_SMALL)),
    "small_qwen2": ("qwen2", dict(_SMALL)),
    "small_qwen3": ("qwen3", dict(_SMALL)),
    "small_mistral": ("mistral", dict(_SMALL, sliding_window=None)),
    "small_gemma2": ("gemma2", dict(_SMALL, query_pre_attn_scalar=64, sliding_window=4096)),
    "small_gemma3": ("gemma3", dict(_SMALL, num_hidden_layers=6, query_pre_attn_scalar=64, sliding_window=512)),
    "cpu_tiny": ("qwen3", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                               tie_word_embeddings=True)),
}
SHAPE_GROUPS = {"arch": ["small_llama", "small_qwen2", "small_qwen3", "small_mistral", "small_gemma2",
                         "small_gemma3"]}
FAMILIES = {  # family -> (config class, model class) in transformers
    "llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
LORA_TARGETS = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# --gradient_checkpointing: what Unsloth's get_peft_model is asked for, and the setup line's words for it
GRADIENT_CHECKPOINTING: dict[str, str | bool] = {"unsloth": "unsloth", "gpu": True, "off": False}
GRADIENT_CHECKPOINTING_LABEL = {"unsloth": "Unsloth gradient checkpointing (offloaded)",
                                "gpu": "gradient checkpointing on the GPU (not offloaded)",
                                "off": "no gradient checkpointing"}
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def say(*args: Any) -> None:
    print(*args, flush=True)


# ------------------------------------------------------------------------------------------------ configuration


@dataclass
class BenchConfig:
    shapes: list[str]
    variants: list[str]
    tokenizer_dir: str
    data_dir: str
    work_dir: str
    out_dir: str
    max_seq_length: int = 4096
    micro_rows: int = 8
    grad_accum: int = 1
    padded_batch: int = 0  # samples per micro-batch of unsloth_auto / padding-free (0: as many as micro_rows hold)
    warmup_steps: int = 3
    steps: int = 10
    num_samples: int = 4000
    eval_samples: int = 48
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_targets: str = "attn"
    load_in_4bit: bool = True
    gradient_checkpointing: str = "unsloth"  # a key of GRADIENT_CHECKPOINTING
    seed: int = 3407
    backend: str = "unsloth"
    nproc: int = 1
    timeout: int = 900
    unsloth_fallback: bool = False
    work_timings: bool = False
    work_max_tokens: int = 16384
    prime: bool = True
    prime_tokens: int = 0  # the prime's flat micro-batch (prime_size); 0: micro_rows full rows
    profile_steps: int = 0
    data_info: dict = field(default_factory=dict)

    @property
    def rows_per_step(self) -> int:
        return self.micro_rows * self.grad_accum

    @property
    def trained_steps(self) -> int:
        """Optimizer steps each variant trains: the warm-up, the timed steps, then the profiled ones."""
        return self.warmup_steps + self.steps + self.profile_steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--shapes", default="qwen3_0.6b",
                   help="comma-separated, from: " + ", ".join(list(SHAPES) + list(SHAPE_GROUPS)))
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the shared Qwen3 tokenizer)")
    p.add_argument("--data_dir", default=None, help="folder of the shared chat JSONL files (default: shared data)")
    p.add_argument("--work_dir", default="/tmp/opensloth_bench", help="models, prepared data and runs")
    p.add_argument("--out_dir", default=None, help="per-shape logs and JSON (default: WORK_DIR/runs)")
    p.add_argument("--max_seq_length", type=int, default=None, help="row capacity (default 4096; 2048 for small_*)")
    p.add_argument("--micro_rows", type=int, default=8, help="packed rows per micro-batch (flattened into one row)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--padded_batch", type=int, default=0,
                   help="samples per micro-batch of the unpacked variants (0: as many as --micro_rows rows hold)")
    p.add_argument("--warmup_steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps after the warm-up")
    p.add_argument("--num_samples", type=int, default=4000, help="training samples taken from the shuffled mix")
    p.add_argument("--eval_samples", type=int, default=48, help="held-out samples for the eval loss")
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_targets", choices=tuple(LORA_TARGETS), default="attn")
    p.add_argument("--no_4bit", action="store_true", help="16-bit LoRA instead of QLoRA")
    p.add_argument("--gradient_checkpointing", choices=tuple(GRADIENT_CHECKPOINTING), default="unsloth",
                   help="unsloth: Unsloth's offloaded checkpointing (its default; checkpoints go to host memory and "
                        "back over PCIe); gpu: plain checkpointing, checkpoints kept on the GPU; off: none, no "
                        "recomputed forward (2N of the 6N matmul FLOPs per token a LoRA step does with "
                        "checkpointing; MFU counts 4N), at the memory of every layer's activations")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--backend", choices=("unsloth", "hf"), default="unsloth",
                   help="hf: no Unsloth anywhere (transformers SDPA, OpenSloth rows); for CPU smoke tests")
    p.add_argument("--nproc", type=int, default=1, help="run each shape under torchrun --nproc_per_node=N")
    p.add_argument("--timeout", type=int, default=900, help="seconds per shape")
    p.add_argument("--isolate", action="store_true", help="one process per shape (default: one for all shapes)")
    p.add_argument("--unsloth_fallback", action="store_true",
                   help="leave Unsloth's varlen branch off on torch < 2.12 (its slow fallback; labelled as such)")
    p.add_argument("--work_timings", action="store_true",
                   help="also time micro-batches of controlled composition (for benchmarks/sim_scaling.py)")
    p.add_argument("--work_max_tokens", type=int, default=16384, help="largest micro-batch of the work timings")
    p.add_argument("--no_prime", action="store_true",
                   help="skip the untimed step of the largest micro-batch each process trains first (see _prime)")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="N more steps after the timed ones, under torch.profiler: SHAPE_VARIANT_profile.txt in the out "
                        "dir (where the step time goes; the timed figures do not include them)")
    p.add_argument("--write_results", action="store_true", help="write a section of benchmarks/results/gpu_train.md")
    p.add_argument("--section", default=None, help="name of that section (default: the shapes)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_config", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def expand_shapes(spec: str) -> list[str]:
    out: list[str] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name in SHAPE_GROUPS:
            out += SHAPE_GROUPS[name]
        elif name in SHAPES:
            out.append(name)
        else:
            raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(list(SHAPES) + list(SHAPE_GROUPS))}")
    return out


def build_config(args: argparse.Namespace) -> BenchConfig:
    shapes = expand_shapes(args.shapes)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.backend == "hf":
        variants = ["hf_opensloth"]
    elif "hf_opensloth" in variants:
        raise SystemExit("hf_opensloth runs without Unsloth: pass --backend hf")
    if min(args.nproc, args.micro_rows, args.grad_accum, args.steps) < 1 or min(args.warmup_steps,
                                                                                  args.profile_steps) < 0:
        raise SystemExit("--nproc, --micro_rows, --grad_accum and --steps must be positive, --warmup_steps and "
                         "--profile_steps >= 0")
    from benchmarks._shared_data import shared_data_dir

    shared = shared_data_dir()
    small = all(s.startswith(("small_", "cpu_")) for s in shapes)
    max_len = args.max_seq_length or (256 if shapes == ["cpu_tiny"] else 2048 if small else 4096)
    work = Path(args.work_dir)
    return BenchConfig(
        shapes=shapes, variants=variants, tokenizer_dir=args.tokenizer or str(shared / "tokenizers" / "qwen3"),
        data_dir=args.data_dir or str(shared / "chat"), work_dir=str(work), out_dir=args.out_dir or str(work / "runs"),
        max_seq_length=max_len, micro_rows=args.micro_rows, grad_accum=args.grad_accum,
        padded_batch=args.padded_batch, warmup_steps=args.warmup_steps, steps=args.steps,
        num_samples=args.num_samples, eval_samples=args.eval_samples, learning_rate=args.learning_rate,
        lora_r=args.lora_r, lora_targets=args.lora_targets, load_in_4bit=not args.no_4bit and args.backend == "unsloth",
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed, backend=args.backend, nproc=args.nproc, timeout=args.timeout,
        unsloth_fallback=args.unsloth_fallback, work_timings=args.work_timings, work_max_tokens=args.work_max_tokens,
        prime=not args.no_prime, profile_steps=args.profile_steps)


# ------------------------------------------------------------------------------------------------ preparation


def model_dir(cfg: BenchConfig, shape: str) -> Path:
    return Path(cfg.work_dir) / f"model_{shape}"


def build_random_model(cfg: BenchConfig, shape: str) -> Path:
    """Save a randomly initialised model of ``shape`` (bf16, with the tokenizer) once; returns its folder."""
    path = model_dir(cfg, shape)
    if (path / "config.json").exists():
        return path
    import torch
    import transformers
    from transformers import AutoTokenizer

    family, params = SHAPES[shape]
    config_cls, model_cls = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    config = getattr(transformers, config_cls)(**params, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    with torch.device(device):
        model = getattr(transformers, model_cls)(config).to(torch.bfloat16)
    tmp = Path(str(path) + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    if device == "cuda":
        # This process outlives the workers that train: without this it kept the model's memory (53 GB for two 8B
        # shapes on the H100, 2026-12-07), and a worker's work timings then ran out of memory.
        gc.collect()
        torch.cuda.empty_cache()
    tmp.rename(path)
    say(f"[bench] saved a random {shape} model to {path} ({time.perf_counter() - t0:.0f} s)")
    return path


def prepare_data(cfg: BenchConfig) -> dict:
    """Tokenise the shuffled mix once (train samples, eval samples, packed rows) under work_dir."""
    import hashlib

    key = hashlib.sha256(json.dumps([cfg.tokenizer_dir, cfg.data_dir, cfg.max_seq_length, cfg.num_samples,
                                     cfg.eval_samples, 3]).encode()).hexdigest()[:12]
    root = Path(cfg.work_dir) / f"data_{key}"
    info_path = root / "info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    import numpy as np
    from transformers import AutoTokenizer

    from benchmarks._shared_data import SHARED_CHAT_FILES, read_shared_chat
    from opensloth.data.chat import tokenize_chat_dataset
    from opensloth.data.packed import build_packed_dataset

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
    train, evals = ds.select(range(cfg.num_samples)), ds.select(range(cfg.num_samples, want))
    rows = build_packed_dataset(train, cfg.max_seq_length, strategy="best")
    lengths = np.asarray([len(x) for x in train["input_ids"]], dtype=np.float64)
    root.mkdir(parents=True, exist_ok=True)
    train.save_to_disk(str(root / "train"))
    evals.save_to_disk(str(root / "eval"))
    rows.save_to_disk(str(root / "rows"))
    info = {
        "train": str(root / "train"), "eval": str(root / "eval"), "rows": str(root / "rows"),
        "n_samples": int(len(train)), "n_rows": int(len(rows)), "tokens": int(lengths.sum()),
        "mean_len": float(lengths.mean()), "max_len": int(lengths.max()),
        "pairs_per_token": float((lengths * (lengths + 1) / 2).sum() / lengths.sum()),
        "pack_efficiency": float(lengths.sum() / (len(rows) * cfg.max_seq_length)),
        "eval_tokens": int(sum(len(x) for x in evals["input_ids"])),
    }
    info_path.write_text(json.dumps(info, indent=1))
    say(f"[bench] data: {info['n_samples']} samples, {info['tokens']:,} tokens (mean {info['mean_len']:.0f}), "
        f"{info['n_rows']} rows of {cfg.max_seq_length} ({100 * info['pack_efficiency']:.2f}% full)")
    return info


def check_enough_data(cfg: BenchConfig) -> None:
    """Every trained step must be a full one: a timed window that runs past the end of the data times a short last
    step (and the trainer starts a second epoch), which no other variant may share. Packed variants need rows, the
    sample-batched ones (``unsloth_auto``, ``opensloth_padding_free``) samples; 5% spare, since TRL's rows for
    ``unsloth_packing`` are not ours and ``padded_batch`` rounds."""
    info = cfg.data_info
    micro_batches = cfg.trained_steps * cfg.grad_accum * cfg.nproc
    needs = [("packed rows", micro_batches * cfg.micro_rows, info["n_rows"])]
    if {"unsloth_auto", "opensloth_padding_free"} & set(cfg.variants):
        needs.append(("samples", micro_batches * padded_batch(cfg), info["n_samples"]))
    for what, need, have in needs:
        if have < math.ceil(need * 1.05):
            more = math.ceil(cfg.num_samples * need * 1.05 / have * 1.05)
            raise SystemExit(f"{cfg.trained_steps} steps x {cfg.grad_accum} x {cfg.nproc} ranks need "
                             f"{need} {what} and 5% spare; {cfg.num_samples} samples make {have}: pass "
                             f"--num_samples {more} or more")


def padded_batch(cfg: BenchConfig) -> int:
    """Samples per micro-batch of the unpacked variants: as many as ``micro_rows`` packed rows hold on average."""
    info = cfg.data_info
    return cfg.padded_batch or max(1, round(cfg.micro_rows * info["n_samples"] / info["n_rows"]))


# ------------------------------------------------------------------------------------------------ FLOPs


def matmul_params(config: Any) -> int:
    """Weights of the matmuls a token goes through: every projection of every block, and the LM head."""
    config = getattr(config, "text_config", None) or config
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter
    return layers * per_layer + h * config.vocab_size


def flops_per_token(config: Any, pairs_per_token: float, lora_params: int) -> float:
    """Model FLOPs per real token (unsloth/utils/mfu.py's convention, recompute excluded)."""
    config = getattr(config, "text_config", None) or config
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12.0 * config.num_hidden_layers * config.num_attention_heads * hd * pairs_per_token
    return 4.0 * matmul_params(config) + 6.0 * lora_params + attention


def peak_tflops(name: str) -> float | None:
    upper = name.upper()
    return next((v for k, v in PEAK_TFLOPS if k in upper), None)


# ------------------------------------------------------------------------------------------------ the worker


def _dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class _Counter:
    """Real tokens and token slots of each micro-batch, read from the batch on the CPU as the collator returns it
    (the trainer's collator is wrapped after the trainer is built, so TRL's and Unsloth's are counted alike), and
    credited to the optimizer step that trains it. The data loader collates ahead of training (accelerate fetches one
    batch ahead to see the end of the data), so counting at collation would credit each step with the next step's
    batch, and a timed window reaching the end of the data would lose a whole step's tokens. The counts wait in a
    queue until ``consume`` (called once per micro-batch trained) takes them."""

    def __init__(self) -> None:
        self.pending: collections.deque[tuple[int, int]] = collections.deque()
        self.real = 0
        self.slots = 0

    def wrap(self, collator):
        counter = self

        def collate(features, *args, **kwargs):
            batch = collator(features, *args, **kwargs)
            slots = int(batch["input_ids"].numel())
            seq = [len(f["input_ids"]) for f in features if isinstance(f, dict) and "input_ids" in f]
            if len(seq) == len(features):
                real = sum(seq)  # every token of every feature is real; the rest is padding
            else:
                mask = batch.get("attention_mask")
                real = int(mask.sum()) if getattr(mask, "dim", lambda: 0)() == 2 else slots
            counter.pending.append((real, slots))
            return batch

        return collate

    def consume(self) -> None:
        if not self.pending:
            raise RuntimeError("a micro-batch was trained that the counting collator never returned")
        real, slots = self.pending.popleft()
        self.real += real
        self.slots += slots

    def take(self) -> tuple[int, int]:
        out = (self.real, self.slots)
        self.real = self.slots = 0
        return out

    def instrument(self, trainer) -> None:
        """Count the collator's batches and credit each to the ``training_step`` that trains it. Only for a trainer
        that collates its training batches in this process and nothing else (no evaluation inside ``train()``)."""
        args = trainer.args
        strategy = getattr(args, "eval_strategy", "no")
        if args.dataloader_num_workers or getattr(strategy, "value", strategy) != "no":
            raise ValueError("token counting needs dataloader_num_workers=0 and no evaluation during train()")
        trainer.data_collator = self.wrap(trainer.data_collator)
        step = trainer.training_step
        counter = self

        def training_step(*args, **kwargs):
            counter.consume()
            return step(*args, **kwargs)

        trainer.training_step = training_step


def _timer_class():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self, counter: _Counter, cuda: bool) -> None:
            self.counter, self.cuda = counter, cuda
            self.ends: list[float] = []
            self.real: list[int] = []
            self.slots: list[int] = []
            self.start = 0.0

        def _sync(self):
            if self.cuda:
                import torch

                torch.cuda.synchronize()

        def on_train_begin(self, args, state, control, **kwargs):
            self._sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.ends.append(time.perf_counter())
            real, slots = self.counter.take()
            self.real.append(real)
            self.slots.append(slots)

    return Timer


def _profiler_class():
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        """torch.profiler over the optimizer steps after ``first`` (0-based count of steps done), written as tables
        to ``path``: the busiest operators by time on the CPU and on the GPU, and how much of the wall time the GPU
        was busy (a step the GPU waits through is one the CPU side holds up)."""

        def __init__(self, first: int, path: Path, cuda: bool) -> None:
            self.first, self.path, self.cuda = first, path, cuda
            self.prof = None
            self.t0 = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if state.global_step == self.first and self.prof is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if self.cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            if self.prof is None:
                return
            import torch

            if self.cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            prof, self.prof = self.prof, None
            prof.__exit__(None, None, None)
            self.path.write_text(profile_report(prof.key_averages(), wall, state.global_step - self.first))

        def stop(self) -> None:
            """Stop a profiler still running (its train() raised); nothing is written."""
            if self.prof is not None:
                prof, self.prof = self.prof, None
                prof.__exit__(None, None, None)

    return StepProfiler


def profile_report(averages, wall_s: float, steps: int) -> str:
    """The tables of a profiled window: GPU busy share of the wall time, then the top operators by self time."""
    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    gpu_us = sum(device_us(e) for e in averages)
    busy = 100 * gpu_us / 1e6 / wall_s if wall_s else 0.0  # kernels of several streams may overlap: can pass 100%
    lines = [f"profiled {steps} steps: wall {1000 * wall_s:.1f} ms ({1000 * wall_s / max(1, steps):.1f} ms per step); "
             f"GPU kernels {gpu_us / 1000:.1f} ms ({busy:.1f}% of the wall)", ""]
    for title, key in (("by self CPU time", lambda e: e.self_cpu_time_total), ("by self GPU time", device_us)):
        rows = sorted(averages, key=key, reverse=True)[:25]
        lines += [title, f"{'ms':>10} {'calls':>7}  name"]
        lines += [f"{key(e) / 1000:10.2f} {e.count:7d}  {e.key[:110]}" for e in rows if key(e) > 0]
        lines.append("")
    return "\n".join(lines)


def _load(cfg: BenchConfig, shape: str, local_rank: int):
    """(model, tokenizer) with LoRA, for this shape and backend."""
    import torch

    path = str(model_dir(cfg, shape))
    targets = LORA_TARGETS[cfg.lora_targets]
    if cfg.backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            path, max_seq_length=cfg.max_seq_length, load_in_4bit=cfg.load_in_4bit, dtype=None,
            device_map=f"cuda:{local_rank}")
        model = FastLanguageModel.get_peft_model(model, r=cfg.lora_r, lora_alpha=cfg.lora_r, lora_dropout=0.0,
                                                 target_modules=targets,
                                                 use_gradient_checkpointing=GRADIENT_CHECKPOINTING[
                                                     cfg.gradient_checkpointing],
                                                 random_state=cfg.seed)
        return model, tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_r, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
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


def variant_data(cfg: BenchConfig, variant: str) -> tuple[Any, int, dict[str, Any]]:
    """(training dataset, micro-batch size, SFTConfig arguments) of ``variant``: the raw samples for Unsloth's modes
    (``packing=True`` packs them), OpenSloth's rows or samples (already collated by its own collator)."""
    from datasets import load_from_disk

    info = cfg.data_info
    if variant in ("unsloth_packing", "unsloth_auto"):
        packing = variant == "unsloth_packing"
        return load_from_disk(info["train"]), cfg.micro_rows if packing else padded_batch(cfg), \
            {"packing": True} if packing else {}
    padding_free = variant == "opensloth_padding_free"
    return (load_from_disk(info["train" if padding_free else "rows"]),
            padded_batch(cfg) if padding_free else cfg.micro_rows,
            {"remove_unused_columns": False, "dataset_kwargs": {"skip_prepare_dataset": True}})


def _sft_trainer(cfg: BenchConfig, shape: str, name: str, model, tokenizer, train_ds, batch: int, steps: int,
                 world: int, collator=None, wiring=None, cpu: bool = False, **kwargs):
    """The SFTTrainer every run of the benchmark trains with (the same arguments for every variant and the prime;
    ``kwargs`` add to or replace them); ``wiring``: OpenSloth's `BatchWiring`, attached to the trainer (with the
    window patch for masked rows). ``cpu``: on the CPU even where a GPU is (`benchmarks/step_tokens.py`)."""
    import torch
    from trl import SFTConfig

    from opensloth.patching.sft_trainer import sft_trainer_class

    cuda = torch.cuda.is_available() and not cpu
    args = SFTConfig(**{
        "output_dir": str(Path(cfg.work_dir) / "trainer" / shape / name), "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": cfg.grad_accum, "max_steps": steps, "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "max_length": cfg.max_seq_length, "bf16": cuda, "fp16": False, "use_cpu": not cuda,
        "seed": cfg.seed, "dataloader_num_workers": 0, "dataloader_pin_memory": cuda, "logging_nan_inf_filter": False,
        "optim": "adamw_torch", "ddp_find_unused_parameters": False if world > 1 else None,
        "gradient_checkpointing": cuda and cfg.gradient_checkpointing != "off", **kwargs})
    trainer = sft_trainer_class()(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                                   data_collator=collator)
    if wiring is not None:
        wiring.attach(trainer)
        if wiring.layout == "masked_rows":  # Unsloth drops the target count of 4-D masks; the window patch adds it
            from opensloth.patching.batch_samples import install_on_trainer

            install_on_trainer(trainer, repack=False)
    return trainer


def _train_variant(cfg: BenchConfig, shape: str, variant: str, model, tokenizer, device, world: int,
                   label: str | None = None) -> dict:
    import torch
    from datasets import load_from_disk

    info = cfg.data_info
    cuda = torch.cuda.is_available()
    collator = wiring = None
    note = ""
    train_ds, batch, kwargs = variant_data(cfg, variant)
    if variant in ("unsloth_packing", "unsloth_auto"):
        layout = "flat (TRL BFD rows)" if variant == "unsloth_packing" else "flat (samples)"
    else:
        from opensloth.wiring import wire_batches

        packing = "padding_free" if variant == "opensloth_padding_free" else "packed"
        wiring = wire_batches(model, backend=cfg.backend, packing=packing, max_seq_length=cfg.max_seq_length,
                              pad_token_id=tokenizer.pad_token_id, per_device_batch_size=batch, dataset=train_ds)
        collator, layout = wiring.collator, wiring.layout
        note = wiring.check.describe() if wiring.check is not None else ""
    trainer = _sft_trainer(cfg, shape, variant, model, tokenizer, train_ds, batch, cfg.trained_steps, world,
                           collator=collator, wiring=wiring, **kwargs)
    counter = _Counter()
    counter.instrument(trainer)
    timer = _timer_class()(counter, cuda)
    trainer.add_callback(timer)
    profiler = None
    if cfg.profile_steps and _dist_info()[0] == 0:  # rank 0's steps: one file per variant
        path = Path(cfg.out_dir) / f"{shape}_{(label or variant).replace(' #', '_')}_profile.txt"
        profiler = _profiler_class()(cfg.warmup_steps + cfg.steps, path, cuda)
        trainer.add_callback(profiler)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    routes_before = route_counters()
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        if profiler is not None:
            profiler.stop()  # a train() that raised inside the profiled steps must not profile the next variant
    train_s = time.perf_counter() - t0
    routes = {k: v - routes_before.get(k, 0) for k, v in route_counters().items() if v != routes_before.get(k, 0)}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_ds = load_from_disk(info["eval"])
    eval_loss = _eval_loss(model, eval_ds, device) if cfg.eval_samples else float("nan")
    w = cfg.warmup_steps
    ends = [timer.start] + timer.ends
    step_s = [b - a for a, b in zip(ends[:-1], ends[1:])]
    mine = {"step_s": step_s, "real": timer.real, "slots": timer.slots}
    per_rank = [mine]
    if world > 1 and torch.distributed.is_initialized():
        per_rank = [None] * world
        torch.distributed.all_gather_object(per_rank, mine)
    timed = range(w, min(w + cfg.steps, len(step_s)))
    timed_step_s = [max(r["step_s"][i] for r in per_rank) for i in timed]  # a DDP step lasts as long as its slowest
    step_real = [sum(r["real"][i] for r in per_rank) for i in timed]
    wall = sum(timed_step_s)
    real = sum(step_real)
    slots = sum(sum(r["slots"][i] for i in timed) for r in per_rank)
    if variant in ("unsloth_packing", "unsloth_auto") and slots > real:
        # Unsloth pads where it does not pack (seen for Gemma 2: "packing=True ignored (unsupported model type)")
        layout = "padded (Unsloth " + ("ignored packing=True)" if variant == "unsloth_packing"
                                       else "did not go padding-free)")
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "shape": shape, "variant": variant, "layout": layout, "note": note, "world": world, "batch": batch,
        "accum": cfg.grad_accum, "tokens_per_s": real / wall if wall else float("nan"), "real_tokens": real,
        "slots": slots, "wasted": 1 - real / slots if slots else float("nan"), "timed_s": wall,
        "step_s_mean": wall / max(1, len(timed)), "step_s": timed_step_s,
        "tokens_per_s_median": _median_rate(step_real, timed_step_s), "peak_gb": peak, "steps": len(step_s),
        "warmup": w,
        "timed_steps": len(timed), "loss_first": losses[0] if losses else float("nan"),
        "loss_end": _mean(losses[max(w, w + cfg.steps - 3):w + cfg.steps]), "losses": losses,
        "eval_loss": eval_loss, "train_s": train_s, "routes": routes,
    }


def _median_rate(tokens: list[int], seconds: list[float]) -> float:
    """Median over the timed steps of each step's real tokens per second: unlike the total over the total, one slow
    step (a recompile for a new shape, say) does not move it."""
    rates = sorted(t / s for t, s in zip(tokens, seconds) if s > 0)
    if not rates:
        return float("nan")
    mid = len(rates) // 2
    return rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2


def _work_timings(cfg: BenchConfig, shape: str, model, device) -> list[dict]:
    """Forward + backward time of flat packed micro-batches and padded micro-batches of controlled composition."""
    import numpy as np
    import torch

    from opensloth.collate import collate_samples
    from opensloth.wiring import UNSLOTH_METADATA

    rng = np.random.default_rng(0)
    vocab = getattr(getattr(model, "config", None), "vocab_size", VOCAB)
    compositions: list[tuple[str, list[int]]] = []
    for total in (t for t in (4096, 8192, 16384) if t <= cfg.work_max_tokens):
        for length in (64, 256, 1024, 4096):
            if length <= total and length <= cfg.max_seq_length:
                compositions.append(("flat", [length] * (total // length)))
    for _ in range(6):  # mixed lengths, as real batches are
        lengths = np.minimum(cfg.max_seq_length, rng.lognormal(5.5, 0.9, size=64).astype(int) + 8)
        lengths = lengths[np.cumsum(lengths) <= cfg.work_max_tokens]
        compositions.append(("flat", lengths.tolist()))
    for batch, length in ((8, 512), (16, 512), (8, 1024), (4, 2048)):
        if batch * length <= cfg.work_max_tokens and length <= cfg.max_seq_length:
            compositions.append(("padded", [length] * batch))
    out = []
    model.train()
    for layout, lengths in compositions:
        feats = [{"input_ids": rng.integers(100, vocab, size=n), "labels": rng.integers(100, vocab, size=n)}
                 for n in lengths]
        if layout == "flat":
            batch = collate_samples(feats, layout="flat", metadata=UNSLOTH_METADATA if cfg.backend == "unsloth"
                                    else ("use_cache",))
            padded_slots = 0
        else:
            real = [max(8, int(n * f)) for n, f in zip(lengths, rng.uniform(0.3, 1.0, size=len(lengths)))]
            feats = [{"input_ids": f["input_ids"][:m], "labels": f["labels"][:m]} for f, m in zip(feats, real)]
            batch = collate_samples(feats, layout="padded", metadata=("use_cache",))
            lengths = real
            padded_slots = int(batch["input_ids"].numel()) - sum(real)
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        times = []
        for _ in range(4):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        out.append({"shape": shape, "layout": layout, "lengths": [int(x) for x in lengths],
                    "padded_slots": padded_slots, "ms": 1000 * float(np.median(times[1:]))})
    return out


def prime_size(cfg: BenchConfig) -> int:
    """Tokens of the largest flat micro-batch any listed variant trains in one process: ``micro_rows`` full rows for
    the packed ones, and for the sample-batched ones (``unsloth_auto``, ``opensloth_padding_free``) the largest
    micro-batch of their epoch as the trainer cuts it (`benchmarks/step_tokens.py`; the ranks of ``--nproc`` > 1 cut
    theirs otherwise, so there it is an estimate)."""
    size = cfg.micro_rows * cfg.max_seq_length
    sampled = [v for v in dict.fromkeys(cfg.variants) if v in ("unsloth_auto", "opensloth_padding_free")]
    if sampled:
        from transformers import AutoTokenizer

        from benchmarks.step_tokens import variant_tokens

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
        size = max([size] + [max(variant_tokens(cfg, v, tokenizer)) for v in sampled])
    return int(size)


def full_rows(rows: Any, n_rows: int, capacity: int, seed: int = 0, last: int | None = None) -> list[dict]:
    """``n_rows`` packed rows of exactly ``capacity`` tokens (the last one ``last`` tokens, if given): the first rows
    of ``rows`` (a packed dataset with ``seq_lengths``), each topped up with one more document of random tokens (its
    own segment). A last row shorter than its real documents keeps the whole documents that fit."""
    import numpy as np

    if len(rows) < n_rows:
        raise ValueError(f"{len(rows)} packed rows; the prime needs {n_rows}")
    if last is not None and not 0 < last <= capacity:
        raise ValueError(f"last = {last} must be in [1, capacity = {capacity}]")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_rows):
        ids, labels, seq = list(rows[i]["input_ids"]), list(rows[i]["labels"]), list(rows[i]["seq_lengths"])
        width = capacity if last is None or i < n_rows - 1 else last
        while width < capacity and sum(seq) > width:  # a short last row: drop whole documents from its end
            n = seq.pop()
            ids, labels = ids[:-n], labels[:-n]
        free = width - sum(seq)
        if free < 0:
            raise ValueError(f"row {i} holds {sum(seq)} tokens, above the capacity {capacity}")
        if free:
            filler = rng.integers(100, 1000, size=free).tolist()
            ids, labels, seq = ids + filler, labels + filler, seq + [free]
        out.append({"input_ids": ids, "labels": labels, "seq_lengths": seq})
    return out


def _prime(cfg: BenchConfig, shape: str, model, tokenizer, world: int) -> tuple[str, float]:
    """One untimed training step, before the first variant, of micro-batches as large as the largest any listed
    variant trains: ``cfg.prime_tokens`` (`prime_size`) in one flat row where `wire_batches` picks the flat layout for
    this model, else ``micro_rows`` full rows of ``max_seq_length`` (rows of a fixed width: every step the same size).

    Why: a flat micro-batch's length T changes every step, and on Qwen3-8B (H100 and H200, 2026-12-07) every slow
    timed step, 0.3 to 2.7 s above the others' 5.4-5.9 s, was one whose T was the largest of its process so far, in
    three runs: the first anchor's 3rd and 6th steps and our 4th (`benchmarks/step_tokens.py` prints T by step).
    Llama-3.1-8B, trained after Qwen3-8B in the same process with the same T by step, met no new largest T and had
    no slow step. This fits Unsloth's offloaded gradient checkpointing, which regrows its pinned host buffers
    (process-wide) to the exact new size, copying what they hold; not proven. A long run meets its largest T early;
    a benchmark of 2+4 steps does not, so without the prime the variants that meet a new largest T inside their
    timed steps pay for it, and the order of the variants decides which.

    A trainer's step, not a bare forward and backward: Unsloth treats a forward + backward run before the first
    ``trainer.train()`` as a stray probe and, at that ``train()``, resets torch.compile's caches and its gradient
    checkpointing buffers (``_unsloth_reset_stray_compile_cache``, read against 2026.10.9), which would undo the
    prime. Every ``train()`` of Unsloth's ends by shrinking those buffers back (``resize_``, which keeps their
    storage, so a later step of the primed size allocates nothing; an Unsloth that frees the storage there would undo
    the prime). Every variant restores the LoRA weights, so the prime's update is not carried. Returns (what was
    primed, seconds)."""
    from datasets import Dataset, load_from_disk

    from opensloth.wiring import wire_batches

    wiring = wire_batches(model, backend=cfg.backend, packing="packed", max_seq_length=cfg.max_seq_length,
                          pad_token_id=tokenizer.pad_token_id, per_device_batch_size=cfg.micro_rows)
    capacity, per_batch, last = cfg.max_seq_length, cfg.micro_rows, None
    if wiring.layout == "flat" and cfg.prime_tokens:  # one row of all the rows' tokens: any size can be built
        per_batch = -(-cfg.prime_tokens // capacity)
        last = cfg.prime_tokens - (per_batch - 1) * capacity
    rows = load_from_disk(cfg.data_info["rows"])
    batches = cfg.grad_accum * world
    prime_rows = [row for _ in range(batches) for row in full_rows(rows, per_batch, capacity, cfg.seed, last)]
    trainer = _sft_trainer(cfg, shape, "prime", model, tokenizer, Dataset.from_list(prime_rows), per_batch, 1, world,
                           collator=wiring.collator, wiring=wiring, remove_unused_columns=False,
                           dataset_kwargs={"skip_prepare_dataset": True})
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    del trainer
    gc.collect()
    tokens = per_batch * capacity if last is None else (per_batch - 1) * capacity + last
    return f"{tokens:,} tokens in {per_batch} row{'s' if per_batch > 1 else ''} ({wiring.layout})", seconds


def route_counters() -> dict[str, int]:
    """Counters that say which route the steps took, to diff around ``train()``: Unsloth's packed-attention calls on
    the transformers modeling path (``hf_packed.fast``: a varlen kernel; ``.fallback``: SDPA over a dense mask;
    ``.compiled``: inside a compiled block; read against 2026.10.9) and torch.compile's graphs, frames and graph
    breaks. A variant whose compiled blocks hit the recompile limit runs them eagerly without an error; its
    ``hf_packed.fast`` then grows with every layer and step, and its ``dynamo.stats.unique_graphs`` stops growing."""
    out: dict[str, int] = {}
    stats = getattr(sys.modules.get("unsloth.utils.hf_packed_attention"), "HF_PACKED_ATTENTION_STATS", None)
    if isinstance(stats, dict):
        out.update({f"hf_packed.{k}": int(v) for k, v in stats.items() if isinstance(v, (int, float))})
    dynamo = sys.modules.get("torch._dynamo.utils")
    counters = getattr(dynamo, "counters", None)
    if counters is not None:
        for group in ("stats", "frames"):
            out.update({f"dynamo.{group}.{k}": int(v) for k, v in counters.get(group, {}).items()})
        out["dynamo.graph_breaks"] = int(sum(counters.get("graph_break", {}).values()))
    return out


def _model_flags_as_loaded(model) -> Callable[[], None]:
    """A function that puts back the model's flags that OpenSloth's wiring may set, as they were at load: Unsloth's
    keep-the-attention-mask flag, which the dense-mask route (Gemma 2) sets on the model and keeps. Each variant
    starts from it, so an Unsloth anchor that runs after our variant or the prime runs as its users run it (in the
    fourth session's Gemma 2 run it did not: the anchor's repeat kept the padding mask it would have dropped)."""
    from opensloth.patching.unsloth_mask import keep_unsloth_attention_mask

    try:
        restore = keep_unsloth_attention_mask(model)  # sets the flag and records what was there before...
    except ValueError:  # no backbone with embed_tokens: no flag to keep
        return lambda: None
    restore()  # ...which this puts back, now and before every variant
    return restore


def _flash_impl_state() -> str | None:
    """Unsloth's own account of its FA3 / FA4 choice for the last training (its packing=True and
    `BatchWiring.attach` scope it to train()), or None off Unsloth."""
    module = sys.modules.get("unsloth.utils.flash_impl")
    state = getattr(module, "FLASH_IMPL_STATE", None)
    return state.get("reason") if isinstance(state, dict) else None


def _run_label(variants: list[str] | tuple[str, ...], i: int) -> str:
    """A variant's name in the results, with " #k" on its k-th run where the list repeats it (to time an anchor
    again once everything the process compiles has been compiled)."""
    k = list(variants[:i + 1]).count(variants[i])
    return variants[i] if k == 1 else f"{variants[i]} #{k}"


def _variant_name(label: str) -> str:
    return label.split(" #", 1)[0]


def run_worker(cfg: BenchConfig, shapes: list[str]) -> None:
    """Train every variant of every shape in this process (Unsloth is imported once)."""
    for shape in shapes:
        _run_shape_here(cfg, shape)
        gc.collect()


_SETUP: dict[str, Any] = {}


def _run_shape_here(cfg: BenchConfig, shape: str) -> None:
    rank, world, local_rank = _dist_info()
    if cfg.backend == "unsloth":
        import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)
    import torch

    cuda = torch.cuda.is_available()
    if "device" in _SETUP:
        device = _SETUP["device"]
    elif world > 1:
        from opensloth.patching.ddp_patch import ddp_patch

        device = _SETUP["device"] = ddp_patch()
    else:
        device = _SETUP["device"] = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
    varlen = "-"
    if cfg.backend == "unsloth":
        from opensloth.patching.unsloth_varlen import switch_on_unsloth_varlen, unsloth_varlen_state

        varlen = "fallback kept (--unsloth_fallback)" if cfg.unsloth_fallback else switch_on_unsloth_varlen()
        varlen = f"{varlen} ({unsloth_varlen_state()})"
    t_load = time.perf_counter()
    model, tokenizer = _load(cfg, shape, local_rank)
    load_s = time.perf_counter() - t_load
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    as_loaded = _model_flags_as_loaded(model)
    lora_params = sum(p.numel() for p in trainable.values())
    fpt = flops_per_token(model.config, cfg.data_info["pairs_per_token"], lora_params)
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_tflops(gpu)
    out_prefix = Path(cfg.out_dir) / shape
    prime = None
    if cfg.prime:
        try:
            what, seconds = _prime(cfg, shape, model, tokenizer, world)
            prime = f"{what}, {seconds:.1f} s"
            say(f"[bench] {shape}: primed with one untimed training step of {prime}")
        except Exception as exc:  # noqa: BLE001 - the variants still run, unprimed, and the table says so
            if world > 1:  # the other ranks may wait in a collective of the prime: fail the shape now
                raise
            import traceback

            traceback.print_exc()
            prime = f"failed ({type(exc).__name__}: {str(exc)[:120]}), variants unprimed"
            say(f"[bench] {shape}: prime {prime}")
        if prime is not None and prime.startswith("failed"):  # out of the except: its frames no longer hold tensors
            model.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    results = []
    for i, variant in enumerate(cfg.variants):
        label = _run_label(cfg.variants, i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in trainable:
                    p.copy_(trainable[n])
        as_loaded()
        say(f"[bench] {shape} / {variant}: training {cfg.warmup_steps}+{cfg.steps} steps")
        try:
            r = _train_variant(cfg, shape, variant, model, tokenizer, device, world, label)
        except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
            import traceback

            traceback.print_exc()
            r = {"shape": shape, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]}
            if cuda:
                torch.cuda.empty_cache()
        r["variant"] = label
        if "error" not in r:
            r.update(flops_per_token=fpt, load_s=load_s, varlen=varlen, gpu=gpu, flash_impl=_flash_impl_state(),
                     prime=prime,
                     mfu=(r["tokens_per_s"] * fpt / (peak * 1e12)) if peak else None)
            say(f"[bench] {shape} / {variant}: {r['tokens_per_s']:,.0f} real tokens/s, peak {r['peak_gb']:.2f} GB, "
                f"eval loss {r['eval_loss']:.4f}" + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else ""))
            say(f"[bench] {shape} / {variant}: routes during train() {r['routes'] or '-'}")
        results.append(r)
        if rank == 0:
            Path(f"{out_prefix}.json").write_text(json.dumps(results, indent=1))
    if cfg.work_timings and rank == 0:
        from opensloth.sampler import WorkModel

        timings = _work_timings(cfg, shape, model, device)
        meta = {"shape": shape, "lora_param_bytes": 4 * lora_params,
                "attn_tokens": WorkModel.for_config(getattr(model.config, "text_config", None) or model.config)
                .attn_tokens}
        source = f"{gpu}; {varlen}; benchmarks/bench_train_gpu.py --work_timings"
        Path(f"{out_prefix}_work_timings.json").write_text(
            json.dumps({"source": source, "records": timings, "shapes": [meta]}, indent=1))  # sim_scaling.py's input
        say(f"[bench] {shape}: {len(timings)} work timings written")
    del model, tokenizer, trainable
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ the parent


def worker_command(cfg_path: Path, shapes: str, nproc: int) -> list[str]:
    script = str(Path(__file__).resolve())
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
                "--_worker", shapes, "--_config", str(cfg_path)]
    return [sys.executable, script, "--_worker", shapes, "--_config", str(cfg_path)]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
               OPENSLOTH_REPACK="0")
    for k, v in MULTICAST_OFF.items():
        env.setdefault(k, v)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


INTERRUPTED = "interrupted"


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (what `timeout` sends) interrupt this process as Ctrl-C does, so `run_shapes` stops its worker
    and the variants finished so far are still reported."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def run_shapes(cfg: BenchConfig, cfg_path: Path, shapes: list[str]) -> list[dict]:
    """One worker process (under torchrun with --nproc) trains every variant of ``shapes``; results per shape, the
    unfinished variants as errors (``"rc interrupted"`` when this process was stopped)."""
    name = shapes[0] if len(shapes) == 1 else f"{shapes[0]}-and-{len(shapes) - 1}-more"
    log = Path(cfg.out_dir) / f"{name}.log"
    for shape in shapes:
        (Path(cfg.out_dir) / f"{shape}.json").unlink(missing_ok=True)
    cmd = worker_command(cfg_path, ",".join(shapes), cfg.nproc)
    say(f"[bench] {', '.join(shapes)}: {shlex.join(cmd[1:])} > {log}")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=worker_env(), start_new_session=True,
                                cwd=str(ROOT))
        # The worker runs in its own session (so a kill takes its torchrun children too), which also means a signal
        # to this process does not reach it: stopped here (SIGINT, or SIGTERM through `interrupt_on_sigterm`), this
        # process kills it, or it trains on and skews whatever runs on the GPU next.
        rc: Any
        try:
            rc = proc.wait(timeout=cfg.timeout * len(shapes))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        except KeyboardInterrupt:
            rc = INTERRUPTED
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - t0
    results: list[dict] = []
    for shape in shapes:
        path = Path(cfg.out_dir) / f"{shape}.json"
        got = json.loads(path.read_text()) if path.exists() else []
        done = {r["variant"] for r in got}
        got += [{"shape": shape, "variant": v, "error": f"rc {rc}"} for v in cfg.variants if v not in done]
        results += got
    if rc != 0 or any("error" in r for r in results):
        tail = log.read_text(errors="replace").splitlines()[-25:]
        say(f"[bench] rc {rc} after {wall:.0f} s; last lines of {log}:\n  " + "\n  ".join(tail))
    return results


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def results_table(results: list[dict]) -> str:
    """One row per (shape, variant); speed-ups against the same shape's unsloth_packing and unsloth_auto runs."""
    from benchmarks._report import markdown_table

    refs = {}
    for r in results:  # a repeated anchor's last run is the reference (compiled caches warm, as for later variants)
        if "error" not in r and _variant_name(r["variant"]) in ("unsloth_packing", "unsloth_auto"):
            refs[(r["shape"], _variant_name(r["variant"]))] = r
    header = ["shape", "variant", "layout", "micro-batch x accum", "real tokens/s", "median step tok/s",
              "vs packing=True", "vs auto", "MFU", "peak GB", "padding", "steps", "loss (last 3)", "eval loss"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["shape"], r["variant"], "failed: " + r["error"]] + ["-"] * (len(header) - 3))
            continue
        unit = "samples" if _variant_name(r["variant"]) in ("unsloth_auto", "opensloth_padding_free") else "rows"
        ratios = []
        for ref_name in ("unsloth_packing", "unsloth_auto"):
            ref = refs.get((r["shape"], ref_name))
            ratios.append(_fmt(r["tokens_per_s"] / ref["tokens_per_s"], ".3f") + "x" if ref else "-")
        rows.append([r["shape"], r["variant"], r["layout"], f"{r['batch']} {unit} x {r['accum']}",
                     f"{r['tokens_per_s']:,.0f}", _fmt(r.get("tokens_per_s_median"), ",.0f"), *ratios,
                     _fmt(100 * r["mfu"], ".1f") + "%" if r.get("mfu") else "-", _fmt(r["peak_gb"], ".2f"),
                     f"{100 * r['wasted']:.1f}%", f"{r['warmup']}+{r['timed_steps']}", _fmt(r["loss_end"], ".4f"),
                     _fmt(r["eval_loss"], ".4f")])
    return markdown_table(header, rows)


PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "triton",
            "datasets", "xformers")


def setup_lines(cfg: BenchConfig, results: list[dict]) -> str:
    info = cfg.data_info
    gpus = sorted({r["gpu"] for r in results if r.get("gpu")})
    varlen = sorted({r["varlen"] for r in results if r.get("varlen")})
    lines = [
        f"- GPU: {', '.join(gpus) or 'none'}; Unsloth's varlen branch: {', '.join(varlen) or '-'}",
        f"- data: {info['n_samples']} training samples of the shuffled shared mix (alpaca, gsm8k, hh_rlhf, "
        f"arena_hard; {info['tokens']:,} tokens, mean {info['mean_len']:.0f}, max {info['max_len']}), OpenSloth rows "
        f"of {cfg.max_seq_length} ({info['n_rows']} rows, {100 * info['pack_efficiency']:.2f}% full); eval loss over "
        f"{cfg.eval_samples} held-out samples, each run alone",
        f"- model: random weights from each shape's config, {'4-bit NF4 (QLoRA)' if cfg.load_in_4bit else '16-bit'}, "
        f"LoRA r {cfg.lora_r} on {cfg.lora_targets} ({', '.join(LORA_TARGETS[cfg.lora_targets])}), "
        f"{GRADIENT_CHECKPOINTING_LABEL[cfg.gradient_checkpointing]}, "
        f"lr {cfg.learning_rate} constant, AdamW",
        f"- steps: {cfg.warmup_steps} warm-up + {cfg.steps} timed; {cfg.micro_rows} rows per micro-batch x "
        f"{cfg.grad_accum}; unpacked variants {padded_batch(cfg)} samples per micro-batch; all variants of a shape "
        f"in one process, from the same LoRA initialisation, in the order {', '.join(cfg.variants)}",
        "- MFU: model FLOPs per real token = 4 x matmul weights (blocks + LM head) + 6 x LoRA weights + 12 x layers "
        "x heads x head_dim x causal pairs per token of the training samples, over 989 TFLOP/s (bf16 dense)",
    ]
    primes = sorted({r["prime"] for r in results if r.get("prime")})
    if primes:
        lines.append("- prime: one untimed step per process before the first variant, of micro-batches as large as "
                     "the largest any listed variant trains, so that none meets a new largest micro-batch inside its "
                     f"timed steps (`_prime`; `--no_prime` leaves it out): {'; '.join(primes)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        cfg = BenchConfig(**json.loads(Path(args._config).read_text()))
        run_worker(cfg, args._worker.split(","))
        return 0
    cfg = build_config(args)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg.data_info = prepare_data(cfg)
    check_enough_data(cfg)
    if cfg.prime:
        cfg.prime_tokens = prime_size(cfg)
    cfg_path = Path(cfg.out_dir) / "config.json"
    cfg_path.write_text(json.dumps(asdict(cfg), indent=1))
    command = "python " + shlex.join(["benchmarks/bench_train_gpu.py"] + (argv if argv is not None else sys.argv[1:]))
    results: list[dict] = []
    ready = []
    for shape in cfg.shapes:
        try:
            build_random_model(cfg, shape)
            ready.append(shape)
        except Exception as exc:  # noqa: BLE001
            results += [{"shape": shape, "variant": v, "error": f"model: {type(exc).__name__}: {exc}"[:300]}
                        for v in cfg.variants]
    groups = [[s] for s in ready] if args.isolate else ([ready] if ready else [])
    interrupt_on_sigterm()
    for group in groups:
        results += run_shapes(cfg, cfg_path, group)
        Path(cfg.out_dir, "results.json").write_text(json.dumps(results, indent=1))
        if any(r.get("error") == f"rc {INTERRUPTED}" for r in results):
            say("[bench] stopped: the table below holds the variants finished so far")
            break
    table = results_table(results)
    from benchmarks._report import machine_header

    header = machine_header(PACKAGES, command=command) + "\n" + setup_lines(cfg, results)
    Path(cfg.out_dir, "header.md").write_text(header)
    say("\n" + header + "\n\n" + table)
    if args.write_results:
        from benchmarks._report import write_section

        path = write_section("gpu_train", "QLoRA training on one GPU: OpenSloth vs Unsloth as its users run it",
                             args.section or ", ".join(cfg.shapes), header + "\n\n" + table)
        say(f"[bench] wrote {path}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
