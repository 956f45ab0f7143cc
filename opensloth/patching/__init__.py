"""Trainer patches for multi-GPU training (each version-gated, idempotent, applied only when called).

The seed API lives in the submodule: ``from opensloth.patching.ddp_patch import ddp_patch,
patch_optimize_sft_trainer_batch_samples`` (``ddp_patch()``: env validation, device pinning, the loss-scaling fix,
DDP defaults and the rank-balanced sampler). ``opensloth.patching.ddp_patch`` is that module, not the function.

Importing this package imports nothing heavy (no torch, transformers, trl or unsloth); the names below load their
module on first use:

- ``patch_optimize_sft_trainer_batch_samples()`` (`opensloth.patching.batch_samples`): re-cuts each
  gradient-accumulation window's micro-batches with ``repack_window`` (the algorithm: `opensloth.recut`).
- ``add_pre_train_hook(hook)`` (`opensloth.patching.hooks`): the registry of functions run when ``Trainer.train``
  starts; ``trainer_state(trainer)`` (`opensloth.patching.state`): the one object holding OpenSloth's per-trainer
  state (re-cut switch, work model, last window's stats, balanced sampler, step figures).
- ``apply_loss_scaling_fix()`` (`opensloth.patching.loss_scaling`), ``use_balanced_sampler(trainer)``
  (`opensloth.patching.dataloader`), ``attach_step_figures(trainer)`` (`opensloth.patching.metrics`).
- ``switch_on_unsloth_varlen()`` (`opensloth.patching.unsloth_varlen`; ``patch_unsloth_torch_varlen`` is its former
  name, importable from ``opensloth.patching.unsloth_attention`` too): on torch < 2.12, switches on Unsloth's own
  FlashAttention-2 varlen branch, which the GPU path (`opensloth.wiring`: flat rows with ``packed_seq_lengths``)
  relies on. OpenSloth patches no Unsloth attention code.
- ``keep_unsloth_attention_mask(model)`` (`opensloth.patching.unsloth_mask`, used by `opensloth.wiring` only): sets
  Unsloth's own keep-the-mask flag so a dense block-causal mask reaches Gemma 2's attention in training.
- ``enable_unsloth_packed_attention()`` and ``scope_unsloth_flash_impl(trainer, model)``
  (`opensloth.patching.unsloth_packing`, used by `opensloth.wiring` and ``BatchWiring.attach``): call the two
  functions of Unsloth's that its own ``packing=True`` calls, and calls only when the trainer is given no collator
  (varlen attention on the transformers modeling path; FA3 / FA4 kernels during training where installed).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "add_pre_train_hook",
    "apply_loss_scaling_fix",
    "attach_step_figures",
    "patch_optimize_sft_trainer_batch_samples",
    "patch_unsloth_torch_varlen",
    "switch_on_unsloth_varlen",
    "repack_window",
    "trainer_state",
    "use_balanced_sampler",
]

_WHERE = {
    "patch_optimize_sft_trainer_batch_samples": "opensloth.patching.batch_samples",
    "repack_window": "opensloth.recut",
    "add_pre_train_hook": "opensloth.patching.hooks",
    "trainer_state": "opensloth.patching.state",
    "attach_step_figures": "opensloth.patching.metrics",
    "apply_loss_scaling_fix": "opensloth.patching.loss_scaling",
    "use_balanced_sampler": "opensloth.patching.dataloader",
    "patch_unsloth_torch_varlen": "opensloth.patching.unsloth_varlen",
    "switch_on_unsloth_varlen": "opensloth.patching.unsloth_varlen",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'opensloth.patching' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
