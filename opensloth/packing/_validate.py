"""Input validation of the packing API, in one place: every public function of ``opensloth.packing`` (and the
segment gather of ``opensloth.packing._gather``) checks and converts its inputs here, above the backends, so the
messages are identical whichever backend runs. Each message names the value, the limit and the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

INT64_MAX = np.iinfo(np.int64).max
STRATEGIES = ("bfd", "ffd", "exact_fit", "best")
MAX_EMPTY_PARTS = 1 << 16  # balance(): num_parts may exceed the item count up to this (each part is an array)

# Working memory of partition_padded (the DP's rows of f, split points, sorted copies) must stay within
# OPENSLOTH_PACKING_MEMORY_GB (default DEFAULT_MEMORY_GB), checked before anything is allocated. A full table of
# split points is kept up to PARTITION_TABLE_BYTES; beyond, the DP holds blocks of rows and recomputes them (same
# result, at most twice the time).
MEMORY_ENV = "OPENSLOTH_PACKING_MEMORY_GB"
DEFAULT_MEMORY_GB = 8.0
PARTITION_TABLE_BYTES = 256 << 20
PARTITION_BYTES_PER_ITEM = 64  # sorted order and lengths, two rows of f, the hull's lines: 8 arrays of n + 1

# ---------------------------------------------------------------------------------------------------------------
# Lengths, costs and counts (pack_lengths, partition_padded, balance)
# ---------------------------------------------------------------------------------------------------------------


def unmasked(values: np.ndarray, name: str) -> np.ndarray:
    """The data of a numpy masked array with nothing masked (any other array as it is). A masked entry is refused:
    reading the hidden value would pack it as if it were data, and leaving it out would shift every index after
    it, so the caller chooses."""
    if not isinstance(values, np.ma.MaskedArray):
        return values
    data = np.ma.getdata(values)
    mask = np.ma.getmaskarray(values)
    if data.ndim == 1 and mask.any():
        count = int(mask.sum())
        raise ValueError(
            f"{name} is a numpy masked array with {count} masked value{'s' if count > 1 else ''} (the first at index "
            f"{first_true(mask)}), and masked entries are not skipped: pass {name}.compressed() to leave them out "
            f"(indices then count the kept entries only) or {name}.filled(value) to give them a value"
        )
    return data


def torch_to_numpy(tensor: Any, name: str) -> np.ndarray:
    """A torch tensor as a numpy array, on the CPU and detached. Floating dtypes numpy has no equivalent for
    (bfloat16, float8) are read through float64, which holds every one of their values exactly."""
    tensor = tensor.detach().cpu()
    try:
        return tensor.numpy()
    except TypeError:
        if not tensor.is_floating_point():
            raise TypeError(f"{name} is a torch tensor of dtype {tensor.dtype}, which numpy cannot hold; pass "
                            f"integers (e.g. {name}.long())") from None
        return tensor.double().numpy()


def to_numpy(values: Any, name: str) -> np.ndarray:
    if isinstance(values, (str, bytes)) or values is None or isinstance(values, dict):
        raise TypeError(f"{name} must be a 1-D sequence of integers (list, numpy array or torch tensor), "
                        f"got {type(values).__name__}")
    module = type(values).__module__ or ""
    if module.startswith("torch") and hasattr(values, "detach"):
        values = torch_to_numpy(values, name)
    if isinstance(values, np.ndarray):
        values = unmasked(values, name)
        arr = values
    else:
        try:
            values = list(values)
        except TypeError:
            raise TypeError(
                f"{name} must be a 1-D sequence of integers (list, numpy array or torch tensor), "
                f"got {type(values).__name__}"
            ) from None
        for i, v in enumerate(values):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (Integral, Real)):
                raise TypeError(f"{name}[{i}] = {v!r} is a {type(v).__name__}, not an integer")
        arr = np.asarray(values) if values else np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        raise TypeError(f"{name} has dtype bool; pass integer lengths")
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} has dtype {arr.dtype}; pass integers")
    return arr


def int64_values(values: Any, name: str, *, low: int, high: int | None, high_name: str = "",
                 fix: str = "") -> np.ndarray:
    """Convert to a C-contiguous int64 array, checking every element is a whole number in [low, high]."""
    arr = to_numpy(values, name)
    if arr.size == 0:
        raise ValueError(f"{name} is empty; pass at least one value")
    if arr.dtype.kind == "f":
        if arr.dtype.itemsize < 8:
            arr = arr.astype(np.float64)  # exact; float16 cannot even hold the int64 limit it is compared with
        finite = np.isfinite(arr)
        if not finite.all():
            i = int(np.argmin(finite))
            raise ValueError(f"{name}[{i}] = {arr[i]} is not a finite number; pass whole-number values")
        frac = arr != np.floor(arr)
        if frac.any():
            i = int(np.argmax(frac))
            raise ValueError(f"{name}[{i}] = {arr[i].item()!r} has a fractional part; pass whole-number values")
        if (np.abs(arr) >= 2.0**63).any():
            i = int(np.argmax(np.abs(arr) >= 2.0**63))
            raise ValueError(f"{name}[{i}] = {arr[i]} does not fit in int64")
    elif arr.dtype == np.uint64 and (arr > INT64_MAX).any():
        i = int(np.argmax(arr > INT64_MAX))
        raise ValueError(f"{name}[{i}] = {arr[i]} does not fit in int64")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    below = out < low
    if below.any():
        i = int(np.argmax(below))
        raise ValueError(f"{name}[{i}] = {out[i]} is below the minimum {low}{fix}")
    if high is not None:
        above = out > high
        if above.any():
            i = int(np.argmax(above))
            raise ValueError(f"{name}[{i}] = {out[i]} exceeds {high_name} {high}{fix}")
    return out


def check_per_item_limit(arr: np.ndarray, name: str, limit: int, why: str) -> None:
    """A bound on every value that depends on the item count (so that sums or products stay exact in int64)."""
    if int(arr.max()) > limit:
        i = int(np.argmax(arr > limit))
        raise ValueError(f"{name}[{i}] = {arr[i]} exceeds {limit}: with {arr.shape[0]} items {why}; "
                         f"pass {name} in smaller units")


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Integral, Real)):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if isinstance(value, Real) and not isinstance(value, Integral):
        if not np.isfinite(value) or value != int(value):
            raise ValueError(f"{name} = {value!r} must be a positive integer")
    value = int(value)
    if value <= 0:
        raise ValueError(f"{name} = {value} must be a positive integer (> 0)")
    if value > INT64_MAX:
        raise ValueError(f"{name} = {value} does not fit in int64")
    return value


def pack_args(lengths: Any, capacity: Any, strategy: Any) -> tuple[np.ndarray, int]:
    """``pack_lengths``: int64 lengths in [1, capacity] and the capacity."""
    capacity = positive_int(capacity, "capacity")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; choose one of {STRATEGIES}")
    arr = int64_values(lengths, "lengths", low=1, high=capacity, high_name="the capacity",
                       fix="; truncate or split long samples before packing (opensloth.data overlong policies)")
    return arr, capacity


def partition_args(lengths: Any, num_batches: Any,
                   max_tokens_per_batch: Any) -> tuple[np.ndarray, int, int | None, int]:
    """``partition_padded``: int64 lengths, the batch count, the cap (None: no cap) and the rows of split points
    to hold at once (``partition_rows``)."""
    num_batches = positive_int(num_batches, "num_batches")
    cap = None if max_tokens_per_batch is None else positive_int(max_tokens_per_batch, "max_tokens_per_batch")
    arr = int64_values(lengths, "lengths", low=1, high=cap, high_name="max_tokens_per_batch",
                       fix="; a single sample must fit in one batch")
    # Every padded cost is at most longest x count, which must stay below the DP's INF (2**62) for exact int64.
    check_per_item_limit(arr, "lengths", ((1 << 62) - 1) // arr.shape[0],
                         "the padded size (longest x count) must stay below 2**62 for exact int64 arithmetic")
    if num_batches > arr.shape[0]:
        raise ValueError(
            f"num_batches = {num_batches} exceeds the number of items {arr.shape[0]}; every batch must be non-empty, "
            f"so pass num_batches <= {arr.shape[0]}"
        )
    return arr, num_batches, cap, partition_rows(arr.shape[0], num_batches)


def memory_limit() -> int:
    """Bytes of working memory a packing call may plan for: ``OPENSLOTH_PACKING_MEMORY_GB`` GiB (default 8)."""
    raw = os.environ.get(MEMORY_ENV, "").strip()
    if not raw:
        return int(DEFAULT_MEMORY_GB * 2**30)
    try:
        gib = float(raw)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib > 0):
        raise ValueError(f"{MEMORY_ENV}={raw!r} is not a positive number of GiB; set it like {MEMORY_ENV}=16")
    return int(gib * 2**30)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def partition_memory(n: int, num_batches: int, rows: int) -> int:
    """Bytes the padded-partition DP of every backend needs for ``n`` items, ``num_batches`` batches and ``rows``
    rows of split points held at once: split points of 4 bytes (8 from 2**31 items), one saved row of f (8 bytes)
    per block when there is more than one block, and the per-item arrays."""
    width = n + 1
    steps = num_batches - 1
    blocks = -(-steps // rows) if steps > 0 else 0
    point = 4 if n < 2**31 - 1 else 8
    return (blocks * 8 if blocks > 1 else 0) * width + max(rows, 1) * point * width + PARTITION_BYTES_PER_ITEM * width


def partition_rows(n: int, num_batches: int) -> int:
    """Rows of split points ``partition_padded`` holds at once: all of them while they take at most
    ``PARTITION_TABLE_BYTES``, else the count that needs the least memory (about sqrt(2 x batches)). Raises
    ValueError, before anything is allocated, when that exceeds ``memory_limit()``."""
    steps = max(num_batches - 1, 1)
    point = 4 if n < 2**31 - 1 else 8
    limit = memory_limit()
    if steps * point * (n + 1) <= PARTITION_TABLE_BYTES and partition_memory(n, num_batches, steps) <= limit:
        return steps
    guess = max(1, min(steps, round(math.sqrt(8 * steps / point))))
    rows = min((r for r in (guess - 1, guess, guess + 1) if 1 <= r <= steps),
               key=lambda r: partition_memory(n, num_batches, r))
    need = partition_memory(n, num_batches, rows)
    if need > limit:
        raise ValueError(
            f"partition_padded of {n:,} lengths into {num_batches:,} batches needs about {_size(need)} of working "
            f"memory even holding split points for {rows} batches at a time, above the limit of {_size(limit)} "
            f"({MEMORY_ENV}); partition fewer lengths per call (e.g. one window of "
            f"micro-batches at a time), ask for fewer batches, or raise {MEMORY_ENV}"
        )
    return rows


def balance_args(costs: Any, num_parts: Any, equal_count: Any) -> tuple[np.ndarray, int, bool]:
    """``balance``: int64 costs whose sum fits in int64, the part count and ``equal_count``."""
    num_parts = positive_int(num_parts, "num_parts")
    arr = int64_values(costs, "costs", low=0, high=None)
    check_per_item_limit(arr, "costs", INT64_MAX // arr.shape[0], "the sum of costs must fit in int64")
    most_parts = max(arr.shape[0], MAX_EMPTY_PARTS)
    if num_parts > most_parts:
        raise ValueError(
            f"num_parts = {num_parts} exceeds {most_parts} (the larger of the {arr.shape[0]} items and "
            f"{MAX_EMPTY_PARTS}): parts beyond the item count stay empty, and every part is returned; ask for fewer"
        )
    if not isinstance(equal_count, (bool, np.bool_)):
        raise TypeError(f"equal_count must be True or False, got {equal_count!r}")
    return arr, num_parts, bool(equal_count)


# ---------------------------------------------------------------------------------------------------------------
# Segment gather
# ---------------------------------------------------------------------------------------------------------------


class GatherPlan:
    """Validated gather inputs: ``sources`` (C-contiguous 1-D arrays of one dtype), int64 ``starts``, ``lengths``,
    ``chunks`` (None: every segment in ``sources[0]``), ``order`` (None: every segment, in index order) and the
    output ``size`` in elements. Build it with ``check_segments``."""

    __slots__ = ("_flat", "chunks", "dtype", "lengths", "order", "size", "sources", "starts")

    def __init__(self, *, sources, starts, lengths, chunks, order, size, dtype):
        self.sources, self.starts, self.lengths = sources, starts, lengths
        self.chunks, self.order, self.size, self.dtype = chunks, order, size, dtype
        self._flat = None

    @classmethod
    def trusted(cls, *, sources: list[np.ndarray], starts: np.ndarray, lengths: np.ndarray,
                order: np.ndarray | None, chunks: np.ndarray | None, size: int) -> GatherPlan:
        """A plan whose validity the caller guarantees instead of ``check_segments`` (the packed-dataset builder
        derives them from arrow list offsets): sources C-contiguous, 1-D, of one dtype; int64 C-contiguous index
        arrays; every index in range and every segment inside its source; ``size`` the total. The native gather
        still checks every index it uses; the numba and numpy paths rely on these guarantees."""
        return cls(sources=sources, starts=starts, lengths=lengths, chunks=chunks, order=order, size=size,
                   dtype=sources[0].dtype)

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """One flat source and global starts, for the numba and python gathers (the sources concatenated, once,
        when there are several)."""
        if self._flat is None:
            from opensloth.packing._python.gather import flatten_sources

            self._flat = flatten_sources(self.sources, self.chunks, self.starts)
        return self._flat


def index_array(values: Any, name: str) -> np.ndarray:
    arr = unmasked(values, name) if isinstance(values, np.ndarray) else np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integers, got shape {arr.shape}")
    if arr.dtype == np.int64 and arr.flags.c_contiguous:
        return arr
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {int(arr.max())}, beyond the int64 range")
    return np.ascontiguousarray(arr, dtype=np.int64)


def first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_segments(
    values: np.ndarray | Sequence[np.ndarray],
    starts: Any,
    lengths: Any,
    order: Any = None,
    *,
    chunks: Any = None,
) -> GatherPlan:
    """Validate gather inputs once (see ``gather_segments``) and return them normalised as ``GatherPlan``."""
    if isinstance(values, np.ndarray):
        sources = [values]
    elif isinstance(values, Sequence) and not isinstance(values, str | bytes):
        sources = list(values)
        if not sources:
            raise ValueError("values is an empty sequence; pass at least one array to gather from")
    else:
        raise TypeError(f"values must be a numpy array or a sequence of them, got {type(values).__name__}")
    dtype = None
    for c, src in enumerate(sources):
        name = "values" if isinstance(values, np.ndarray) else f"values[{c}]"
        if not isinstance(src, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(src).__name__}")
        src = sources[c] = unmasked(src, name)
        if src.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {src.shape}")
        if src.dtype.kind not in "iub" or src.dtype.itemsize not in (1, 2, 4, 8):
            raise TypeError(f"{name} has dtype {src.dtype}; token and label values must be integers or booleans "
                            "of 1, 2, 4 or 8 bytes")
        if dtype is None:
            dtype = src.dtype
        elif src.dtype != dtype:
            raise TypeError(f"{name} has dtype {src.dtype} but values[0] has {dtype}; every source needs one dtype")
        if not src.flags.c_contiguous:
            sources[c] = np.ascontiguousarray(src)  # strided input: one copy, so the copy loops can read it in place
    starts = index_array(starts, "starts")
    lengths = index_array(lengths, "lengths")
    n = starts.shape[0]
    if lengths.shape[0] != n:
        raise ValueError(f"starts has {n} entries but lengths has {lengths.shape[0]}; give one of each per segment")
    if chunks is None:
        if len(sources) > 1:
            raise ValueError(f"values holds {len(sources)} arrays: pass chunks (which array each segment is in)")
        limit = sources[0].shape[0]
    else:
        chunks = index_array(chunks, "chunks")
        if chunks.shape[0] != n:
            raise ValueError(f"chunks has {chunks.shape[0]} entries but there are {n} segments; give one per segment")
        if n and (chunks.min() < 0 or chunks.max() >= len(sources)):
            bad = first_true((chunks < 0) | (chunks >= len(sources)))
            raise ValueError(f"chunks[{bad}] = {int(chunks[bad])} is not an index into values "
                             f"({len(sources)} arrays)")
        sizes = np.array([s.shape[0] for s in sources], dtype=np.int64)
        limit = sizes[chunks] if len(sources) > 1 else sources[0].shape[0]
    if n:
        if lengths.min() < 0:
            bad = first_true(lengths < 0)
            raise ValueError(f"lengths[{bad}] = {int(lengths[bad])} is negative; a segment has 0 or more elements")
        if starts.min() < 0 or np.any(starts > limit - lengths):
            bad = first_true((starts < 0) | (starts > limit - lengths))
            size = int(limit if np.ndim(limit) == 0 else limit[bad])
            raise ValueError(f"segment {bad} = [{int(starts[bad])}, {int(starts[bad])} + {int(lengths[bad])}) lies "
                             f"outside its source array of {size} elements")
    if order is None:
        size = int(lengths.sum())
    else:
        order = index_array(order, "order")
        if order.size and (order.min() < 0 or order.max() >= n):
            bad = first_true((order < 0) | (order >= n))
            raise ValueError(f"order[{bad}] = {int(order[bad])} is not a segment index in [0, {n})")
        size = int(lengths[order].sum())
    return GatherPlan(sources=sources, starts=starts, lengths=lengths, chunks=chunks, order=order, size=size,
                      dtype=dtype)


def check_out(out: Any, seg: GatherPlan) -> np.ndarray:
    if out is None:
        return np.empty(seg.size, dtype=seg.dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writeable, C-contiguous 1-D numpy array")
    if out.dtype != seg.dtype:
        raise TypeError(f"out has dtype {out.dtype} but the values have {seg.dtype}")
    if out.shape[0] != seg.size:
        raise ValueError(f"out has {out.shape[0]} elements but the segments hold {seg.size}; allocate exactly that")
    for src in seg.sources:
        if np.may_share_memory(out, src):
            raise ValueError("out overlaps one of the source arrays; gather into a fresh array")
    return out
