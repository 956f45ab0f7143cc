"""Data pipeline: chat formatting with assistant-only labels, the rank-aware dataset cache, the packed-dataset builder.

Names resolve lazily on first use, so importing ``opensloth.data`` loads none of datasets, transformers or torch.

- ``opensloth.data.chat``: render chat records with the tokenizer's template and tokenize them with labels
  (``tokenize_chat_dataset``, ``encode_chat``).
- ``opensloth.data.cache``: build processed datasets once on global rank 0 and load them on every rank
  (``cache_dataset_wrapper``, ``simple_cache_dataset_wrapper``, ``load_prepared_dataset``).
- ``opensloth.data.packed``: pack a tokenized dataset into rows of at most ``capacity`` tokens
  (``build_packed_dataset``).
- ``opensloth.data.records``: read chat-record files (JSONL, a JSON list), each record named by file and line
  (``read_chat_records``, ``ChatRecord``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "chat": (
        "CHAT_FORMAT_VERSION", "IGNORE_INDEX", "ChatFormatError", "ChatTokenizeStats", "NothingToTrainError",
        "detect_end_of_turn", "encode_chat", "probe_chat_template", "record_messages", "record_tools",
        "render_with_spans", "token_mask_from_spans", "tokenize_chat_dataset", "unified_free_form_fields",
    ),
    "cache": (
        "CacheBuildError", "CacheConfig", "atomic_save_datasets", "cache_dataset_wrapper", "dataset_fingerprint",
        "load_cached_datasets", "load_prepared_dataset", "make_cache_key", "rank_zero_build_and_load",
        "read_cache_metadata", "simple_cache_dataset_wrapper", "tokenizer_identity",
    ),
    "packed": ("PackingStats", "build_packed_dataset", "packing_stats"),
    "records": ("ChatRecord", "read_chat_records"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'opensloth.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"opensloth.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
