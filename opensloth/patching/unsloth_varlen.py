"""Unsloth's own FlashAttention-2 varlen branch for packed batches, switched on where torch is older than 2.12.

Why: Unsloth reads packed batches (``position_ids`` + ``packed_seq_lengths``) for every architecture it supports
and, on torch >= 2.12 (what ``pip install unsloth`` brings), runs them as one FlashAttention-2 varlen call per layer
through ``torch.nn.attention.varlen.varlen_attn``. Its loader accepts ``varlen_attn`` only with ``enable_gqa``
(torch 2.12+); on an older torch it falls back to one SDPA call per run of equal-length documents, about 6x slower
for packed training (issue 12). The kernel it would call, torch's own ``aten._flash_attention_forward`` behind
Unsloth's ``_LeanFlashVarlen`` autograd function, is there on torch 2.11 and takes grouped K/V heads as they are.

What: `switch_on_unsloth_varlen` gives ``unsloth.utils.attention_dispatch`` the varlen function it failed to load:
``_TORCH_VARLEN_ATTN`` becomes a function with ``varlen_attn``'s signature over ``_LeanFlashVarlen``,
``_varlen_can_use_cudnn`` answers False (torch 2.11 has no such choice) and ``_LEAN_VARLEN`` is True. Nothing else
changes; Unsloth's own dispatch decides per call as on a newer torch.

Remove when: the GPU machines run torch >= 2.12 (then the switch reports "not needed" and changes nothing).
Targets: Unsloth 2026.10.x (read against 2026.10.9). The switch is feature-detected, not version-gated: if a name
it sets is missing (another Unsloth), it logs a warning and leaves Unsloth as it is, which still trains correctly
on its slower path. Safe to call twice.
"""

from __future__ import annotations

import importlib
from typing import Any

from opensloth.distributed import logger

__all__ = ["patch_unsloth_torch_varlen", "switch_on_unsloth_varlen", "unsloth_varlen_state"]

_DISPATCH = "unsloth.utils.attention_dispatch"
_MARK = "_opensloth_varlen_switch"
# Read before switching. ``_varlen_can_use_cudnn`` is not among them: Unsloth defines it only when it loaded a varlen
# kernel itself (never on torch 2.11), and the switch sets it either way.
_NEEDED = ("_TORCH_VARLEN_ATTN", "_LeanFlashVarlen", "_LEAN_VARLEN")


def _dispatch_module() -> Any | None:
    try:
        return importlib.import_module(_DISPATCH)
    except ImportError:
        return None


def unsloth_varlen_state() -> str:
    """``"native"`` (Unsloth loaded torch's varlen_attn itself), ``"switched"`` (this module's switch is in place),
    ``"fallback"`` (per-segment SDPA: no varlen kernel in use) or ``"no unsloth"``."""
    dispatch = _dispatch_module()
    if dispatch is None:
        return "no unsloth"
    current = getattr(dispatch, "_TORCH_VARLEN_ATTN", None)
    if current is None:
        return "fallback"
    return "switched" if getattr(current, _MARK, False) else "native"


def _flash_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    check = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    return bool(check()) if callable(check) else True


def switch_on_unsloth_varlen() -> str:
    """Switch on Unsloth's FlashAttention-2 varlen branch for packed batches where its loader found no usable
    ``varlen_attn`` (torch < 2.12). Import Unsloth first.

    Returns ``"not needed"`` (Unsloth uses torch's own varlen_attn), ``"already"``, ``"switched"``, or
    ``"unavailable"`` (no CUDA flash kernel, Unsloth not importable, or this Unsloth lacks a name the switch sets:
    logged as a warning; Unsloth keeps its own, slower, packed path). Never raises for a version mismatch.
    """
    dispatch = _dispatch_module()
    if dispatch is None:
        logger.warning("Unsloth's attention dispatch (%s) does not import: packed attention stays as it is", _DISPATCH)
        return "unavailable"
    state = unsloth_varlen_state()
    if state == "native":
        return "not needed"
    if state == "switched":
        return "already"
    missing = [name for name in _NEEDED if not hasattr(dispatch, name)]
    if missing:
        logger.warning("this Unsloth has no %s in %s (the varlen switch was read against 2026.10.9): packed batches "
                       "keep Unsloth's own per-segment attention, correct but slower on torch < 2.12",
                       ", ".join(missing), _DISPATCH)
        return "unavailable"
    if not _flash_available():
        logger.warning("torch has no CUDA FlashAttention kernel here: packed batches keep Unsloth's per-segment "
                       "attention")
        return "unavailable"
    lean = dispatch._LeanFlashVarlen

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False, return_aux=None):
        window = tuple(window_size)
        return lean.apply(query, key, value, cu_seq_q, max_q, window == (-1, 0), scale, window[0], window[1])

    setattr(varlen_attn, _MARK, True)
    dispatch._TORCH_VARLEN_ATTN = varlen_attn
    dispatch._varlen_can_use_cudnn = lambda *args, **kwargs: False
    dispatch._LEAN_VARLEN = True
    import torch

    logger.info("Unsloth: packed batches run FlashAttention-2 varlen (torch %s has no varlen_attn(enable_gqa); "
                "Unsloth's own varlen branch switched on)", torch.__version__)
    return "switched"


def patch_unsloth_torch_varlen(*, allow_untested: bool = False) -> str:
    """The former name of `switch_on_unsloth_varlen` (kept for scripts that call it): ``"patched"`` where the
    switch was made, else its outcome. ``allow_untested`` is accepted and ignored: the switch is feature-detected."""
    outcome = switch_on_unsloth_varlen()
    return "patched" if outcome == "switched" else outcome
