"""Sequence packing and batch balancing: public API, input validation and backend dispatch.

Three backends compute the same thing: ``native`` (the C++17 extension ``opensloth._native``), ``numba`` and
``python`` (``_python.py``, the written spec, tie-breaks included). Every backend returns identical arrays for every
input, so DDP ranks that compute the same plan agree without talking. Inputs are validated here, once, above the
backends, so error messages are identical whichever backend runs.

Choose a backend with ``OPENSLOTH_BACKEND=auto|native|numba|python`` (default ``auto``: the fastest available,
logged once) or per call with ``backend=``. Asking for a backend that is not there raises ImportError saying why.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from numbers import Integral, Real
from types import ModuleType
from typing import Any

import numpy as np

from opensloth.distributed import logger

__all__ = [
    "BACKEND_NAMES",
    "MAX_EMPTY_PARTS",
    "PackPlan",
    "available_backends",
    "balance",
    "get_backend",
    "pack_lengths",
    "partition_padded",
]

BACKEND_NAMES = ("native", "numba", "python")
STRATEGIES = ("bfd", "ffd", "exact_fit", "best")
_INT64_MAX = np.iinfo(np.int64).max
MAX_EMPTY_PARTS = 1 << 16  # balance(): num_parts may exceed the item count up to this (each part is an array)

# ---------------------------------------------------------------------------------------------------------------
# Backend loading
# ---------------------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_load_errors: dict[str, str] = {}
_auto_logged = False


def _import_backend(name: str) -> ModuleType:
    if name == "native":
        from opensloth import __version__

        try:
            module = importlib.import_module("opensloth._native")
        except ImportError as exc:
            raise ImportError(
                f"the native backend (opensloth._native) is not built: {exc}. Build it with "
                "`pip install -e .` (needs a C++17 compiler and pybind11)"
            ) from exc
        built = getattr(module, "__version__", None)
        if built != __version__:
            raise ImportError(
                f"the native backend was built for opensloth {built}, but the package is {__version__}; "
                "rebuild it with `pip install -e .`"
            )
        return module
    if name == "numba":
        try:
            import numba  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"the numba backend needs numba: {exc}. Install it with `pip install numba`") from exc
        return importlib.import_module("opensloth.packing._numba")
    if name == "python":
        return importlib.import_module("opensloth.packing._python")
    raise ValueError(f"unknown packing backend {name!r}; choose one of {BACKEND_NAMES} (or 'auto')")


def _load(name: str) -> ModuleType:
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _load_errors:
            raise ImportError(_load_errors[name])
        try:
            module = _import_backend(name)
        except ImportError as exc:
            _load_errors[name] = str(exc)
            raise
        _loaded[name] = module
        return module


def available_backends() -> tuple[str, ...]:
    """The backends that load on this machine, fastest first, from ("native", "numba", "python")."""
    names = []
    for name in BACKEND_NAMES:
        try:
            _load(name)
        except ImportError:
            continue
        names.append(name)
    return tuple(names)


def backend_error(name: str) -> str | None:
    """Why backend `name` does not load (None when it does)."""
    try:
        _load(name)
    except ImportError as exc:
        return str(exc)
    return None


def _resolve(backend: str | None) -> tuple[str, ModuleType]:
    global _auto_logged
    requested = backend if backend is not None else os.environ.get("OPENSLOTH_BACKEND", "auto")
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        for name in BACKEND_NAMES:
            try:
                module = _load(name)
            except ImportError:
                continue
            if not _auto_logged:
                _auto_logged = True
                skipped = {n: _load_errors[n] for n in BACKEND_NAMES[: BACKEND_NAMES.index(name)]}
                if skipped:
                    logger.info("packing backend: %s (auto; unavailable: %s)", name, skipped)
                else:
                    logger.info("packing backend: %s (auto)", name)
            return name, module
        raise ImportError("no packing backend could be loaded")  # pragma: no cover - python always loads
    if requested not in BACKEND_NAMES:
        raise ValueError(
            f"unknown packing backend {requested!r} (from "
            f"{'backend=' if backend is not None else 'OPENSLOTH_BACKEND'}); choose one of "
            f"{('auto',) + BACKEND_NAMES}"
        )
    return requested, _load(requested)


def get_backend() -> str:
    """The name of the backend in use (OPENSLOTH_BACKEND, or the fastest available under ``auto``)."""
    return _resolve(None)[0]


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def _to_numpy(values: Any, name: str) -> np.ndarray:
    if isinstance(values, (str, bytes)) or values is None or isinstance(values, dict):
        raise TypeError(f"{name} must be a 1-D sequence of integers (list, numpy array or torch tensor), "
                        f"got {type(values).__name__}")
    module = type(values).__module__ or ""
    if module.startswith("torch") and hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
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


def _as_int64(values: Any, name: str, *, low: int, high: int | None, high_name: str = "", fix: str = "") -> np.ndarray:
    """Convert to a C-contiguous int64 array, checking every element is a whole number in [low, high]."""
    arr = _to_numpy(values, name)
    if arr.size == 0:
        raise ValueError(f"{name} is empty; pass at least one value")
    if arr.dtype.kind == "f":
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
    elif arr.dtype == np.uint64 and (arr > _INT64_MAX).any():
        i = int(np.argmax(arr > _INT64_MAX))
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


def _check_per_item_limit(arr: np.ndarray, name: str, limit: int, why: str) -> None:
    """A bound on every value that depends on the item count (so that sums or products stay exact in int64)."""
    if int(arr.max()) > limit:
        i = int(np.argmax(arr > limit))
        raise ValueError(f"{name}[{i}] = {arr[i]} exceeds {limit}: with {arr.shape[0]} items {why}; "
                         f"pass {name} in smaller units")


def _as_positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Integral, Real)):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if isinstance(value, Real) and not isinstance(value, Integral):
        if not np.isfinite(value) or value != int(value):
            raise ValueError(f"{name} = {value!r} must be a positive integer")
    value = int(value)
    if value <= 0:
        raise ValueError(f"{name} = {value} must be a positive integer (> 0)")
    if value > _INT64_MAX:
        raise ValueError(f"{name} = {value} does not fit in int64")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PackPlan:
    """Bins of a packing in CSR form.

    The items of bin ``b`` are ``items[bin_ptr[b]:bin_ptr[b+1]]`` (indices into the input lengths, in placement
    order: length descending then index ascending for "bfd" and "ffd"); ``bin_lengths[b]`` is the bin's total length.
    Bins are numbered in the order they were opened, so the first item of each bin is no shorter than the next bin's.
    """

    bin_ptr: np.ndarray
    items: np.ndarray
    bin_lengths: np.ndarray
    capacity: int

    @property
    def n_bins(self) -> int:
        return int(self.bin_lengths.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.items.shape[0])

    @property
    def efficiency(self) -> float:
        """Sum of lengths / (n_bins * capacity): the fraction of the bins' slots that hold tokens."""
        return float(self.bin_lengths.sum()) / (self.n_bins * self.capacity)

    def bin(self, b: int) -> np.ndarray:
        """Indices of the items in bin ``b``."""
        return self.items[self.bin_ptr[b] : self.bin_ptr[b + 1]]

    def bins(self) -> list[np.ndarray]:
        """All bins as a list of index arrays (views into ``items``)."""
        return np.split(self.items, self.bin_ptr[1:-1])

    def __len__(self) -> int:
        return self.n_bins

    def __repr__(self) -> str:
        return (f"PackPlan(n_bins={self.n_bins}, n_items={self.n_items}, capacity={self.capacity}, "
                f"efficiency={self.efficiency:.4%})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackPlan):
            return NotImplemented
        return (self.capacity == other.capacity and np.array_equal(self.bin_ptr, other.bin_ptr)
                and np.array_equal(self.items, other.items) and np.array_equal(self.bin_lengths, other.bin_lengths))


def _split_csr(ptr: np.ndarray, items: np.ndarray) -> list[np.ndarray]:
    return [items[ptr[i] : ptr[i + 1]].copy() for i in range(len(ptr) - 1)]


# ---------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------


def pack_lengths(lengths: Any, capacity: int, *, strategy: str = "bfd", backend: str | None = None) -> PackPlan:
    """Pack items of the given lengths into the fewest bins of ``capacity`` slots (whole items, never split).

    ``strategy="bfd"`` (best-fit decreasing, the default): items in order of length descending then index
    ascending; each goes to the open bin with the least free space that still fits it; among bins with that same free
    space, the one that reached it first (FIFO); a new bin when none fits. The same bins as TRL's BFD.
    ``strategy="ffd"`` (first-fit decreasing): the same order, each item to the lowest-numbered bin that fits it.
    ``strategy="exact_fit"``: one bin at a time, opened with the longest remaining item and completed with an exact
    fit when one remains, else with the longest item that leaves a gap some remaining item can still fill. Fewer
    bins than BFD on narrow length distributions; bins list items in placement order, which need not be descending.
    ``strategy="best"``: runs "bfd" and "exact_fit" and returns the plan with fewer bins ("bfd" on a tie), so it is
    never worse than either (the fewest-rows choice for packed datasets, for about twice the time of one).

    Raises ValueError naming the index, value and limit for a length that is below 1, above ``capacity``,
    fractional or NaN, and for an empty input or ``capacity <= 0``; TypeError for non-numeric input. Truncating or
    splitting long samples is the data layer's job (``opensloth.data``).
    """
    capacity = _as_positive_int(capacity, "capacity")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; choose one of {STRATEGIES}")
    arr = _as_int64(lengths, "lengths", low=1, high=capacity, high_name="the capacity",
                    fix="; truncate or split long samples before packing (opensloth.data overlong policies)")
    _, module = _resolve(backend)
    if strategy == "best":
        bfd = module.pack_bfd(arr, capacity)
        exact = module.pack_exact_fit(arr, capacity)
        bin_ptr, items, bin_lengths = exact if len(exact[2]) < len(bfd[2]) else bfd
    else:
        bin_ptr, items, bin_lengths = getattr(module, f"pack_{strategy}")(arr, capacity)
    return PackPlan(bin_ptr=bin_ptr, items=items, bin_lengths=bin_lengths, capacity=capacity)


def partition_padded(
    lengths: Any,
    num_batches: int,
    *,
    max_tokens_per_batch: int | None = None,
    backend: str | None = None,
) -> list[np.ndarray]:
    """Split items into exactly ``num_batches`` non-empty batches minimising the padded size.

    The cost of a batch is its longest length times its size (the slots of a right-padded batch); the result is
    the exact minimum of the summed cost. An optimal split is always contiguous in length-descending order, so each
    batch is a run of the items sorted by length descending then index ascending, and batches come longest first.
    Among optimal splits the one returned is canonical: each batch boundary is the smallest one that is still
    optimal (the same for every backend). ``max_tokens_per_batch`` caps each batch's padded size
    (longest x size); ValueError when no split into ``num_batches`` batches meets the cap.
    """
    num_batches = _as_positive_int(num_batches, "num_batches")
    cap = None if max_tokens_per_batch is None else _as_positive_int(max_tokens_per_batch, "max_tokens_per_batch")
    arr = _as_int64(lengths, "lengths", low=1, high=cap, high_name="max_tokens_per_batch",
                    fix="; a single sample must fit in one batch")
    # Every padded cost is at most longest x count, which must stay below the DP's INF (2**62) for exact int64.
    _check_per_item_limit(arr, "lengths", ((1 << 62) - 1) // arr.shape[0],
                          "the padded size (longest x count) must stay below 2**62 for exact int64 arithmetic")
    if num_batches > arr.shape[0]:
        raise ValueError(
            f"num_batches = {num_batches} exceeds the number of items {arr.shape[0]}; every batch must be non-empty, "
            f"so pass num_batches <= {arr.shape[0]}"
        )
    _, module = _resolve(backend)
    ptr, items = module.partition_padded(arr, num_batches, 0 if cap is None else cap)
    if ptr is None:
        raise ValueError(
            f"no split of {arr.shape[0]} items into {num_batches} batches keeps every batch's padded size "
            f"(longest x size) within max_tokens_per_batch = {cap}; raise the cap or use more batches"
        )
    return _split_csr(ptr, items)


def balance(costs: Any, num_parts: int, *, equal_count: bool = False, backend: str | None = None) -> list[np.ndarray]:
    """Assign items to ``num_parts`` parts so that the largest part's total cost is small.

    LPT (largest cost first, to the lightest part) and Karmarkar-Karp largest differencing both run; the one with
    the smaller maximum is kept (LPT on a tie) and then refined by swaps between the heaviest and the lightest part.
    The result is never worse than LPT. ``equal_count=True`` keeps the number of items per part within one (exactly
    equal when ``num_parts`` divides the count). Costs are non-negative integers (scale and round float costs first).
    Each part's indices are returned in ascending order; parts may be empty when there are fewer items than parts
    (``num_parts`` at most the larger of the item count and ``MAX_EMPTY_PARTS``, since every part is returned).
    """
    num_parts = _as_positive_int(num_parts, "num_parts")
    arr = _as_int64(costs, "costs", low=0, high=None)
    _check_per_item_limit(arr, "costs", _INT64_MAX // arr.shape[0], "the sum of costs must fit in int64")
    most_parts = max(arr.shape[0], MAX_EMPTY_PARTS)
    if num_parts > most_parts:
        raise ValueError(
            f"num_parts = {num_parts} exceeds {most_parts} (the larger of the {arr.shape[0]} items and "
            f"{MAX_EMPTY_PARTS}): parts beyond the item count stay empty, and every part is returned; ask for fewer"
        )
    if not isinstance(equal_count, (bool, np.bool_)):
        raise TypeError(f"equal_count must be True or False, got {equal_count!r}")
    _, module = _resolve(backend)
    ptr, items = module.balance(arr, num_parts, bool(equal_count))
    return _split_csr(ptr, items)
