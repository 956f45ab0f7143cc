"""Numba packing backend: the algorithms of ``opensloth.packing._python`` (the spec) as compiled kernels, identical
output, one module per algorithm like ``csrc/``: ``pack``, ``partition``, ``balancing`` (not ``balance``, which
would hide the function of that name) and ``gather``.

Every kernel is ``@numba.njit(cache=True, nogil=True)``: importing this package compiles nothing; each kernel
compiles on its first call and numba caches the machine code in ``__pycache__``, so later processes load it.
Inputs arrive validated by ``opensloth.packing`` (int64, C-contiguous, 1-D, non-empty, within their limits). The
backend interface is the one listed in ``opensloth.packing._python``.
"""

from __future__ import annotations

from .balancing import balance
from .gather import gather_segments
from .pack import pack_bfd, pack_exact_fit, pack_ffd
from .partition import partition_padded

__all__ = ["balance", "gather_segments", "pack_bfd", "pack_exact_fit", "pack_ffd", "partition_padded"]
