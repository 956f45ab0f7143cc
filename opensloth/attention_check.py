"""Does a model keep packed samples apart? A behavioural check, the same for every architecture and backend.

Packed rows are only correct if the model's attention reads the boundaries the collator sends (``position_ids``
restarting per sample, ``packed_seq_lengths`` for Unsloth, ``cu_seq_lens_*`` for flash-attention). A model that
ignores them trains without an error while every sample attends to the samples packed before it. Reading library
internals to find out which architectures honour which key breaks with every release, so this module asks the model
instead: three tiny forwards through the very collator the trainer uses,

- ``packed``: a row holding two samples A and B (A first);
- ``alone``: B on its own;
- ``leak``: A and B as one sample (B attends to A: what packing looks like when the boundaries are ignored),

and compares B's logits. Boundaries are honoured when ``packed`` is much closer to ``alone`` than ``leak`` is
(`PackedAttentionCheck`). The three forwards run under ``torch.no_grad`` in the model's current train/eval mode,
on its device, with every tensor moved there as the Trainer does, and on forked random generators; they cost
milliseconds and change no weight and no random state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PackedAttentionCheck", "check_packed_attention"]

# B's logits may differ from B alone by bf16 rounding in kernels of other shapes (measured up to ~1e-2 of the logit
# scale); a leak moves them by the attention to A's tokens. Honoured: the packed error is under this fraction of the
# leak's. A leak smaller than _MIN_LEAK (relative) means the model barely reads its context, and the check cannot
# tell the two apart: it says so instead of guessing.
_HONOURED_FRACTION = 0.2
_MIN_LEAK = 1e-3
_LEN_A, _LEN_B = 48, 12


@dataclass(frozen=True)
class PackedAttentionCheck:
    """Result of `check_packed_attention`.

    ``packed_error``: max |B's logits packed - B alone| / max |B alone|. ``leak_error``: the same for B attending
    to A. ``honoured``: the packed row kept B apart from A. ``conclusive``: the leak was large enough to tell.
    """

    honoured: bool
    conclusive: bool
    packed_error: float
    leak_error: float

    def describe(self) -> str:
        verdict = ("keeps packed samples apart" if self.honoured else
                   "lets packed samples attend to each other")
        if not self.conclusive:
            verdict = "could not be told apart from a leak (the model barely reads its context)"
        return (f"{verdict}: packed vs alone {self.packed_error:.2e}, leak vs alone {self.leak_error:.2e} "
                f"(relative max logit error)")


def _probe_tokens(model: Any, len_a: int, len_b: int) -> tuple[np.ndarray, np.ndarray]:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 8:
        raise ValueError(f"cannot probe a model whose config has vocab_size = {vocab!r}")
    low = min(100, vocab // 2)  # above the special tokens most vocabularies start with
    rng = np.random.default_rng(0)
    ids = rng.integers(low, vocab, size=len_a + len_b, dtype=np.int64)
    return ids[:len_a], ids[len_a:]


def _model_device(model: Any) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


def _logits(model: Any, batch: Mapping[str, Any], device: torch.device, lo: int, hi: int) -> torch.Tensor:
    """Logits of the flattened batch's tokens lo..hi-1 as float32, copied out so the full (tokens, vocab) logits of
    a row as wide as max_seq_length are freed at once (4096 x 256k in fp32 would be 4 GB)."""
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
    # A forked RNG: a model with dropout draws nothing from the generators the training goes on with.
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        out = model(**inputs)
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.numel() == 0:
        raise RuntimeError("the model returned no logits for an unlabelled forward; cannot check packed attention")
    return logits.reshape(-1, logits.shape[-1])[lo:hi].float().clone()


def check_packed_attention(model: Any, collate: Callable[[list[dict]], Mapping[str, Any]], *,
                           max_tokens: int | None = None) -> PackedAttentionCheck:
    """Run the three probe forwards (module docstring) through ``collate`` (the trainer's collator: it receives
    features with ``input_ids`` and ``seq_lengths``, as packed rows come from `opensloth.data.packed`) and compare.

    ``max_tokens`` caps the probe row (A and B together; default 60 tokens), e.g. at a rows collator's capacity.
    Raises RuntimeError when the model returns no logits, ValueError for ``max_tokens`` below 4. Works for any
    layout whose flattened batch holds B's tokens in order after A's (flat and rows) or B in its own row (padded)."""
    total = _LEN_A + _LEN_B if max_tokens is None else min(_LEN_A + _LEN_B, int(max_tokens))
    if total < 4:
        raise ValueError(f"max_tokens = {max_tokens}: the probe needs a row of at least 4 tokens")
    len_b = max(2, total // 5)
    len_a = total - len_b
    a, b = _probe_tokens(model, len_a, len_b)
    # Dropout (LoRA's above all) would give the three forwards different noise: switch the dropout layers off for
    # the probe, and only them (the model's own train/eval mode can choose another attention path).
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training]
    for m in dropouts:
        m.train(False)
    try:
        return _compare(model, collate, a, b, len_a, len_b)
    finally:
        for m in dropouts:
            m.train(True)


def _compare(model: Any, collate: Callable[[list[dict]], Mapping[str, Any]], a: np.ndarray, b: np.ndarray,
             len_a: int, len_b: int) -> PackedAttentionCheck:
    both = np.concatenate([a, b])
    device = _model_device(model)
    packed_batch = collate([{"input_ids": both, "seq_lengths": np.array([len_a, len_b])}])
    alone_batch = collate([{"input_ids": b, "seq_lengths": np.array([len_b])}])
    leak_batch = collate([{"input_ids": both, "seq_lengths": np.array([len_a + len_b])}])
    ids = packed_batch["input_ids"].reshape(-1)
    want = torch.from_numpy(b)
    # B follows A in the same row (flat, rows) or opens the second row (padded).
    start = next((s for s in (len_a, packed_batch["input_ids"].shape[-1])
                  if ids.shape[0] >= s + len_b and torch.equal(ids[s:s + len_b], want)), None)
    if start is None:
        raise ValueError("the collator placed the probe's second sample neither after the first in its row nor at "
                         "the start of the next row; check_packed_attention supports the flat, rows and padded "
                         "layouts")
    packed = _logits(model, packed_batch, device, start, start + len_b)
    alone = _logits(model, alone_batch, device, 0, len_b)
    leak = _logits(model, leak_batch, device, len_a, len_a + len_b)
    scale = float(alone.abs().max().clamp_min(1e-12))
    packed_error = float((packed - alone).abs().max()) / scale
    leak_error = float((leak - alone).abs().max()) / scale
    conclusive = leak_error >= _MIN_LEAK
    honoured = packed_error <= _HONOURED_FRACTION * leak_error if conclusive else packed_error <= _MIN_LEAK
    return PackedAttentionCheck(honoured=bool(honoured), conclusive=bool(conclusive), packed_error=packed_error,
                                leak_error=leak_error)
