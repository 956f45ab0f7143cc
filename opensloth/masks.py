"""Packed-batch attention metadata: per-sample lengths <-> what attention implementations read.

Every function takes ``lengths`` in one of two forms:

- **flat**: a 1-D sequence of positive ints (list, tuple, numpy array or torch tensor), the samples of one row
  laid end to end (the padding-free layout, batch dim 1);
- **rows**: a sequence of such sequences, one per row of a (P, L) batch (a 2-D array or tensor works too).

``capacity`` is the row width L; by default the row's total (flat) or the longest row's total (rows). When the
samples of a row fill less than L, the rest of the row is **padding**, and padding is one segment of its own: its
positions count 0, 1, 2, ..., it attends only to itself (causally), and no real token attends to it. A fully masked
softmax row would otherwise give NaN (or 0) in some kernels, and NaN outputs leak into real tokens through
``0 * NaN`` in the next layer; a segment of its own is what transformers builds from such position_ids anyway.

Metadata is built on the CPU with numpy in O(tokens); the dense (P, 1, L, L) mask and the FlexAttention
``BlockMask`` are built only when asked for (backends that need them, and test oracles).

Conventions (the metadata side of the batch contract; the keys, presets and the reader of a collated batch are in
`opensloth.batch`):

- ``position_ids`` (int64) restart at 0 for every sample and for every padding segment;
- ``cu_seq_lens`` (int32, CPU, S + 1 entries) and the segment lengths cover the whole flattened batch, padding
  segments included, so ``cu_seq_lens[-1] == P * L``: flash-attention varlen kernels (and transformers'
  ``cu_seq_lens_q``/``cu_seq_lens_k`` path) flatten the batch and leave tokens past ``cu_seq_lens[-1]`` unwritten;
- ``seq_idx`` (int32) numbers the segments of each row from 0;
- ``mask_boundary_labels`` sets the label of the first token of every sample (and of every padding token) to -100,
  so no sample is trained to predict across a boundary and the count of trained targets over ``labels[..., 1:]``
  equals the unpacked count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
import torch

__all__ = [
    "Segments",
    "block_causal_mask",
    "cu_seq_lens_from_lengths",
    "flex_block_mask",
    "lengths_from_cu_seq_lens",
    "lengths_from_position_ids",
    "mask_boundary_labels",
    "position_ids_from_lengths",
    "segments_from_csr",
    "segments_from_lengths",
    "seq_idx_from_lengths",
]

_INT32_MAX = np.iinfo(np.int32).max


# ---------------------------------------------------------------------------------------------------------------
# Normalised form: every segment of the flattened batch, padding segments included
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segments:
    """The segments of a (n_rows, width) batch in flattened order, padding segments included.

    ``lengths`` int64 (S,) and ``is_pad`` bool (S,); ``row_ptr`` int64 (n_rows + 1,) is CSR over segments (the
    segments of row r are ``lengths[row_ptr[r]:row_ptr[r + 1]]``); ``nested`` says whether the input was the rows
    form (results keep a row dimension) or the flat form (results are 1-D).
    """

    lengths: np.ndarray
    is_pad: np.ndarray
    row_ptr: np.ndarray
    n_rows: int
    width: int
    nested: bool

    @property
    def total(self) -> int:
        return self.n_rows * self.width

    def starts(self) -> np.ndarray:
        """Flattened start offset of every segment (int64)."""
        return np.cumsum(self.lengths) - self.lengths

    def positions(self) -> np.ndarray:
        """int64 position of every token of the flattened batch, restarting at 0 for each segment."""
        total = self.total
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        return np.arange(total, dtype=np.int64) - np.repeat(self.starts(), self.lengths)

    def segment_ids(self, per_row: bool = False) -> np.ndarray:
        """Segment index of every token of the flattened batch (global, or restarting at 0 in each row)."""
        ids = np.arange(self.lengths.shape[0], dtype=np.int64)
        if per_row and self.n_rows > 1:
            ids = ids - np.repeat(self.row_ptr[:-1], np.diff(self.row_ptr))
        return np.repeat(ids, self.lengths)

    def shape(self) -> tuple[int, ...]:
        return (self.n_rows, self.width) if self.nested else (self.width,)


def _int_array(values: Any, name: str) -> np.ndarray:
    """A 1-D int64 numpy view/copy of a list, array or tensor of integers (no per-element Python work)."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"{name} has dtype {values.dtype}; pass integer lengths")
        arr = values.detach().cpu().numpy()
    else:
        arr = np.asarray(values)
        if arr.dtype == object:
            raise TypeError(f"{name} must hold integers, got {values!r:.200}")
        if arr.size == 0:
            arr = arr.astype(np.int64)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        raise TypeError(f"{name} has dtype {arr.dtype}; pass integer lengths")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds a value that does not fit in int64")
    return arr.astype(np.int64, copy=False)


def _is_nested(lengths: Any) -> bool:
    if isinstance(lengths, (torch.Tensor, np.ndarray)):
        if lengths.ndim == 2:
            return True
        if lengths.ndim == 1:
            return lengths.dtype == object
        raise ValueError(f"lengths must be 1-D (flat) or 2-D / a sequence of sequences (rows), got shape "
                         f"{tuple(lengths.shape)}")
    if isinstance(lengths, (str, bytes, dict)) or not isinstance(lengths, Sequence):
        raise TypeError(f"lengths must be a sequence of ints or a sequence of per-row sequences, got "
                        f"{type(lengths).__name__}")
    if len(lengths) == 0:
        return False
    first = lengths[0]
    return not isinstance(first, (Integral, np.integer)) and not (
        isinstance(first, (torch.Tensor, np.ndarray)) and first.ndim == 0
    )


def _as_capacity(capacity: Any) -> int | None:
    if capacity is None:
        return None
    if isinstance(capacity, (bool, np.bool_)) or not isinstance(capacity, (Integral, np.integer)):
        raise TypeError(f"capacity must be a positive integer or None, got {capacity!r}")
    capacity = int(capacity)
    if capacity <= 0:
        raise ValueError(f"capacity = {capacity} must be a positive integer (the row width)")
    return capacity


def segments_from_lengths(lengths: Any, capacity: int | None = None) -> Segments:
    """Validate ``lengths`` (flat or rows form) and return every segment of the batch, padding included.

    A ``Segments`` passes through unchanged (``capacity`` must then be None or its width). Raises ValueError
    naming the row, index and value for a length below 1, and for a row whose samples exceed ``capacity``;
    TypeError for non-integer input.
    """
    capacity = _as_capacity(capacity)
    if isinstance(lengths, Segments):
        if capacity is not None and capacity != lengths.width:
            raise ValueError(f"capacity = {capacity} differs from the segments' width {lengths.width}")
        return lengths
    nested = _is_nested(lengths)
    if nested:
        rows = [_int_array(row, f"lengths[{r}]") for r, row in enumerate(lengths)]
    else:
        rows = [_int_array(lengths, "lengths")]
    n_rows = len(rows)
    counts = np.fromiter((row.shape[0] for row in rows), dtype=np.int64, count=n_rows)
    flat = np.concatenate(rows) if n_rows else np.zeros(0, dtype=np.int64)
    if flat.size and flat.min() < 1:
        i = int(np.argmax(flat < 1))
        r = int(np.searchsorted(np.cumsum(counts), i, side="right"))
        where = f"lengths[{r}][{i - int(np.sum(counts[:r]))}]" if nested else f"lengths[{i}]"
        raise ValueError(f"{where} = {int(flat[i])}: every sample length must be at least 1 (drop empty samples)")
    ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    csum = np.concatenate(([0], np.cumsum(flat)))
    row_sums = csum[ptr[1:]] - csum[ptr[:-1]]
    width = capacity if capacity is not None else int(row_sums.max()) if n_rows else 0
    if n_rows and row_sums.max() > width:
        r = int(np.argmax(row_sums > width))
        where = f"row {r}'s samples" if nested else "the samples"
        raise ValueError(
            f"{where} sum to {int(row_sums[r])} tokens, over the capacity {width}; pass a larger capacity or "
            f"put fewer samples in the row"
        )
    return segments_from_csr(flat, ptr, width, nested=nested, row_sums=row_sums)


def segments_from_csr(lengths: np.ndarray, row_ptr: np.ndarray, width: int, *, nested: bool = True,
                      row_sums: np.ndarray | None = None) -> Segments:
    """Segments of rows given in CSR form (``lengths[row_ptr[r]:row_ptr[r + 1]]`` are row r's samples), each row
    padded to ``width`` by a padding segment. No validation: the caller guarantees positive int64 lengths and row
    totals within ``width`` (the collator validates its features once, then calls this).
    """
    if row_sums is None:
        csum = np.concatenate(([0], np.cumsum(lengths)))
        row_sums = csum[row_ptr[1:]] - csum[row_ptr[:-1]]
    pads = width - row_sums
    has_pad = pads > 0
    if has_pad.any():
        at = row_ptr[1:][has_pad]
        seg_lengths = np.insert(lengths, at, pads[has_pad])
        is_pad = np.insert(np.zeros(lengths.shape[0], dtype=bool), at, True)
        row_ptr = row_ptr + np.concatenate(([0], np.cumsum(has_pad)))
    else:
        seg_lengths, is_pad = lengths, np.zeros(lengths.shape[0], dtype=bool)
    return Segments(seg_lengths, is_pad, row_ptr, int(row_ptr.shape[0] - 1), int(width), nested)


def _to_torch(arr: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype, device: Any = None) -> torch.Tensor:
    out = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype).reshape(shape)
    return out if device is None else out.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------


def position_ids_from_lengths(lengths: Any, capacity: int | None = None, *, device: Any = None) -> torch.Tensor:
    """int64 position ids restarting at 0 for every sample (and for a row's padding segment).

    Flat ``lengths`` give a 1-D tensor of ``capacity`` (default: the total) positions; rows give (P, capacity).
    """
    seg = segments_from_lengths(lengths, capacity)
    return _to_torch(seg.positions(), seg.shape(), torch.int64, device)


def cu_seq_lens_from_lengths(lengths: Any, capacity: int | None = None) -> torch.Tensor:
    """Cumulative segment lengths, int32 on the CPU, (S + 1,) starting at 0, over the flattened batch.

    Padding segments are included, so the last entry is the number of tokens in the batch (rows x capacity).
    """
    seg = segments_from_lengths(lengths, capacity)
    if seg.total > _INT32_MAX:
        raise ValueError(f"the batch has {seg.total} tokens, more than int32 cu_seq_lens can index ({_INT32_MAX})")
    cu = np.zeros(seg.lengths.shape[0] + 1, dtype=np.int32)
    np.cumsum(seg.lengths, out=cu[1:])
    return torch.from_numpy(cu)


def seq_idx_from_lengths(lengths: Any, capacity: int | None = None, *, device: Any = None) -> torch.Tensor:
    """int32 index of the segment each token belongs to, counted from 0 in each row (padding is a segment).

    Flat ``lengths`` give a 1-D tensor; rows give (P, capacity). This is the ``seq_idx`` that Mamba-style kernels
    and transformers' ``TransformersKwargs`` read.
    """
    seg = segments_from_lengths(lengths, capacity)
    return _to_torch(seg.segment_ids(per_row=True), seg.shape(), torch.int32, device)


def _as_numpy_2d(values: Any, name: str) -> tuple[np.ndarray, bool]:
    if isinstance(values, torch.Tensor):
        arr = values.detach().cpu().numpy()
    else:
        arr = np.asarray(values)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        return arr.astype(np.int64, copy=False)[None, :], False
    if arr.ndim == 2:
        return arr.astype(np.int64, copy=False), True
    raise ValueError(f"{name} must be 1-D (T,) or 2-D (P, L), got shape {arr.shape}")


def lengths_from_position_ids(position_ids: Any) -> torch.Tensor | list[torch.Tensor]:
    """Segment lengths from position ids: a segment starts at index 0 and wherever a position is not the previous
    one plus 1 (the rule transformers applies in ``find_packed_sequence_indices``).

    A 1-D input gives a 1-D int64 tensor; a 2-D (P, L) input gives a list of P such tensors. A row's padding
    (positions 0, 1, 2, ... after its last sample) comes back as a segment of its own.
    """
    arr, nested = _as_numpy_2d(position_ids, "position_ids")
    n_rows, width = arr.shape
    out = []
    for r in range(n_rows):
        if width == 0:
            out.append(torch.zeros(0, dtype=torch.int64))
            continue
        row = arr[r]
        start = np.empty(width, dtype=bool)
        start[0] = True
        np.not_equal(row[1:], row[:-1] + 1, out=start[1:])
        bounds = np.append(np.flatnonzero(start), width)
        out.append(torch.from_numpy(np.diff(bounds)))
    return out if nested else out[0]


def lengths_from_cu_seq_lens(cu_seq_lens: Any) -> torch.Tensor:
    """Segment lengths (int64) from cumulative lengths: ``cu[0]`` must be 0 and the entries strictly increasing."""
    arr = _int_array(cu_seq_lens, "cu_seq_lens")
    if arr.shape[0] == 0:
        raise ValueError("cu_seq_lens is empty; it has one more entry than there are segments and starts with 0")
    if arr[0] != 0:
        raise ValueError(f"cu_seq_lens[0] = {int(arr[0])}; cumulative lengths start at 0")
    lengths = np.diff(arr)
    if lengths.size and lengths.min() < 1:
        i = int(np.argmax(lengths < 1))
        raise ValueError(
            f"cu_seq_lens[{i + 1}] = {int(arr[i + 1])} is not above cu_seq_lens[{i}] = {int(arr[i])}; cumulative "
            f"lengths must strictly increase (every segment has at least one token)"
        )
    return torch.from_numpy(lengths)


def mask_boundary_labels(labels: torch.Tensor, lengths: Any, *, ignore_index: int = -100) -> torch.Tensor:
    """Return a copy of ``labels`` with the first token of every sample, and every padding token, set to
    ``ignore_index``.

    ``labels`` is (T,), (1, T) or (P, L). Rows-form ``lengths`` (one entry per row) describe the rows of a (P, L)
    tensor; flat ``lengths`` describe the flattened tensor (Unsloth's convention for ``packed_seq_lengths``), and
    tokens past their sum are padding. Causal LM losses predict ``labels[i + 1]`` from token i, so the first label
    of a sample is the target that would cross from the previous sample.
    """
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() not in (1, 2):
        raise ValueError(f"labels must be (T,), (1, T) or (P, L), got shape {tuple(labels.shape)}")
    if _is_nested(lengths):
        if labels.dim() != 2 or len(lengths) != labels.shape[0]:
            raise ValueError(
                f"rows-form lengths have {len(lengths)} rows but labels have shape {tuple(labels.shape)}; pass "
                f"one list of lengths per row of a (P, L) labels tensor"
            )
        seg = segments_from_lengths(lengths, labels.shape[1])
    else:
        seg = segments_from_lengths(lengths, labels.numel())
    out = labels.clone(memory_format=torch.contiguous_format)
    flat = out.view(-1)
    starts = seg.starts()[~seg.is_pad]
    flat[torch.from_numpy(starts).to(flat.device)] = ignore_index
    if seg.is_pad.any():
        pad = np.repeat(seg.is_pad, seg.lengths)
        flat[torch.from_numpy(pad).to(flat.device)] = ignore_index
    return out


# ---------------------------------------------------------------------------------------------------------------
# Dense and flex masks (on request only)
# ---------------------------------------------------------------------------------------------------------------


def block_causal_mask(
    lengths: Any,
    capacity: int | None = None,
    *,
    dtype: torch.dtype = torch.bool,
    device: Any = None,
    causal: bool = True,
) -> torch.Tensor:
    """Dense (P, 1, L, L) mask: query i may attend key j iff both are in the same segment and j <= i.

    ``dtype=torch.bool`` gives True where attention is allowed (sdpa); a floating dtype gives an additive mask,
    0 where allowed and ``torch.finfo(dtype).min`` elsewhere (eager and sdpa). Flat lengths give P = 1.
    ``causal=False`` allows attention both ways inside each segment. Costs P * L * L elements: build it only for
    backends that need it, or as a test oracle.
    """
    if not (dtype == torch.bool or dtype.is_floating_point):
        raise TypeError(f"dtype must be torch.bool or a floating dtype, got {dtype}")
    seg = segments_from_lengths(lengths, capacity)
    if dtype == torch.bool:
        on, off = True, False
    else:
        on, off = 0.0, torch.finfo(dtype).min
    return dense_segment_mask(seg, "causal" if causal else "full", on=on, off=off, dtype=dtype, device=device)


def dense_segment_mask(
    seg: Segments,
    block: str,
    *,
    on: float | bool,
    off: float | bool,
    dtype: torch.dtype,
    device: Any = None,
    pad_block: str | None = None,
) -> torch.Tensor:
    """(P, 1, L, L) tensor, ``off`` everywhere except each segment's diagonal block, which holds the pattern
    ``block`` ("causal": lower triangle, "full", "identity") with ``on`` where allowed. Padding segments get
    ``pad_block`` (default: the same pattern as ``block``; "none" leaves them all ``off``).

    Cost: one fill of P * L * L elements plus a copy per segment of its own block (sum of squared lengths), a
    loop over segments, not over tokens, and an order of magnitude faster than comparing segment ids pairwise.
    """
    n_rows, width = seg.n_rows, seg.width
    out = torch.full((n_rows, 1, width, width), off, dtype=dtype, device=device)
    if seg.lengths.shape[0] == 0:
        return out
    longest = int(seg.lengths.max())
    templates = {}

    def template(kind: str) -> torch.Tensor:
        if kind not in templates:
            if kind == "causal":
                allowed = torch.ones(longest, longest, dtype=torch.bool, device=device).tril_()
            elif kind == "full":
                allowed = torch.ones(longest, longest, dtype=torch.bool, device=device)
            elif kind == "identity":
                allowed = torch.eye(longest, dtype=torch.bool, device=device)
            else:
                raise ValueError(f"unknown block pattern {kind!r}; use 'causal', 'full' or 'identity'")
            t = torch.full((longest, longest), off, dtype=dtype, device=device)
            templates[kind] = t.masked_fill_(allowed, on)
        return templates[kind]

    pad_block = block if pad_block is None else pad_block
    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(seg.row_ptr))
    local = seg.starts() - row_of * width
    for r, a, n, is_pad in zip(row_of.tolist(), local.tolist(), seg.lengths.tolist(), seg.is_pad.tolist(),
                               strict=True):
        kind = pad_block if is_pad else block
        if kind != "none":
            out[r, 0, a : a + n, a : a + n] = template(kind)[:n, :n]
    return out


def flex_block_mask(
    lengths: Any,
    capacity: int | None = None,
    *,
    device: Any = "cpu",
    causal: bool = True,
    block_size: int = 128,
):
    """FlexAttention ``BlockMask`` for the same pattern as :func:`block_causal_mask` (document mask_mod).

    B = number of rows, H broadcast, Q_LEN = KV_LEN = capacity. Needs ``torch.nn.attention.flex_attention``
    (torch >= 2.5); raises RuntimeError saying so when it is missing.
    """
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        raise RuntimeError(
            f"flex_block_mask needs FlexAttention (torch.nn.attention.flex_attention, torch >= 2.5); this is torch "
            f"{torch.__version__}. Use block_causal_mask (dense) or position_ids metadata instead"
        ) from exc
    seg = segments_from_lengths(lengths, capacity)
    if seg.total == 0:
        raise ValueError("flex_block_mask needs at least one token (got an empty batch)")
    ids = torch.from_numpy(seg.segment_ids()).reshape(seg.n_rows, seg.width).to(device)

    if causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return (ids[b, q_idx] == ids[b, kv_idx]) & (kv_idx <= q_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return ids[b, q_idx] == ids[b, kv_idx]

    return create_block_mask(mask_mod, B=seg.n_rows, H=None, Q_LEN=seg.width, KV_LEN=seg.width, device=device,
                             BLOCK_SIZE=block_size)
