"""Typed stub of ``opensloth._native``, the C++17 packing backend (sources in ``csrc/``).

Same interface and results as ``opensloth.packing._python`` (the spec). Inputs must be 1-D, C-contiguous int64 numpy
arrays (they are read in place; anything else raises TypeError instead of being copied) and lie within the limits
that ``opensloth.packing`` validates; the module re-checks the ranges its memory safety depends on and raises
ValueError otherwise. Results are freshly allocated int64 arrays. The GIL is released while the C++ code runs.
"""

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
    lengths: _Int64Array, num_batches: int, cap: int
) -> tuple[_Int64Array, _Int64Array] | tuple[None, None]:
    """Exact padded partition: ``(batch_ptr, items)``; ``cap == 0`` means no cap; ``(None, None)`` when no split
    meets the cap."""

def balance(costs: _Int64Array, num_parts: int, equal_count: bool) -> tuple[_Int64Array, _Int64Array]:
    """LPT or Karmarkar-Karp (the better), then swap refinement: ``(part_ptr, items)``."""
