"""`opensloth precompute`: tokenise (and optionally pack) a chat dataset once, for every later training run to load.

    opensloth precompute --data chats.jsonl --tokenizer Qwen/Qwen3-0.6B \\
        --max_seq_length 4096 --val_size 0.05 --pack 4096 --name chats_qwen3_4k

(`python -m opensloth precompute` and the repository's `python train_scripts/precompute_dataset.py` are the same.)

writes `data/precomputed/<name>/train`, `.../val` (datasets `save_to_disk` folders) and `metadata.json` (the
arguments, the sources and their checksums, the tokenizer's identity, formatting/truncation/packing counts). The
folder is written under a temporary name and renamed into place, so an interrupted run leaves nothing that
looks complete. Training scripts load it with `--skip_prepare --prepared_dataset_path data/precomputed/<name>`
(`opensloth.data.cache.load_prepared_dataset`).

`--data` takes JSONL/JSON files of chat records (`messages`, with `tool_calls`, `tool` turns and a per-record
`tools` list; Capybara's `conversation`; ShareGPT's `conversations`; see TRAINING_README.md "Record schemas") or
folders written by `datasets.save_to_disk`. File records keep their nested values exactly as written; a bad
record is named by file and line. Tools shared by every record without its own: `--template_kwargs '{"tools": [...]}'`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from opensloth.config import dataset_problem
from opensloth.data.cache import file_sha256
from opensloth.data.records import read_chat_records

PROG = "opensloth precompute"


def parse_args(argv=None, *, prog: str | None = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True,
                   help="JSONL/JSON files or save_to_disk folders; several are concatenated")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or hub name (HF_HUB_OFFLINE is honoured)")
    p.add_argument("--name", default=None, help="output folder name (default: the data names joined by '+')")
    p.add_argument("--output_dir", default="data/precomputed", help="parent folder of <name>")
    p.add_argument("--max_seq_length", type=int, default=4096,
                   help="truncate longer conversations to this many tokens (0: no limit)")
    p.add_argument("--overflow", choices=("truncate", "drop"), default="truncate",
                   help="what happens to a conversation longer than --max_seq_length")
    p.add_argument("--all_tokens", action="store_true",
                   help="train on every token (default: assistant turns only, content + end-of-turn token)")
    p.add_argument("--on_error", choices=("raise", "skip"), default="raise",
                   help="a malformed record (or a file line that is not a JSON object) stops the run (raise) or is "
                        "skipped and counted (skip)")
    p.add_argument("--template_kwargs", default="{}",
                   help='JSON of extra apply_chat_template arguments, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--val_data", nargs="*", default=None, help="separate validation sources (same forms as --data)")
    p.add_argument("--val_size", type=float, default=0.0,
                   help="hold out this fraction (< 1) or number (>= 1) of the --data records for validation")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed for --val_size")
    p.add_argument("--max_records", type=int, default=None, help="use only the first N records (quick trials)")
    p.add_argument("--num_proc", type=int, default=None, help="worker processes for tokenisation")
    p.add_argument("--pack", type=int, default=None, metavar="CAPACITY",
                   help="also pack the tokenised samples into rows of at most CAPACITY tokens "
                        "(opensloth.data.packed.build_packed_dataset)")
    p.add_argument("--pack_strategy", default="best", choices=("best", "bfd", "exact_fit", "ffd"),
                   help="how --pack fills rows: 'best' (fewer rows of bfd and exact_fit), 'bfd' (TRL's rows), "
                        "'exact_fit', 'ffd' (opensloth.packing.pack_lengths)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing complete output folder")
    args = p.parse_args(argv)
    if args.max_seq_length < 0:
        p.error(f"--max_seq_length={args.max_seq_length} must be >= 0 (0 means no limit)")
    if args.pack is not None and args.pack < 1:
        p.error(f"--pack={args.pack} must be a positive capacity in tokens")
    if args.val_size < 0:
        p.error(f"--val_size={args.val_size} must be >= 0")
    if args.val_data and args.val_size:
        p.error("give either --val_data or --val_size, not both")
    try:
        args.template_kwargs = json.loads(args.template_kwargs)
        assert isinstance(args.template_kwargs, dict)
    except (ValueError, AssertionError):
        p.error(f"--template_kwargs={args.template_kwargs!r} must be a JSON object")
    return args


def resolve_source(src: str) -> list[Path]:
    """Files or folders for one --data entry."""
    path = Path(src)
    if path.exists():
        return [path]
    raise SystemExit(f"--data {src!r}: {dataset_problem(src) or 'is not an existing file or folder'}")


def load_records(sources: list[str], max_records: int | None, on_error: str = "raise"):
    """All records of the sources, as a list of dicts (or one datasets.Dataset for a save_to_disk folder)."""
    records: list = []
    provenance = []
    paths = [(src, path) for src in sources for path in resolve_source(src)]
    if any(path.is_dir() for _, path in paths):
        if len(paths) > 1:
            raise SystemExit("a save_to_disk folder must be the only --data source (concatenate them first)")
        from datasets import load_from_disk

        src, path = paths[0]
        records = load_from_disk(str(path))
        provenance.append({"source": src, "path": str(path), "rows": len(records), "kind": "save_to_disk"})
        paths = []
    for src, path in paths:
        n0 = len(records)
        try:
            records.extend(read_chat_records(path, progress=True, on_error=on_error))
        except ValueError as exc:
            raise SystemExit(str(exc).replace("pass on_error='skip'", "pass --on_error skip")) from None
        provenance.append({"source": src, "path": str(path), "rows": len(records) - n0,
                           "sha256": file_sha256(path)})
    if max_records is not None:
        if isinstance(records, list):
            records = records[:max_records]
        else:
            records = records.select(range(min(max_records, len(records))))
    return records, provenance


def split_records(records, val_size: float, seed: int):
    if not val_size:
        return records, None
    import numpy as np

    n = len(records)
    n_val = int(round(val_size * n)) if val_size < 1 else int(val_size)
    if not 0 < n_val < n:
        raise SystemExit(f"--val_size={val_size} gives {n_val} validation records out of {n}; it must leave both "
                         f"splits non-empty")
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
    if isinstance(records, list):
        return [records[i] for i in train_idx], [records[i] for i in val_idx]
    return records.select(train_idx), records.select(val_idx)


def main(argv=None, *, prog: str | None = PROG) -> int:
    """`opensloth precompute [flags]`: 0 when the dataset is written; a bad flag or input exits with a message."""
    args = parse_args(argv, prog=prog)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if not args.num_proc else "false")
    from opensloth.distributed import setup_logging

    setup_logging()
    from transformers import AutoTokenizer

    from opensloth.data.cache import CacheConfig, atomic_save_datasets, read_cache_metadata, tokenizer_identity
    from opensloth.data.chat import (
        CHAT_FORMAT_VERSION,
        ChatFormatError,
        NothingToTrainError,
        TemplateDropsToolsError,
        tokenize_chat_dataset,
    )

    name = args.name or "+".join(Path(s).stem for s in args.data)
    out = Path(args.output_dir) / name
    config = CacheConfig(train_subdir="train", val_subdir="val", metadata_file="metadata.json")
    if out.exists() and not args.overwrite:
        meta, _ = read_cache_metadata(out, config)
        if meta is not None:
            raise SystemExit(f"{out} already holds a complete precomputed dataset; pass --overwrite to rebuild it")

    for src in args.data + (args.val_data or []):
        resolve_source(src)  # a missing file stops the run before the tokenizer loads
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    records, provenance = load_records(args.data, args.max_records, args.on_error)
    if args.val_data:
        train_records, val_records = records, load_records(args.val_data, None, args.on_error)[0]
    else:
        train_records, val_records = split_records(records, args.val_size, args.seed)

    common = dict(max_seq_length=args.max_seq_length or None, assistant_only=not args.all_tokens,
                  num_proc=args.num_proc, overflow=args.overflow, on_error=args.on_error, return_stats=True,
                  **args.template_kwargs)
    splits, stats = {}, {}
    for split, recs in (("train", train_records), ("val", val_records)):
        if recs is None:
            continue
        try:
            ds, st = tokenize_chat_dataset(recs, tokenizer, desc=split, **common)
        except NothingToTrainError as exc:
            limit = "--max_seq_length" if exc.stats.no_trained_by_truncation else "the records or chat template"
            if split == "train":
                raise SystemExit(f"{split}: {exc} (here: {limit}; --all_tokens trains every token)") from None
            print(f"no validation split written: {exc}")
            continue
        except ChatFormatError as exc:
            raise SystemExit(f"{exc}".replace("pass on_error='skip'", "pass --on_error skip")
                             + ("" if args.on_error == "skip" or isinstance(exc, TemplateDropsToolsError) else
                                "; fix it, or drop such records with --on_error skip (counted)")) from None
        splits[split], stats[split] = ds, {"chat": st.as_dict()}

    if args.pack is not None:
        try:
            from opensloth.data.packed import build_packed_dataset
        except ImportError as exc:
            raise SystemExit(f"--pack needs opensloth.data.packed.build_packed_dataset ({exc})") from None
        for split, ds in list(splits.items()):
            packed, pst = build_packed_dataset(ds, args.pack, strategy=args.pack_strategy, return_stats=True)
            splits[split] = packed
            stats[split]["packing"] = dataclasses.asdict(pst) if dataclasses.is_dataclass(pst) else dict(pst)

    metadata = {
        "kind": "opensloth.precomputed",
        "chat_format": CHAT_FORMAT_VERSION,
        "args": dict(vars(args)),
        "sources": provenance,
        "tokenizer": {"name_or_path": args.tokenizer, **(tokenizer_identity(tokenizer) or {})},
        "stats": stats,
        "columns": {k: v.column_names for k, v in splits.items()},
        "packed_capacity": args.pack,
    }
    atomic_save_datasets(out, splits, metadata, config)

    print(f"\nprecomputed dataset written to {out} in {time.time() - t0:.1f}s")
    for split, ds in splits.items():
        chat = stats[split]["chat"]
        line = (f"  {split}: {chat['records_out']} samples from {chat['records_in']} records, {chat['tokens']} tokens "
                f"({chat['trained_tokens']} trained); {chat['truncated']} truncated, {chat['dropped_too_long']} "
                f"dropped as too long, {chat['dropped_no_trained']} dropped for training no token, "
                f"{chat['skipped']} skipped")
        if "packing" in stats[split]:
            line += f"; packed into {len(ds)} rows of <= {args.pack} tokens"
            eff = stats[split]["packing"].get("efficiency")
            if eff is not None:
                line += f" (efficiency {100 * eff:.2f}%)"
        print(line)
    print(f"train with: --skip_prepare --prepared_dataset_path {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
