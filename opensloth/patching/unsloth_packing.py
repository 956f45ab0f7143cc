"""What Unsloth's own ``SFTTrainer(packing=True)`` switches on besides its collator, for runs fed by OpenSloth's.

Why: when Unsloth's trainer packs or goes padding-free (``enable_sample_packing`` / ``enable_padding_free_metadata``
in ``unsloth/utils/packing.py``, read against 2026.10.9), it also sets up two things. It does so only when the user
passes no ``data_collator``: its trainer init turns packing and padding-free off for any given collator
(``blocked = data_collator is not None or ...``, unsloth/trainer.py 1912). A trainer fed by OpenSloth's collator gets
neither, so without this module our packed rows could run slower than Unsloth's own in a fresh process (not measured
yet; the benchmark could not show it: its Unsloth anchor runs first in the same process and switches the first one
on for everything after it).

What:
- `enable_unsloth_packed_attention` calls Unsloth's ``enable_hf_packed_attention()``. It applies process-wide, to
  models that Unsloth runs on the transformers modeling path with SDPA attention. Those models then read
  ``packed_seq_lengths`` and run one varlen kernel over the flat row. Without it they get SDPA over the dense
  block-causal mask that transformers builds from ``position_ids``, whose cost grows with the square of the
  micro-batch's whole flat row. Batches without ``packed_seq_lengths`` go to the original SDPA as before. Gemma 3
  is not one of them on Unsloth 2026.10.9: Unsloth gives it flex attention, whose block mask (built by transformers
  from the restarting ``position_ids``) keeps packed samples apart without a dense mask; on an H100 its steps ran
  flex-attention kernels and Unsloth's varlen counters stayed at zero (benchmarks/results/gpu_train.md).
- `scope_unsloth_flash_impl` calls Unsloth's ``scope_flash_attention_impl_to_train(trainer, model, "seq_lengths")``.
  Then, during ``trainer.train()`` only, torch's flash kernels run as FA3 (Hopper, hidden size >= 2048) or FA4
  (Blackwell, documents of 1024 tokens or more on average, read from the rows' ``seq_lengths``) when that package is
  installed and Unsloth's probe of it passes; otherwise nothing changes (as on our GPU machine, which has neither).

Both are feature-detected, not version-gated. Where this Unsloth lacks the function, a warning says so once and
Unsloth stays as it is, which trains correctly. The packed-attention check of `opensloth.wiring` runs after the
first, so a packed route is kept only if the model keeps packed samples apart with it on. Safe to call twice.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from opensloth.distributed import logger

__all__ = ["enable_unsloth_packed_attention", "scope_unsloth_flash_impl"]

_PACKED_ATTENTION = ("unsloth.utils.hf_packed_attention", "enable_hf_packed_attention")
_FLASH_IMPL = ("unsloth.utils.flash_impl", "scope_flash_attention_impl_to_train")
_warned: set[str] = set()


def _unsloth_function(module: str, name: str) -> Any | None:
    if "unsloth" not in sys.modules:  # not an Unsloth run (the varlen switch has said so already)
        return None
    try:
        function = getattr(importlib.import_module(module), name, None)
    except ImportError:
        function = None
    if not callable(function) and name not in _warned:
        _warned.add(name)
        logger.warning("this Unsloth has no %s.%s (read against 2026.10.9): Unsloth's packing=True would switch it "
                       "on, OpenSloth's packed batches train without it (correct, possibly slower)", module, name)
    return function if callable(function) else None


def enable_unsloth_packed_attention() -> bool:
    """Unsloth's varlen attention for packed rows on the transformers modeling path (module docstring). True when
    Unsloth reports it in place."""
    function = _unsloth_function(*_PACKED_ATTENTION)
    return bool(function()) if function is not None else False


def scope_unsloth_flash_impl(trainer: Any, model: Any) -> bool:
    """Let Unsloth run torch's flash kernels as FA3 / FA4 during ``trainer.train()`` where it would for its own
    packing (module docstring). True when Unsloth's function was called; whether FA3 / FA4 then runs is Unsloth's
    decision at train time (installed package, GPU, model, probe)."""
    function = _unsloth_function(*_FLASH_IMPL)
    if function is None:
        return False
    function(trainer, model, "seq_lengths")
    return True
