"""Batch assembly for HF/TRL Trainers: packed rows or unpacked samples -> a batch of the contract in `opensloth.batch`.

Input: a list of features (dicts). Each has ``input_ids`` (list, numpy array or 1-D tensor of ints) and optionally
``labels`` (same length, -100 = not trained; when absent, ``assistant_masks`` or ``completion_mask`` select the
trained tokens, else every token is trained) and ``seq_lengths`` (the per-sample lengths of a packed row from
``opensloth.data.packed``, summing to the row's length; when absent the feature is one sample). Other keys are
ignored. Labels are raw: the collator masks sample boundaries itself.

Output: a `opensloth.batch.PackedBatch` (a dict; its ``segments`` attribute records which segments are padding).
The keys, their shapes and dtypes and the metadata presets are the contract's (`opensloth.batch`):

- ``layout="flat"`` (padding-free, batch dim 1; the default): (1, T), every sample end to end in input order (T
  rounded up to ``pad_to_multiple_of``, the tail a padding segment).
- ``layout="rows"``: (P, capacity) tensors for static shapes: one row per feature, or, with ``pack=True`` (or an
  explicit ``rows=`` assignment), the samples of all features repacked into rows with
  :func:`opensloth.packing.pack_lengths`. Each row's trailing padding is a segment of its own (label -100, positions
  0, 1, 2, ...), so no real token attends to it.
- ``layout="padded"``: one row per *sample* (the samples of packed rows split by ``seq_lengths``), right-padded to
  the longest sample (rounded up to ``pad_to_multiple_of``), with a 2-D ``attention_mask`` (1 = real token) and
  positions 0 .. L-1 in every row: the plain padded batch that every model and attention backend handles, and the
  fallback where a model cannot keep packed samples apart (`opensloth.wiring`). The samples of a step stay the
  same, so the loss is the same as packed; only the padding costs more.

Metadata (``metadata=``; default ``DEFAULT_METADATA``, ``PADDED_METADATA`` for ``layout="padded"``): the names of
`opensloth.batch.METADATA_KEYS`, written by `opensloth.batch.metadata_tensors`. ``"use_cache"`` matters for the
position_ids-only path: transformers 5.x builds the block-causal mask from ``position_ids`` only when
``attention_mask`` is None *and* there is no KV cache, and Qwen3/Llama create a ``DynamicCache`` whenever
``use_cache`` is true (the config default), in training too; TRL's SFTTrainer sets it itself, a plain ``Trainer``
does not.

Which layout: flash-attention (``cu_seq_lens``) and Unsloth (``packed_seq_lengths``) read the metadata and build no
mask, so ``layout="flat"`` costs nothing quadratic. transformers' sdpa/eager paths instead materialise a dense
(B, 1, T, T) mask from ``position_ids`` in every forward: for the flat layout that is (P * L)^2 elements against
P * L^2 for ``layout="rows"``, so prefer rows there. With transformers 5.17, Qwen3 and Llama under
``attn_implementation="sdpa"`` or ``"eager"`` take every default key through ``**kwargs`` and ignore what they do not
use (tests/test_packed_equivalence.py checks logits and loss).

What Unsloth expects (unsloth/utils/packing.py, models/llama.py): ``packed_seq_lengths`` as an int32 tensor in the
forward kwargs (`opensloth.batch.UNSLOTH_METADATA`). Its attention turns it into cu_seqlens/max_seqlen and runs
flash-attention varlen, an xFormers block-diagonal causal mask, or per-segment SDPA; RoPE reads ``position_ids``;
its loss masks ``labels`` again at ``cumsum(packed_seq_lengths)`` (the same tokens we mask, so it is idempotent).
Unsloth treats the batch as ONE flattened sequence and its xFormers/SDPA packed paths assume batch size 1, so use
``layout="flat"`` with Unsloth. Its ``enable_sample_packing`` wraps only collators that have ``torch_call`` (TRL's),
so it leaves this one alone.

HF ``Trainer(remove_unused_columns=True)`` drops dataset columns that the model's ``forward`` does not name, and
``seq_lengths`` is one of them: set ``remove_unused_columns=False`` (TRL's SFTTrainer keeps ``seq_lengths``) or a
packed row arrives as one long sample. ``require_seq_lengths=True`` turns that into an error.

Speed: one pass over the features (a numpy view of each), one concatenation, index arithmetic in numpy, no work per
sample or per token in Python. Features that are numpy arrays or tensors (``dataset.with_format("numpy")``) are
fastest; Python lists cost a list -> array conversion of every column. Measured against TRL's collators in
benchmarks/results/collate.md.

Function-level API for code that rebuilds batches (the trainer integration)::

    collate_samples(features, layout="flat" | "rows" | "padded", capacity=None, pack=False, rows=None,
                    pad_token_id=0, pad_to_multiple_of=None, metadata=None, mask_dtype=torch.bool,
                    ignore_index=-100, seq_lengths_key="seq_lengths", require_seq_lengths=False, backend=None)

``rows`` (rows layout only) places the samples explicitly: a PackPlan or a list of index sequences over the
samples in input order (the samples of every feature, split by ``seq_lengths``), each sample exactly once; row r
holds ``rows[r]`` in that order. ``PackedDataCollator(**same options)`` is the callable for ``Trainer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opensloth.batch import (
    ATTENTION_MASK,
    DEFAULT_METADATA,
    INPUT_IDS,
    LABELS,
    LAYOUTS,
    METADATA_KEYS,
    PADDED_METADATA,
    POSITION_IDS,
    UNSLOTH_METADATA,
    PackedBatch,
    check_metadata,
    metadata_tensors,
)
from opensloth.masks import Segments, _int_array, segments_from_csr

# The contract's names are re-exported here: tests, scripts and users import them from opensloth.collate.
__all__ = [
    "DEFAULT_METADATA",
    "LAYOUTS",
    "METADATA_KEYS",
    "PADDED_METADATA",
    "UNSLOTH_METADATA",
    "PackedBatch",
    "PackedDataCollator",
    "collate_samples",
]


# ---------------------------------------------------------------------------------------------------------------
# Gathering features
# ---------------------------------------------------------------------------------------------------------------


def _tokens(values: Any, name: str) -> np.ndarray:
    """A 1-D integer numpy view (no copy for CPU tensors and int arrays) of a feature's token column."""
    if isinstance(values, np.ndarray):
        arr = values
    elif isinstance(values, torch.Tensor):
        arr = values.numpy(force=True)
    elif type(values) is list and values and type(values[0]) is int and type(values[-1]) is int:
        # Lists of Python ints (a datasets.Dataset without a format): fromiter is ~2x faster than asarray.
        return np.fromiter(values, dtype=np.int64, count=len(values))
    else:
        arr = np.asarray(values)
    if arr.ndim != 1:
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        else:
            raise ValueError(f"{name} must be 1-D (one sample or one packed row), got shape {arr.shape}")
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        if arr.size == 0:
            return arr.astype(np.int64)
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr


@dataclass
class _Gathered:
    ids: np.ndarray  # int64 (T,), every token of every feature in input order
    labels: np.ndarray  # int64 (T,), a separate buffer (safe to modify)
    sample_lengths: np.ndarray  # int64 (N,)
    feature_ptr: np.ndarray  # int64 (F + 1,), CSR of samples per feature


def _gather(features: Sequence[Mapping], seq_lengths_key: str, ignore_index: int,
            require_seq_lengths: bool) -> _Gathered:
    if isinstance(features, Mapping) or not isinstance(features, Sequence):
        raise TypeError(f"features must be a list of dicts (one per sample or packed row), got "
                        f"{type(features).__name__}")
    if len(features) == 0:
        raise ValueError("cannot collate an empty list of features; every batch needs at least one sample")
    n_features = len(features)
    ids_parts, label_parts, length_parts = [], [], []
    n_tokens = np.empty(n_features, dtype=np.int64)
    n_samples = np.ones(n_features, dtype=np.int64)
    for i, feature in enumerate(features):
        if not isinstance(feature, Mapping):
            raise TypeError(f"features[{i}] is a {type(feature).__name__}, not a dict with 'input_ids'")
        if "input_ids" not in feature:
            raise ValueError(f"features[{i}] has no 'input_ids' (keys: {sorted(feature)})")
        ids = _tokens(feature["input_ids"], f"features[{i}]['input_ids']")
        n_tok = ids.shape[0]
        if n_tok == 0:
            raise ValueError(f"features[{i}] has no tokens; drop empty samples before collating")
        labels = feature.get("labels")
        if labels is None:
            mask = feature.get("assistant_masks")
            if mask is None:
                mask = feature.get("completion_mask")
            if mask is not None:
                mask = _tokens(mask, f"features[{i}]['assistant_masks' / 'completion_mask']")
                if mask.shape[0] != n_tok:
                    raise ValueError(f"features[{i}] has {n_tok} input_ids but a mask of {mask.shape[0]} entries")
                labels = np.where(mask != 0, ids, ignore_index)
            else:
                labels = ids
        else:
            labels = _tokens(labels, f"features[{i}]['labels']")
            if labels.shape[0] != n_tok:
                raise ValueError(
                    f"features[{i}] has {n_tok} input_ids but {labels.shape[0]} labels; they must match one to one"
                )
        lengths = feature.get(seq_lengths_key)
        if lengths is None:
            if require_seq_lengths:
                raise ValueError(
                    f"features[{i}] has no {seq_lengths_key!r}; packed rows need it. HF Trainer drops it with "
                    f"remove_unused_columns=True: set remove_unused_columns=False"
                )
            lengths = n_tok
        else:
            lengths = _int_array(lengths, f"features[{i}][{seq_lengths_key!r}]")
            n_samples[i] = lengths.shape[0]
            if n_samples[i] == 0:
                raise ValueError(f"features[{i}][{seq_lengths_key!r}] is empty but the row has {n_tok} tokens")
        ids_parts.append(ids)
        label_parts.append(labels)
        length_parts.append(lengths)
        n_tokens[i] = n_tok
    ptr = np.zeros(n_features + 1, dtype=np.int64)
    np.cumsum(n_samples, out=ptr[1:])
    if ptr[-1] == n_features:  # one sample per feature: the lengths are the token counts
        sample_lengths = n_tokens
    else:
        sample_lengths = np.concatenate([np.atleast_1d(x) for x in length_parts]).astype(np.int64, copy=False)
        bad = sample_lengths < 1
        if bad.any():
            j = int(np.argmax(bad))
            i = int(np.searchsorted(ptr, j, side="right") - 1)
            raise ValueError(f"features[{i}][{seq_lengths_key!r}][{j - int(ptr[i])}] = {int(sample_lengths[j])}: "
                             f"every sample length must be at least 1")
        sums = np.add.reduceat(sample_lengths, ptr[:-1])
        if not np.array_equal(sums, n_tokens):
            i = int(np.argmax(sums != n_tokens))
            raise ValueError(
                f"features[{i}][{seq_lengths_key!r}] sums to {int(sums[i])} but the row has {int(n_tokens[i])} "
                f"input_ids; the per-sample lengths of a packed row must add up to its length"
            )
    return _Gathered(
        ids=np.concatenate(ids_parts).astype(np.int64, copy=False),
        labels=np.concatenate(label_parts).astype(np.int64, copy=False),
        sample_lengths=sample_lengths,
        feature_ptr=ptr,
    )


# ---------------------------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------------------------


def _round_up(value: int, multiple: int | None) -> int:
    if not multiple:
        return value
    return -(-value // multiple) * multiple


def _row_assignment(rows: Any, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, row_ptr) from a PackPlan or a list of index sequences, checking each sample appears exactly once."""
    from opensloth.packing import PackPlan

    if isinstance(rows, PackPlan):
        order, ptr = np.asarray(rows.items, dtype=np.int64), np.asarray(rows.bin_ptr, dtype=np.int64)
    else:
        parts = [_int_array(r, f"rows[{i}]") for i, r in enumerate(rows)]
        if not parts:
            raise ValueError("rows is empty; give at least one row")
        ptr = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([p.shape[0] for p in parts], out=ptr[1:])
        order = np.concatenate(parts)
    if order.shape[0] != n_samples or not np.array_equal(np.sort(order), np.arange(n_samples)):
        seen = np.bincount(order[(order >= 0) & (order < n_samples)], minlength=n_samples) if order.size else \
            np.zeros(n_samples, dtype=np.int64)
        bad = order[(order < 0) | (order >= n_samples)]
        detail = (f"index {int(bad[0])} is out of range" if bad.size else
                  f"sample {int(np.argmax(seen != 1))} appears {int(seen[np.argmax(seen != 1)])} times")
        raise ValueError(
            f"rows must place each of the {n_samples} samples exactly once ({detail}); index the samples in input "
            f"order, the samples of every feature split by seq_lengths"
        )
    return order, ptr


def _assemble(
    ids: np.ndarray,
    labels: np.ndarray,
    sample_lengths: np.ndarray,
    order: np.ndarray | None,
    row_ptr: np.ndarray,
    width: int,
    *,
    pad_token_id: int,
    ignore_index: int,
) -> tuple[np.ndarray, np.ndarray, Segments]:
    """Place samples (in ``order``, rows by ``row_ptr`` over that order) into a (P, width) grid.

    Returns flat grids of ids and labels (labels boundary-masked, padding = ignore_index) and the Segments. The
    caller guarantees every row total is within ``width``. ``labels`` may be modified in place.
    """
    if order is not None and np.array_equal(order, np.arange(order.shape[0])):
        order = None
    if order is None:
        lens = sample_lengths
    else:
        lens = sample_lengths[order]
        src_starts = np.cumsum(sample_lengths) - sample_lengths
        new_starts = np.cumsum(lens) - lens
        total = int(lens.sum())
        src = np.arange(total, dtype=np.int64) + np.repeat(src_starts[order] - new_starts, lens)
        ids, labels = ids[src], labels[src]
    csum = np.zeros(lens.shape[0] + 1, dtype=np.int64)
    np.cumsum(lens, out=csum[1:])
    row_tok = csum[row_ptr]
    row_sums = np.diff(row_tok)
    n_rows = row_sums.shape[0]
    sample_starts = csum[:-1]
    if n_rows == 1 and int(row_sums[0]) == width:
        grid_ids, grid_labels = ids, labels
        starts_grid = sample_starts
    else:
        # A boolean-mask store fills the rows' leading slots in row-major order, i.e. in token order (an order of
        # magnitude faster than scattering through an index array).
        filled = np.arange(width, dtype=np.int64)[None, :] < row_sums[:, None]
        grid_ids = np.full((n_rows, width), pad_token_id, dtype=np.int64)
        grid_labels = np.full((n_rows, width), ignore_index, dtype=np.int64)
        grid_ids[filled] = ids
        grid_labels[filled] = labels
        grid_ids, grid_labels = grid_ids.reshape(-1), grid_labels.reshape(-1)
        offsets = np.arange(n_rows, dtype=np.int64) * width - row_tok[:-1]
        starts_grid = sample_starts + np.repeat(offsets, np.diff(row_ptr))
    grid_labels[starts_grid] = ignore_index
    seg = segments_from_csr(lens, row_ptr, width, nested=True, row_sums=row_sums)
    return grid_ids, grid_labels, seg


def _check_options(layout: str, capacity: Any, pack: bool, rows: Any, pad_to_multiple_of: Any,
                   metadata: Sequence[str], mask_dtype: Any) -> tuple[int | None, int | None, tuple[str, ...]]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout = {layout!r}; choose one of {LAYOUTS}")
    for name, value in (("capacity", capacity), ("pad_to_multiple_of", pad_to_multiple_of)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0):
            raise ValueError(f"{name} = {value!r} must be a positive integer or None")
    if layout != "rows" and (pack or rows is not None):
        raise ValueError("pack=True and rows= place samples into rows: use them with layout='rows'")
    if layout != "rows" and capacity is not None:
        raise ValueError(f"capacity is the row width of layout='rows'; the {layout} layout's length is the "
                         f"{'batch total' if layout == 'flat' else 'longest sample'} (use pad_to_multiple_of to "
                         f"round it)")
    if pack and rows is not None:
        raise ValueError("pass either pack=True (pack_lengths chooses the rows) or rows= (explicit rows), not both")
    if pack and capacity is None:
        raise ValueError("pack=True needs capacity (the row width to pack samples into)")
    metadata = check_metadata(metadata, layout)
    if not isinstance(mask_dtype, torch.dtype) or not (mask_dtype == torch.bool or mask_dtype.is_floating_point):
        raise TypeError(f"mask_dtype must be torch.bool or a floating torch dtype, got {mask_dtype!r}")
    return (None if capacity is None else int(capacity),
            None if pad_to_multiple_of is None else int(pad_to_multiple_of), metadata)


def collate_samples(
    features: Sequence[Mapping],
    *,
    layout: str = "flat",
    capacity: int | None = None,
    pack: bool = False,
    rows: Any = None,
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
    metadata: Sequence[str] | None = None,
    mask_dtype: torch.dtype = torch.bool,
    ignore_index: int = -100,
    seq_lengths_key: str = "seq_lengths",
    require_seq_lengths: bool = False,
    backend: str | None = None,
) -> dict[str, Any]:
    """Collate packed rows or unpacked samples into one batch (see the module docstring for the format).

    ``layout="flat"``: (1, T), every sample end to end in input order. ``layout="padded"``: (S, L), one sample per
    row, L the longest sample. ``layout="rows"``: (P, L) with
    L = ``capacity`` (default: the longest row, rounded up to ``pad_to_multiple_of``); rows are the features,
    or the samples repacked by ``pack_lengths(lengths, capacity)`` with ``pack=True`` (``backend`` picks the
    packing backend), or the explicit ``rows`` assignment. Raises ValueError for empty input, lengths that do not
    add up to a row, rows over capacity, bad options.
    """
    capacity, pad_to_multiple_of, metadata = _check_options(layout, capacity, pack, rows, pad_to_multiple_of,
                                                            metadata, mask_dtype)
    return _collate(features, layout, capacity, pack, rows, pad_token_id, pad_to_multiple_of, metadata, mask_dtype,
                    ignore_index, seq_lengths_key, require_seq_lengths, backend)


def _collate(features, layout, capacity, pack, rows, pad_token_id, pad_to_multiple_of, metadata, mask_dtype,
             ignore_index, seq_lengths_key, require_seq_lengths, backend) -> dict[str, Any]:
    g = _gather(features, seq_lengths_key, ignore_index, require_seq_lengths)
    n_samples = g.sample_lengths.shape[0]
    order = None
    if layout == "padded":
        return _collate_padded(g, pad_token_id, pad_to_multiple_of, metadata, ignore_index)
    if layout == "flat":
        row_ptr = np.array([0, n_samples], dtype=np.int64)
        width = _round_up(int(g.ids.shape[0]), pad_to_multiple_of)
    else:
        if pack:
            from opensloth.packing import pack_lengths

            order, row_ptr = _row_assignment(pack_lengths(g.sample_lengths, capacity, backend=backend), n_samples)
        elif rows is not None:
            order, row_ptr = _row_assignment(rows, n_samples)
        else:
            row_ptr = g.feature_ptr
        lens = g.sample_lengths if order is None else g.sample_lengths[order]
        csum = np.zeros(n_samples + 1, dtype=np.int64)
        np.cumsum(lens, out=csum[1:])
        row_sums = np.diff(csum[row_ptr])
        longest = int(row_sums.max())
        if capacity is not None and longest > capacity:
            r = int(np.argmax(row_sums > capacity))
            what = f"feature {r}" if order is None else f"row {r}"
            raise ValueError(
                f"{what} has {int(row_sums[r])} tokens, over the capacity {capacity}; raise capacity, or pass "
                f"pack=True to repack the samples into rows of at most {capacity} tokens"
            )
        width = _round_up(capacity if capacity is not None else longest, pad_to_multiple_of)
    grid_ids, grid_labels, seg = _assemble(g.ids, g.labels, g.sample_lengths, order, row_ptr, width,
                                           pad_token_id=pad_token_id, ignore_index=ignore_index)
    shape = (seg.n_rows, seg.width)
    batch = PackedBatch({
        INPUT_IDS: torch.from_numpy(grid_ids).reshape(shape),
        LABELS: torch.from_numpy(grid_labels).reshape(shape),
        POSITION_IDS: torch.from_numpy(seg.positions()).reshape(shape),
    }, segments=seg)
    batch.update(metadata_tensors(seg, metadata, mask_dtype=mask_dtype))
    return batch


def _collate_padded(g: _Gathered, pad_token_id: int, pad_to_multiple_of: int | None, metadata: Sequence[str],
                    ignore_index: int) -> dict[str, Any]:
    n_samples = g.sample_lengths.shape[0]
    width = _round_up(int(g.sample_lengths.max()), pad_to_multiple_of)
    row_ptr = np.arange(n_samples + 1, dtype=np.int64)
    grid_ids, grid_labels, seg = _assemble(g.ids, g.labels, g.sample_lengths, None, row_ptr, width,
                                           pad_token_id=pad_token_id, ignore_index=ignore_index)
    shape = (n_samples, width)
    real = np.arange(width, dtype=np.int64)[None, :] < g.sample_lengths[:, None]
    batch = PackedBatch({
        INPUT_IDS: torch.from_numpy(grid_ids).reshape(shape),
        LABELS: torch.from_numpy(grid_labels).reshape(shape),
        ATTENTION_MASK: torch.from_numpy(real.astype(np.int64)),
        # Positions run on through the padding, so nothing reads the row as several packed sequences.
        POSITION_IDS: torch.arange(width, dtype=torch.int64).expand(shape).contiguous(),
    }, segments=seg)
    batch.update(metadata_tensors(seg, metadata))  # use_cache only (check_metadata allows nothing else here)
    return batch


@dataclass
class PackedDataCollator:
    """Callable collator for HF/TRL Trainers: ``PackedDataCollator(pad_token_id=tok.pad_token_id)(features)``.

    The options are those of :func:`collate_samples` (checked once, here). ``layout="flat"`` (default) suits
    flash-attention, Unsloth (with ``metadata=UNSLOTH_METADATA``) and transformers' position_ids path;
    ``layout="rows"`` with a fixed ``capacity`` gives static shapes (torch.compile, dense or flex masks).
    `opensloth.wiring.wire_batches` picks the options for a training run.
    """

    pad_token_id: int = 0
    layout: str = "flat"
    capacity: int | None = None
    pack: bool = False
    pad_to_multiple_of: int | None = None
    metadata: Sequence[str] | None = None
    mask_dtype: torch.dtype = torch.bool
    ignore_index: int = -100
    seq_lengths_key: str = "seq_lengths"
    require_seq_lengths: bool = False
    backend: str | None = None
    return_tensors: str = "pt"

    def __post_init__(self) -> None:
        if self.return_tensors != "pt":
            raise ValueError(f"return_tensors = {self.return_tensors!r}; only 'pt' (torch) is supported")
        self.capacity, self.pad_to_multiple_of, self.metadata = _check_options(
            self.layout, self.capacity, self.pack, None, self.pad_to_multiple_of, self.metadata, self.mask_dtype)

    def __call__(self, features: Sequence[Mapping], return_tensors: str | None = None) -> dict[str, Any]:
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors = {return_tensors!r}; only 'pt' (torch) is supported")
        return _collate(features, self.layout, self.capacity, self.pack, None, self.pad_token_id,
                        self.pad_to_multiple_of, self.metadata, self.mask_dtype, self.ignore_index,
                        self.seq_lengths_key, self.require_seq_lengths, self.backend)
