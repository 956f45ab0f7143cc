"""Pure-Python packing backend: the written specification, one module per algorithm like ``csrc/`` (``pack``,
``partition``, ``balancing`` (not ``balance``, which would hide the function of that name) and ``gather``).

Every rule here, tie-breaks included, is normative: the numba and native backends must return identical arrays
for every valid input. Inputs arrive validated (see ``opensloth.packing._validate``): int64, C-contiguous,
non-empty, within their limits.

Backend interface (shared by ``opensloth.packing._numba`` and ``opensloth._native``):

- ``pack_bfd(lengths, capacity) -> (bin_ptr, items, bin_lengths)``                      (``pack.py``)
- ``pack_ffd(lengths, capacity) -> (bin_ptr, items, bin_lengths)``                      (``pack.py``)
- ``pack_exact_fit(lengths, capacity) -> (bin_ptr, items, bin_lengths)``                (``pack.py``)
- ``partition_padded(lengths, num_batches, cap, rows=0) -> (batch_ptr, items)``, ``cap == 0`` meaning no cap,
  ``(None, None)`` when no split meets the cap, at most ``rows`` rows of split points held at once (0: all; the
  dispatch sizes it, ``_validate.partition_rows``)                                       (``partition.py``)
- ``balance(costs, num_parts, equal_count) -> (part_ptr, items)``                       (``balancing.py``)
- ``gather_segments(sources, chunks, starts, lengths, order, out) -> elements written``  (``gather.py``)

All result arrays are int64 and freshly allocated.
"""

from ._common import INF, descending_order
from .balancing import balance
from .gather import gather_segments
from .pack import pack_bfd, pack_exact_fit, pack_ffd
from .partition import partition_padded

__all__ = ["INF", "balance", "descending_order", "gather_segments", "pack_bfd", "pack_exact_fit", "pack_ffd",
           "partition_padded"]
