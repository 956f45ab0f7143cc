"""Let Unsloth read a dense attention mask in training, for the families whose packed attention it cannot run.

Why: Unsloth drops ``attention_mask`` from every labelled training forward (its padding-free assumption) unless the
backbone carries ``_unsloth_keep_padding_mask = True``, the flag Unsloth itself sets for its PPO, distillation and
calibration forwards. Gemma 2 without flash-attn runs its softcapped attention as an explicit matmul that adds a
given 4-D mask to the scores, but ignores ``packed_seq_lengths``, so Unsloth's flat packed protocol lets packed
samples attend to each other there. With the flag set, a (P, 1, L, L) additive block-causal mask reaches that matmul
and packed rows train correctly at P * L * L mask elements, instead of every sample padded to its own row.

What: `keep_unsloth_attention_mask` sets the flag on every module that owns ``embed_tokens`` (the backbone Unsloth's
forward reads it from) and returns a function that puts the previous values back. Nothing else changes. It is
feature-detected, not version-gated: `opensloth.wiring` only keeps this route when the behavioural packed-attention
check (`opensloth.attention_check`) passes through it, so on an Unsloth that ignores the flag the run falls back to
padded rows. Targets: Unsloth 2026.10.x (read against 2026.10.9, ``unsloth/models/llama.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["keep_unsloth_attention_mask"]

_FLAG = "_unsloth_keep_padding_mask"


def keep_unsloth_attention_mask(model: Any) -> Callable[[], None]:
    """Set Unsloth's keep-the-attention-mask flag on ``model``'s backbones; return a function that restores them.
    Raises ValueError when ``model`` has no module owning ``embed_tokens`` (nothing would read the flag)."""
    missing = object()
    backbones = [m for m in model.modules() if hasattr(m, "embed_tokens")]
    if not backbones:
        raise ValueError(f"{type(model).__name__} has no module with embed_tokens: Unsloth would not read "
                         f"{_FLAG} from it")
    previous = [(m, m.__dict__.get(_FLAG, missing)) for m in backbones]
    for m in backbones:
        setattr(m, _FLAG, True)

    def restore() -> None:
        for m, value in previous:
            if value is missing:
                m.__dict__.pop(_FLAG, None)
            else:
                setattr(m, _FLAG, value)

    return restore
