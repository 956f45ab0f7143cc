"""Exact padded partition, the spec (see ``csrc/partition.cpp``)."""

from __future__ import annotations

import numpy as np

from ._common import INF, descending_order


def partition_padded(lengths: np.ndarray, num_batches: int, cap: int):
    """Exact minimum of sum over batches of (longest x size), every batch non-empty, optional cap on longest x size.

    Sort descending (ties by index); an optimal split is contiguous in that order, so with ``s`` the sorted lengths
    the batch of sorted positions ``[i, j)`` costs ``s[i] * (j - i)`` (infinite above the cap). The DP is
    ``f[k][j] = min_{k-1 <= i < j} f[k-1][i] + s[i] * (j - i)`` over ``k`` batches holding the first ``j`` items.
    That cost is Monge (``s`` non-increasing), so the smallest minimising ``i`` is non-decreasing in ``j`` and
    divide and conquer over ``j`` computes each row in O(n log n). Tie-break, normative for every backend: at each
    ``(k, j)`` the smallest minimising ``i``. Infeasible cells (no split under the cap) are ``INF``; their argmin is
    set to the top of the search range, which keeps the ranges of feasible cells intact because feasibility is a
    prefix in ``j``.
    """
    order = descending_order(lengths)
    s = lengths[order]
    n = s.shape[0]
    cap_value = INF if cap == 0 else np.int64(cap)
    positions = np.arange(n + 1, dtype=np.int64)

    prev = np.full(n + 1, INF, dtype=np.int64)
    single = s[0] * positions[1:]
    prev[1:] = np.where(single <= cap_value, single, INF)
    argmins = []  # argmins[k-2][j] = start of the last batch in the best split of the first j items into k batches

    for k in range(2, num_batches + 1):
        cur = np.full(n + 1, INF, dtype=np.int64)
        arg = np.zeros(n + 1, dtype=np.int64)
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
        argmins.append(arg)
        prev = cur

    if prev[n] >= INF:
        return None, None
    bounds = [n]
    j = n
    for k in range(num_batches, 1, -1):
        j = int(argmins[k - 2][j])
        bounds.append(j)
    bounds.append(0)
    ptr = np.asarray(bounds[::-1], dtype=np.int64)
    return ptr, order.copy()
