"""`opensloth train`: configurable SFT training, one process or many (torchrun + DDP), Unsloth or transformers + peft.

    opensloth train --preset tiny                                          # CPU, offline, < 2 min
    torchrun --no-python --nproc_per_node=2 opensloth train --preset tiny  # 2 processes (gloo on CPU)
    torchrun --nproc_per_node=4 -m opensloth train \\
        --model_name unsloth/Qwen3-0.6B-bnb-4bit --per_device_batch_size 2   # 4 GPUs, Unsloth, Capybara

`python -m opensloth train` and the repository's `python train_scripts/train_configurable.py` run the same code.
Every flag is listed by --help and in TRAINING_README.md. The run writes outputs/<experiment>_ws<N>[_nopatches]/:
checkpoints, TensorBoard events (runs/), the final model, and run_summary.json with the figures printed at the end.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Nothing below imports torch, transformers, trl or peft at module level: Unsloth must be imported first when used.
from opensloth.config import TrainConfig, build_parser, dataset_problem, resolve_config
from opensloth.data.records import read_chat_records
from opensloth.distributed import shutdown_process_group

PROG = "opensloth train"
SUMMARY_FILE = "run_summary.json"
CONFIG_FILE = "run_config.json"  # the resolved configuration, written when training starts
# Bump when the prepared data change (part of the cache key). 2: rows packed "best"; 3: records that train no token
# dropped (their counts stored in the cache's metadata).
DATA_FORMAT = 3


class RunError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do."""


class RunInterrupted(Exception):
    """Training was interrupted (Ctrl-C); the message says where it stopped and how to continue."""


# ------------------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None, *, prog: str = PROG) -> tuple[TrainConfig, dict[str, str]]:
    """Parse and validate the flags; an invalid value exits with an argparse error naming the flag."""
    config, sources, _ = parse_flags(build_parser(prog=prog, description=__doc__), argv)
    return config, sources


def parse_flags(parser, argv: list[str] | None) -> tuple[TrainConfig, dict[str, str], Any]:
    """`(config, sources, namespace)` from a `build_parser` parser (which may carry a command's own flags, left in
    the namespace); every problem `TrainConfig.problems` finds is an argparse error naming the flag."""
    namespace = parser.parse_args(argv)
    config, sources = resolve_config(namespace)
    problems = config.problems(sources)
    if problems:
        flag, message = problems[0]
        more = f" (and {len(problems) - 1} more problem(s): " + "; ".join(f"{f} {m}" for f, m in problems[1:]) + ")" \
            if len(problems) > 1 else ""
        parser.error(f"argument {flag}: {message}{more}")
    return config, sources, namespace


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


def check_machine(config: TrainConfig, backend: str | None = None) -> str:
    """The runtime checks of a run, in one place: resolve --backend on this machine (`resolve_backend`, unless
    `backend` is given) and fail with a `RunError` on what this machine cannot run, before the process group, the
    model or the data are touched. Returns the backend. (The flags themselves are checked by `TrainConfig.problems`;
    the model's layer names by `check_lora_targets` once it is loaded.)"""
    if backend is None:
        backend = resolve_backend(config.backend)
    if _cuda_available():
        return backend
    if backend == "hf" and config.attn_implementation in ("flash_attention_2", "flex_attention"):
        raise RunError(f"--attn_implementation {config.attn_implementation} needs a CUDA GPU (on a CPU its backward "
                       f"is not supported); use sdpa or eager here")
    if backend == "hf" and config.preset is None and "bnb-4bit" in config.model_name:
        raise RunError(f"--model_name {config.model_name} is a 4-bit bitsandbytes checkpoint, which needs a CUDA GPU; "
                       f"on a CPU use a 16-bit model (e.g. --model_name Qwen/Qwen3-0.6B) or --preset tiny")
    if config.ddp_backend == "nccl":
        raise RunError("--ddp_backend nccl needs CUDA GPUs and none is visible; use --ddp_backend gloo or auto")
    return backend


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
    """(model, tokenizer) with LoRA adapters (or all weights trainable when --lora_r 0); `check_machine` has said
    that this machine can run them."""
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


def _read_json_records(path: Path, on_error: str = "raise") -> list[dict]:
    try:
        return read_chat_records(path, on_error=on_error)
    except ValueError as exc:
        raise RunError(f"--dataset: {exc}".replace("pass on_error='skip'", "pass --on_error skip")) from None


def check_dataset_spec(spec: str) -> None:
    """The --dataset check of `TrainConfig.problems` again when the data are read (a file may have gone since the
    flags were parsed): before any cache or hub is touched."""
    problem = dataset_problem(spec)
    if problem is not None:
        raise RunError(f"--dataset {spec}: {problem}")


def dataset_identity(spec: str, seed: int, *, contents: bool = True) -> dict:
    """What identifies the raw data: for a file or folder, each file's name, size and (with `contents`, as the cache
    key needs) SHA-256; the name for hub data."""
    path = Path(spec)
    if spec == "synthetic":
        from opensloth.presets.synthetic import LENGTH_MEDIAN, LENGTH_SIGMA

        return {"kind": "synthetic", "seed": seed, "median": LENGTH_MEDIAN, "sigma": LENGTH_SIGMA}
    if path.exists():
        from opensloth.data.cache import file_sha256

        files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
        return {"kind": "path", "path": str(path.resolve()),
                "files": [[str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size]
                          + ([file_sha256(p)] if contents else []) for p in files]}
    return {"kind": "hub", "name": spec}


def load_records(spec: str, train_samples: int, test_samples: int, seed: int, on_error: str = "raise"):
    """(train records, eval records or None): the first `train_samples` and the next `test_samples` records."""
    if spec == "synthetic":
        from opensloth.presets import tiny_datasets

        train, test = tiny_datasets(train_samples, test_samples, seed=seed)
        return train, (test or None)
    check_dataset_spec(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in (".parquet", ".csv"):
        from datasets import load_dataset

        records: Any = load_dataset(path.suffix.lower()[1:], data_files=str(path), split="train")
    elif path.is_file():
        records = _read_json_records(path, on_error)
    elif path.is_dir():
        from datasets import DatasetDict, load_from_disk

        records = load_from_disk(str(path))
        if isinstance(records, DatasetDict):
            if "train" not in records:
                raise RunError(f"--dataset {spec}: the DatasetDict has no 'train' split ({list(records)})")
            records = records["train"]
    else:
        from datasets import load_dataset

        try:
            records = load_dataset(spec, split=f"train[:{train_samples + test_samples}]")
        except Exception as exc:  # noqa: BLE001 - network, offline mode, missing dataset: one clear message
            raise RunError(
                f"--dataset {spec}: could not load it from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
                f"Give a JSONL file of chat records, a save_to_disk folder, or train offline with --preset tiny"
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
    if config.dataset != "synthetic":
        check_dataset_spec(config.dataset)  # before the cache: a missing file leaves nothing behind
    # Filled by build() and stored in the cache's metadata (rank_zero_build_and_load merges it after building), so
    # that every rank, and every later run that loads this cache, reports what was dropped and why.
    built_stats: dict[str, Any] = {}

    def build() -> dict:
        train_records, eval_records = load_records(config.dataset, config.train_samples, config.test_samples,
                                                   config.seed, on_error=config.on_error)
        out = {"train": _tokenize_split(config, tokenizer, train_records, "train", built_stats)}
        if eval_records is not None:
            val = _tokenize_split(config, tokenizer, eval_records, "eval", built_stats)
            if val is not None:
                out["val"] = val
        if packed:
            from opensloth.data.packed import build_packed_dataset

            out = {k: build_packed_dataset(v, config.max_seq_length, strategy="best") for k, v in out.items()}
        return out

    from opensloth.data.chat import CHAT_FORMAT_VERSION

    material = {
        "format": DATA_FORMAT,
        "chat_format": CHAT_FORMAT_VERSION,  # what a record renders to and trains (opensloth.data.chat)
        "dataset": dataset_identity(config.dataset, config.seed),
        "train_samples": config.train_samples,
        "test_samples": config.test_samples,
        "tokenizer": tokenizer_identity(tokenizer),
        "max_seq_length": config.max_seq_length,
        "packed": packed,
        "all_tokens": config.all_tokens,
        "on_error": config.on_error,  # skip drops malformed records: a cache built so must not serve a strict run
    }
    from opensloth.data.cache import make_cache_key

    name = Path(config.dataset).stem if Path(config.dataset).exists() else config.dataset.replace("/", "_")
    path = Path(config.cache_dir) / f"prepared-{name}-{make_cache_key(material)}"
    from opensloth.data.cache import CacheBuildError

    try:
        loaded, meta, built = rank_zero_build_and_load(path, material, build, CacheConfig(cache_dir=config.cache_dir),
                                                       extra_metadata=built_stats)
    except CacheBuildError as exc:
        raise RunError(str(exc)) from None
    info.update({"cache": str(path), "built_here": built})
    stats = meta.get("opensloth_data_stats") or {}
    report_data_stats(config, stats)
    info["records"] = stats
    return loaded["train"], loaded.get("val"), info


def _tokenize_split(config: TrainConfig, tokenizer, records, split: str, built_stats: dict):
    """One split tokenised for training; records that train no token are dropped. A training split with nothing
    to train stops the run saying why; an evaluation split with nothing to evaluate is left out (None)."""
    from opensloth.data.chat import ChatFormatError, NothingToTrainError, TemplateDropsToolsError, tokenize_chat_dataset

    stats_all = built_stats.setdefault("opensloth_data_stats", {})
    try:
        ds, stats = tokenize_chat_dataset(records, tokenizer, desc=split, max_seq_length=config.max_seq_length,
                                          assistant_only=not config.all_tokens, num_proc=config.dataset_num_proc,
                                          on_error=config.on_error, return_stats=True)
    except NothingToTrainError as exc:
        if split == "train":
            raise RunError(nothing_to_train(config, exc.stats, "training")) from None
        stats_all[split] = {**exc.stats.as_dict(), "left_out": nothing_to_train(config, exc.stats, "evaluation")}
        return None
    except ChatFormatError as exc:
        raise RunError(f"--dataset {config.dataset}: {exc}".replace("pass on_error='skip'", "pass --on_error skip")
                       + ("" if config.on_error == "skip" or isinstance(exc, TemplateDropsToolsError) else
                          "; fix the record, or drop such records with --on_error skip (counted)")) from None
    except ValueError as exc:  # every record skipped, empty dataset
        raise RunError(f"--dataset {config.dataset} ({split}): {exc}") from None
    stats_all[split] = {**stats.as_dict(), "skip_reasons": dict(list(stats.skip_reasons.items())[:5])}
    return ds


def nothing_to_train(config: TrainConfig, stats, what: str) -> str:
    """Why no record of a split trains a token, and what to change, in the script's flags."""
    lines = [f"none of the {stats.records_in} {what} records of --dataset {config.dataset} has a trained token"]
    fixes = []
    if stats.no_trained_by_truncation:
        lines.append(f"{stats.no_trained_by_truncation} lost every answer to truncation at --max_seq_length "
                     f"{config.max_seq_length}: their first answer token is at position {stats.first_answer_min} "
                     f"at the earliest, {stats.first_answer_median} at the median")
        fixes.append(f"raise --max_seq_length (above {stats.first_answer_min}; {stats.first_answer_median + 1} keeps "
                     f"half of them)")
    other = stats.dropped_no_trained - stats.no_trained_by_truncation
    if other:
        lines.append(f"{other} have no trained token even untruncated (an empty answer, or a chat template whose "
                     f"assistant turns render no text)")
        fixes.append("check the records' assistant turns and the tokenizer's chat template")
    if stats.skipped:
        lines.append(f"{stats.skipped} were skipped as malformed (--on_error skip)")
    if not config.all_tokens:
        fixes.append("or train on every token with --all_tokens")
    return "; ".join(lines) + (". To train on them: " if what == "training" else ". To evaluate on them: ") \
        + ", ".join(fixes)


def report_data_stats(config: TrainConfig, stats: dict) -> None:
    """Tell the terminal what preparing the data dropped, split by split."""
    for split, st in sorted(stats.items(), key=lambda kv: kv[0] != "train"):
        if st.get("left_out"):
            say(f"[opensloth] no evaluation: {st['left_out']}")
            continue
        if st.get("skipped"):
            reasons = "; ".join(list(st.get("skip_reasons") or {})[:2])
            say(f"[opensloth] {split}: skipped {st['skipped']} malformed record(s) of {st['records_in']} "
                f"(--on_error skip), e.g. {reasons}")
        if st.get("dropped_no_trained"):
            cut = st.get("no_trained_by_truncation") or 0
            half = (st.get("first_answer_median") or 0) + 1
            why = (f"{cut} lost every answer to truncation at --max_seq_length {config.max_seq_length} (raising it "
                   f"above {st.get('first_answer_min')} keeps the first of them, to {half} half of them)"
                   if cut else "")
            other = st["dropped_no_trained"] - cut
            if other:
                why += ("; " if why else "") + f"{other} have no trained token even untruncated"
            say(f"[opensloth] {split}: dropped {st['dropped_no_trained']} of {st['records_in']} records that train "
                f"no token: {why}")


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
    if config.ddp_backend != "auto" and world_size > 1:  # one process has no process group to give a backend
        kwargs["ddp_backend"] = config.ddp_backend
    return SFTConfig(**kwargs)


def build_trainer(config: TrainConfig, model, tokenizer, train_dataset, eval_dataset, training_args, backend: str,
                  wiring):
    from opensloth.patching.sft_trainer import sft_trainer_class

    trainer_cls = sft_trainer_class()  # logs when it is the model-loss subclass (no triton)
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=wiring.collator,
    )
    wiring.attach(trainer)
    if config.packing == "balanced":
        from opensloth.patching.dataloader import use_balanced_sampler

        # rows padded to capacity (the hf rows layout) count their padding as work; flat rows have none
        use_balanced_sampler(trainer, row_capacity=config.max_seq_length if wiring.layout in ("rows", "masked_rows")
                             else None)
    from opensloth.metrics import attach_step_figures

    attach_step_figures(trainer)  # observes batches only: tokens/s/GPU, real-token fraction, rank balance
    trainer.add_callback(final_step_log_callback())
    return trainer


def final_step_log_callback():
    """A TrainerCallback that logs the last optimizer step on its own, whatever --logging_steps is: a log at the
    step before the last (unless already due) and one at the last, so the final logged loss is the last step's
    (the Trainer logs the mean loss since the previous log)."""
    from transformers import TrainerCallback

    class FinalStepLog(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps - 1:
                control.should_log = True
            return control

    return FinalStepLog()


def debug_batches(trainer, train_dataset, config: TrainConfig, rank: int, world_size: int, n: int | None = None):
    """This rank's first `n` (default --debug_dataloader) micro-batches, built without touching the training's RNG or
    process group: with --packing balanced the balanced sampler's plan (deterministic, every rank's micro-batches
    interleaved: rank r trains the r-th of every world_size); otherwise the data in order, micro-batch i going to
    rank i % world_size (the Trainer shuffles the order it trains in). Returns (batches, what they are)."""
    n = config.debug_dataloader if n is None else n
    columns = [c for c in ("input_ids", "labels", "seq_lengths") if c in train_dataset.column_names]
    data = train_dataset.select_columns(columns)
    from opensloth.patching.state import trainer_state

    state = trainer_state(trainer, create=False)
    sampler = state.sampler if state is not None else None
    if sampler is not None:
        mine = [mb.tolist() for mb in sampler.plan(0).rank_batches(rank, 0)]
        order = "its micro-batches in training order (the balanced sampler's plan of epoch 0)"
    else:
        bs = config.per_device_batch_size
        mine = [list(range(i, min(i + bs, len(data)))) for i in range(0, len(data), bs)][rank::world_size]
        order = ("micro-batches of the data in dataset order" + (f", every {world_size}th from the {rank}th"
                                                                 if world_size > 1 else "")
                 + " (training shuffles this order)")

    def batches():
        for indices in mine[:n]:
            yield trainer.data_collator([data[int(j)] for j in indices])

    return batches(), order


def write_debug_pages(trainer, train_dataset, config: TrainConfig, rank: int, world_size: int, *,
                      n: int | None = None, out_dir: str = ".log") -> list[str]:
    """HTML pages of this rank's first `n` (default --debug_dataloader) training micro-batches (`debug_batches`),
    through the trainer's collator, under <out_dir>/<run name>_rank<r>_batch_<k>.html. Every rank writes its own;
    touches no process group."""
    from opensloth._debug_dataloader import debug_chat_dataloader_for_training

    n = config.debug_dataloader if n is None else n
    loader, order = debug_batches(trainer, train_dataset, config, rank, world_size, n)
    paths = debug_chat_dataloader_for_training(loader, trainer.processing_class, n, out_dir=out_dir,
                                               name=config.run_name(world_size), rank=rank,
                                               note=f"Rank {rank} of {world_size}: {order}.")
    if paths:
        print(f"[opensloth] rank {rank}: {len(paths)} batch preview(s): {', '.join(paths)}", flush=True)
    return paths


# ------------------------------------------------------------------------------------------------ summary


def _interval_mean(history: list[dict], key: str, resumed_from: int | None = None) -> float | None:
    """Mean of a per-interval figure over the run, weighted by the optimizer steps each interval covers (training
    logs only: an evaluation's log entry can carry the figures of the steps before it too). A resumed run's history
    starts with the logs its checkpoint kept; its first own log covers the steps after `resumed_from` only, and the
    steps between the checkpoint's last log and the checkpoint were never logged, so they count in no interval."""
    total, weight, last_step = 0.0, 0, 0
    for entry in history:
        if key in entry and entry.get("step") is not None and "eval_loss" not in entry:
            if resumed_from is not None and last_step < resumed_from < int(entry["step"]):
                last_step = resumed_from
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
        # FinalStepLog makes the last log cover the last optimizer step alone
        "final_train_loss": losses[-1][1] if losses else None,
        "final_logged_step": losses[-1][0] if losses else None,
        # the Trainer's train_loss divides this process's loss sum by every step, the resumed-over ones included
        "train_loss_mean": _interval_mean(history, "loss", resumed_from),
        "final_eval_loss": eval_loss,
        "train_runtime_s": metrics.get("train_runtime"),
        "wall_time_s": seconds,
        "tokens_per_sec_per_gpu": _interval_mean(history, "opensloth/tokens_per_sec_per_gpu", resumed_from),
        "real_token_fraction": _interval_mean(history, "opensloth/real_token_fraction", resumed_from),
        "rank_work_max_over_mean": _interval_mean(history, "opensloth/rank_work_max_over_mean", resumed_from),
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
                       f"{num(summary['final_train_loss'], '.4f')} (step {summary.get('final_logged_step')}, "
                       f"final)"),
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


# What a run writes at the top of its output folder (besides checkpoint-N folders and runs/), removed by
# --overwrite_output_dir: the summary, the stored configuration and the final model with its tokenizer.
RUN_FILES = (SUMMARY_FILE, CONFIG_FILE, "training_args.bin", "config.json", "generation_config.json",
             "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
             "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
             "vocab.json", "merges.txt", "tokenizer.model")


def run_artifacts(output_dir: str | os.PathLike) -> list[str]:
    """What in `output_dir` shows that a run already wrote there: checkpoint-N folders, the summary, the stored
    configuration, TensorBoard event files (names relative to the folder; empty when none)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())
    found += [name for name in (SUMMARY_FILE, CONFIG_FILE) if (folder / name).is_file()]
    if any((folder / "runs").rglob("events.out.tfevents.*")):
        found.append("runs/")
    return found


def stored_run_config(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); delete it or give --overwrite_output_dir") from None


def curve_record(config: TrainConfig, world_size: int) -> dict:
    """The settings a resumed run must share with the run that wrote its checkpoint (the data by size only: copying
    a file keeps it the same data)."""
    out = config.curve_settings(world_size)
    if config.skip_prepare:
        return out
    ident = dataset_identity(config.dataset, config.seed, contents=False)
    if ident.get("kind") == "path":
        ident = {"kind": ident["kind"], "files": ident["files"]}
    out["data_files"] = ident
    return out


def config_differences(stored: dict, current: dict) -> list[str]:
    keys = sorted(set(stored) | set(current))
    return [f"{k}: {stored.get(k)!r} in the checkpoint's run, {current.get(k)!r} now" for k in keys
            if stored.get(k) != current.get(k)]


def check_output_dir(config: TrainConfig, output_dir: str, world_size: int, resume: str | None) -> None:
    """A new run never writes into a folder that holds another run, unless asked to (--overwrite_output_dir); a
    resumed run continues the run whose checkpoint it loads, with the same curve-changing settings."""
    found = run_artifacts(output_dir)
    if resume is None:
        if found and not config.overwrite_output_dir:
            listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise RunError(
                f"the output folder {output_dir} already holds a run ({listed}); a new run there would mix its "
                f"checkpoints and TensorBoard events with that one's. Continue that run with "
                f"--resume_from_checkpoint latest, start this one elsewhere (--experiment_name NAME or --output_dir "
                f"DIR), or replace it with --overwrite_output_dir")
        return
    run_dir = Path(resume).resolve().parent
    inside = run_dir == Path(output_dir).resolve()
    if config.overwrite_output_dir and inside:
        raise RunError(f"--overwrite_output_dir would delete {output_dir}, which holds the checkpoint {resume} that "
                       f"--resume_from_checkpoint continues; give one of them")
    if found and not inside and not config.overwrite_output_dir:
        raise RunError(
            f"--resume_from_checkpoint {resume} continues the run of {run_dir}, but the output folder {output_dir} "
            f"holds another run ({', '.join(found[:4])}); resume into {run_dir} (--output_dir {run_dir}), into an "
            f"empty folder, or replace that run with --overwrite_output_dir")
    stored = stored_run_config(run_dir)
    if stored is None:
        say(f"[opensloth] warning: {run_dir} has no {CONFIG_FILE} (a run older than this check): cannot tell whether "
            f"its settings match this run's")
        return
    stored_curve, current = dict(stored.get("curve", {})), curve_record(config, world_size)
    if stored_curve.get("dataset") != current.get("dataset"):  # the file sizes say nothing more then
        stored_curve.pop("data_files", None)
        current.pop("data_files", None)
    diffs = config_differences(stored_curve, current)
    if diffs:
        raise RunError(
            f"--resume_from_checkpoint {resume}: this run's settings differ from those of the run that wrote the "
            f"checkpoint ({run_dir / CONFIG_FILE}) in what changes the loss curve: " + "; ".join(diffs)
            + ". Resume with the stored values, or start a new run (another --experiment_name or --output_dir)")


def start_output_dir(config: TrainConfig, sources: dict[str, str], output_dir: str, world_size: int) -> None:
    """Global rank 0, once every rank has checked the folder: clear it for --overwrite_output_dir, then store the
    resolved configuration (`CONFIG_FILE`) that a later resume is checked against."""
    import dataclasses
    import shutil

    folder = Path(output_dir)
    if config.overwrite_output_dir and run_artifacts(folder):  # never the resumed run's own (checked)
        say(f"[opensloth] --overwrite_output_dir: removing the previous run from {folder}")
        for p in list(folder.glob("checkpoint-*")) + [folder / "runs"]:
            shutil.rmtree(p, ignore_errors=True)
        for pattern in RUN_FILES:
            for p in folder.glob(pattern):
                p.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "format": 1,
        "world_size": world_size,
        "curve": curve_record(config, world_size),
        "config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                   if not f.metadata.get("internal")},
        "sources": {k: v for k, v in sources.items() if v != "default"},
    }
    tmp = folder / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, folder / CONFIG_FILE)


def _barrier() -> None:
    torch = sys.modules.get("torch")
    if torch is None:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _resume_path(config: TrainConfig, output_dir: str) -> str | None:
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint != "latest":
        return config.resume_from_checkpoint
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        hint = ""
        if config.output_dir is None:  # the run's folder is named after the world size: a run of another size?
            others = sorted(str(p) for p in Path(output_dir).parent.glob(f"{config.experiment_name}_ws*")
                            if p.is_dir() and get_last_checkpoint(str(p)) is not None)
            if others:
                hint = (f"; the checkpoints of this experiment on another number of processes are in "
                        f"{', '.join(others)}: continue one there with --output_dir {others[-1]}")
        raise RunError(f"--resume_from_checkpoint latest: no checkpoint-N folder in {output_dir}{hint}")
    return last


# ------------------------------------------------------------------------------------------------ main


@dataclass
class RunSetup:
    """Everything a run builds before its first step (`setup_run`): what `run` trains and `opensloth inspect`
    previews."""

    env: Any  # opensloth.distributed.DistEnv
    backend: str
    training_args: Any
    model: Any
    tokenizer: Any
    wiring: Any
    train_dataset: Any
    eval_dataset: Any
    data_info: dict
    trainer: Any
    resume: str | None = None


def check_items_per_process(n_items: int, world_size: int, per_device_batch_size: int, packing: str) -> str | None:
    """Raise RunError when there are fewer training items than processes; return a note when the last step of an
    epoch has to repeat items so that every process gets a full micro-batch (accelerate pads it with items from the
    start of the epoch; the balanced sampler gives the leftover items instead, repeating only to avoid an empty
    micro-batch), None otherwise."""
    unit = "rows" if packing in ("packed", "balanced") else "samples"
    if n_items < world_size:
        raise RunError(f"{n_items} training {unit} for {world_size} processes: every process needs at least one; use "
                       f"at most {n_items} processes, or more data (--train_samples)")
    if world_size == 1 or packing == "balanced":
        return None
    step = world_size * per_device_batch_size
    repeated = -n_items % step
    if repeated == 0:
        return None
    return (f"{n_items} training {unit} do not fill the last step of {world_size} processes x "
            f"{per_device_batch_size}: {repeated} of them are trained twice per epoch (the last micro-batches are "
            f"padded with {unit} from the start). Use a multiple of {step} {unit}, or --packing balanced")


def setup_run(config: TrainConfig, sources: dict[str, str], *, output: bool = True) -> RunSetup:
    """Check the machine, apply the patches, then build the training arguments (which start the process group under
    torchrun), the model, the data and the trainer, as a training run does. `output=False` (inspect) leaves the
    output folder alone: no check that it is free, no checkpoint to resume."""
    from opensloth.distributed import read_dist_env, setup_logging

    env = read_dist_env()
    world_size = env.world_size
    backend = check_machine(config)
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
    resume = None
    if output:
        say("[opensloth] " + batch_size_guidance(config, world_size, backend))
        output_dir = config.resolved_output_dir(world_size)
        resume = _resume_path(config, output_dir)
        check_output_dir(config, output_dir, world_size, resume)  # every rank, before anything is written

    training_args = make_training_args(config, world_size, backend)  # initialises the process group under torchrun
    model, tokenizer = load_model(config, backend, env.local_rank)
    wiring = wire_collator(config, model, tokenizer, backend)
    train_dataset, eval_dataset, data_info = prepare_datasets(config, tokenizer, world_size)
    data_info["batch_layout"] = wiring.layout
    from opensloth.wiring import check_packed_dataset

    try:
        check_packed_dataset(train_dataset, config.max_seq_length)
    except ValueError as exc:
        raise RunError(f"--max_seq_length: {exc}") from None
    if eval_dataset is None and training_args.eval_strategy != "no":
        training_args.eval_strategy = "no"  # the evaluation records had nothing to evaluate (said above)
        training_args.do_eval = False
    say(f"[opensloth] data: {len(train_dataset)} training "
        f"{'rows' if config.packing in ('packed', 'balanced') else 'samples'}"
        + (f", {len(eval_dataset)} evaluation" if eval_dataset is not None else ", no evaluation"))
    repeat_note = check_items_per_process(len(train_dataset), world_size, config.per_device_batch_size,
                                          config.packing)
    if repeat_note:
        say(f"[opensloth] {repeat_note}")

    trainer = build_trainer(config, model, tokenizer, train_dataset, eval_dataset, training_args, backend, wiring)
    return RunSetup(env=env, backend=backend, training_args=training_args, model=model, tokenizer=tokenizer,
                    wiring=wiring, train_dataset=train_dataset, eval_dataset=eval_dataset, data_info=data_info,
                    trainer=trainer, resume=resume)


def interrupted_message(state, output_dir: str) -> str:
    """Where an interrupted run stopped, and how to continue it from its newest checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    where = f"interrupted at step {state.global_step} of {state.max_steps}"
    if last is None:
        return f"{where}; no checkpoint was saved yet, so running the command again starts over"
    return (f"{where}; the newest checkpoint is {last}: continue with the same command and "
            f"--resume_from_checkpoint latest")


def run(config: TrainConfig, sources: dict[str, str]) -> dict:
    """Train as configured; returns the summary (also written to <output_dir>/run_summary.json by rank 0)."""
    t_start = time.perf_counter()
    setup = setup_run(config, sources)
    env, trainer, training_args, resume = setup.env, setup.trainer, setup.training_args, setup.resume
    world_size = env.world_size
    if config.debug_dataloader:
        write_debug_pages(trainer, setup.train_dataset, config, env.rank, world_size)
    _barrier()  # every rank has checked the output folder: rank 0 may now clear it and write into it
    if trainer.is_world_process_zero():
        start_output_dir(config, sources, training_args.output_dir, world_size)
    resumed_from = None
    if resume is not None:
        state_file = Path(resume) / "trainer_state.json"
        if state_file.is_file():
            resumed_from = int(json.loads(state_file.read_text()).get("global_step", 0))
        say(f"[opensloth] resuming from {resume} (step {resumed_from})")

    say("[opensloth] training...")
    try:
        train_output = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted_message(trainer.state, training_args.output_dir)) from None
    eval_loss = _final_eval_loss(trainer, setup.eval_dataset is not None)
    trainer.save_model(training_args.output_dir)

    summary = summarize_run(trainer, train_output, config=config, world_size=world_size, backend=setup.backend,
                            seconds=time.perf_counter() - t_start, resumed_from=resumed_from, eval_loss=eval_loss,
                            data_info=setup.data_info)
    if trainer.is_world_process_zero():
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(training_args.output_dir) / SUMMARY_FILE, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2, default=str)
        print(format_summary(summary), flush=True)
    return summary


def print_config(config: TrainConfig, sources: dict[str, str]) -> int:
    """--print_config: the resolved configuration, for the world size torchrun gives (WORLD_SIZE)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    print(describe_config(config, sources, world_size=world_size, backend=None))
    return 0


def run_command(prog: str, action) -> int:
    """Run `action()` as a command: a `RunError` is one line on stderr and exit status 2, Ctrl-C one line (rank 0's)
    and status 130 (the shell's for SIGINT); the process group, if one was started, is shut down either way."""
    _stacks_on_fatal_signal()
    finished = False
    try:
        action()
        finished = True
    except RunError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (RunInterrupted, KeyboardInterrupt) as exc:  # every rank gets Ctrl-C; one says so
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"{prog}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        shutdown_process_group(wait_for_peers=finished)
    return 0


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """`opensloth train [flags]`: 0 when the run finished, 2 for a bad flag (argparse) or a run that cannot start or
    go on (the message says why)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config, sources = parse_args(argv, prog=prog)
    if config.print_config:
        return print_config(config, sources)
    return run_command(prog, lambda: run(config, sources))


def _stacks_on_fatal_signal() -> None:
    """Under torchrun, print every thread's Python stack if this rank dies of a fatal signal. Three CI runs saw a rank
    of a finished CPU run abort (SIGABRT) with only C++'s "terminate called without an active exception" to go on;
    not reproduced in 275 runs of the command here, loaded or not (see `shutdown_process_group`)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        import faulthandler

        if not faulthandler.is_enabled():
            faulthandler.enable(all_threads=True)


if __name__ == "__main__":
    sys.exit(main())
