"""The batch contract: what a collated batch holds, one writer of its metadata and one reader of its segments.

Every module that builds, re-cuts or shows a batch goes through here: the collator (`opensloth.collate`), the window
re-cut (`opensloth.recut`), the wiring (`opensloth.wiring`), the inspector (`opensloth._debug_dataloader`) and the
seed's `opensloth.utils.packing.pack`.

Layouts (``input_ids`` is (P, L); P = 1 for the flat layout)::

    flat    (1, T)  every sample end to end, padding-free (a padding tail only with pad_to_multiple_of)
    rows    (P, L)  packed rows of fixed width L; each row's padding tail is a segment of its own
    padded  (B, L)  one sample per row, padding marked by a 2-D attention_mask (1 = real token)

Keys (shapes for a (P, L) batch; S = number of segments of the flattened batch, padding segments included):

==========================  ==========================  ==============================================================
key                         dtype, shape                meaning
==========================  ==========================  ==============================================================
``input_ids``               int64 (P, L)                tokens; padding = the pad token id
``labels``                  int64 (P, L)                -100 where not trained: prompts, the first token of every
                                                        sample (no target across a boundary) and every padding token
``position_ids``            int64 (P, L)                restart at 0 for every segment, padding segments included
                                                        (padded layout: 0 .. L-1 in every row)
``packed_seq_lengths``      int32 CPU (S,)              every segment of the flattened batch, summing to P * L;
                                                        Unsloth's key
``cu_seq_lens_q`` / ``_k``  int32 CPU (S + 1,)          cumulative segment lengths from 0 (flash-attention varlen in
                                                        transformers); one tensor for both
``max_length_q`` / ``_k``   int                         the longest segment
``seq_idx``                 int32 (P, L)                segment index per token, from 0 in each row
``attention_mask``          bool/float (P, 1, L, L)     dense block-causal mask (packed layouts, on request only);
                            int64 (B, L)                1 = real token (padded layout)
``use_cache``               bool False                  keeps transformers from building a KV cache, which would hide
                                                        the packed boundaries from its position_ids mask
==========================  ==========================  ==============================================================

Metadata presets (``metadata=`` of the collator; each name adds the keys above): `DEFAULT_METADATA`
(transformers: position_ids + packed_seq_lengths + cu_seq_lens + use_cache), `UNSLOTH_METADATA` (Unsloth's own
packed protocol: packed_seq_lengths + use_cache), `PADDED_METADATA` (the padded layout: use_cache only).

Padding is carried explicitly. The collator returns a `PackedBatch`: a plain ``dict`` of the keys above (the model
receives exactly those) whose ``segments`` attribute records every segment with its padding flag. The record rides
along through DataLoader workers (pickling), pinned memory and accelerate's device placement (`PackedBatch.to`), but
never reaches the model. `segments_from_batch` takes padding, in order, from that record (when it agrees with the
batch's boundary keys), from a 2-D ``attention_mask``, from per-row ``seq_lengths`` (real samples; the rest of the row
is padding), and only for batches that carry none of them (TRL's and Unsloth's collators, hand-made dicts) from the
padding rule: a row's last segment, when the row has others, whose labels are all -100 and whose ids are all the pad
id (or all one id when the pad id is not known). Such a segment trains nothing and attends only to itself, so
reading a real sample of that shape as padding changes no loss and no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opensloth.masks import (
    Segments,
    block_causal_mask,
    cu_seq_lens_from_lengths,
    lengths_from_cu_seq_lens,
    lengths_from_position_ids,
)

__all__ = [
    "ATTENTION_MASK",
    "CU_SEQ_LENS_K",
    "CU_SEQ_LENS_Q",
    "DEFAULT_METADATA",
    "IGNORE_INDEX",
    "INPUT_IDS",
    "LABELS",
    "LAYOUTS",
    "MAX_LENGTH_K",
    "MAX_LENGTH_Q",
    "METADATA_KEYS",
    "PACKED_BATCH_KEYS",
    "PACKED_SEQ_LENGTHS",
    "PADDED_BATCH_KEYS",
    "PADDED_METADATA",
    "POSITION_IDS",
    "SEQ_IDX",
    "SEQ_LENGTHS",
    "UNSLOTH_METADATA",
    "USE_CACHE",
    "BatchFormatError",
    "BatchSegments",
    "PackedBatch",
    "check_metadata",
    "metadata_in",
    "metadata_tensors",
    "read_batch",
    "segments_from_batch",
]

# ---------------------------------------------------------------------------------------------------------------
# Key names and presets
# ---------------------------------------------------------------------------------------------------------------

INPUT_IDS = "input_ids"
LABELS = "labels"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
PACKED_SEQ_LENGTHS = "packed_seq_lengths"
CU_SEQ_LENS_Q = "cu_seq_lens_q"
CU_SEQ_LENS_K = "cu_seq_lens_k"
MAX_LENGTH_Q = "max_length_q"
MAX_LENGTH_K = "max_length_k"
SEQ_IDX = "seq_idx"
USE_CACHE = "use_cache"
SEQ_LENGTHS = "seq_lengths"  # per-row sample lengths: a feature column of packed rows, never a collated key
IGNORE_INDEX = -100

LAYOUTS = ("flat", "rows", "padded")
# Metadata names (what ``metadata=`` lists) -> the batch keys each one writes.
_METADATA_WRITES: dict[str, tuple[str, ...]] = {
    "packed_seq_lengths": (PACKED_SEQ_LENGTHS,),
    "cu_seq_lens": (CU_SEQ_LENS_Q, CU_SEQ_LENS_K, MAX_LENGTH_Q, MAX_LENGTH_K),
    "seq_idx": (SEQ_IDX,),
    "attention_mask": (ATTENTION_MASK,),
    "use_cache": (USE_CACHE,),
}
METADATA_KEYS = tuple(_METADATA_WRITES)
DEFAULT_METADATA = ("packed_seq_lengths", "cu_seq_lens", "use_cache")
PADDED_METADATA = ("use_cache",)  # one sample per row needs no packing metadata
UNSLOTH_METADATA = ("packed_seq_lengths", "use_cache")

PADDED_BATCH_KEYS = frozenset({INPUT_IDS, ATTENTION_MASK, LABELS, POSITION_IDS})
PACKED_BATCH_KEYS = frozenset({INPUT_IDS, LABELS, POSITION_IDS, *(k for ks in _METADATA_WRITES.values() for k in ks)})
_LENGTH_KEYS = (PACKED_SEQ_LENGTHS, CU_SEQ_LENS_Q, CU_SEQ_LENS_K)  # the reader's order
_INT32_MAX = np.iinfo(np.int32).max


def check_metadata(metadata: Sequence[str] | str | None, layout: str = "flat") -> tuple[str, ...]:
    """The metadata names for ``layout`` (None: the layout's default), checked; raises ValueError naming the fix."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout = {layout!r}; choose one of {LAYOUTS}")
    if metadata is None:
        metadata = PADDED_METADATA if layout == "padded" else DEFAULT_METADATA
    if isinstance(metadata, str):
        metadata = (metadata,)
    metadata = tuple(metadata)
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        removed = ("; 'opensloth_varlen' belonged to the removed Qwen3-only attention route: for Unsloth use "
                   "metadata=UNSLOTH_METADATA with layout='flat' (what opensloth.wiring.wire_batches picks)"
                   ) if "opensloth_varlen" in unknown else ""
        raise ValueError(f"unknown metadata keys {unknown}; choose from {METADATA_KEYS}{removed}")
    if layout == "padded":
        varlen = sorted(set(metadata) - {"use_cache"})
        if varlen:
            raise ValueError(f"layout='padded' puts one sample in each row and carries its own 2-D attention_mask; "
                             f"the packing metadata {varlen} does not apply: use metadata=('use_cache',)")
    return metadata


def metadata_in(batch: Mapping[str, Any]) -> tuple[str, ...]:
    """The metadata names whose keys ``batch`` carries (a 4-D ``attention_mask`` counts, a 2-D one does not)."""
    names = []
    for name, keys in _METADATA_WRITES.items():
        if name == "attention_mask":
            mask = batch.get(ATTENTION_MASK)
            if getattr(mask, "ndim", 0) == 4:
                names.append(name)
        elif any(k in batch for k in keys):
            names.append(name)
    return tuple(names)


# ---------------------------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------------------------


def metadata_tensors(segments: Segments, metadata: Sequence[str], *,
                     mask_dtype: torch.dtype = torch.bool) -> dict[str, Any]:
    """The metadata keys of ``metadata`` (names of `METADATA_KEYS`) for ``segments`` (padding segments included).

    Raises ValueError when the batch is too large for int32 metadata. The caller validated ``metadata``
    (`check_metadata`).
    """
    out: dict[str, Any] = {}
    if "packed_seq_lengths" in metadata or "cu_seq_lens" in metadata:
        cu = cu_seq_lens_from_lengths(segments)  # int32, checks the batch fits int32 indexing
        longest = int(segments.lengths.max())
        if "packed_seq_lengths" in metadata:
            out[PACKED_SEQ_LENGTHS] = torch.from_numpy(segments.lengths.astype(np.int32))
        if "cu_seq_lens" in metadata:
            out[CU_SEQ_LENS_Q] = cu
            out[CU_SEQ_LENS_K] = cu
            out[MAX_LENGTH_Q] = longest
            out[MAX_LENGTH_K] = longest
    if "seq_idx" in metadata:
        ids = segments.segment_ids(per_row=True).astype(np.int32)
        out[SEQ_IDX] = torch.from_numpy(ids).reshape(segments.n_rows, segments.width)
    if "attention_mask" in metadata:
        out[ATTENTION_MASK] = block_causal_mask(segments, dtype=mask_dtype)
    if "use_cache" in metadata:
        out[USE_CACHE] = False
    return out


class PackedBatch(dict):
    """A collated batch: a plain dict of the contract's keys, plus ``segments``, the record of every segment and
    which are padding (`opensloth.masks.Segments`), as an attribute that ``model(**batch)`` never sees.

    ``.to(device)`` (what accelerate calls on batches that have it) returns a PackedBatch with every tensor moved
    and the record kept; pickling and ``copy.copy`` keep it too. Code that rebuilds the dict drops the record, and
    the reader falls back to the batch's own keys.
    """

    segments: Segments | None = None

    def __init__(self, *args: Any, segments: Segments | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if segments is not None:
            self.segments = segments

    def to(self, *args: Any, **kwargs: Any) -> PackedBatch:
        moved = {k: (v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v) for k, v in self.items()}
        return PackedBatch(moved, segments=self.segments)

    def __repr__(self) -> str:
        return f"PackedBatch({dict.__repr__(self)})"


# ---------------------------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------------------------


class BatchFormatError(ValueError):
    """A batch whose keys contradict each other or the contract (the message says which and how)."""


@dataclass(frozen=True)
class BatchSegments:
    """What `read_batch` found. ``segments``: every segment of the (P, L) batch in flattened order with its padding
    flag. ``layout``: ``"flat"`` (one row), ``"rows"`` or ``"padded"``. ``source``: the key the boundaries came from
    (``"packed_seq_lengths"``, ``"cu_seq_lens_q"``, ``"cu_seq_lens_k"``, ``"seq_lengths"``, ``"position_ids"``,
    ``"attention_mask"``, or ``"none"``: one segment per row). ``padding``: how padding was known (``"record"``,
    ``"attention_mask"``, ``"seq_lengths"``, ``"rule"``)."""

    segments: Segments
    layout: str
    source: str
    padding: str

    def row_segments(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(lengths, is_pad) of every row's segments."""
        seg = self.segments
        ptr = seg.row_ptr.tolist()
        return [(seg.lengths[a:b], seg.is_pad[a:b]) for a, b in zip(ptr[:-1], ptr[1:], strict=True)]

    def real_lengths(self) -> np.ndarray:
        """int64 lengths of the samples (padding segments left out), in batch order."""
        return self.segments.lengths[~self.segments.is_pad]

    def pad_mask(self) -> np.ndarray:
        """bool (P, L): True on padding tokens."""
        seg = self.segments
        return np.repeat(seg.is_pad, seg.lengths).reshape(seg.n_rows, seg.width)


def _numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise BatchFormatError(f"{name} is not an array ({exc}); pad ragged rows first") from None
    if arr.dtype == np.bool_:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise BatchFormatError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    if shape is None:
        try:
            shape = np.shape(value)
        except ValueError:  # ragged lists
            raise BatchFormatError("input_ids is ragged; pad its rows to one length first") from None
    return tuple(int(n) for n in shape)


def _csr(counts: Sequence[int]) -> np.ndarray:
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr


def _split_rows(flat: np.ndarray, n_rows: int, width: int, source: str) -> np.ndarray:
    """row_ptr of flat segment lengths over a (n_rows, width) batch, checking they tile it row by row."""
    total = n_rows * width
    if flat.size == 0 or (flat < 1).any():
        raise BatchFormatError(f"{source} = {flat.tolist()[:8]}... has an empty or negative segment; every segment "
                               "has at least one token")
    if int(flat.sum()) != total:
        raise BatchFormatError(
            f"{source} sums to {int(flat.sum())} but the batch has {total} tokens (a padded tail, e.g. "
            "pad_to_multiple_of, that the lengths do not describe)"
        )
    ends = np.cumsum(flat)
    row_ends = np.arange(width, total + 1, width, dtype=np.int64)
    if n_rows > 1 and np.setdiff1d(row_ends, ends).size:
        raise BatchFormatError(f"{source} has a segment that crosses a row boundary (rows of {width} tokens)")
    ptr = np.zeros(n_rows + 1, dtype=np.int64)
    ptr[1:] = np.searchsorted(ends, row_ends) + 1
    return ptr


def _seq_lengths_rows(value: Any, n_rows: int, width: int) -> list[np.ndarray]:
    """Per-row real sample lengths from a batch's ``seq_lengths``: one sequence per row, a zero-padded (P, S) array,
    or (one row) a flat sequence."""
    if isinstance(value, (list, tuple)) and len(value) == n_rows and all(
        np.ndim(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) == 1 for v in value
    ):
        rows = [_numpy(v, f"seq_lengths[{r}]") for r, v in enumerate(value)]
    else:
        arr = _numpy(value, "seq_lengths")
        if arr.ndim == 2 and arr.shape[0] == n_rows:
            rows = [r[r > 0] for r in arr]
        elif arr.ndim == 1 and n_rows == 1:
            rows = [arr]
        else:
            raise BatchFormatError(f"seq_lengths of shape {arr.shape} does not describe {n_rows} rows")
    for r, row in enumerate(rows):
        if row.size == 0 or (row < 1).any() or int(row.sum()) > width:
            raise BatchFormatError(f"seq_lengths of row {r} = {row.tolist()[:8]} must be positive and sum to at "
                                   f"most the row width {width}")
    return rows


def _padded_segments(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lengths, is_pad, row_ptr) of a (B, L) padded batch: [left padding] sample [right padding] per row."""
    real = mask != 0
    width = real.shape[1]
    counts = real.sum(axis=1)
    if (counts == 0).any():
        raise BatchFormatError(f"padded row {int(np.argmin(counts))} has no real token (attention_mask all 0)")
    first = real.argmax(axis=1)
    cols = np.arange(width)[None, :]
    contiguous = (cols >= first[:, None]) & (cols < (first + counts)[:, None])
    if not np.array_equal(real, contiguous):
        r = int(np.argmax((real != contiguous).any(axis=1)))
        raise BatchFormatError(f"attention_mask row {r} has padding between real tokens; a padded row holds one "
                               "sample, padded on the left or the right")
    parts = np.stack([first, counts, width - first - counts], axis=1)  # (B, 3): left pad, sample, right pad
    keep = parts > 0
    is_pad = np.broadcast_to(np.array([True, False, True]), parts.shape)[keep]
    return parts[keep].astype(np.int64), is_pad.copy(), _csr(keep.sum(axis=1))


def _pad_rule(lengths: np.ndarray, ptr: np.ndarray, batch: Mapping[str, Any], shape: tuple[int, int],
              pad_token_id: int | None, ignore_index: int) -> np.ndarray:
    """The padding rule (module docstring): which rows' last segment is padding. Reads only those tails."""
    is_pad = np.zeros(lengths.shape[0], dtype=bool)
    if batch.get(LABELS) is None:
        return is_pad
    candidates = np.flatnonzero(np.diff(ptr) >= 2)
    if candidates.size == 0:
        return is_pad
    ids = _numpy(batch[INPUT_IDS], INPUT_IDS).reshape(shape)
    labels = _numpy(batch[LABELS], LABELS).reshape(shape)
    width = shape[1]
    for r in candidates.tolist():
        last = int(ptr[r + 1] - 1)
        n = int(lengths[last])
        tail_ids, tail_labels = ids[r, width - n:], labels[r, width - n:]
        want = tail_ids[0] if pad_token_id is None else pad_token_id
        if (tail_labels == ignore_index).all() and (tail_ids == want).all():
            is_pad[last] = True
    return is_pad


def _lengths_from(batch: Mapping[str, Any], key: str) -> np.ndarray:
    if key == PACKED_SEQ_LENGTHS:
        return _numpy(batch[key], key).reshape(-1)
    try:
        return lengths_from_cu_seq_lens(batch[key]).numpy().astype(np.int64)
    except (ValueError, TypeError) as exc:
        raise BatchFormatError(f"{key}: {exc}") from None


def read_batch(batch: Mapping[str, Any], *, pad_token_id: int | None = None,
               ignore_index: int = IGNORE_INDEX) -> BatchSegments:
    """Every segment of a collated batch, padding segments flagged: from this package's collator, TRL's collators
    (padded and padding-free), Unsloth's keys or a hand-made dict of the contract's keys (module docstring).

    Boundaries come from, in order: a 2-D ``attention_mask`` (padded layout), ``seq_lengths`` (per-row real
    samples), ``packed_seq_lengths``, ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``position_ids`` (a segment starts
    wherever a position is not the previous plus one), else one segment per row; when lengths come from one of the
    length keys, the other length keys must agree and ``position_ids`` must restart where they say.
    ``pad_token_id`` sharpens the padding rule. Raises `BatchFormatError` (a ValueError) for keys that contradict
    each other.
    """
    if not isinstance(batch, Mapping) or INPUT_IDS not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise BatchFormatError(f"a batch is a dict with 'input_ids' (got {keys})")
    shape = _shape(batch[INPUT_IDS])
    if len(shape) not in (1, 2):
        raise BatchFormatError(f"input_ids must be (T,) or (P, L), got shape {shape}")
    nested = len(shape) == 2
    n_rows, width = shape if nested else (1, shape[0])
    if n_rows == 0 or width == 0:
        raise BatchFormatError(f"the batch is empty (input_ids of shape {shape})")
    labels = batch.get(LABELS)
    if labels is not None and int(np.prod(_shape(labels))) != n_rows * width:
        raise BatchFormatError(f"labels have shape {_shape(labels)} but input_ids {shape}")

    mask = batch.get(ATTENTION_MASK)
    if mask is not None and len(_shape(mask)) == 2:
        mask = _numpy(mask, ATTENTION_MASK)
        if mask.shape != (n_rows, width):
            raise BatchFormatError(f"attention_mask has shape {mask.shape} but input_ids {shape}")
        lengths, is_pad, ptr = _padded_segments(mask)
        return BatchSegments(Segments(lengths, is_pad, ptr, n_rows, width, nested), "padded", ATTENTION_MASK,
                             ATTENTION_MASK)

    layout = "flat" if n_rows == 1 else "rows"
    pos = batch.get(POSITION_IDS)
    if pos is not None and int(np.prod(_shape(pos))) != n_rows * width:
        raise BatchFormatError(f"position_ids have shape {_shape(pos)} but input_ids {shape}")
    source = next((k for k in (SEQ_LENGTHS, *_LENGTH_KEYS) if batch.get(k) is not None), None)
    is_pad = None
    padding = "rule"
    if source == SEQ_LENGTHS:
        rows = _seq_lengths_rows(batch[SEQ_LENGTHS], n_rows, width)
        parts, flags = [], []
        for row in rows:
            tail = width - int(row.sum())
            parts.append(np.append(row, tail) if tail else row)
            flags.append(np.arange(len(parts[-1])) == len(row))  # True only on the appended tail
        lengths, is_pad = np.concatenate(parts), np.concatenate(flags)
        ptr = _csr([len(p) for p in parts])
        padding = SEQ_LENGTHS
    elif source is not None:
        lengths = _lengths_from(batch, source)
        ptr = _split_rows(lengths, n_rows, width, source)
        for other in _LENGTH_KEYS[_LENGTH_KEYS.index(source) + 1:]:
            if batch.get(other) is not None and not np.array_equal(_lengths_from(batch, other), lengths):
                raise BatchFormatError(f"{other} and {source} describe different segments")
        if pos is not None:
            starts = np.cumsum(lengths) - lengths
            expected = np.arange(n_rows * width, dtype=np.int64) - np.repeat(starts, lengths)
            if not np.array_equal(_numpy(pos, POSITION_IDS).reshape(-1), expected):
                raise BatchFormatError(f"position_ids do not restart where {source} says the samples begin")
    elif pos is not None:
        rows = lengths_from_position_ids(_numpy(pos, POSITION_IDS).reshape(n_rows, width))
        lengths = np.concatenate([r.numpy() for r in rows]).astype(np.int64)
        ptr = _csr([len(r) for r in rows])
        source = POSITION_IDS
    else:
        lengths = np.full(n_rows, width, dtype=np.int64)
        ptr = np.arange(n_rows + 1, dtype=np.int64)
        source = "none"
    if is_pad is None:
        record = getattr(batch, "segments", None)
        if (isinstance(record, Segments) and record.n_rows == n_rows and record.width == width
                and np.array_equal(record.lengths, lengths) and np.array_equal(record.row_ptr, ptr)):
            is_pad, padding = record.is_pad, "record"
        else:
            is_pad = _pad_rule(lengths, ptr, batch, (n_rows, width), pad_token_id, ignore_index)
    return BatchSegments(Segments(lengths, is_pad, ptr, n_rows, width, nested), layout, source, padding)


def segments_from_batch(batch: Mapping[str, Any], *, pad_token_id: int | None = None,
                        ignore_index: int = IGNORE_INDEX) -> Segments:
    """The segments of a collated batch, padding segments flagged (`read_batch` says how they were found)."""
    return read_batch(batch, pad_token_id=pad_token_id, ignore_index=ignore_index).segments
