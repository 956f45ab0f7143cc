"""Exact padded partition kernels, identical to ``_python/partition.py``."""

from __future__ import annotations

import numba
import numpy as np

from ._common import I32_PROTO, I64_PROTO, INF, JIT, filled, order_sorted


@numba.njit(**JIT)
def _partition_dc_row(s, prev, cur, arg, k, cap_value, st):
    """One DP row by the spec's divide and conquer, cell for cell: the same search ranges, the first minimum in each
    range, INF cells taking the top of their range; int64 arithmetic wraps exactly as numpy's does."""
    n = s.shape[0]
    inf = INF
    for j in range(n + 1):
        cur[j] = inf
    st[0, 0] = k
    st[0, 1] = n
    st[0, 2] = k - 1
    st[0, 3] = n - 1
    sp = 1
    while sp > 0:
        sp -= 1
        j_lo = st[sp, 0]
        j_hi = st[sp, 1]
        i_lo = st[sp, 2]
        i_hi = st[sp, 3]
        if j_lo > j_hi:
            continue
        mid = (j_lo + j_hi) >> 1
        top = min(i_hi, mid - 1)
        batch = s[i_lo] * (mid - i_lo)
        base = prev[i_lo]
        best = base + batch if (batch <= cap_value) & (base < inf) else inf
        best_i = i_lo
        for i in range(i_lo + 1, top + 1):
            batch = s[i] * (mid - i)
            base = prev[i]
            total = base + batch if (batch <= cap_value) & (base < inf) else inf
            better = total < best
            best = total if better else best
            best_i = i if better else best_i
        if best >= inf:
            best_i = top
            best = inf
        cur[mid] = best
        arg[mid] = best_i
        st[sp, 0] = mid + 1
        st[sp, 1] = j_hi
        st[sp, 2] = best_i
        st[sp, 3] = i_hi
        st[sp + 1, 0] = j_lo
        st[sp + 1, 1] = mid - 1
        st[sp + 1, 2] = i_lo
        st[sp + 1, 3] = best_i
        sp += 2


@numba.njit(**JIT)
def _partition_hull_row(s, prev, cur, arg, k, intercept, dq):
    """One DP row by a monotone convex-hull trick, O(n): the same cells as the divide and conquer when no cost can
    overflow and every cell is feasible (the caller checks).

    Then the cost is Monge, so the spec's divide and conquer finds at every cell the smallest global minimiser, and
    so does this: candidate i is the line ``prev[i] - s[i] * i + s[i] * j`` (slopes non-increasing in i), added when
    j reaches i + 1; queries j increase. Ties go to the smaller i: an equal-slope newcomer must be strictly lower to
    replace the back line, the front moves on only to a strictly lower line, and a middle line that is never
    strictly lowest is dropped (the smaller index wins where it ties)."""
    n = s.shape[0]
    for j in range(k):
        cur[j] = INF
    for i in range(k - 1, n):
        intercept[i] = prev[i] - s[i] * i
    h = 0
    e = 0
    for j in range(k, n + 1):
        c = j - 1
        sc = s[c]
        ac = intercept[c]
        add = True
        if e > h and s[dq[e - 1]] == sc:
            if ac < intercept[dq[e - 1]]:
                e -= 1
            else:
                add = False
        if add:
            while e - h >= 2:
                l1 = dq[e - 2]
                l2 = dq[e - 1]
                if (ac - intercept[l1]) * (s[l1] - s[l2]) <= (intercept[l2] - intercept[l1]) * (s[l1] - sc):
                    e -= 1
                else:
                    break
            dq[e] = c
            e += 1
        f = dq[h]
        best = intercept[f] + s[f] * j
        while e - h >= 2:
            g = dq[h + 1]
            v = intercept[g] + s[g] * j
            if v >= best:
                break
            h += 1
            best = v
        cur[j] = best
        arg[j] = dq[h]


@numba.njit(**JIT)
def _partition(lengths, num_batches, cap, allow_hull, rows, proto):
    """The spec's DP over the sorted lengths, holding at most ``rows`` rows of argmins (of ``proto``'s dtype) at
    once, in blocks recomputed from saved rows as the spec does; returns (feasible, batch_ptr, order)."""
    order = order_sorted(lengths)
    s = lengths[order]
    n = s.shape[0]
    inf = INF
    cap_value = inf if cap == 0 else cap
    prev = filled(n + 1, inf)
    for j in range(1, n + 1):
        single = s[0] * j
        prev[j] = single if single <= cap_value else inf
    # The hull is exact when no batch can pass the cap and no cost or hull product can overflow.
    s0 = s[0]
    hull = allow_hull and (cap == 0 or s0 <= cap // n) and float(s0) * float(s0) * float(n) < 2.0**60
    steps = num_batches - 1
    if rows <= 0 or rows > steps:
        rows = steps
    blocks = (steps + rows - 1) // rows if steps > 0 else 0
    block = np.empty((max(rows, 1), n + 1), proto.dtype)
    saved = np.empty((blocks if blocks > 1 else 0, n + 1), np.int64)  # f before each block, when recomputing
    cur = np.empty(n + 1, np.int64)
    intercept = np.empty(n + 1 if hull else 0, np.int64)
    dq = np.empty(n + 1 if hull else 0, np.int64)
    depth = 4
    m = n + 1
    while m:
        depth += 2
        m >>= 1
    st = np.empty((depth, 4), np.int64)
    for k in range(2, num_batches + 1):
        if blocks > 1 and (k - 2) % rows == 0:
            saved[(k - 2) // rows, :] = prev
        if hull:
            _partition_hull_row(s, prev, cur, block[(k - 2) % rows], k, intercept, dq)
        else:
            _partition_dc_row(s, prev, cur, block[(k - 2) % rows], k, cap_value, st)
        prev, cur = cur, prev
    ptr = np.zeros(num_batches + 1, np.int64)
    if prev[n] >= inf:
        return False, ptr, order
    ptr[num_batches] = n
    j = n
    for b in range(blocks - 1, -1, -1):
        start = 2 + b * rows
        end = min(start + rows - 1, num_batches)
        if b != blocks - 1:  # the last block's argmins are still in `block` from the first pass
            prev[:] = saved[b]
            for k in range(start, end + 1):
                if hull:
                    _partition_hull_row(s, prev, cur, block[k - start], k, intercept, dq)
                else:
                    _partition_dc_row(s, prev, cur, block[k - start], k, cap_value, st)
                prev, cur = cur, prev
        for k in range(end, start - 1, -1):
            j = block[k - start, j]
            ptr[k - 1] = j
    return True, ptr, order


def solve(lengths: np.ndarray, num_batches: int, cap: int, rows: int = 0, allow_hull: bool = True):
    """``_partition`` with the argmin dtype of every backend (int32 while n + 1 positions fit)."""
    proto = I32_PROTO if lengths.shape[0] < 2**31 - 1 else I64_PROTO
    return _partition(lengths, int(num_batches), int(cap), allow_hull, int(rows), proto)


def partition_padded(lengths: np.ndarray, num_batches: int, cap: int, rows: int = 0):
    """Exact padded partition, identical to ``_python.partition_padded`` (``rows``: the same memory bound);
    ``(None, None)`` when infeasible."""
    ok, ptr, order = solve(lengths, num_batches, cap, rows)
    if not ok:
        return None, None
    return ptr, order
