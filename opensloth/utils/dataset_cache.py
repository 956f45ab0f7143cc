"""The seed's import path for the rank-aware dataset cache: `from opensloth.utils.dataset_cache import
cache_dataset_wrapper, simple_cache_dataset_wrapper, _check_distributed_environment`.

The implementations live in `opensloth.data.cache`; this module only re-exports them (the same objects), and like
that module imports nothing heavy (no torch, datasets or transformers until a wrapped builder runs).
"""

from __future__ import annotations

from opensloth.data.cache import (
    CacheConfig,
    _check_distributed_environment,
    cache_dataset_wrapper,
    simple_cache_dataset_wrapper,
)

__all__ = ["CacheConfig", "_check_distributed_environment", "cache_dataset_wrapper", "simple_cache_dataset_wrapper"]
