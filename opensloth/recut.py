"""Re-cut the micro-batches of one gradient-accumulation window: a pure function of tensors (no trainer).

The HF Trainer fetches all micro-batches of an optimizer step at once (``Trainer.get_batch_samples``) and counts
the window's trained targets (``num_items_in_batch``) before running them. Inside that window the micro-batches can
be re-cut freely: the loss is a sum over targets divided by that count, so any regrouping of the same samples gives
the same gradient, while a better grouping wastes fewer padded slots and evens out the micro-batches' work.
`opensloth.patching.batch_samples` installs `repack_window` on a trainer (the seed's
``patch_optimize_sft_trainer_batch_samples``).

Three layouts are recognised (anything else passes through unchanged, with one log line per reason); the samples and
padding of every micro-batch are read with `opensloth.batch.read_batch` and new metadata is written with
`opensloth.batch.metadata_tensors`:

- **padded**: ``input_ids``, ``attention_mask`` (B, L) of 0/1, ``labels``, optional ``position_ids``; right or left
  padding. Re-cut by `opensloth.packing.partition_padded` (the fewest padded slots for the same number of
  micro-batches) under a cap of the largest original micro-batch's slots, so memory never grows.
- **flat** (padding-free, TRL ``padding_free=True``, Unsloth, ``opensloth.collate`` ``layout="flat"``): (1, T) with
  ``position_ids`` and no 2-D ``attention_mask``. Re-cut by `opensloth.packing.balance` on the work model of
  `opensloth.sampler.WorkModel`, under a cap of the longest original micro-batch's tokens; padding segments are
  dropped.
- **rows** (``opensloth.collate`` ``layout="rows"``): (P, capacity) rows of packed samples; whole rows are balanced
  over the micro-batches (equal row counts, so shapes stay static).

Invariants: the same multiset of samples (every token, every label) and the same trained targets, so the
``num_items_in_batch`` the wrapped ``get_batch_samples`` counted stays right and is returned unchanged. transformers
counts targets over ``labels[..., 1:]``, so the first label of a sample counts only when the sample does not start
its row; a window whose samples have trained first labels (boundaries not masked) passes through unchanged. A first
label that was never trained because its sample started a row is set to -100 if the sample moves off column 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from opensloth.batch import (
    ATTENTION_MASK,
    CU_SEQ_LENS_Q,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    MAX_LENGTH_K,
    MAX_LENGTH_Q,
    PACKED_BATCH_KEYS,
    PACKED_SEQ_LENGTHS,
    PADDED_BATCH_KEYS,
    POSITION_IDS,
    SEQ_IDX,
    USE_CACHE,
    BatchFormatError,
    BatchSegments,
    PackedBatch,
    metadata_in,
    metadata_tensors,
    read_batch,
)
from opensloth.distributed import logger
from opensloth.masks import Segments, segments_from_csr
from opensloth.sampler import WorkModel

__all__ = ["WindowStats", "repack_window"]

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


def _read(batch: dict) -> BatchSegments:
    try:
        return read_batch(batch)
    except BatchFormatError as exc:
        raise _Passthrough(str(exc)) from None


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


def _rebuilt_metadata(batches: list[dict], seg: Segments, names: tuple[str, ...]) -> dict[str, Any]:
    """The metadata keys of ``names`` that the window's micro-batches carry, written for ``seg`` by the contract's
    writer and given the dtype, device and type (tensor or int) of the first micro-batch's values."""
    like = batches[0]
    mask = like.get(ATTENTION_MASK)
    mask_dtype = mask.dtype if isinstance(mask, torch.Tensor) else torch.bool
    try:
        written = metadata_tensors(seg, names, mask_dtype=mask_dtype)
    except ValueError as exc:  # e.g. a window too large for int32 metadata
        raise _Passthrough(str(exc)) from None
    out: dict[str, Any] = {}
    for key, value in written.items():
        if key not in like:
            continue
        ref = like[key]
        if key == USE_CACHE:
            out[key] = ref
        elif isinstance(ref, torch.Tensor):
            out[key] = torch.as_tensor(value).to(dtype=ref.dtype, device=ref.device)
        else:
            out[key] = value
    return out


def _like(batch: Any, values: dict, seg: Segments | None) -> dict:
    """A new micro-batch of the same type as ``batch`` (a PackedBatch keeps the record of its segments)."""
    if isinstance(batch, PackedBatch) and seg is not None:
        return PackedBatch(values, segments=seg)
    return values


# ---------------------------------------------------------------------------------------------------------------
# Padded layout
# ---------------------------------------------------------------------------------------------------------------


def _repack_padded(batches: list[dict], stats: WindowStats, work_model: WorkModel, repack: bool) -> list[dict]:
    from opensloth.packing import partition_padded

    keys = set(batches[0])
    for b in batches:
        if set(b) != keys:
            raise _Passthrough(f"micro-batches of one window have different keys ({sorted(keys)} vs {sorted(b)})")
        if not all(isinstance(b[k], torch.Tensor) and b[k].shape == b[INPUT_IDS].shape for k in keys):
            raise _Passthrough("a padded batch has a key whose shape differs from input_ids")
    row_lengths, left_padded, right_padded = [], [], []
    for b in batches:
        segs = _read(b).row_segments()
        row_lengths.append(np.asarray([int(n[~p].sum()) for n, p in segs], dtype=np.int64))
        left_padded.append(any(bool(p[0]) for _, p in segs))
        right_padded.append(any(bool(p[-1]) for _, p in segs))
    lengths = np.concatenate(row_lengths)
    slots_before = sum(int(b[INPUT_IDS].numel()) for b in batches)
    stats.real_tokens, stats.slots, stats.slots_before = int(lengths.sum()), slots_before, slots_before
    stats.sample_lengths = lengths.tolist()
    stats.work = work_model.batch_work(lengths)
    per_batch_work = [work_model.batch_work(rl) for rl in row_lengths]
    stats.max_batch_work_before = stats.max_batch_work_after = max(per_batch_work)
    if stats.real_tokens == slots_before or not repack:
        return batches  # no padding: nothing to gain
    if not any(left_padded):
        left_side = False
    elif not any(right_padded):
        left_side = True
    else:
        raise _Passthrough("attention_mask is neither right- nor left-padded throughout the window")
    # Each sample is a contiguous run of the window's batches laid end to end (row-major): where it starts there.
    widths = np.concatenate([np.full(b[INPUT_IDS].shape[0], b[INPUT_IDS].shape[1], dtype=np.int64)
                             for b in batches])
    cols = widths - lengths if left_side else np.zeros_like(lengths)
    row_starts = np.cumsum(widths) - widths
    starts = row_starts + cols
    flat = {k: _concat([b[k].reshape(-1) for b in batches]) for k in keys if k != ATTENTION_MASK}
    first = _first_labels(flat[LABELS], starts)
    if (first & (cols > 0)).any():
        raise _Passthrough(
            "left-padded rows train their first label (predicted from a padding token); re-cutting would change "
            "which targets count"
        )
    cap = max(int(b[INPUT_IDS].numel()) for b in batches)
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
    pad_values = {k: (IGNORE_INDEX if k == LABELS else flat[k][pad_at].item()) for k in flat}
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
    device = like[INPUT_IDS].device
    src_t = torch.from_numpy(src).to(device)
    valid_t = torch.from_numpy(valid).to(device)
    out = {}
    for key, values in s.flat.items():
        gathered = values.index_select(0, src_t).view(k, width)
        out[key] = gathered.masked_fill(~valid_t, pad_values[key])
    fix = s.first_untrained_at_col0[items] & (first_col > 0)
    if fix.any():
        rows = np.flatnonzero(fix)
        out[LABELS][torch.from_numpy(rows).to(device), torch.from_numpy(first_col[rows]).to(device)] = IGNORE_INDEX
    out[ATTENTION_MASK] = valid_t.to(like[ATTENTION_MASK].dtype)
    return {key: out[key] for key in like}


# ---------------------------------------------------------------------------------------------------------------
# Flat (padding-free) and rows layouts
# ---------------------------------------------------------------------------------------------------------------


def _check_packed_batches(batches: list[dict]) -> None:
    keys = set(batches[0])
    for b in batches:
        if set(b) != keys:
            raise _Passthrough(f"micro-batches of one window have different keys ({sorted(keys)} vs {sorted(b)})")
    for k in (MAX_LENGTH_Q, MAX_LENGTH_K, USE_CACHE):
        if k in keys and not all(isinstance(b[k], (int, bool, np.integer, torch.Tensor)) for b in batches):
            raise _Passthrough(f"{k} has an unexpected type")
    if USE_CACHE in keys and len({bool(b[USE_CACHE]) for b in batches}) > 1:
        raise _Passthrough("use_cache differs between the micro-batches of one window")
    shape = batches[0][INPUT_IDS].shape
    for b in batches:
        ids = b[INPUT_IDS]
        if ids.dim() != 2 or b[LABELS].shape != ids.shape:
            raise _Passthrough("a padding-free batch's labels and input_ids differ in shape")
        for k in (POSITION_IDS, SEQ_IDX):
            if k in b and b[k].shape != ids.shape:
                raise _Passthrough(f"{k} has shape {tuple(b[k].shape)} but input_ids has {tuple(ids.shape)}")
        if ATTENTION_MASK in b and b[ATTENTION_MASK].dim() != 4:
            raise _Passthrough("a padding-free batch carries a 2-D attention_mask")
        if ids.shape[0] > 1 and ids.shape != shape:
            raise _Passthrough("row batches of one window differ in shape")


def _repack_flat(batches: list[dict], stats: WindowStats, work_model: WorkModel, repack: bool) -> list[dict]:
    from opensloth.packing import balance

    read = [_read(b).segments for b in batches]
    all_lengths = np.concatenate([s.lengths for s in read])
    is_pad = np.concatenate([s.is_pad for s in read])
    counts = np.asarray([s.lengths.shape[0] for s in read], dtype=np.int64)
    split = np.cumsum(counts)[:-1]
    real = np.flatnonzero(~is_pad)
    sizes = np.asarray([int(b[INPUT_IDS].shape[1]) for b in batches], dtype=np.int64)
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
    token_keys = [k for k in (INPUT_IDS, LABELS, POSITION_IDS, SEQ_IDX) if k in batches[0]]
    flat = {k: _concat([b[k].reshape(-1) for b in batches]) for k in token_keys}
    all_starts = np.cumsum(all_lengths) - all_lengths
    first = _first_labels(flat[LABELS], all_starts)
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
    names = metadata_in(like)
    device = like[INPUT_IDS].device
    out = []
    for p in parts:
        items = np.sort(p)
        lens = lengths[items]
        total = int(lens.sum())
        src = torch.from_numpy(_ranges(starts[items], lens)).to(device)
        new = {k: samples.flat[k].index_select(0, src).view(1, total) for k in token_keys}
        new_starts = np.cumsum(lens) - lens
        fix = samples.first_untrained_at_col0[items] & (new_starts > 0)
        if fix.any():
            new[LABELS] = new[LABELS].clone()
            new[LABELS].view(-1)[torch.from_numpy(new_starts[fix]).to(device)] = IGNORE_INDEX
        seg = segments_from_csr(lens, np.array([0, len(lens)], dtype=np.int64), total)
        new.update(_rebuilt_metadata(batches, seg, names))  # seq_idx and a 4-D mask too: both follow the samples
        out.append(_like(like, {k: new[k] for k in like}, seg))
    stats.changed = True
    stats.slots = int(sum(tokens_after))
    stats.max_batch_work_after = max(after)
    return out


def _repack_rows(batches: list[dict], stats: WindowStats, work_model: WorkModel, repack: bool) -> list[dict]:
    from opensloth.packing import balance

    width = batches[0][INPUT_IDS].shape[1]
    rows: list[np.ndarray] = []
    pads: list[np.ndarray] = []
    for b in batches:
        for lengths, is_pad in _read(b).row_segments():
            rows.append(lengths)
            pads.append(is_pad)
    row_work = work_model.row_work(rows)  # a row's padding segment is computed too, so it stays in the row's work
    n_rows = batches[0][INPUT_IDS].shape[0]
    stats.slots = stats.slots_before = len(rows) * width
    stats.real_tokens = int(sum(int(r[~p].sum()) for r, p in zip(rows, pads, strict=True)))
    stats.sample_lengths = [int(x) for r, p in zip(rows, pads, strict=True) for x in r[~p]]
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
    # Only the flattened keys are rewritten: seq_idx and a 4-D mask are per row and move with their rows.
    names = tuple(n for n in metadata_in(like) if n not in ("seq_idx", "attention_mask"))
    stacked = {k: _concat([b[k] for b in batches]) for k in row_keys}
    out = []
    for p in parts:
        items = np.sort(p)
        idx = torch.from_numpy(items).to(like[INPUT_IDS].device)
        new = {k: stacked[k].index_select(0, idx.to(stacked[k].device)) for k in row_keys}
        counts = [len(rows[i]) for i in items]
        ptr = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        seg = Segments(np.concatenate([rows[i] for i in items]), np.concatenate([pads[i] for i in items]), ptr,
                       len(items), int(width), True)
        new.update(_rebuilt_metadata(batches, seg, names))
        out.append(_like(like, {k: new[k] for k in like}, seg))
    stats.changed = True
    stats.max_batch_work_after = max(after)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def _layout(batches: list[Any]) -> str:
    if not batches or not all(isinstance(b, dict) or hasattr(b, "keys") for b in batches):
        raise _Passthrough("the micro-batches are not dicts of tensors")
    first = batches[0]
    if INPUT_IDS not in first or LABELS not in first:
        raise _Passthrough(f"the batch has no input_ids/labels (keys {sorted(first.keys())})")
    if not isinstance(first[INPUT_IDS], torch.Tensor) or first[INPUT_IDS].dim() != 2:
        raise _Passthrough("input_ids is not a 2-D tensor")
    mask = first.get(ATTENTION_MASK)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        unknown = set(first) - PADDED_BATCH_KEYS
        if unknown:
            raise _Passthrough(f"unknown keys {sorted(unknown)} in a padded batch (not guessing how to re-cut them)")
        return "padded"
    unknown = set(first) - PACKED_BATCH_KEYS
    if unknown:
        raise _Passthrough(f"unknown keys {sorted(unknown)} in a padding-free batch (not guessing how to re-cut them)")
    if not ({POSITION_IDS, PACKED_SEQ_LENGTHS, CU_SEQ_LENS_Q} & set(first)):
        raise _Passthrough("a batch with neither attention_mask nor position_ids/packed_seq_lengths (one sample "
                           "per micro-batch without padding-free metadata)")
    return "flat" if first[INPUT_IDS].shape[0] == 1 else "rows"


def _fallback_stats(batches: list[Any], stats: WindowStats, work_model: WorkModel) -> None:
    """Token counts of a window no layout matched: real tokens from a 2-D attention_mask, else every token."""
    lengths: list[int] = []
    slots = 0
    for b in batches:
        ids = b.get(INPUT_IDS) if hasattr(b, "get") else None
        if not isinstance(ids, torch.Tensor):
            continue
        slots += int(ids.numel())
        mask = b.get(ATTENTION_MASK)
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
