"""Packed-dataset builder: a tokenised ``datasets.Dataset`` into rows of at most ``capacity`` tokens.

Every sample of the whole dataset is placed at once by ``opensloth.packing.pack_lengths`` (best-fit decreasing by
default; no 1000-row chunks), then each output column is assembled by one segment gather
(``opensloth.packing._gather``: native ``memcpy`` per sample, or numba / numpy) that reads every sample's tokens in
place from the arrow chunks of the input column, located by their offsets: no per-sample Python loop and no copy of
the input. For the same truncation the rows are identical to TRL's
``pack_dataset(strategy="bfd")`` run over the whole dataset in one batch (same best-fit rule, same FIFO tie-break, same
row and sample order).

Output rows follow the batch format contract: ``input_ids``, ``labels`` (raw per-token labels, NOT boundary-masked:
the collator masks the first token of every sample) and ``seq_lengths`` (the lengths of the row's samples, in order,
summing to the row's length). Other input columns are not carried over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from opensloth.distributed import get_rank, logger
from opensloth.packing import STRATEGIES, get_backend, pack_lengths
from opensloth.packing._gather import GatherPlan, gather_backend, run_gather

__all__ = [
    "OVERLONG_POLICIES",
    "PackingStats",
    "build_packed_dataset",
    "packing_stats",
]

OVERLONG_POLICIES = ("truncate", "split", "drop", "error")
_STATS_KEY = "opensloth_packing"
_INT32_MAX = np.iinfo(np.int32).max
_DEFAULT_CHUNK_TOKENS = 1 << 23


@dataclass(frozen=True)
class PackingStats:
    """What a build did. Sample counts refer to input rows unless said otherwise.

    - ``n_input``: rows of the input dataset; ``n_empty``: rows with no tokens (always dropped).
    - ``n_overlong``: rows longer than ``capacity``; by policy: ``n_truncated`` (and ``n_truncated_tokens`` cut off
      their ends), ``n_split`` (turned into ``n_split_pieces`` samples), ``n_dropped`` (``n_dropped_tokens`` lost).
    - ``n_samples``: samples in the packed rows (each split piece counts as one); ``n_tokens``: tokens in them;
      ``n_rows``: packed rows; ``lower_bound``: ceil(n_tokens / capacity), the fewest rows any packing could use.
    - ``efficiency``: n_tokens / (n_rows * capacity) (0.0 for an empty result).
    """

    capacity: int
    strategy: str
    overlong: str
    backend: str
    n_input: int
    n_empty: int
    n_overlong: int
    n_truncated: int
    n_truncated_tokens: int
    n_split: int
    n_split_pieces: int
    n_dropped: int
    n_dropped_tokens: int
    n_samples: int
    n_tokens: int
    n_rows: int
    lower_bound: int
    efficiency: float
    seconds: float

    @property
    def rows_over_lower_bound(self) -> int:
        return self.n_rows - self.lower_bound

    def to_json(self) -> str:
        return json.dumps({_STATS_KEY: dict(vars(self))}, sort_keys=True)

    def summary(self) -> str:
        """One line for logs."""
        parts = [
            f"packed {self.n_samples} samples ({self.n_tokens} tokens) into {self.n_rows} rows of capacity "
            f"{self.capacity} (lower bound {self.lower_bound}, +{self.rows_over_lower_bound}), fill efficiency "
            f"{self.efficiency:.3%}, {self.strategy} on {self.backend}, {self.seconds:.2f}s",
            f"overlong (> {self.capacity} tokens, policy {self.overlong!r}): {self.n_overlong}",
        ]
        if self.n_truncated:
            parts.append(f"{self.n_truncated} truncated ({self.n_truncated_tokens} tokens cut)")
        if self.n_split:
            parts.append(f"{self.n_split} split into {self.n_split_pieces} pieces")
        if self.n_dropped:
            parts.append(f"{self.n_dropped} dropped ({self.n_dropped_tokens} tokens)")
        parts.append(f"{self.n_empty} empty samples dropped")
        return "; ".join(parts)


def packing_stats(dataset: Any) -> PackingStats | dict[str, PackingStats] | None:
    """The ``PackingStats`` a build stored in ``dataset.info.description`` (None if it holds none).

    The stats survive ``save_to_disk``/``load_from_disk`` and format changes. For a DatasetDict: split -> stats.
    """
    if hasattr(dataset, "info"):
        try:
            payload = json.loads(dataset.info.description or "")
        except (TypeError, ValueError):
            return None
        if not isinstance(payload, dict) or _STATS_KEY not in payload:
            return None
        return PackingStats(**payload[_STATS_KEY])
    if isinstance(dataset, dict):
        return {name: packing_stats(split) for name, split in dataset.items()}
    return None


# ---------------------------------------------------------------------------------------------------------------
# Input reading and validation
# ---------------------------------------------------------------------------------------------------------------


def _check_capacity(capacity: Any) -> int:
    if isinstance(capacity, bool | np.bool_) or not isinstance(capacity, int | np.integer):
        raise TypeError(f"capacity must be a positive integer (tokens per packed row), got {capacity!r} "
                        f"({type(capacity).__name__})")
    capacity = int(capacity)
    if capacity <= 0:
        raise ValueError(f"capacity = {capacity} must be a positive integer (tokens per packed row), e.g. 4096")
    if capacity > _INT32_MAX:
        raise ValueError(f"capacity = {capacity} exceeds the largest supported row length {_INT32_MAX}")
    return capacity


# A column stored in many small arrow chunks is combined into one first: below this many rows per chunk the
# per-chunk Python work costs more than copying the column once.
_MIN_ROWS_PER_CHUNK = 64


@dataclass
class _Column:
    """A list column read in place: row ``i`` is ``sources[chunks[i]][starts[i] : starts[i] + lengths[i]]``
    (``chunks`` None: every row is in ``sources[0]``). ``sources`` are numpy views of the arrow values buffers
    (copies only for boolean columns, which arrow stores as bits).

    ``_list_column`` checks that every chunk's offsets never decrease and that its values hold the offsets' whole
    range, so every row lies inside its source: 0 <= starts[i] and starts[i] + lengths[i] <= len(source). Any
    sub-slice of rows (truncation, split pieces) does too, which is what the gather needs."""

    sources: list
    chunks: np.ndarray | None
    starts: np.ndarray
    lengths: np.ndarray
    value_type: Any


def _list_column(table, name: str, *, allow_bool: bool = False) -> _Column:
    """Read list column ``name`` of an arrow table without copying its values (see ``_Column``)."""
    import pyarrow as pa

    column = table.column(name)
    ctype = column.type
    if not (pa.types.is_list(ctype) or pa.types.is_large_list(ctype)):
        raise TypeError(f"column {name!r} has type {ctype}; it must hold one list of integers per sample "
                        "(tokenise the dataset first, e.g. with opensloth.data.chat)")
    vtype = ctype.value_type
    if pa.types.is_null(vtype):  # arrow's inferred type when every list is empty
        column = column.cast(pa.large_list(pa.int64()) if pa.types.is_large_list(ctype) else pa.list_(pa.int64()))
        vtype = pa.int64()
    if not (pa.types.is_integer(vtype) or (allow_bool and pa.types.is_boolean(vtype))):
        kinds = "integers or booleans" if allow_bool else "integers"
        raise TypeError(f"column {name!r} holds lists of {vtype}; it must hold lists of {kinds}")
    chunks = [column.chunk(0)] if column.num_chunks == 1 else [c for c in column.chunks if len(c)]
    if len(chunks) > 1 and len(column) < _MIN_ROWS_PER_CHUNK * len(chunks):
        chunks = [column.combine_chunks()]
    n_rows = len(column)
    lengths = np.empty(n_rows, dtype=np.int64)
    starts = np.empty(n_rows, dtype=np.int64)
    chunk_of = np.empty(n_rows, dtype=np.int64) if len(chunks) > 1 else None
    sources = []
    row = 0
    for c, chunk in enumerate(chunks):  # a loop over arrow chunks (about one per 1000 rows), not over samples
        n = len(chunk)
        offsets = chunk.offsets.to_numpy(zero_copy_only=False)  # this chunk's n + 1 offsets into chunk.values
        first, last = int(offsets[0]), int(offsets[-1])
        np.subtract(offsets[:-1], first, out=starts[row : row + n], dtype=np.int64)
        np.subtract(offsets[1:], offsets[:-1], out=lengths[row : row + n], dtype=np.int64)
        if n and lengths[row : row + n].min() < 0:
            raise ValueError(f"column {name!r} has decreasing list offsets (a malformed arrow array)")
        if chunk.null_count:  # a null list counts as empty, whatever its offsets say
            lengths[row : row + n][chunk.is_null().to_numpy(zero_copy_only=False)] = 0
        used = chunk.values.slice(first, last - first)
        if len(used) != last - first:
            raise ValueError(f"column {name!r}: list offsets reach past the end of the values (a malformed arrow "
                             "array)")
        if used.null_count:
            raise ValueError(f"column {name!r} contains null values inside its lists; every token needs a value")
        sources.append(used.to_numpy(zero_copy_only=not pa.types.is_boolean(vtype)))
        if chunk_of is not None:
            chunk_of[row : row + n] = c
        row += n
    if not sources:
        sources.append(np.zeros(0, dtype=vtype.to_pandas_dtype()))
    return _Column(sources, chunk_of, starts, lengths, vtype)


def _read_columns(dataset):
    """Arrow table (respecting any indices mapping) of the columns the build reads, and which label source it has."""
    names = list(dataset.column_names)
    if "input_ids" not in names:
        raise ValueError(f"the dataset has no 'input_ids' column (columns: {names}); tokenise it first so each row "
                         "has input_ids (and optionally labels or assistant_masks)")
    label_source = "labels" if "labels" in names else ("assistant_masks" if "assistant_masks" in names else None)
    columns = ["input_ids"] + ([label_source] if label_source else [])
    ignored = [n for n in names if n not in columns]
    if ignored:
        logger.debug("build_packed_dataset: columns not carried into the packed rows: %s", ignored)
    if "labels" in names and "assistant_masks" in names:
        logger.debug("build_packed_dataset: both labels and assistant_masks present; using labels")
    if getattr(dataset, "_indices", None) is None:
        table = dataset.data.table  # read in place: the common case (no select/shuffle mapping)
    else:
        table = dataset.with_format("arrow", columns=columns)[:]  # applies the indices mapping
    return table, label_source


# ---------------------------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------------------------


def build_packed_dataset(
    dataset: Any,
    capacity: int,
    *,
    overlong: str = "truncate",
    backend: str | None = None,
    strategy: str = "bfd",
    progress: bool | None = None,
    chunk_tokens: int = _DEFAULT_CHUNK_TOKENS,
    return_stats: bool = False,
) -> Any:
    """Pack a tokenised dataset into rows of at most ``capacity`` tokens.

    Args:
        dataset: a ``datasets.Dataset`` (or ``DatasetDict``: each split is packed on its own) with a list-of-int
            column ``input_ids`` and optionally ``labels`` (same lengths; -100 = not trained) or ``assistant_masks``
            (same lengths; nonzero = trained, giving labels = input_ids there and -100 elsewhere). With neither,
            labels = input_ids. ``labels`` wins when both are present. Other columns are not carried over.
        capacity: the most tokens a packed row holds.
        overlong: what happens to a sample longer than ``capacity``: ``"truncate"`` keeps its first ``capacity``
            tokens (the default); ``"split"`` cuts it into ``capacity``-token pieces (the last one shorter), each
            packed as a sample of its own, so every token is kept; ``"drop"`` leaves it out; ``"error"`` raises
            ValueError naming the first such sample. Truncated and dropped samples are counted and logged.
            Samples with no tokens are always dropped (and counted).
        backend: packing backend for ``pack_lengths`` (None: ``OPENSLOTH_BACKEND`` / fastest available).
        strategy: a ``pack_lengths`` strategy (``opensloth.packing.STRATEGIES``): ``"bfd"`` (best-fit decreasing,
            the same rows as TRL's ``pack_dataset(strategy="bfd")`` over the whole dataset), ``"ffd"``, ...
        progress: show a tqdm bar while gathering tokens (None: on rank 0 when the build takes more than one chunk).
        chunk_tokens: about how many tokens each gather step assembles (each becomes one arrow chunk of the output).
        return_stats: also return the ``PackingStats`` (a dict split -> stats for a DatasetDict).

    Returns:
        A ``datasets.Dataset`` with columns ``input_ids``, ``labels`` (raw labels, not boundary-masked; the
        collator masks each sample's first token) and ``seq_lengths`` (int32 per-sample lengths, in order, summing
        to the row's length). Rows come in the order the packer opened them, samples in placement order (for
        bfd/ffd: rows by their longest sample, longest first; samples longest first); shuffle or sample as needed.
        Its ``info.description`` holds the build's ``PackingStats`` as JSON (read them back with
        ``packing_stats``); with ``return_stats=True``, ``(dataset, stats)``.

    Raises:
        ValueError: no ``input_ids`` column, ``capacity <= 0``, an unknown ``overlong`` or ``strategy``, labels whose
            lengths differ from input_ids, or (``overlong="error"``) a sample longer than ``capacity``.
        TypeError: not a Dataset/DatasetDict, or columns that are not lists of integers.
    """
    import datasets

    capacity = _check_capacity(capacity)
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong = {overlong!r} is not a policy; choose one of {OVERLONG_POLICIES}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; choose one of {STRATEGIES}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int | np.integer) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens = {chunk_tokens!r} must be a positive integer")

    if isinstance(dataset, datasets.DatasetDict):
        packed, stats = {}, {}
        for name, split in dataset.items():
            packed[name], stats[name] = build_packed_dataset(
                split, capacity, overlong=overlong, backend=backend, strategy=strategy, progress=progress,
                chunk_tokens=chunk_tokens, return_stats=True)
        result = datasets.DatasetDict(packed)
        return (result, stats) if return_stats else result
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"build_packed_dataset takes a datasets.Dataset or DatasetDict, got {type(dataset).__name__}"
                        + ("; materialise an IterableDataset first (e.g. Dataset.from_generator)"
                           if isinstance(dataset, datasets.IterableDataset | datasets.IterableDatasetDict) else ""))

    import pyarrow as pa

    start_time = time.perf_counter()
    table, label_source = _read_columns(dataset)
    ids = _list_column(table, "input_ids")
    lengths = ids.lengths
    n_input = int(lengths.shape[0])
    lab = None
    if label_source is not None:
        lab = _list_column(table, label_source, allow_bool=label_source == "assistant_masks")
        if not np.array_equal(lab.lengths, lengths):
            bad = np.flatnonzero(lab.lengths != lengths)
            i = int(bad[0])
            raise ValueError(f"row {i}: {label_source} has {int(lab.lengths[i])} values but input_ids has "
                             f"{int(lengths[i])} tokens ({bad.size} rows differ); each row's {label_source} must "
                             "match its input_ids token for token")

    # Which input rows survive, and as which samples (start offset into the flat values, length).
    empty = lengths == 0
    over = lengths > capacity
    n_overlong = int(np.count_nonzero(over))
    if overlong == "error" and n_overlong:
        i = int(np.argmax(over))
        raise ValueError(
            f"sample {i} has {int(lengths[i])} tokens, more than capacity {capacity} ({n_overlong} overlong "
            f"samples in all); overlong='error' refuses them: raise capacity, or pass overlong='truncate' (keep "
            f"the first {capacity} tokens), 'split' (cut into {capacity}-token pieces) or 'drop'")
    keep = ~empty
    n_truncated = n_truncated_tokens = n_split = n_pieces = n_dropped = n_dropped_tokens = 0
    if overlong == "drop" and n_overlong:
        keep &= ~over
        n_dropped, n_dropped_tokens = n_overlong, int(lengths[over].sum())
    # src: the input row of each sample (None: sample i is row i, the common case of nothing empty, dropped or split)
    rows = None if bool(keep.all()) else np.flatnonzero(keep)
    row_len = lengths if rows is None else lengths[rows]
    if overlong == "split" and n_overlong:
        if rows is None:
            rows = np.arange(n_input, dtype=np.int64)
        counts = -(-row_len // capacity)  # ceil
        n_split, n_pieces = n_overlong, int(counts[row_len > capacity].sum())
        src = np.repeat(rows, counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        piece_offset = (np.arange(src.shape[0], dtype=np.int64) - first) * capacity
        sample_len = np.minimum(lengths[src] - piece_offset, capacity)
    else:
        src, piece_offset = rows, 0
        sample_len = np.minimum(row_len, capacity) if n_overlong else row_len
        if overlong == "truncate":
            n_truncated = n_overlong
            n_truncated_tokens = int(row_len.sum() - sample_len.sum()) if n_overlong else 0

    n_samples = int(sample_len.shape[0])
    if n_samples:
        plan = pack_lengths(sample_len, capacity, strategy=strategy, backend=backend)
        order, bin_ptr = plan.items, plan.bin_ptr
    else:
        order, bin_ptr = np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    n_rows = int(bin_ptr.shape[0] - 1)
    lens_o = sample_len[order]
    tok_off = np.zeros(n_samples + 1, dtype=np.int64)
    np.cumsum(lens_o, out=tok_off[1:])
    n_tokens = int(tok_off[-1])
    gather = gather_backend(backend)

    # Each column is gathered into one flat array (at memcpy speed by the native gather), in steps of about
    # chunk_tokens tokens for the progress bar; each step's rows become one arrow chunk of the output, whose list
    # offsets then fit int32 unless one step holds more than 2^31 tokens. One input column at a time is read.
    row_tok = tok_off[bin_ptr]
    n_chunks = max(1, math.ceil(n_tokens / chunk_tokens))
    if n_chunks == 1:
        spans = [(0, n_rows)]
    else:
        row_bounds = np.unique(np.concatenate([
            [0, n_rows], np.searchsorted(row_tok, np.linspace(0, n_tokens, n_chunks + 1), side="left")]))
        spans = list(zip(row_bounds[:-1].tolist(), row_bounds[1:].tolist()))
    large = n_rows > 0 and max(int(row_tok[r1] - row_tok[r0]) for r0, r1 in spans) > _INT32_MAX
    list_cls, list_type, off_np = ((pa.LargeListArray, pa.large_list, np.int64) if large
                                   else (pa.ListArray, pa.list_, np.int32))
    show = progress if progress is not None else (len(spans) > 1 and get_rank() == 0)
    bar = _progress(n_tokens * (1 if lab is None else 2), show)

    def gather_column(col: _Column) -> np.ndarray:
        if src is None:
            starts, chunks = col.starts, col.chunks
        else:
            starts = col.starts[src] + piece_offset
            chunks = None if col.chunks is None else col.chunks[src]
        # In bounds by construction (see _Column), and order is the packer's permutation of the samples.
        seg = GatherPlan.trusted(sources=col.sources, starts=starts, lengths=sample_len, order=order, chunks=chunks,
                                 size=n_tokens)
        flat = _empty(n_tokens, seg.dtype)
        if len(spans) == 1:
            run_gather(seg, flat, gather)
            bar.update(n_tokens)
            return flat
        for r0, r1 in spans:
            k0, k1 = int(bin_ptr[r0]), int(bin_ptr[r1])
            run_gather(seg, flat[tok_off[k0] : tok_off[k1]], gather, order=order[k0:k1])
            bar.update(int(tok_off[k1] - tok_off[k0]))
        return flat

    span_offsets = [pa.array((row_tok[r0 : r1 + 1] - row_tok[r0]).astype(off_np)) for r0, r1 in spans]

    def to_lists(flat: np.ndarray, vtype) -> Any:
        values = pa.Array.from_buffers(vtype, flat.shape[0], [None, pa.py_buffer(flat)])  # zero-copy
        if len(spans) == 1:
            return pa.chunked_array([list_cls.from_arrays(span_offsets[0], values)])
        pieces = []
        for (r0, r1), offsets in zip(spans, span_offsets):
            t0 = int(row_tok[r0])
            pieces.append(list_cls.from_arrays(offsets, values.slice(t0, int(row_tok[r1]) - t0)))
        return pa.chunked_array(pieces, type=list_type(vtype))

    try:
        flat_ids = gather_column(ids)
        input_ids = to_lists(flat_ids, ids.value_type)
        if lab is None:
            labels = input_ids  # arrow arrays are immutable: both columns share the buffers
        elif label_source == "assistant_masks":
            mask = gather_column(lab)
            signed = pa.types.is_signed_integer(ids.value_type)
            flat_lab = flat_ids.astype(flat_ids.dtype if signed else np.int64)
            flat_lab[mask == 0] = -100
            del mask
            labels = to_lists(flat_lab, ids.value_type if signed else pa.int64())
        else:
            labels = to_lists(gather_column(lab), lab.value_type)
    finally:
        bar.close()
    seq_cls, seq_ptr = (pa.ListArray, np.int32) if n_samples <= _INT32_MAX else (pa.LargeListArray, np.int64)
    seq_lengths = seq_cls.from_arrays(pa.array(bin_ptr.astype(seq_ptr)), pa.array(lens_o.astype(np.int32)))
    packed = pa.Table.from_arrays([input_ids, labels, seq_lengths], names=["input_ids", "labels", "seq_lengths"])
    stats = PackingStats(
        capacity=capacity, strategy=strategy, overlong=overlong,
        backend=backend if backend is not None else get_backend(),
        n_input=n_input, n_empty=int(np.count_nonzero(empty)), n_overlong=n_overlong,
        n_truncated=n_truncated, n_truncated_tokens=n_truncated_tokens, n_split=n_split, n_split_pieces=n_pieces,
        n_dropped=n_dropped, n_dropped_tokens=n_dropped_tokens, n_samples=n_samples, n_tokens=n_tokens,
        n_rows=n_rows, lower_bound=-(-n_tokens // capacity),
        efficiency=n_tokens / (n_rows * capacity) if n_rows else 0.0,
        seconds=round(time.perf_counter() - start_time, 4),
    )
    packed = _finish(packed, dataset, stats)
    lost = stats.n_truncated_tokens + stats.n_dropped_tokens
    level = logging.WARNING if lost else logging.INFO
    if logger.isEnabledFor(level):
        logger.log(level, "%s%s", stats.summary(),
                   f"; {lost} tokens lost: use overlong='split' or a larger capacity to keep them" if lost else "")
    if n_samples == 0:
        logger.warning("build_packed_dataset: no samples to pack (%d input rows, %d empty)", n_input, stats.n_empty)
    return (packed, stats) if return_stats else packed


def _empty(n: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised array in a buffer of arrow's memory pool: the output columns wrap it without a copy, and the
    pool reuses memory that earlier builds freed (numpy maps fresh pages for every large array, and first touches of
    fresh pages are a good part of a big build's time)."""
    import pyarrow as pa

    return np.frombuffer(pa.allocate_buffer(n * dtype.itemsize), dtype=dtype)


def _progress(total: int, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="packing rows", unit="tok", unit_scale=True, disable=not show)


def _finish(table, source, stats: PackingStats):
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    info = datasets.DatasetInfo(description=stats.to_json())
    parent = getattr(source, "_fingerprint", None)
    if parent:
        # Deterministic: the same input and settings give the same fingerprint (datasets' caching keys on it).
        params = json.dumps({k: v for k, v in vars(stats).items() if k != "seconds"}, sort_keys=True)
        fingerprint = hashlib.sha256(f"opensloth.data.packed/1|{parent}|{params}".encode()).hexdigest()[:16]
    else:
        fingerprint = generate_random_fingerprint()
    return datasets.Dataset(InMemoryTable(table), info=info, split=source.split, fingerprint=fingerprint)
