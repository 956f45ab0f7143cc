"""Typed stub of ``opensloth._native``, the C++17 packing backend (sources in ``csrc/``).

Same interface and results as ``opensloth.packing._python`` (the spec). Inputs must be 1-D, C-contiguous int64 numpy
arrays (they are read in place; anything else raises TypeError instead of being copied) and lie within the limits
that ``opensloth.packing`` validates; the module re-checks the ranges its memory safety depends on and raises
ValueError otherwise. Results are freshly allocated int64 arrays. The GIL is released while the C++ code runs.
``gather_segments`` (the packed-dataset builder's token copy) writes into an output array given by the caller.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

_Int64Array = npt.NDArray[np.int64]

def pack_bfd(lengths: _Int64Array, capacity: int) -> tuple[_Int64Array, _Int64Array, _Int64Array]:
    """Best-fit decreasing: ``(bin_ptr, items, bin_lengths)``."""

def pack_ffd(lengths: _Int64Array, capacity: int) -> tuple[_Int64Array, _Int64Array, _Int64Array]:
    """First-fit decreasing: ``(bin_ptr, items, bin_lengths)``."""

def pack_exact_fit(lengths: _Int64Array, capacity: int) -> tuple[_Int64Array, _Int64Array, _Int64Array]:
    """Exact fit, one bin at a time: ``(bin_ptr, items, bin_lengths)``."""

def partition_padded(
    lengths: _Int64Array, num_batches: int, cap: int, rows: int = 0
) -> tuple[_Int64Array, _Int64Array] | tuple[None, None]:
    """Exact padded partition: ``(batch_ptr, items)``; ``cap == 0`` means no cap; ``(None, None)`` when no split
    meets the cap. At most ``rows`` rows of split points are held at once (0: all), the rest recomputed."""

def balance(costs: _Int64Array, num_parts: int, equal_count: bool) -> tuple[_Int64Array, _Int64Array]:
    """LPT or Karmarkar-Karp (the better), then swap refinement: ``(part_ptr, items)``."""

def gather_segments(
    sources: Sequence[npt.NDArray[Any]],
    chunks: _Int64Array | None,
    starts: _Int64Array,
    lengths: _Int64Array,
    order: _Int64Array | None,
    out: npt.NDArray[Any],
) -> int:
    """Copy ``sources[chunks[j]][starts[j] : starts[j] + lengths[j]]`` for each ``j`` of ``order`` (None: every
    segment in index order; ``chunks`` None: all in ``sources[0]``) back to back into ``out``; returns the elements
    written, which must be ``len(out)``. Sources and ``out`` are 1-D, C-contiguous, of one integer or boolean dtype
    of 1, 2, 4 or 8 bytes (TypeError otherwise); ``out`` must be writeable and must not overlap a source. Every
    index is checked before use: a bad one raises ValueError naming it (``out`` may then be partly written). Used
    through ``opensloth.packing._gather``, which validates first."""
