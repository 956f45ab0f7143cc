"""Segment gather kernel: a compiled element-copy loop (the numba backend's ``gather_segments``)."""

from __future__ import annotations

import numba
import numpy as np

from .._python.gather import flatten_sources, segments_held
from ._common import JIT


@numba.njit(**JIT)
def _gather(values, starts, lengths, order, out):
    pos = 0
    for k in range(order.shape[0]):
        j = order[k]
        s = starts[j]
        n = lengths[j]
        for i in range(n):
            out[pos + i] = values[s + i]
        pos += n
    return pos


def gather_segments(sources, chunks, starts, lengths, order, out) -> int:
    """Identical to ``_python.gather.gather_segments``; inputs arrive validated, several sources are concatenated
    first. The kernel copies bytes: unsigned integers of the item's width serve every dtype and byte order, so it
    compiles four times at most."""
    values, starts = flatten_sources(sources, chunks, starts)
    order = segments_held(lengths, order, out)
    view = np.dtype(f"u{values.dtype.itemsize}")
    return _gather(values.view(view), starts, lengths, order, out.view(view))
