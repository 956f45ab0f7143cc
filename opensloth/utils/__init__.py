"""Seed-compatible import paths: `opensloth.utils.simple_cache_dataset_wrapper`, `cache_dataset_wrapper`.

Names are resolved on first access (PEP 562), so `import opensloth.utils` imports nothing heavy; the
implementations live in `opensloth.data.cache`. The submodules `opensloth.utils.packing` (the seed's `pack`) and
`opensloth.utils.dataset_cache` (the seed's cache module path, with `_check_distributed_environment`) are separate.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "simple_cache_dataset_wrapper": "opensloth.data.cache",
    "cache_dataset_wrapper": "opensloth.data.cache",
    "CacheConfig": "opensloth.data.cache",
    "_check_distributed_environment": "opensloth.data.cache",
}

__all__ = ["simple_cache_dataset_wrapper", "cache_dataset_wrapper", "CacheConfig"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'opensloth.utils' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
