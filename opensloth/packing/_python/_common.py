"""What every algorithm of the python backend shares: the one sort order, CSR offsets, the DP's INF."""

from __future__ import annotations

import numpy as np

# A cost no feasible padded partition reaches (lengths x counts stay far below it for any realistic input).
INF = np.int64(1) << np.int64(62)


def descending_order(values: np.ndarray) -> np.ndarray:
    """Indices sorted by value descending, ties by index ascending (the one sort order every algorithm uses)."""
    return np.argsort(-values, kind="stable").astype(np.int64)


def csr(groups_sizes: list[int] | np.ndarray) -> np.ndarray:
    """Offsets of consecutive groups of the given sizes: ``[0, s0, s0 + s1, ...]``."""
    ptr = np.zeros(len(groups_sizes) + 1, dtype=np.int64)
    np.cumsum(groups_sizes, out=ptr[1:])
    return ptr
