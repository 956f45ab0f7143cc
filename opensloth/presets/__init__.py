"""Embedded offline defaults: a tiny model, the project's own tokenizer and a synthetic chat dataset.

`opensloth train --preset tiny` (or `train_scripts/train_configurable.py --preset tiny`) trains with them on a CPU in
well under two minutes, with no network and no files outside the repository. Names are resolved on first access, so
importing this package imports neither torch nor transformers (the training command imports Unsloth, when it uses it,
before those).

- `get_preset("tiny")` -> `TinyPreset` (model shape, data sizes, training defaults)
- `build_tiny_tokenizer(vocab_size)`, `tokenizer_fingerprint(tokenizer)` (opensloth.presets.tokenizer)
- `build_tiny_model(preset, seed=...)`, `save_tiny_model_folder(path)`, `tiny_datasets(n_train, n_test, seed)`
  (opensloth.presets.tiny)
- `synthetic_chat_records(n, seed, start=0)` (opensloth.presets.synthetic)

`python -m opensloth.presets tiny DIR` writes the tiny model and tokenizer to DIR (a folder `from_pretrained`,
`opensloth precompute --tokenizer` and `--model_name` accept).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PRESET_NAMES",
    "TINY",
    "TinyPreset",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "get_preset",
    "save_tiny_model_folder",
    "synthetic_chat_records",
    "tiny_datasets",
    "tokenizer_fingerprint",
]

PRESET_NAMES = ("tiny",)

_WHERE = {
    "TINY": "opensloth.presets.tiny",
    "TinyPreset": "opensloth.presets.tiny",
    "build_tiny_model": "opensloth.presets.tiny",
    "save_tiny_model_folder": "opensloth.presets.tiny",
    "tiny_datasets": "opensloth.presets.tiny",
    "build_tiny_tokenizer": "opensloth.presets.tokenizer",
    "tokenizer_fingerprint": "opensloth.presets.tokenizer",
    "synthetic_chat_records": "opensloth.presets.synthetic",
}


def get_preset(name: str):
    """The preset called `name` (one of PRESET_NAMES)."""
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESET_NAMES)}")
    from opensloth.presets.tiny import TINY

    return TINY


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'opensloth.presets' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
