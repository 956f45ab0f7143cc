#!/usr/bin/env python
"""OpenSloth: configurable SFT training, one process or many (torchrun + DDP), Unsloth or transformers + peft.

    python train_scripts/train_configurable.py --preset tiny                          # CPU, offline, < 2 min
    torchrun --nproc_per_node=2 train_scripts/train_configurable.py --preset tiny     # 2 processes (gloo on CPU)
    torchrun --nproc_per_node=4 train_scripts/train_configurable.py \\
        --model_name unsloth/Qwen3-0.6B-bnb-4bit --per_device_batch_size 2            # 4 GPUs, Unsloth, Capybara

Every flag is listed by --help and in TRAINING_README.md. The run writes outputs/<experiment>_ws<N>[_nopatches]/:
checkpoints, TensorBoard events (runs/), the final model, and run_summary.json with the figures printed at the end.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# Nothing below imports torch, transformers, trl or peft at module level: Unsloth must be imported first when used.
from opensloth.config import TrainConfig, build_parser, resolve_config  # noqa: E402
from opensloth.data.shared import SHARED_CHAT_FILES, read_chat_records, shared_chat_paths, shared_data_dir  # noqa: E402

SUMMARY_FILE = "run_summary.json"
DATA_FORMAT = 2  # bump when the prepared-dataset layout changes (part of the cache key); 2: rows packed "best"


class RunError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, str]]:
    """Parse and validate the flags; an invalid value exits with an argparse error naming the flag."""
    parser = build_parser(prog="train_configurable.py", description=__doc__)
    parser.add_argument("--ddp_backend", choices=("auto", "nccl", "gloo"), default="auto",
                        help="torch.distributed backend under torchrun: 'auto' (nccl on CUDA, gloo on CPU), or force "
                             "one; gloo lets several ranks share one GPU (NCCL refuses two ranks on one device)")
    namespace = parser.parse_args(argv)
    config, sources = resolve_config(namespace)
    config.ddp_backend = namespace.ddp_backend  # a script-level flag, not a TrainConfig field
    problems = config.problems(sources)
    if config.preset is not None and sources.get("model_name") == "flag":
        problems.insert(0, ("--model_name", f"conflicts with --preset {config.preset}, which builds its own model; "
                                            f"give one of them"))
    if problems:
        flag, message = problems[0]
        more = f" (and {len(problems) - 1} more problem(s): " + "; ".join(f"{f} {m}" for f, m in problems[1:]) + ")" \
            if len(problems) > 1 else ""
        parser.error(f"argument {flag}: {message}{more}")
    return config, sources


def describe_config(config: TrainConfig, sources: dict[str, str], *, world_size: int, backend: str | None) -> str:
    """The configuration as aligned lines: name, value, and where the value came from when not the default."""
    rows = [("world size", world_size, "WORLD_SIZE"), ("backend (resolved)", backend or config.backend, ""),
            ("patches", "on" if config.patches else "off", "--no_patches" if config.no_patches else "default"),
            ("run name", config.run_name(world_size), ""),
            ("output dir", config.resolved_output_dir(world_size), ""),
            ("effective batch", f"{config.per_device_batch_size} x {config.grad_accum} x {world_size} = "
                                f"{config.per_device_batch_size * config.grad_accum * world_size} "
                                f"{'rows' if config.packing in ('packed', 'balanced') else 'samples'} per step", "")]
    import dataclasses

    for f in dataclasses.fields(config):
        if f.name in ("use_patches_given", "use_patches", "no_patches", "print_config"):
            continue
        if f.name == "model_name" and config.preset is not None:
            rows.append((f.name, f"(built by --preset {config.preset})", "preset"))
            continue
        source = sources.get(f.name, "default")
        rows.append((f.name, getattr(config, f.name), "" if source == "default" else source))
    width = max(len(r[0]) for r in rows)
    lines = ["OpenSloth training configuration:"]
    for name, value, source in rows:
        lines.append(f"  {name:<{width}}  {value}" + (f"   [{source}]" if source else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ environment


def resolve_backend(requested: str) -> str:
    """'unsloth' or 'hf'. Imports Unsloth (before transformers, trl and peft) when it is used."""
    import importlib.util

    cuda = _cuda_available()
    if requested == "hf":
        return "hf"
    if requested == "unsloth" and not cuda:
        raise RunError("--backend unsloth needs a CUDA GPU and none is visible; use --backend hf (CPU) or auto")
    if importlib.util.find_spec("unsloth") is None:
        if requested == "unsloth":
            raise RunError("--backend unsloth: the unsloth package is not installed "
                           "(python -m pip install -e '.[unsloth]'); or use --backend hf")
        return "hf"
    if not cuda:
        return "hf"
    try:
        import unsloth  # noqa: F401  (must come before transformers, trl and peft)
    except Exception as exc:  # noqa: BLE001 - any import failure means: not usable here
        if requested == "unsloth":
            raise RunError(f"--backend unsloth: `import unsloth` failed: {type(exc).__name__}: {exc}") from exc
        print(f"[opensloth] unsloth does not import ({type(exc).__name__}: {exc}); using transformers + peft",
              file=sys.stderr)
        return "hf"
    return "unsloth"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def is_main_process() -> bool:
    from opensloth.distributed import get_rank

    return get_rank() == 0


def say(message: str) -> None:
    """Print on global rank 0 only (the terminal's view of the run)."""
    if is_main_process():
        print(message, flush=True)


def batch_size_guidance(config: TrainConfig, world_size: int, backend: str) -> str:
    unit = "packed rows" if config.packing in ("packed", "balanced") else "samples"
    tokens = config.per_device_batch_size * config.max_seq_length
    lines = [f"per_device_batch_size={config.per_device_batch_size} {unit} per micro-batch "
             f"(up to ~{tokens} tokens per process per micro-batch at max_seq_length={config.max_seq_length})"]
    if world_size > 1:
        lines.append(f"to compare with a single-process run, keep per_device_batch_size x grad_accum x world_size "
                     f"constant (here {config.per_device_batch_size * config.grad_accum * world_size}); e.g. "
                     f"8 x 1 process, 4 x 2, 2 x 4")
    if backend == "unsloth" or _cuda_available():
        lines.append("out of memory: halve per_device_batch_size and double grad_accum (same effective batch)")
    else:
        lines.append("on a CPU, attention cost grows with the tokens of a micro-batch: keep micro-batches small")
    return "; ".join(lines)


# ------------------------------------------------------------------------------------------------ model


def check_attention_backend(config: TrainConfig, backend: str) -> None:
    """--attn_implementation choices that cannot train on this machine fail now, not mid-training."""
    if backend != "hf" or _cuda_available():
        return
    if config.attn_implementation in ("flash_attention_2", "flex_attention"):
        raise RunError(f"--attn_implementation {config.attn_implementation} needs a CUDA GPU (on a CPU its backward "
                       f"is not supported); use sdpa or eager here")


def check_lora_targets(model, targets: list[str], lora_r: int) -> None:
    """Every --lora_targets name must be a layer of the model: say which are not, and what there is."""
    if lora_r == 0:
        return
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if getattr(getattr(module, "weight", None), "dim", lambda: 0)() == 2 and not list(module.children())}
    missing = [t for t in targets if t not in names]
    if missing:
        raise RunError(f"--lora_targets: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a layer of "
                       f"{type(model).__name__}; its weight layers are named {', '.join(sorted(names))}")


def load_model(config: TrainConfig, backend: str, local_rank: int):
    """(model, tokenizer) with LoRA adapters (or all weights trainable when --lora_r 0)."""
    check_attention_backend(config, backend)
    targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
    if config.preset is not None:
        from opensloth.presets import get_preset

        preset = get_preset(config.preset)
        if backend == "unsloth":
            from opensloth.presets import save_tiny_model_folder

            folder = save_tiny_model_folder(Path(config.cache_dir) / f"preset-{config.preset}-model", preset)
            return _load_unsloth(config, str(folder), local_rank, targets, load_in_4bit=False)
        from opensloth.presets import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(preset.vocab_size, config.max_seq_length)
        model = build_tiny_model(preset, seed=config.seed, attn_implementation=config.attn_implementation,
                                 tokenizer=tokenizer)
        return _add_peft(config, model, targets), tokenizer
    if backend == "unsloth":
        return _load_unsloth(config, config.model_name, local_rank, targets, load_in_4bit=config.load_in_4bit)
    return _load_hf(config, targets)


def _hub_hint(name: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0", "false")
    return (f"could not load {name!r}" + (" (HF_HUB_OFFLINE is set)" if offline else "") +
            ": give a local folder, make the Hugging Face Hub reachable, or train offline with --preset tiny")


def _load_unsloth(config: TrainConfig, name: str, local_rank: int, targets: list[str], *, load_in_4bit: bool):
    from unsloth import FastLanguageModel

    full = config.lora_r == 0
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=name,
            max_seq_length=config.max_seq_length,
            load_in_4bit=load_in_4bit and not full,
            full_finetuning=full,
            device_map=f"cuda:{local_rank}",
        )
    except OSError as exc:
        raise RunError(f"{_hub_hint(name)} ({exc})") from exc
    if not full:
        check_lora_targets(model, targets, config.lora_r)
        gc = {"auto": "unsloth", "on": "unsloth", "off": False}[config.gradient_checkpointing]
        model = FastLanguageModel.get_peft_model(
            model,
            r=config.lora_r,
            target_modules=targets,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_gradient_checkpointing=gc,
            random_state=config.seed,
        )
    return model, _ensure_pad(tokenizer)


def _load_hf(config: TrainConfig, targets: list[str]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"attn_implementation": config.attn_implementation}
    if torch.cuda.is_available():
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        kwargs["dtype"] = torch.float32
    if "bnb-4bit" in config.model_name and not torch.cuda.is_available():
        raise RunError(f"--model_name {config.model_name} is a 4-bit bitsandbytes checkpoint, which needs a CUDA GPU; "
                       f"on a CPU use a 16-bit model (e.g. --model_name Qwen/Qwen3-0.6B) or --preset tiny")
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model_name)
        model = AutoModelForCausalLM.from_pretrained(config.model_name, **kwargs)
    except OSError as exc:
        raise RunError(f"{_hub_hint(config.model_name)} ({exc})") from exc
    return _add_peft(config, model, targets), _ensure_pad(tokenizer)


def _add_peft(config: TrainConfig, model, targets: list[str]):
    if config.lora_r == 0:
        return model
    check_lora_targets(model, targets, config.lora_r)
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)  # the LoRA A matrices are drawn from torch's RNG: --seed fixes them
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _ensure_pad(tokenizer):
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ------------------------------------------------------------------------------------------------ data


def _read_json_records(path: Path) -> list[dict]:
    try:
        return read_chat_records(path)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def dataset_identity(spec: str, seed: int) -> dict:
    """What identifies the raw data for the cache key (file sizes and times; the name for hub data)."""
    path = Path(spec)
    if spec == "synthetic":
        from opensloth.presets.synthetic import LENGTH_MEDIAN, LENGTH_SIGMA

        return {"kind": "synthetic", "seed": seed, "median": LENGTH_MEDIAN, "sigma": LENGTH_SIGMA}
    if path.exists():
        files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
        return {"kind": "path", "path": str(path.resolve()),
                "files": [[str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size,
                           int(p.stat().st_mtime)] for p in files]}
    if spec in SHARED_CHAT_FILES:
        return {"kind": "shared", "name": spec, "files": [
            [f, (shared_data_dir() / "chat" / f).stat().st_size] for f in SHARED_CHAT_FILES[spec]
            if (shared_data_dir() / "chat" / f).is_file()]}
    return {"kind": "hub", "name": spec}


def load_records(spec: str, train_samples: int, test_samples: int, seed: int):
    """(train records, eval records or None): the first `train_samples` and the next `test_samples` records."""
    if spec == "synthetic":
        from opensloth.presets import tiny_datasets

        train, test = tiny_datasets(train_samples, test_samples, seed=seed)
        return train, (test or None)
    path = Path(spec)
    if path.is_file():
        records: Any = _read_json_records(path)
    elif path.is_dir():
        from datasets import DatasetDict, load_from_disk

        records = load_from_disk(str(path))
        if isinstance(records, DatasetDict):
            if "train" not in records:
                raise RunError(f"--dataset {spec}: the DatasetDict has no 'train' split ({list(records)})")
            records = records["train"]
    elif spec in SHARED_CHAT_FILES:
        try:
            files = shared_chat_paths(spec)
        except FileNotFoundError as exc:
            raise RunError(f"--dataset {spec}: {exc}") from None
        records = [r for f in files for r in _read_json_records(f)]
    else:
        from datasets import load_dataset

        try:
            records = load_dataset(spec, split=f"train[:{train_samples + test_samples}]")
        except Exception as exc:  # noqa: BLE001 - network, offline mode, missing dataset: one clear message
            raise RunError(
                f"--dataset {spec}: could not load it from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
                f"Give a JSONL file of chat records, a save_to_disk folder, a shared dataset name "
                f"({', '.join(SHARED_CHAT_FILES)}), or train offline with --preset tiny"
            ) from exc
    n = len(records)
    if n == 0:
        raise RunError(f"--dataset {spec} has no records")
    n_train = min(train_samples, n)
    n_test = min(test_samples, n - n_train)
    if n_train < train_samples:
        say(f"[opensloth] --dataset {spec} has {n} records: training on {n_train} (asked for {train_samples})")
    if test_samples and n_test < test_samples:
        say(f"[opensloth] {n_test} evaluation records left after the training ones (asked for {test_samples})")

    def take(lo, hi):
        return records[lo:hi] if isinstance(records, list) else records.select(range(lo, hi))

    return take(0, n_train), (take(n_train, n_train + n_test) if n_test else None)


def prepare_datasets(config: TrainConfig, tokenizer, world_size: int):
    """(train, eval or None, info): tokenised (and, for packed modes, packed) datasets, built once by global rank 0
    into the dataset cache and loaded by every rank."""
    from opensloth.data.cache import CacheConfig, rank_zero_build_and_load, tokenizer_identity

    packed = config.packing in ("packed", "balanced")
    info: dict[str, Any] = {}

    if config.skip_prepare:
        return _load_prepared(config, tokenizer, packed, info)

    def build() -> dict:
        from opensloth.data.chat import tokenize_chat_dataset

        train_records, eval_records = load_records(config.dataset, config.train_samples, config.test_samples,
                                                   config.seed)
        common = dict(max_seq_length=config.max_seq_length, assistant_only=not config.all_tokens,
                      num_proc=config.dataset_num_proc)
        out = {"train": tokenize_chat_dataset(train_records, tokenizer, desc="train", **common)}
        if eval_records is not None:
            out["val"] = tokenize_chat_dataset(eval_records, tokenizer, desc="eval", **common)
        if packed:
            from opensloth.data.packed import build_packed_dataset

            out = {k: build_packed_dataset(v, config.max_seq_length, strategy="best") for k, v in out.items()}
        return out

    from opensloth.data.chat import CHAT_FORMAT_VERSION

    material = {
        "format": DATA_FORMAT,
        "chat_format": CHAT_FORMAT_VERSION,  # labels of tool-call records changed in 2
        "dataset": dataset_identity(config.dataset, config.seed),
        "train_samples": config.train_samples,
        "test_samples": config.test_samples,
        "tokenizer": tokenizer_identity(tokenizer),
        "max_seq_length": config.max_seq_length,
        "packed": packed,
        "all_tokens": config.all_tokens,
    }
    from opensloth.data.cache import make_cache_key

    name = Path(config.dataset).stem if Path(config.dataset).exists() else config.dataset.replace("/", "_")
    path = Path(config.cache_dir) / f"prepared-{name}-{make_cache_key(material)}"
    loaded, _, built = rank_zero_build_and_load(path, material, build, CacheConfig(cache_dir=config.cache_dir))
    info.update({"cache": str(path), "built_here": built})
    return loaded["train"], loaded.get("val"), info


def _load_prepared(config: TrainConfig, tokenizer, packed: bool, info: dict):
    from opensloth.data.cache import load_prepared_dataset, tokenizer_identity

    try:
        train, val, meta = load_prepared_dataset(config.prepared_dataset_path)
    except FileNotFoundError as exc:
        raise RunError(f"--prepared_dataset_path: {exc}") from exc
    info["prepared"] = config.prepared_dataset_path
    stored = {k: v for k, v in (meta.get("tokenizer") or {}).items() if k != "name_or_path"}
    mine = tokenizer_identity(tokenizer) or {}
    if stored.get("backend_sha256") and mine.get("backend_sha256") and stored["backend_sha256"] != mine[
            "backend_sha256"]:
        raise RunError(
            f"--prepared_dataset_path {config.prepared_dataset_path} was tokenised with a different tokenizer "
            f"({(meta.get('tokenizer') or {}).get('name_or_path')}) than the model's; precompute it again with "
            f"--tokenizer set to the model's tokenizer"
        )
    is_packed = "seq_lengths" in train.column_names
    if is_packed and not packed:
        raise RunError(f"--prepared_dataset_path {config.prepared_dataset_path} holds packed rows; train it with "
                       f"--packing packed or --packing balanced (or precompute without --pack)")
    capacity = meta.get("packed_capacity")
    if is_packed and capacity and capacity > config.max_seq_length:
        raise RunError(f"--prepared_dataset_path rows hold up to {capacity} tokens, above --max_seq_length "
                       f"{config.max_seq_length}; raise --max_seq_length to {capacity}")
    n_train = min(config.train_samples, len(train)) if not is_packed else len(train)
    train = train.select(range(n_train))
    if val is not None and config.test_samples == 0:
        val = None
    if packed and not is_packed:
        from opensloth.data.packed import build_packed_dataset

        train = build_packed_dataset(train, config.max_seq_length, strategy="best")
        val = build_packed_dataset(val, config.max_seq_length, strategy="best") if val is not None else None
    return train, val, info


# ------------------------------------------------------------------------------------------------ trainer


def wire_collator(config: TrainConfig, model, tokenizer, backend: str):
    """The collator and attention setup for --packing on this backend (`opensloth.wiring.wire_batches`): Unsloth's
    packed protocol on Unsloth, position_ids rows on transformers, padded rows for a model that does not keep packed
    samples apart (checked, logged once)."""
    from opensloth.wiring import wire_batches

    wiring = wire_batches(model, backend=backend, packing=config.packing, max_seq_length=config.max_seq_length,
                          pad_token_id=tokenizer.pad_token_id, per_device_batch_size=config.per_device_batch_size)
    if wiring.fallback is not None:
        say(f"[opensloth] this model does not keep packed samples apart: training on padded rows ({wiring.fallback})")
    return wiring


def make_training_args(config: TrainConfig, world_size: int, backend: str):
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    has_eval = config.test_samples > 0
    eval_strategy = config.eval_strategy if has_eval else "no"
    kwargs: dict[str, Any] = dict(
        output_dir=config.resolved_output_dir(world_size),
        run_name=config.run_name(world_size),
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=config.weight_decay,
        seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy=config.save_strategy,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit or None,
        eval_strategy=eval_strategy,
        eval_steps=(config.eval_steps or config.save_steps) if eval_strategy == "steps" else None,
        report_to=[] if config.report_to == "none" else [config.report_to],
        max_length=config.max_seq_length,
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenised, labelled and truncated by prepare_datasets
        bf16=bf16,
        fp16=bool(cuda and not bf16),
        use_cpu=not cuda,
        gradient_checkpointing=(config.gradient_checkpointing == "on" and backend == "hf"),
        dataloader_drop_last=False,
        optim="adamw_torch",
    )
    if world_size > 1:
        kwargs["ddp_find_unused_parameters"] = False
    if getattr(config, "ddp_backend", "auto") != "auto":
        if config.ddp_backend == "nccl" and not cuda:
            raise RunError("--ddp_backend nccl needs CUDA GPUs and none is visible; use --ddp_backend gloo or auto")
        if world_size > 1:  # one process has no process group to give a backend
            kwargs["ddp_backend"] = config.ddp_backend
    return SFTConfig(**kwargs)


def build_trainer(config: TrainConfig, model, tokenizer, train_dataset, eval_dataset, training_args, backend: str,
                  wiring):
    from opensloth.patching.sft_trainer import sft_trainer_class

    trainer_cls = sft_trainer_class()
    if trainer_cls.__name__ != "SFTTrainer" and backend == "hf":
        say("[opensloth] TRL's fused LM-head loss needs triton on a GPU: the loss is the model's own here")
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=wiring.collator,
    )
    if config.packing == "balanced":
        from opensloth.patching.dataloader import use_balanced_sampler

        # rows padded to capacity (the hf rows layout) count their padding as work; flat rows have none
        use_balanced_sampler(trainer, row_capacity=config.max_seq_length if wiring.layout == "rows" else None)
    from opensloth.metrics import attach_step_figures

    attach_step_figures(trainer)  # observes batches only: tokens/s/GPU, real-token fraction, rank balance
    return trainer


def write_debug_pages(trainer, train_dataset, config: TrainConfig, world_size: int) -> list[str]:
    """HTML pages of the first --debug_dataloader training batches (the trainer's collator over the training data in
    order, micro-batch by micro-batch), under .log/. Rank 0 only; touches no process group."""
    from torch.utils.data import DataLoader

    from opensloth._debug_dataloader import debug_chat_dataloader_for_training

    columns = [c for c in ("input_ids", "labels", "seq_lengths") if c in train_dataset.column_names]
    loader = DataLoader(train_dataset.select_columns(columns), batch_size=config.per_device_batch_size,
                        collate_fn=trainer.data_collator)
    paths = debug_chat_dataloader_for_training(loader, trainer.processing_class, config.debug_dataloader,
                                               out_dir=".log", name=config.run_name(world_size))
    for path in paths:
        say(f"[opensloth] batch preview: {path}")
    return paths


# ------------------------------------------------------------------------------------------------ summary


def _interval_mean(history: list[dict], key: str) -> float | None:
    """Mean of a per-interval figure over the run, weighted by the optimizer steps each interval covers (training
    logs only: an evaluation's log entry can carry the figures of the steps before it too)."""
    total, weight, last_step = 0.0, 0, 0
    for entry in history:
        if key in entry and entry.get("step") is not None and "eval_loss" not in entry:
            steps = max(1, int(entry["step"]) - last_step)
            total += float(entry[key]) * steps
            weight += steps
            last_step = int(entry["step"])
    return total / weight if weight else None


def summarize_run(trainer, train_output, *, config: TrainConfig, world_size: int, backend: str, seconds: float,
                  resumed_from: int | None, eval_loss: float | None, data_info: dict) -> dict:
    history = list(trainer.state.log_history)
    losses = [(int(e["step"]), float(e["loss"])) for e in history if "loss" in e and "step" in e]
    output_dir = trainer.args.output_dir
    events = sorted(glob.glob(os.path.join(output_dir, "runs", "**", "events.out.tfevents.*"), recursive=True))
    checkpoints = sorted(glob.glob(os.path.join(output_dir, "checkpoint-*")),
                         key=lambda p: int(p.rsplit("-", 1)[-1]) if p.rsplit("-", 1)[-1].isdigit() else -1)
    metrics = dict(train_output.metrics) if train_output is not None else {}
    return {
        "run_name": config.run_name(world_size),
        "output_dir": output_dir,
        "world_size": world_size,
        "backend": backend,
        "packing": config.packing,
        "patches": config.patches,
        "preset": config.preset,
        "model": config.model_name if config.preset is None else f"preset:{config.preset}",
        "dataset": config.dataset if not config.skip_prepare else config.prepared_dataset_path,
        "global_step": int(trainer.state.global_step),
        "max_steps": int(trainer.state.max_steps),
        "epoch": float(trainer.state.epoch or 0.0),
        "resumed_from_step": resumed_from,
        "first_logged_step": losses[0][0] if losses else None,
        "first_train_loss": losses[0][1] if losses else None,
        "final_train_loss": losses[-1][1] if losses else None,
        "train_loss_mean": metrics.get("train_loss"),
        "final_eval_loss": eval_loss,
        "train_runtime_s": metrics.get("train_runtime"),
        "wall_time_s": seconds,
        "tokens_per_sec_per_gpu": _interval_mean(history, "opensloth/tokens_per_sec_per_gpu"),
        "real_token_fraction": _interval_mean(history, "opensloth/real_token_fraction"),
        "rank_work_max_over_mean": _interval_mean(history, "opensloth/rank_work_max_over_mean"),
        "tensorboard_event_files": events,
        "checkpoints": checkpoints,
        "data": data_info,
    }


def format_summary(summary: dict) -> str:
    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    rows = [
        ("run", f"{summary['run_name']} ({summary['world_size']} process(es), {summary['backend']}, "
                f"packing={summary['packing']}, patches={'on' if summary['patches'] else 'off'})"),
        ("steps", f"{summary['global_step']} of {summary['max_steps']} (epoch {summary['epoch']:.2f})"
                  + (f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else "")),
        ("time", f"{num(summary['train_runtime_s'], '.1f')} s training, {summary['wall_time_s']:.1f} s in all"),
        ("tokens/s/GPU", num(summary["tokens_per_sec_per_gpu"], ",.0f")),
        ("real-token fraction", num(summary["real_token_fraction"], ".3f")),
        ("rank work max/mean", num(summary["rank_work_max_over_mean"], ".3f")),
        ("train loss", f"{num(summary['first_train_loss'], '.4f')} (step {summary['first_logged_step']}) -> "
                       f"{num(summary['final_train_loss'], '.4f')} (final)"),
        ("eval loss", num(summary["final_eval_loss"], ".4f")),
        ("output", summary["output_dir"]),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(["", "OpenSloth run summary:"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def _final_eval_loss(trainer, has_eval: bool) -> float | None:
    if not has_eval:
        return None
    history = trainer.state.log_history
    for entry in reversed(history):
        if "eval_loss" in entry:
            if entry.get("step") == trainer.state.global_step:
                return float(entry["eval_loss"])
            break
    return float(trainer.evaluate()["eval_loss"])


def _resume_path(config: TrainConfig, output_dir: str) -> str | None:
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint != "latest":
        return config.resume_from_checkpoint
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        raise RunError(f"--resume_from_checkpoint latest: no checkpoint-N folder in {output_dir}")
    return last


# ------------------------------------------------------------------------------------------------ main


def run(config: TrainConfig, sources: dict[str, str]) -> dict:
    """Train as configured; returns the summary (also written to <output_dir>/run_summary.json by rank 0)."""
    from opensloth.distributed import read_dist_env, setup_logging

    t_start = time.perf_counter()
    env = read_dist_env()
    world_size = env.world_size
    backend = resolve_backend(config.backend)
    setup_logging()
    if config.preset is not None and backend == "hf" and not _cuda_available() and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)  # a tiny model's ops are too small to split: threads only contend (3-4x slower)
    say(describe_config(config, sources, world_size=world_size, backend=backend))

    if config.patches:
        from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples

        ddp_patch(balance_ranks=False)  # the balanced sampler is --packing balanced's business
        patch_optimize_sft_trainer_batch_samples()
    else:
        if world_size > 1 and not _cuda_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # gloo DDP on CPU (ddp_patch does this when on)
        say("[opensloth] patches off: plain transformers/TRL DDP" if world_size > 1 else
            "[opensloth] patches off")
    say("[opensloth] " + batch_size_guidance(config, world_size, backend))

    training_args = make_training_args(config, world_size, backend)  # initialises the process group under torchrun
    model, tokenizer = load_model(config, backend, env.local_rank)
    wiring = wire_collator(config, model, tokenizer, backend)
    train_dataset, eval_dataset, data_info = prepare_datasets(config, tokenizer, world_size)
    data_info["batch_layout"] = wiring.layout
    say(f"[opensloth] data: {len(train_dataset)} training "
        f"{'rows' if config.packing in ('packed', 'balanced') else 'samples'}"
        + (f", {len(eval_dataset)} evaluation" if eval_dataset is not None else ", no evaluation"))

    trainer = build_trainer(config, model, tokenizer, train_dataset, eval_dataset, training_args, backend, wiring)
    if config.debug_dataloader and is_main_process():
        write_debug_pages(trainer, train_dataset, config, world_size)
    resume = _resume_path(config, training_args.output_dir)
    resumed_from = None
    if resume is not None:
        state_file = Path(resume) / "trainer_state.json"
        if state_file.is_file():
            resumed_from = int(json.loads(state_file.read_text()).get("global_step", 0))
        say(f"[opensloth] resuming from {resume} (step {resumed_from})")

    say("[opensloth] training...")
    train_output = trainer.train(resume_from_checkpoint=resume)
    eval_loss = _final_eval_loss(trainer, eval_dataset is not None)
    trainer.save_model(training_args.output_dir)

    summary = summarize_run(trainer, train_output, config=config, world_size=world_size, backend=backend,
                            seconds=time.perf_counter() - t_start, resumed_from=resumed_from, eval_loss=eval_loss,
                            data_info=data_info)
    if trainer.is_world_process_zero():
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(training_args.output_dir) / SUMMARY_FILE, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2, default=str)
        print(format_summary(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config, sources = parse_args(argv)
    if config.print_config:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        print(describe_config(config, sources, world_size=world_size, backend=None))
        return 0
    try:
        run(config, sources)
    except RunError as exc:
        print(f"train_configurable.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _shutdown_process_group()
    return 0


def _shutdown_process_group() -> None:
    torch = sys.modules.get("torch")
    if torch is None:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
