"""Exact padded partition, the spec (see ``csrc/partition.cpp``)."""

from __future__ import annotations

import numpy as np

from ._common import INF, descending_order


def argmin_dtype(n: int) -> type:
    """Split points are stored as int32 while they fit (n + 1 positions), halving the table (every backend)."""
    return np.int32 if n < 2**31 - 1 else np.int64


def _row(s: np.ndarray, prev: np.ndarray, k: int, cap_value, arg: np.ndarray) -> np.ndarray:
    """Row ``k`` of the DP from row ``k - 1`` (``prev``): returns ``f[k]`` and writes its argmins into ``arg``."""
    n = s.shape[0]
    positions = np.arange(n + 1, dtype=np.int64)
    cur = np.full(n + 1, INF, dtype=np.int64)
    # Each stack entry: j in [j_lo, j_hi], candidate i in [i_lo, i_hi].
    stack = [(k, n, k - 1, n - 1)]
    while stack:
        j_lo, j_hi, i_lo, i_hi = stack.pop()
        if j_lo > j_hi:
            continue
        mid = (j_lo + j_hi) // 2
        top = min(i_hi, mid - 1)
        cand = positions[i_lo : top + 1]
        batch = s[i_lo : top + 1] * (mid - cand)
        base = prev[i_lo : top + 1]
        ok = (batch <= cap_value) & (base < INF)
        total = np.where(ok, base + np.where(ok, batch, 0), INF)
        best_pos = int(np.argmin(total))  # first occurrence = smallest i
        if total[best_pos] >= INF:
            best_i = top
            cur[mid] = INF
        else:
            best_i = i_lo + best_pos
            cur[mid] = total[best_pos]
        arg[mid] = best_i
        stack.append((mid + 1, j_hi, best_i, i_hi))
        stack.append((j_lo, mid - 1, i_lo, best_i))
    return cur


def partition_padded(lengths: np.ndarray, num_batches: int, cap: int, rows: int = 0):
    """Exact minimum of sum over batches of (longest x size), every batch non-empty, optional cap on longest x size.

    Sort descending (ties by index); an optimal split is contiguous in that order, so with ``s`` the sorted lengths
    the batch of sorted positions ``[i, j)`` costs ``s[i] * (j - i)`` (infinite above the cap). The DP is
    ``f[k][j] = min_{k-1 <= i < j} f[k-1][i] + s[i] * (j - i)`` over ``k`` batches holding the first ``j`` items.
    That cost is Monge (``s`` non-increasing), so the smallest minimising ``i`` is non-decreasing in ``j`` and
    divide and conquer over ``j`` computes each row in O(n log n). Tie-break, normative for every backend: at each
    ``(k, j)`` the smallest minimising ``i``. Infeasible cells (no split under the cap) are ``INF``; their argmin is
    set to the top of the search range, which keeps the ranges of feasible cells intact because feasibility is a
    prefix in ``j``.

    Memory: the backtrack reads one argmin per row, but the rows come last to first. ``rows`` (0 or at least
    ``num_batches - 1``: all) bounds how many rows of argmins are held at once: the rows are cut into blocks of
    ``rows``; a first pass keeps ``f`` at the start of every block (one row of ``n + 1`` per block) and the argmins
    of the block it is in, so the last block's are at hand; every earlier block is recomputed from its saved row,
    the last first, and backtracked. Rows are pure functions of the previous row, so the result is the same for
    every ``rows``; the memory is (blocks + rows) rows instead of ``num_batches - 1``, for at most twice the time.
    """
    order = descending_order(lengths)
    s = lengths[order]
    n = s.shape[0]
    cap_value = INF if cap == 0 else np.int64(cap)
    single = s[0] * np.arange(1, n + 1, dtype=np.int64)
    prev = np.full(n + 1, INF, dtype=np.int64)
    prev[1:] = np.where(single <= cap_value, single, INF)

    steps = num_batches - 1  # rows k = 2 .. num_batches
    rows = steps if rows <= 0 else min(rows, steps)
    # block[r][j] = start of the last batch in the best split of the first j items into (block start + r) batches
    block = np.empty((max(rows, 1), n + 1), dtype=argmin_dtype(n))
    saved = {}  # block start k -> f[k - 1]
    for k in range(2, num_batches + 1):
        if (k - 2) % rows == 0:
            saved[k] = prev
        prev = _row(s, prev, k, cap_value, block[(k - 2) % rows])
    if prev[n] >= INF:
        return None, None

    ptr = np.zeros(num_batches + 1, dtype=np.int64)
    ptr[num_batches] = n
    j = n
    last = max(saved, default=2)
    for start in sorted(saved, reverse=True):
        end = min(start + rows - 1, num_batches)
        if start != last:  # the last block's argmins are still in `block` from the first pass
            f = saved[start]
            for k in range(start, end + 1):
                f = _row(s, f, k, cap_value, block[k - start])
        for k in range(end, start - 1, -1):
            j = int(block[k - start][j])
            ptr[k - 1] = j
        del saved[start]
    return ptr, order.copy()
