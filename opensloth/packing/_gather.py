"""Segment gather: copy slices of flat arrays back to back, in a given order, into one output array.

This is the copy at the heart of the packed-dataset builder (``opensloth.data.packed``): each sample's tokens are a
slice of the flat values of an arrow list column (one flat array per arrow chunk), and a packed dataset is those
slices laid out in packing order. Each packing backend implements it, with identical output:

- ``native``: ``opensloth._native.gather_segments`` (C++, one ``memcpy`` per segment, GIL released, zero-copy in and
  out, reads every source in place);
- ``numba``: a compiled element-copy loop, GIL released (``_numba/gather.py``; several sources are first
  concatenated, once per ``GatherPlan``);
- ``python``, called ``numpy`` here: one element-index gather (``_python/gather.py``; ``np.take``).

The backend is chosen by the packing dispatch (``opensloth.packing``: ``backend=``, ``OPENSLOTH_BACKEND``, or the
fastest under ``auto``); ``gather_backend`` only renames ``python`` to ``numpy``. Inputs are validated once, in
``opensloth.packing._validate``, with the same messages whichever implementation runs; the native code re-checks
every index it uses and raises ValueError rather than read or write out of bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from opensloth import packing
from opensloth.packing._validate import GatherPlan, check_out, check_segments

__all__ = ["GATHER_BACKENDS", "GatherPlan", "check_segments", "gather_backend", "gather_segments", "run_gather"]

GATHER_BACKENDS = ("native", "numba", "numpy")
_TO_PACKING = {"native": "native", "numba": "numba", "numpy": "python", "python": "python", "auto": "auto"}
_FROM_PACKING = {"native": "native", "numba": "numba", "python": "numpy"}


def gather_backend(backend: str | None = None) -> str:
    """The gather implementation for ``backend``: one of ``GATHER_BACKENDS``, a packing backend name (``"python"``
    means ``"numpy"``), ``"auto"``, or None (the packing backend in use). Raises ImportError if it does not load."""
    if backend is not None:
        name = _TO_PACKING.get(str(backend).strip().lower())
        if name is None:
            raise ValueError(f"unknown gather backend {backend!r}; choose one of {GATHER_BACKENDS} "
                             "(or 'python', 'auto')")
        backend = name
    return _FROM_PACKING[packing._resolve(backend)[0]]


def run_gather(seg: GatherPlan, out: np.ndarray, backend: str, order: np.ndarray | None = None) -> np.ndarray:
    """Gather validated segments into ``out`` with gather backend ``backend`` (from ``gather_backend``).

    ``order`` (optional) replaces ``seg.order`` for this call; it must lie in range and ``out`` must hold exactly its
    segments: the builder validates the whole order once and gathers it slice by slice.
    """
    order = seg.order if order is None else order
    name, module = packing._resolve(_TO_PACKING[backend])
    if name == "native":  # reads every source in place and checks every index and size itself
        module.gather_segments(seg.sources, seg.chunks, seg.starts, seg.lengths, order, out)
    else:  # one flat source, concatenated once per plan (the builder gathers a plan slice by slice)
        values, starts = seg.flat()
        module.gather_segments([values], None, starts, seg.lengths, order, out)
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
        backend: ``"native"``, ``"numba"``, ``"numpy"`` (``"python"``), ``"auto"``, or None for the packing backend
            in use. Every backend gives the same output.

    Returns:
        ``out`` (or the fresh array), filled.

    Raises:
        ValueError/TypeError: shapes, dtypes, an index out of range or a segment outside its array (naming it).
        ImportError: the requested backend does not load.
    """
    seg = check_segments(values, starts, lengths, order, chunks=chunks)
    name = gather_backend(backend)
    return run_gather(seg, check_out(out, seg), name)
