"""The project's development data for tests and benchmarks: the shared chat datasets (alpaca, gsm8k, hh_rlhf,
arena_hard) by name, and the Qwen3 tokenizer beside them.

The folder is ``$OPENSLOTH_SHARED_DATA``, else ``../shared/data`` beside the checkout (a fresh clone has none: the
tests that need it skip). Its ``chat/`` folder holds JSONL files of ``{"id", "messages"}`` records, read with the
library's ``opensloth.data.records.read_chat_records``. The library itself knows none of these names: users pass
file paths. Imports nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path

from opensloth.data.records import read_chat_records

__all__ = ["SHARED_CHAT_FILES", "chat_template_token_ids", "read_shared_chat", "shared_chat_paths",
           "shared_data_dir"]

SHARED_CHAT_FILES: dict[str, tuple[str, ...]] = {
    "alpaca": ("alpaca_en_demo.jsonl",),
    "gsm8k": ("gsm8k_train-00000-of-00002.jsonl", "gsm8k_train-00001-of-00002.jsonl"),
    "hh_rlhf": ("hh_rlhf_helpful_base_test.jsonl",),
    "arena_hard": ("arena_hard_v0.1.jsonl",),
}


def shared_data_dir() -> Path:
    """``$OPENSLOTH_SHARED_DATA``, else ``shared/data`` beside the repository checkout."""
    env = os.environ.get("OPENSLOTH_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_chat_paths(name: str, chat_dir: str | os.PathLike | None = None) -> list[Path]:
    """The files of shared dataset ``name`` (in ``chat_dir``, default the shared data's ``chat/``); every one must
    exist."""
    if name not in SHARED_CHAT_FILES:
        raise KeyError(f"{name!r} is not a shared dataset; choose from {', '.join(SHARED_CHAT_FILES)}")
    folder = Path(chat_dir) if chat_dir is not None else shared_data_dir() / "chat"
    paths = [folder / f for f in SHARED_CHAT_FILES[name]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shared dataset {name!r}: {', '.join(missing)} not found; set "
                                "OPENSLOTH_SHARED_DATA to the shared data folder")
    return paths


def read_shared_chat(name: str, chat_dir: str | os.PathLike | None = None) -> list[dict]:
    """All records of shared dataset ``name``, its files concatenated in order."""
    return [r for path in shared_chat_paths(name, chat_dir) for r in read_chat_records(path)]


def chat_template_token_ids(records: list[dict], tokenizer) -> list[list[int]]:
    """Token ids of each record's ``messages`` rendered with the tokenizer's chat template (no special tokens added
    on top of the template's own): the lengths the tests and benchmarks measure packing on."""
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
