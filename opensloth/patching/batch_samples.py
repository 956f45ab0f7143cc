"""Re-cut the micro-batches of one gradient-accumulation window (the seed's "optimize batch samples" patch).

The HF Trainer fetches all micro-batches of an optimizer step at once (``Trainer.get_batch_samples``) and counts
the window's trained targets (``num_items_in_batch``) before running them. Inside that window the micro-batches can
be re-cut freely: the loss is a sum over targets divided by that count, so any regrouping of the same samples gives
the same gradient, while a better grouping wastes fewer padded slots and evens out the micro-batches' work.

Three layouts are recognised (anything else passes through unchanged, with one log line per reason):

- **padded**: ``input_ids``, ``attention_mask`` (B, L) of 0/1, ``labels``, optional ``position_ids``; right or left
  padding. Re-cut by `opensloth.packing.partition_padded` (the fewest padded slots for the same number of
  micro-batches) under a cap of the largest original micro-batch's slots, so memory never grows.
- **flat** (padding-free, TRL ``padding_free=True``, Unsloth, ``opensloth.collate`` ``layout="flat"``): (1, T) with
  ``position_ids`` and no 2-D ``attention_mask``; samples from ``packed_seq_lengths``, ``cu_seq_lens_q`` or the
  position resets. Re-cut by `opensloth.packing.balance` on the work model of `opensloth.sampler.WorkModel`, under a
  cap of the longest original micro-batch's tokens.
- **rows** (``opensloth.collate`` ``layout="rows"``): (P, capacity) rows of packed samples; whole rows are balanced
  over the micro-batches (equal row counts, so shapes stay static).

Invariants: the same multiset of samples (every token, every label) and the same trained targets, so the
``num_items_in_batch`` the wrapped ``get_batch_samples`` counted stays right and is returned unchanged. transformers
counts targets over ``labels[..., 1:]``, so the first label of a sample counts only when the sample does not start
its row; a window whose samples have trained first labels (boundaries not masked) passes through unchanged. A first
label that was never trained because its sample started a row is set to -100 if the sample moves off column 0.
"""

from __future__ import annotations

import functools
import logging
import os
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from opensloth.collate import VARLEN_CU_SEQLENS_KEY, VARLEN_MAX_SEQLEN_KEY
from opensloth.distributed import logger
from opensloth.sampler import WorkModel

__all__ = [
    "WindowStats",
    "install_on_trainer",
    "patch_optimize_sft_trainer_batch_samples",
    "repack_window",
]

IGNORE_INDEX = -100
_PADDED_KEYS = frozenset({"input_ids", "attention_mask", "labels", "position_ids"})
_PACKED_KEYS = frozenset({
    "input_ids", "labels", "position_ids", "packed_seq_lengths", "cu_seq_lens_q", "cu_seq_lens_k",
    "max_length_q", "max_length_k", "seq_idx", "attention_mask", "use_cache",
    VARLEN_CU_SEQLENS_KEY, VARLEN_MAX_SEQLEN_KEY,  # opensloth.collate's varlen keys (Unsloth FA2 varlen path)
})
_MARK = "_opensloth_repack"
_logged_reasons: set[str] = set()


@dataclass
class WindowStats:
    """What one window held (after any re-cut): figures for logs and the per-step metrics."""

    layout: str = "unknown"
    changed: bool = False
    reason: str = ""
    real_tokens: int = 0
    slots: int = 0  # token slots computed, padding included
    slots_before: int = 0
    work: float = 0.0  # the window's total work (work model), the same before and after
    max_batch_work_before: float = 0.0
    max_batch_work_after: float = 0.0
    sample_lengths: list[int] = field(default_factory=list)

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.slots if self.slots else 1.0

    @property
    def efficiency_before(self) -> float:
        return self.real_tokens / self.slots_before if self.slots_before else 1.0


class _Passthrough(Exception):
    """The window cannot be re-cut safely; the message says why."""


def _log_once(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.info("window repack skipped (the micro-batches pass through unchanged): %s", reason)


# ---------------------------------------------------------------------------------------------------------------
# Samples of a window
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Samples:
    """A window's tokens laid end to end per key, with each sample's offset and length in that layout."""

    flat: dict[str, torch.Tensor]  # key -> 1-D tensor of the window's tokens
    lengths: np.ndarray  # int64 (n,)
    starts: np.ndarray  # int64 (n,) offset of each sample in `flat`
    first_untrained_at_col0: np.ndarray  # bool (n,): first label != -100 but never a target (sample began a row)


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + l)`` for every (s, l), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)


def _first_labels(labels_flat: torch.Tensor, starts: np.ndarray) -> np.ndarray:
    idx = torch.from_numpy(starts).to(labels_flat.device)
    return (labels_flat.index_select(0, idx) != IGNORE_INDEX).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# Padded layout
# ---------------------------------------------------------------------------------------------------------------


def _padded_side(mask: torch.Tensor, lengths: torch.Tensor) -> tuple[bool, bool]:
    """(is right-padded, is left-padded) for a (B, L) 0/1 mask whose rows hold ``lengths`` ones."""
    cols = torch.arange(mask.shape[1], device=mask.device)
    real = mask != 0
    right = bool(torch.equal(real, cols[None, :] < lengths[:, None]))
    left = bool(torch.equal(real, cols[None, :] >= (mask.shape[1] - lengths)[:, None]))
    return right, left


def _repack_padded(batches: list[dict], stats: WindowStats, work_model: WorkModel, repack: bool) -> list[dict]:
    from opensloth.packing import partition_padded

    keys = set(batches[0])
    for b in batches:
        if set(b) != keys:
            raise _Passthrough(f"micro-batches of one window have different keys ({sorted(keys)} vs {sorted(b)})")
        if not all(isinstance(b[k], torch.Tensor) and b[k].shape == b["input_ids"].shape for k in keys):
            raise _Passthrough("a padded batch has a key whose shape differs from input_ids")
    row_lengths, sides = [], []
    for b in batches:
        lengths = (b["attention_mask"] != 0).sum(-1)
        right, left = _padded_side(b["attention_mask"], lengths)
        sides.append((right, left))
        row_lengths.append(lengths.cpu().numpy().astype(np.int64))
    lengths = np.concatenate(row_lengths)
    if (lengths == 0).any():
        raise _Passthrough("a padded row has no real token (attention_mask all 0)")
    slots_before = sum(int(b["input_ids"].numel()) for b in batches)
    stats.real_tokens, stats.slots, stats.slots_before = int(lengths.sum()), slots_before, slots_before
    stats.sample_lengths = lengths.tolist()
    stats.work = work_model.batch_work(lengths)
    per_batch_work = [work_model.batch_work(rl) for rl in row_lengths]
    stats.max_batch_work_before = stats.max_batch_work_after = max(per_batch_work)
    if stats.real_tokens == slots_before or not repack:
        return batches  # no padding: nothing to gain
    if all(r for r, _ in sides):
        left_side = False
    elif all(lft for _, lft in sides):
        left_side = True
    else:
        raise _Passthrough("attention_mask is neither right- nor left-padded throughout the window")
    # Each sample is a contiguous run of the window's batches laid end to end (row-major): where it starts there.
    widths = np.concatenate([np.full(b["input_ids"].shape[0], b["input_ids"].shape[1], dtype=np.int64)
                             for b in batches])
    cols = widths - lengths if left_side else np.zeros_like(lengths)
    row_starts = np.cumsum(widths) - widths
    starts = row_starts + cols
    flat = {k: _concat([b[k].reshape(-1) for b in batches]) for k in keys if k != "attention_mask"}
    first = _first_labels(flat["labels"], starts)
    if (first & (cols > 0)).any():
        raise _Passthrough(
            "left-padded rows train their first label (predicted from a padding token); re-cutting would change "
            "which targets count"
        )
    cap = max(int(b["input_ids"].numel()) for b in batches)
    try:
        groups = partition_padded(lengths, len(batches), max_tokens_per_batch=cap)
    except ValueError as exc:  # no split meets the cap (cannot happen for a valid window; be safe)
        raise _Passthrough(f"partition_padded found no split under the memory cap: {exc}") from None
    slots_after = sum(int(lengths[g].max()) * len(g) for g in groups)
    if slots_after >= slots_before:
        return batches
    # The value in the first padded slot of the window, per key (labels pad with -100).
    r = int(np.argmax(lengths < widths))
    pad_at = int(row_starts[r] + (0 if left_side else lengths[r]))
    pad_values = {k: (IGNORE_INDEX if k == "labels" else flat[k][pad_at].item()) for k in flat}
    samples = _Samples(flat, lengths, starts, first & (cols == 0))
    out = [_build_padded(np.sort(g), samples, left_side, pad_values, batches[0]) for g in groups]
    stats.changed, stats.slots = True, slots_after
    stats.max_batch_work_after = max(work_model.batch_work(lengths[g]) for g in groups)
    return out


def _build_padded(items: np.ndarray, s: _Samples, left: bool, pad_values: dict, like: dict) -> dict:
    """One padded micro-batch of ``items``: a single gather per key from the window's concatenated batches."""
    lens = s.lengths[items]
    k, width = len(items), int(lens.max())
    first_col = (width - lens) if left else np.zeros_like(lens)
    rel = np.arange(width, dtype=np.int64)[None, :] - first_col[:, None]
    valid = (rel >= 0) & (rel < lens[:, None])
    src = np.where(valid, s.starts[items][:, None] + rel, 0).reshape(-1)
    device = like["input_ids"].device
    src_t = torch.from_numpy(src).to(device)
    valid_t = torch.from_numpy(valid).to(device)
    out = {}
    for key, values in s.flat.items():
        gathered = values.index_select(0, src_t).view(k, width)
        out[key] = gathered.masked_fill(~valid_t, pad_values[key])
    fix = s.first_untrained_at_col0[items] & (first_col > 0)
    if fix.any():
        rows = np.flatnonzero(fix)
        out["labels"][torch.from_numpy(rows).to(device), torch.from_numpy(first_col[rows]).to(device)] = IGNORE_INDEX
    out["attention_mask"] = valid_t.to(like["attention_mask"].dtype)
    return {key: out[key] for key in like}


# ---------------------------------------------------------------------------------------------------------------
# Flat (padding-free) and rows layouts
# ---------------------------------------------------------------------------------------------------------------


def _segment_lengths(batch: dict, row_width: int, n_tokens: int) -> list[np.ndarray]:
    """Per-row segment lengths of a packed batch, from the metadata it carries (checked against position_ids)."""
    from opensloth.masks import lengths_from_cu_seq_lens, lengths_from_position_ids, position_ids_from_lengths

    pos = batch.get("position_ids")
    if "packed_seq_lengths" in batch:
        flat = np.asarray(torch.as_tensor(batch["packed_seq_lengths"]).cpu().numpy(), dtype=np.int64).reshape(-1)
        source = "packed_seq_lengths"
    elif "cu_seq_lens_q" in batch:
        flat = lengths_from_cu_seq_lens(batch["cu_seq_lens_q"]).numpy().astype(np.int64)
        source = "cu_seq_lens_q"
    elif VARLEN_CU_SEQLENS_KEY in batch:
        flat = lengths_from_cu_seq_lens(batch[VARLEN_CU_SEQLENS_KEY]).numpy().astype(np.int64)
        source = VARLEN_CU_SEQLENS_KEY
    elif pos is not None:
        rows = lengths_from_position_ids(pos.reshape(-1, row_width))
        return [r.numpy().astype(np.int64) for r in rows]
    else:
        raise _Passthrough("a padding-free batch has neither position_ids nor packed_seq_lengths / cu_seq_lens_q")
    if (flat < 1).any() or int(flat.sum()) != n_tokens:
        raise _Passthrough(
            f"{source} sums to {int(flat.sum())} but the batch has {n_tokens} tokens (a padded tail, e.g. "
            "pad_to_multiple_of, that the lengths do not describe)"
        )
    ends = np.cumsum(flat)
    if row_width != n_tokens and np.setdiff1d(np.arange(row_width, n_tokens, row_width), ends).size:
        raise _Passthrough(f"{source} has a segment that crosses a row boundary")
    bounds = np.searchsorted(ends, np.arange(row_width, n_tokens + 1, row_width)) + 1
    rows = np.split(flat, bounds[:-1])
    if pos is not None:
        expected = position_ids_from_lengths(rows, row_width).to(pos.device).reshape(pos.shape)
        if not torch.equal(expected, pos.to(expected.dtype)):
            raise _Passthrough(f"position_ids do not restart where {source} says the samples begin")
    return rows


def _padding_tails(input_ids: torch.Tensor, labels: torch.Tensor, rows: list[np.ndarray]) -> np.ndarray:
    """Length of each row's trailing padding segment (0 when its last segment is a sample).

    The collator's rows layout (and ``pad_to_multiple_of``) ends a row with a segment of one repeated pad id whose
    labels are all ignored. A real sample that looks the same has no trained target and attends only to itself, so
    treating it as padding changes no loss or gradient.
    """
    width = input_ids.shape[-1]
    ids = input_ids.reshape(-1, width)
    lab = labels.reshape(-1, width)
    last = torch.as_tensor([int(r[-1]) if len(r) else 0 for r in rows], dtype=torch.long)
    cols = torch.arange(width)
    tail = cols[None, :] >= (width - last)[:, None]
    start_ids = ids.cpu().gather(1, (width - last).clamp(max=width - 1)[:, None])
    other = (lab.cpu() != IGNORE_INDEX) | (ids.cpu() != start_ids)
    is_pad = ~(other & tail).any(dim=1) & (last > 0)
    return np.where(is_pad.numpy(), last.numpy(), 0).astype(np.int64)


def _check_packed_batches(batches: list[dict]) -> None:
    keys = set(batches[0])
    for b in batches:
        if set(b) != keys:
            raise _Passthrough(f"micro-batches of one window have different keys ({sorted(keys)} vs {sorted(b)})")
    for k in ("max_length_q", "max_length_k", "use_cache"):
        if k in keys and not all(isinstance(b[k], (int, bool, np.integer, torch.Tensor)) for b in batches):
            raise _Passthrough(f"{k} has an unexpected type")
    if "use_cache" in keys and len({bool(b["use_cache"]) for b in batches}) > 1:
        raise _Passthrough("use_cache differs between the micro-batches of one window")
    shape = batches[0]["input_ids"].shape
    for b in batches:
        ids = b["input_ids"]
        if ids.dim() != 2 or b["labels"].shape != ids.shape:
            raise _Passthrough("a padding-free batch's labels and input_ids differ in shape")
        for k in ("position_ids", "seq_idx"):
            if k in b and b[k].shape != ids.shape:
                raise _Passthrough(f"{k} has shape {tuple(b[k].shape)} but input_ids has {tuple(ids.shape)}")
        if "attention_mask" in b and b["attention_mask"].dim() != 4:
            raise _Passthrough("a padding-free batch carries a 2-D attention_mask")
        if ids.shape[0] > 1 and ids.shape != shape:
            raise _Passthrough("row batches of one window differ in shape")


def _metadata(batches: list[dict], lengths: np.ndarray) -> dict:
    """Rebuild the flattened metadata keys that the window's micro-batches carry, for the new segments."""
    from opensloth.masks import cu_seq_lens_from_lengths

    like = batches[0]
    out: dict[str, Any] = {}
    if "packed_seq_lengths" in like:
        ref = like["packed_seq_lengths"]
        out["packed_seq_lengths"] = torch.as_tensor(lengths, dtype=ref.dtype).to(ref.device)
    cu = cu_seq_lens_from_lengths(lengths)
    for k in ("cu_seq_lens_q", "cu_seq_lens_k", VARLEN_CU_SEQLENS_KEY):
        if k in like:
            out[k] = cu.to(dtype=like[k].dtype, device=like[k].device)
    for k in ("max_length_q", "max_length_k"):
        if k in like:
            value = int(lengths.max())
            out[k] = torch.tensor(value, dtype=like[k].dtype, device=like[k].device) \
                if isinstance(like[k], torch.Tensor) else value
    if "use_cache" in like:
        out["use_cache"] = like["use_cache"]
    if VARLEN_MAX_SEQLEN_KEY in like:
        # The largest bound of the window covers every sample the new micro-batch can hold (each micro-batch's bound
        # covers its own samples); when the collator was given a constant, it stays that constant (an int that
        # changed between batches would recompile Unsloth's compiled blocks).
        out[VARLEN_MAX_SEQLEN_KEY] = max(int(b[VARLEN_MAX_SEQLEN_KEY]) for b in batches)
    return out


def _repack_flat(batches: list[dict], stats: WindowStats, work_model: WorkModel, repack: bool) -> list[dict]:
    from opensloth.masks import block_causal_mask, seq_idx_from_lengths
    from opensloth.packing import balance

    per_batch, pad = [], []
    for b in batches:
        n = int(b["input_ids"].shape[1])
        segments = _segment_lengths(b, n, n)[0]
        per_batch.append(segments)
        pad.append(int(_padding_tails(b["input_ids"], b["labels"], [segments])[0]))
    all_lengths = np.concatenate(per_batch)
    counts = np.asarray([len(x) for x in per_batch], dtype=np.int64)
    split = np.cumsum(counts)[:-1]
    is_pad = np.zeros(len(all_lengths), dtype=bool)
    is_pad[np.cumsum(counts)[np.asarray(pad) > 0] - 1] = True
    real = np.flatnonzero(~is_pad)
    sizes = np.asarray([int(b["input_ids"].shape[1]) for b in batches], dtype=np.int64)
    lengths = all_lengths[real]
    stats.slots = stats.slots_before = int(sizes.sum())
    stats.real_tokens = int(lengths.sum())
    stats.sample_lengths = lengths.tolist()
    all_works = work_model.sample_work(all_lengths)  # padding segments cost compute too, until they are dropped
    works = all_works[real]
    stats.work = float(works.sum())
    before = [float(w.sum()) for w in np.split(all_works, split)]
    stats.max_batch_work_before = stats.max_batch_work_after = max(before)
    if len(batches) < 2 or len(lengths) < len(batches) or not repack:
        return batches
    token_keys = [k for k in ("input_ids", "labels", "position_ids", "seq_idx") if k in batches[0]]
    flat = {k: _concat([b[k].reshape(-1) for b in batches]) for k in token_keys}
    all_starts = np.cumsum(all_lengths) - all_lengths
    first = _first_labels(flat["labels"], all_starts)
    at_col0 = np.zeros(len(all_lengths), dtype=bool)
    at_col0[np.concatenate(([0], split))] = True
    if (first & ~at_col0).any():
        raise _Passthrough(
            "a packed sample's first label is trained (sample boundaries are not masked in labels); re-cutting "
            "would change which targets count"
        )
    starts, first, at_col0 = all_starts[real], first[real], at_col0[real]
    parts = balance(work_model.costs(works), len(batches))
    if any(len(p) == 0 for p in parts):
        return batches
    tokens_after = [int(lengths[p].sum()) for p in parts]
    after = [float(works[p].sum()) for p in parts]
    if max(tokens_after) > int(sizes.max()) or max(after) >= max(before) * (1 - 1e-9):
        return batches  # the cap (never more tokens than the largest original) or no gain
    samples = _Samples(flat, lengths, starts, first & at_col0)
    like = batches[0]
    out = []
    for p in parts:
        items = np.sort(p)
        lens = lengths[items]
        total = int(lens.sum())
        device = like["input_ids"].device
        src = torch.from_numpy(_ranges(starts[items], lens)).to(device)
        new = {k: samples.flat[k].index_select(0, src).view(1, total) for k in token_keys}
        new_starts = np.cumsum(lens) - lens
        fix = samples.first_untrained_at_col0[items] & (new_starts > 0)
        if fix.any():
            new["labels"] = new["labels"].clone()
            new["labels"].view(-1)[torch.from_numpy(new_starts[fix]).to(device)] = IGNORE_INDEX
        if "seq_idx" in like:
            new["seq_idx"] = seq_idx_from_lengths(lens).to(like["seq_idx"].dtype).to(device).view(1, total)
        if "attention_mask" in like:
            ref = like["attention_mask"]
            new["attention_mask"] = block_causal_mask(lens, dtype=ref.dtype, device=ref.device)
        new.update(_metadata(batches, lens))
        out.append({k: new[k] for k in like})
    stats.changed = True
    stats.slots = int(sum(tokens_after))
    stats.max_batch_work_after = max(after)
    return out


def _repack_rows(batches: list[dict], stats: WindowStats, work_model: WorkModel, repack: bool) -> list[dict]:
    from opensloth.packing import balance

    n_rows, width = batches[0]["input_ids"].shape
    rows: list[np.ndarray] = []
    for b in batches:
        rows.extend(_segment_lengths(b, width, n_rows * width))
    row_work = work_model.row_work(rows)  # a row's padding segment is computed too, so it stays in the row's work
    pad = np.concatenate([_padding_tails(b["input_ids"], b["labels"], rows[i * n_rows : (i + 1) * n_rows])
                          for i, b in enumerate(batches)])
    stats.slots = stats.slots_before = len(rows) * width
    stats.real_tokens = stats.slots - int(pad.sum())
    stats.sample_lengths = [int(x) for r, p in zip(rows, pad) for x in (r[:-1] if p else r)]
    stats.work = float(row_work.sum())
    before = [float(row_work[i * n_rows : (i + 1) * n_rows].sum()) for i in range(len(batches))]
    stats.max_batch_work_before = stats.max_batch_work_after = max(before)
    if len(batches) < 2 or not repack:
        return batches
    parts = balance(work_model.costs(row_work), len(batches), equal_count=True)
    after = [float(row_work[p].sum()) for p in parts]
    if max(after) >= max(before) * (1 - 1e-9):
        return batches
    like = batches[0]
    row_keys = [k for k in like if isinstance(like[k], torch.Tensor) and like[k].dim() >= 2]
    stacked = {k: _concat([b[k] for b in batches]) for k in row_keys}
    out = []
    for p in parts:
        items = np.sort(p)
        idx = torch.from_numpy(items).to(like["input_ids"].device)
        new = {k: stacked[k].index_select(0, idx.to(stacked[k].device)) for k in row_keys}
        seg = [rows[i] for i in items]
        new.update(_metadata(batches, np.concatenate(seg)))
        out.append({k: new[k] for k in like})
    stats.changed = True
    stats.max_batch_work_after = max(after)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def _layout(batches: list[Any]) -> str:
    if not batches or not all(isinstance(b, dict) or hasattr(b, "keys") for b in batches):
        raise _Passthrough("the micro-batches are not dicts of tensors")
    first = batches[0]
    if "input_ids" not in first or "labels" not in first:
        raise _Passthrough(f"the batch has no input_ids/labels (keys {sorted(first.keys())})")
    if not isinstance(first["input_ids"], torch.Tensor) or first["input_ids"].dim() != 2:
        raise _Passthrough("input_ids is not a 2-D tensor")
    mask = first.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        unknown = set(first) - _PADDED_KEYS
        if unknown:
            raise _Passthrough(f"unknown keys {sorted(unknown)} in a padded batch (not guessing how to re-cut them)")
        return "padded"
    unknown = set(first) - _PACKED_KEYS
    if unknown:
        raise _Passthrough(f"unknown keys {sorted(unknown)} in a padding-free batch (not guessing how to re-cut them)")
    if not ({"position_ids", "packed_seq_lengths", "cu_seq_lens_q"} & set(first)):
        raise _Passthrough("a batch with neither attention_mask nor position_ids/packed_seq_lengths (one sample "
                           "per micro-batch without padding-free metadata)")
    return "flat" if first["input_ids"].shape[0] == 1 else "rows"


def _fallback_stats(batches: list[Any], stats: WindowStats, work_model: WorkModel) -> None:
    """Token counts of a window no layout matched: real tokens from a 2-D attention_mask, else every token."""
    lengths: list[int] = []
    slots = 0
    for b in batches:
        ids = b.get("input_ids") if hasattr(b, "get") else None
        if not isinstance(ids, torch.Tensor):
            continue
        slots += int(ids.numel())
        mask = b.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape and ids.dim() == 2:
            lengths.extend((mask != 0).sum(-1).tolist())
        else:
            lengths.extend([int(ids.shape[-1])] * (int(ids.numel()) // max(1, int(ids.shape[-1]))))
    stats.real_tokens, stats.slots, stats.slots_before = int(sum(lengths)), slots, slots
    stats.sample_lengths = lengths
    stats.work = work_model.batch_work(np.asarray(lengths, dtype=np.float64))


def repack_window(batches: list[dict], *, work_model: WorkModel | None = None,
                  repack: bool = True) -> tuple[list[dict], WindowStats]:
    """Re-cut the micro-batches of one gradient-accumulation window; returns (micro-batches, stats).

    The result holds the same samples (tokens and labels) and the same trained targets, in as many micro-batches;
    a window that cannot be re-cut safely comes back unchanged (``stats.reason`` says why, logged once per reason).
    ``repack=False`` only measures the window (the stats the per-step metrics read).
    """
    work_model = work_model or WorkModel()
    stats = WindowStats()
    try:
        stats.layout = _layout(batches)
        repack_fn = {"padded": _repack_padded, "flat": _repack_flat, "rows": _repack_rows}[stats.layout]
        if stats.layout != "padded":
            _check_packed_batches(batches)
        out = repack_fn(batches, stats, work_model, repack)
    except _Passthrough as exc:
        stats = WindowStats(layout="unknown", reason=str(exc))
        _fallback_stats(batches, stats, work_model)
        if repack:
            _log_once(stats.reason)
        return batches, stats
    if stats.changed and logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "window repack (%s, %d micro-batches): padding efficiency %.2f%% -> %.2f%%, largest micro-batch work "
            "%.0f -> %.0f", stats.layout, len(batches), 100 * stats.efficiency_before, 100 * stats.efficiency,
            stats.max_batch_work_before, stats.max_batch_work_after,
        )
    return out, stats


def _repack_enabled() -> bool:
    return os.environ.get("OPENSLOTH_REPACK", "1").strip().lower() not in ("0", "false", "no", "off")


def _make_wrapper(original: Any, trainer: Any) -> Any:
    """A bound get_batch_samples for ``trainer`` that calls ``original`` (bound) and re-cuts its window."""

    @functools.wraps(original)
    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        batch_samples, num_items_in_batch = original(epoch_iterator, num_batches, *args, **kwargs)
        repack = bool(getattr(self, "_opensloth_repack_on", False)) and _repack_enabled()
        batch_samples, stats = repack_window(batch_samples, work_model=getattr(self, "_opensloth_work_model", None),
                                             repack=repack)
        self._opensloth_window_stats = stats
        return batch_samples, num_items_in_batch

    setattr(get_batch_samples, _MARK, True)
    return types.MethodType(get_batch_samples, trainer)


def install_on_trainer(trainer: Any, *, work_model: WorkModel | None = None, repack: bool = True) -> bool:
    """Wrap ``trainer.get_batch_samples`` as resolved now (Unsloth's included) on the instance; idempotent.

    The wrapper records each window's `WindowStats` as ``trainer._opensloth_window_stats`` (the per-step metrics read
    them) and, when ``repack`` is on for the trainer, re-cuts the window. ``repack=False`` installs the observer
    without turning on the re-cut (and without turning off a re-cut already on). Returns True when it installed the
    wrapper, False when it was already there.
    """
    current = getattr(trainer, "get_batch_samples", None)
    if current is None:
        raise AttributeError(
            f"{type(trainer).__name__} has no get_batch_samples; this transformers version is not supported by the "
            "window repack (transformers >= 4.46 has it)"
        )
    if repack:
        trainer._opensloth_repack_on = True
    elif not hasattr(trainer, "_opensloth_repack_on"):
        trainer._opensloth_repack_on = False
    if work_model is not None:
        trainer._opensloth_work_model = work_model
    elif getattr(trainer, "_opensloth_work_model", None) is None:
        config = getattr(getattr(trainer, "model", None), "config", None)
        trainer._opensloth_work_model = WorkModel.for_config(config) if config is not None else WorkModel()
    if getattr(getattr(current, "__func__", current), _MARK, False):
        return False
    trainer.get_batch_samples = _make_wrapper(current, trainer)
    return True


_TRAIN_MARK = "_opensloth_train_hook"


def _install_train_hook() -> None:
    """Wrap ``transformers.Trainer.train`` once so every trainer gets the window repack when training starts.

    Installing at train time wraps the get_batch_samples in force then: Unsloth installs its own (which does not
    call the one it replaces) when a model is loaded, after the seed's ``patch_optimize_sft_trainer_batch_samples()``
    call, so a class-level wrapper installed at patch time would be dropped.
    """
    from transformers import Trainer

    train = Trainer.train
    if getattr(train, _TRAIN_MARK, False):
        return

    @functools.wraps(train)
    def wrapped_train(self, *args, **kwargs):
        hooks = getattr(type(self), "_opensloth_pre_train_hooks", ())
        for hook in list(hooks):
            hook(self)
        return train(self, *args, **kwargs)

    setattr(wrapped_train, _TRAIN_MARK, True)
    Trainer.train = wrapped_train
    if not hasattr(Trainer, "_opensloth_pre_train_hooks"):
        Trainer._opensloth_pre_train_hooks = []


def add_pre_train_hook(hook: Any) -> None:
    """Run ``hook(trainer)`` at the start of every ``Trainer.train`` call (idempotent per hook)."""
    from transformers import Trainer

    _install_train_hook()
    if hook not in Trainer._opensloth_pre_train_hooks:
        Trainer._opensloth_pre_train_hooks.append(hook)


def _repack_hook(trainer: Any) -> None:
    if install_on_trainer(trainer):
        logger.debug("window repack installed on %s.get_batch_samples", type(trainer).__name__)


def patch_optimize_sft_trainer_batch_samples(trainer: Any = None, *, work_model: WorkModel | None = None) -> None:
    """Re-cut every gradient-accumulation window's micro-batches for the least padding and even work (seed API).

    Call it any time before ``trainer.train()``: before the model and trainer exist (the seed's order), or after the
    trainer is built, or pass the ``trainer`` to wrap it now. At train time it wraps the trainer's
    ``get_batch_samples`` as installed then (Unsloth's included), on the instance; calling it again changes nothing.
    ``OPENSLOTH_REPACK=0`` turns the re-cut off at run time.
    """
    _install_train_hook()
    add_pre_train_hook(_repack_hook)
    if trainer is not None:
        install_on_trainer(trainer, work_model=work_model)
