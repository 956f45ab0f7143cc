"""Trainer patches for multi-GPU training (each version-gated, idempotent, applied only when called).

The seed API lives in the submodule: ``from opensloth.patching.ddp_patch import ddp_patch,
patch_optimize_sft_trainer_batch_samples`` (``ddp_patch()``: env validation, device pinning, the loss-scaling fix,
DDP defaults and the rank-balanced sampler). ``opensloth.patching.ddp_patch`` is that module, not the function.

Importing this package imports nothing heavy (no torch, transformers, trl or unsloth); the names below load their
module on first use:

- ``patch_optimize_sft_trainer_batch_samples()`` (`opensloth.patching.batch_samples`): re-cuts each
  gradient-accumulation window's micro-batches.
- ``apply_loss_scaling_fix()`` (`opensloth.patching.loss_scaling`), ``use_balanced_sampler(trainer)``
  (`opensloth.patching.dataloader`), ``repack_window(batches)`` (`opensloth.patching.batch_samples`).
- ``enable_unsloth_varlen(model)`` (`opensloth.patching.unsloth_attention`): Unsloth's Qwen3 attention runs
  FlashAttention-2 varlen on batches collated with ``opensloth.collate.UNSLOTH_VARLEN_METADATA``;
  ``patch_unsloth_torch_varlen()`` is the smaller fallback (Unsloth's own varlen branch, eager blocks).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "apply_loss_scaling_fix",
    "enable_unsloth_varlen",
    "patch_optimize_sft_trainer_batch_samples",
    "patch_unsloth_torch_varlen",
    "repack_window",
    "use_balanced_sampler",
]

_WHERE = {
    "patch_optimize_sft_trainer_batch_samples": "opensloth.patching.batch_samples",
    "repack_window": "opensloth.patching.batch_samples",
    "apply_loss_scaling_fix": "opensloth.patching.loss_scaling",
    "use_balanced_sampler": "opensloth.patching.dataloader",
    "enable_unsloth_varlen": "opensloth.patching.unsloth_attention",
    "patch_unsloth_torch_varlen": "opensloth.patching.unsloth_attention",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'opensloth.patching' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
