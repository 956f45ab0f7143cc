"""Sequence packing and batch balancing: public API, input validation and backend dispatch.

Three backends compute the same thing: ``native`` (the C++17 extension ``opensloth._native``), ``numba`` and
``python`` (the package ``_python``, the written spec, tie-breaks included), each split per algorithm like
``csrc/``. Every backend returns identical arrays for every input, so DDP ranks that compute the same plan agree
without talking. Inputs are validated once, above the backends (``_validate.py``), so error messages are identical
whichever backend runs; the backend is chosen here, for the packing functions and the segment gather alike.

Choose a backend with ``OPENSLOTH_BACKEND=auto|native|numba|python`` (default ``auto``: the fastest available,
logged once) or per call with ``backend=``. Asking for a backend that is not there raises ImportError saying why.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from opensloth.distributed import logger
from opensloth.packing._validate import MAX_EMPTY_PARTS, STRATEGIES, balance_args, pack_args, partition_args

__all__ = [
    "BACKEND_NAMES",
    "MAX_EMPTY_PARTS",
    "STRATEGIES",
    "PackPlan",
    "available_backends",
    "balance",
    "get_backend",
    "pack_lengths",
    "partition_padded",
]

BACKEND_NAMES = ("native", "numba", "python")

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
    arr, capacity = pack_args(lengths, capacity, strategy)
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

    Memory is sized before anything is allocated: the split points of every batch count while they take at most
    256 MiB, else blocks of them recomputed (the same result in at most twice the time, in about
    ``64 + 8 sqrt(2 x num_batches)`` bytes per length); ValueError naming the need when that exceeds
    ``OPENSLOTH_PACKING_MEMORY_GB`` GiB (default 8).
    """
    arr, num_batches, cap, rows = partition_args(lengths, num_batches, max_tokens_per_batch)
    _, module = _resolve(backend)
    ptr, items = module.partition_padded(arr, num_batches, 0 if cap is None else cap, rows)
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
    arr, num_parts, equal_count = balance_args(costs, num_parts, equal_count)
    _, module = _resolve(backend)
    ptr, items = module.balance(arr, num_parts, equal_count)
    return _split_csr(ptr, items)
