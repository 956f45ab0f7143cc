"""Segment gather: copy slices of flat arrays back to back, in a given order, into one output array.

This is the copy at the heart of the packed-dataset builder (``opensloth.data.packed``): each sample's tokens are a
slice of the flat values of an arrow list column (one flat array per arrow chunk), and a packed dataset is those
slices laid out in packing order. Three implementations give identical output:

- ``native``: ``opensloth._native.gather_segments`` (C++, one ``memcpy`` per segment, GIL released, zero-copy in and
  out, reads every source in place);
- ``numba``: a compiled element-copy loop, GIL released (sources of several chunks are first concatenated);
- ``numpy``: one element-index gather (``np.take``; sources of several chunks are first concatenated).

``backend=None`` follows the packing backend in use (``OPENSLOTH_BACKEND`` / ``opensloth.packing.get_backend()``):
native -> native, numba -> numba, python -> numpy. Asking for one that does not load raises ImportError saying why.
Inputs are validated here, once, with the same messages whichever implementation runs; the native code re-checks
every index it uses and raises ValueError rather than read or write out of bounds.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["GATHER_BACKENDS", "GatherPlan", "check_segments", "gather_backend", "gather_segments", "run_gather"]

GATHER_BACKENDS = ("native", "numba", "numpy")
_ALIASES = {"python": "numpy"}


# ---------------------------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _native_gather():
    from opensloth.packing import backend_error

    error = backend_error("native")
    if error is not None:
        raise ImportError(error)
    from opensloth import _native

    fn = getattr(_native, "gather_segments", None)
    if fn is None:
        raise ImportError("the native module opensloth._native was built without gather_segments (an older build); "
                          "rebuild it with `pip install -e .`")
    return fn


@functools.cache
def _numba_kernel():
    from opensloth.packing import backend_error

    error = backend_error("numba")
    if error is not None:
        raise ImportError(error)
    import numba

    @numba.njit(cache=True, nogil=True)
    def gather(values, starts, lengths, order, out):  # pragma: no cover - compiled
        pos = 0
        for k in range(order.shape[0]):
            j = order[k]
            s = starts[j]
            n = lengths[j]
            for i in range(n):
                out[pos + i] = values[s + i]
            pos += n
        return pos

    return gather


def gather_backend(backend: str | None = None) -> str:
    """The gather implementation for ``backend``: one of ``GATHER_BACKENDS``, a packing backend name (``"python"``
    means ``"numpy"``), ``"auto"``, or None (the packing backend in use). Raises ImportError if it does not load."""
    if backend is None or str(backend).strip().lower() == "auto":
        from opensloth.packing import get_backend

        name = get_backend() if backend is None else _first_loading()
    else:
        name = str(backend).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in GATHER_BACKENDS:
        raise ValueError(f"unknown gather backend {backend!r}; choose one of {GATHER_BACKENDS} (or 'python', 'auto')")
    if name == "native":
        _native_gather()
    elif name == "numba":
        _numba_kernel()
    return name


def _first_loading() -> str:
    for name in ("native", "numba"):
        try:
            return gather_backend(name)
        except ImportError:
            continue
    return "numpy"


# ---------------------------------------------------------------------------------------------------------------
# Validation
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
        """One flat source and global starts, for the numba and numpy paths (the sources concatenated, once, when
        there are several)."""
        if self._flat is None:
            if len(self.sources) == 1:
                self._flat = (self.sources[0], self.starts)
            else:
                base = np.zeros(len(self.sources), dtype=np.int64)
                np.cumsum([s.shape[0] for s in self.sources[:-1]], out=base[1:])
                self._flat = (np.concatenate(self.sources), self.starts + base[self.chunks])
        return self._flat


def _index_array(values: Any, name: str) -> np.ndarray:
    arr = values if isinstance(values, np.ndarray) else np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integers, got shape {arr.shape}")
    if arr.dtype == np.int64 and arr.flags.c_contiguous:
        return arr
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {int(arr.max())}, beyond the int64 range")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _first(mask: np.ndarray) -> int:
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
    starts = _index_array(starts, "starts")
    lengths = _index_array(lengths, "lengths")
    n = starts.shape[0]
    if lengths.shape[0] != n:
        raise ValueError(f"starts has {n} entries but lengths has {lengths.shape[0]}; give one of each per segment")
    if chunks is None:
        if len(sources) > 1:
            raise ValueError(f"values holds {len(sources)} arrays: pass chunks (which array each segment is in)")
        limit = sources[0].shape[0]
    else:
        chunks = _index_array(chunks, "chunks")
        if chunks.shape[0] != n:
            raise ValueError(f"chunks has {chunks.shape[0]} entries but there are {n} segments; give one per segment")
        if n and (chunks.min() < 0 or chunks.max() >= len(sources)):
            bad = _first((chunks < 0) | (chunks >= len(sources)))
            raise ValueError(f"chunks[{bad}] = {int(chunks[bad])} is not an index into values "
                             f"({len(sources)} arrays)")
        sizes = np.array([s.shape[0] for s in sources], dtype=np.int64)
        limit = sizes[chunks] if len(sources) > 1 else sources[0].shape[0]
    if n:
        if lengths.min() < 0:
            bad = _first(lengths < 0)
            raise ValueError(f"lengths[{bad}] = {int(lengths[bad])} is negative; a segment has 0 or more elements")
        if starts.min() < 0 or np.any(starts > limit - lengths):
            bad = _first((starts < 0) | (starts > limit - lengths))
            size = int(limit if np.ndim(limit) == 0 else limit[bad])
            raise ValueError(f"segment {bad} = [{int(starts[bad])}, {int(starts[bad])} + {int(lengths[bad])}) lies "
                             f"outside its source array of {size} elements")
    if order is None:
        size = int(lengths.sum())
    else:
        order = _index_array(order, "order")
        if order.size and (order.min() < 0 or order.max() >= n):
            bad = _first((order < 0) | (order >= n))
            raise ValueError(f"order[{bad}] = {int(order[bad])} is not a segment index in [0, {n})")
        size = int(lengths[order].sum())
    return GatherPlan(sources=sources, starts=starts, lengths=lengths, chunks=chunks, order=order, size=size,
                      dtype=dtype)


def _check_out(out: Any, seg: GatherPlan) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


def run_gather(seg: GatherPlan, out: np.ndarray, backend: str, order: np.ndarray | None = None) -> np.ndarray:
    """Gather validated segments into ``out`` with gather backend ``backend`` (from ``gather_backend``).

    ``order`` (optional) replaces ``seg.order`` for this call; it must lie in range and ``out`` must hold exactly its
    segments: the builder validates the whole order once and gathers it slice by slice.
    """
    order = seg.order if order is None else order
    if backend == "native":  # checks every index and size itself
        _native_gather()(seg.sources, seg.chunks, seg.starts, seg.lengths, order, out)
        return out
    values, starts = seg.flat()
    if order is None:
        order = np.arange(seg.starts.shape[0], dtype=np.int64)
    held = int(seg.lengths[order].sum())
    if held != out.shape[0]:  # the numba kernel does not check its writes
        raise ValueError(f"out has {out.shape[0]} elements but the segments of this order hold {held}")
    if backend == "numba":
        # the kernel copies bytes: unsigned integers of the same width serve every dtype and byte order, so it
        # compiles four times at most
        view = np.dtype(f"u{values.dtype.itemsize}")
        _numba_kernel()(values.view(view), starts, seg.lengths, order, out.view(view))
        return out
    lens = seg.lengths[order]
    ends = np.cumsum(lens)
    shift = np.repeat(starts[order] - (ends - lens), lens)
    np.take(values, np.arange(out.shape[0], dtype=np.int64) + shift, out=out, mode="clip")  # indices checked
    return out


def gather_segments(
    values: np.ndarray | Sequence[np.ndarray],
    starts: Any,
    lengths: Any,
    order: Any = None,
    *,
    chunks: Any = None,
    out: np.ndarray | None = None,
    backend: str | None = None,
) -> np.ndarray:
    """Concatenate segments of flat arrays: for each ``j`` of ``order``, ``values[chunks[j]][starts[j] : starts[j] +
    lengths[j]]``, back to back.

    Args:
        values: a 1-D numpy array of integers or booleans (1, 2, 4 or 8 bytes each), or a sequence of them of one
            dtype (e.g. the flat values of each chunk of an arrow list column), read in place.
        starts, lengths: one int per segment: where it begins in its array and how many elements it has.
        order: the segments to copy, in output order (repeats allowed); None: every segment in index order.
        chunks: one int per segment: which array of ``values`` holds it (required with several arrays).
        out: where to write (1-D, C-contiguous, writeable, values' dtype, exactly the total length, not overlapping
            the values); None: a fresh array.
        backend: ``"native"``, ``"numba"``, ``"numpy"`` (``"python"``), ``"auto"``, or None for the one matching the
            packing backend in use. Every backend gives the same output.

    Returns:
        ``out`` (or the fresh array), filled.

    Raises:
        ValueError/TypeError: shapes, dtypes, an index out of range or a segment outside its array (naming it).
        ImportError: the requested backend does not load.
    """
    seg = check_segments(values, starts, lengths, order, chunks=chunks)
    name = gather_backend(backend)
    return run_gather(seg, _check_out(out, seg), name)
