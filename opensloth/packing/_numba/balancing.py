"""Balance kernels: LPT, Karmarkar-Karp and swap refinement, identical to ``_python/balance.py``."""

from __future__ import annotations

import numba
import numpy as np

from ._common import I64_MAX, JIT, filled, last_at_most, order_sorted


@numba.njit(**JIT)
def _pair_less(a1, a2, b1, b2):
    return a1 < b1 or (a1 == b1 and a2 < b2)


@numba.njit(**JIT)
def _heap_push(h1, h2, h3, size, v1, v2, v3):
    """Binary min-heap on (h1, h2) with payload h3; returns the new size."""
    i = size
    while i > 0:
        p = (i - 1) >> 1
        if not _pair_less(v1, v2, h1[p], h2[p]):
            break
        h1[i] = h1[p]
        h2[i] = h2[p]
        h3[i] = h3[p]
        i = p
    h1[i] = v1
    h2[i] = v2
    h3[i] = v3
    return size + 1


@numba.njit(**JIT)
def _heap_pop(h1, h2, h3, size):
    """Removes the minimum (returned by the caller from index 0 beforehand); returns the new size."""
    size -= 1
    v1 = h1[size]
    v2 = h2[size]
    v3 = h3[size]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and _pair_less(h1[c + 1], h2[c + 1], h1[c], h2[c]):
            c += 1
        if not _pair_less(h1[c], h2[c], v1, v2):
            break
        h1[i] = h1[c]
        h2[i] = h2[c]
        h3[i] = h3[c]
        i = c
    if size > 0:
        h1[i] = v1
        h2[i] = v2
        h3[i] = v3
    return size


@numba.njit(**JIT)
def _lpt(costs, order, k, equal_count):
    """The spec's LPT; returns the part of each item and the largest part load."""
    n = order.shape[0]
    q = n // k
    r = n % k
    part_of = np.empty(n, np.int64)
    counts = np.zeros(k, np.int64)
    h_load = np.zeros(k, np.int64)
    h_part = np.arange(k)
    h_pay = np.zeros(k, np.int64)
    size = k  # (0, p) for p ascending is already a heap
    big = 0
    for t in range(n):
        idx = order[t]
        while True:
            load = h_load[0]
            p = h_part[0]
            size = _heap_pop(h_load, h_part, h_pay, size)
            count = counts[p]
            if not equal_count or count < q or (count == q and big < r):
                break
        part_of[idx] = p
        counts[p] += 1
        if counts[p] == q + 1:
            big += 1
        if not equal_count or counts[p] <= q:
            size = _heap_push(h_load, h_part, h_pay, size, load + costs[idx], p, 0)
    loads = np.zeros(k, np.int64)
    for i in range(n):
        loads[part_of[i]] += costs[i]
    return part_of, loads.max()


@numba.njit(**JIT)
def _stable_rank_desc(values, rank):
    """rank = indices of values sorted descending, ties in index order (stable)."""
    k = values.shape[0]
    if k > 64:
        sorted_rank = order_sorted(values)
        for i in range(k):
            rank[i] = sorted_rank[i]
        return
    for i in range(k):
        rank[i] = i
    for i in range(1, k):
        x = rank[i]
        j = i - 1
        while j >= 0 and values[rank[j]] < values[x]:
            rank[j + 1] = rank[j]
            j -= 1
        rank[j + 1] = x


@numba.njit(**JIT)
def _karmarkar_karp(costs, order, k, equal_count):
    """The spec's k-way largest differencing; returns the part of each item (part = final subset position) and the
    largest subset sum. State s keeps its k subset sums (descending) at ``sums[s*k:(s+1)*k]`` and its subsets as
    linked lists of items (head/tail per subset, ``nxt`` per item), so merging two subsets is O(1). A merged state
    reuses the slot of the first state it consumed; the heap orders states by (spread descending, creation)."""
    n = order.shape[0]
    nstates = (n + k - 1) // k if equal_count else n
    sums = np.zeros(nstates * k, np.int64)
    head = filled(nstates * k, -1)
    tail = np.empty(nstates * k, np.int64)  # read only where head >= 0
    nxt = np.empty(n, np.int64)  # read only before a list's tail
    h_spread = np.empty(nstates, np.int64)
    h_serial = np.empty(nstates, np.int64)
    h_slot = np.empty(nstates, np.int64)
    size = 0
    for s in range(nstates):
        base = s * k
        if equal_count:
            for i in range(k):
                t = s * k + i
                if t < n:
                    idx = order[t]
                    sums[base + i] = costs[idx]
                    head[base + i] = idx
                    tail[base + i] = idx
        else:
            idx = order[s]
            sums[base] = costs[idx]
            head[base] = idx
            tail[base] = idx
        size = _heap_push(h_spread, h_serial, h_slot, size, -(sums[base] - sums[base + k - 1]), s, s)
    serial = nstates
    m_sum = np.empty(k, np.int64)
    m_head = np.empty(k, np.int64)
    m_tail = np.empty(k, np.int64)
    rank = np.empty(k, np.int64)
    while size > 1:
        a = h_slot[0] * k
        size = _heap_pop(h_spread, h_serial, h_slot, size)
        b = h_slot[0] * k
        size = _heap_pop(h_spread, h_serial, h_slot, size)
        for i in range(k):
            j = b + k - 1 - i
            m_sum[i] = sums[a + i] + sums[j]
            ha = head[a + i]
            hb = head[j]
            if ha < 0:
                m_head[i] = hb
                m_tail[i] = tail[j]
            elif hb < 0:
                m_head[i] = ha
                m_tail[i] = tail[a + i]
            else:
                nxt[tail[a + i]] = hb
                m_head[i] = ha
                m_tail[i] = tail[j]
        _stable_rank_desc(m_sum, rank)
        for i in range(k):
            r = rank[i]
            sums[a + i] = m_sum[r]
            head[a + i] = m_head[r]
            tail[a + i] = m_tail[r]
        size = _heap_push(h_spread, h_serial, h_slot, size, -(sums[a] - sums[a + k - 1]), serial, a // k)
        serial += 1
    last = h_slot[0] * k
    part_of = np.empty(n, np.int64)
    for i in range(k):
        x = head[last + i]
        if x < 0:
            continue
        end = tail[last + i]
        while True:
            part_of[x] = i
            if x == end:
                break
            x = nxt[x]
    return part_of, sums[last]


@numba.njit(**JIT)
def _refine(costs, part_of, k, equal_count):
    """The spec's swap refinement between the heaviest and the lightest part, in place on ``part_of``.

    As in the spec, each round sorts the distinct costs of L (each with its smallest index; the move, b = -1, holds
    cost 0 before every item) and takes, for each a of H, the better of the two costs around c[a] - g/2: lo, the
    largest cost <= c[a] - ceil(g/2), and the next one (the smallest cost >= c[a] - floor(g/2), or a worse one
    when lo already scores 0)."""
    n = costs.shape[0]
    loads = np.zeros(k, np.int64)
    for i in range(n):
        loads[part_of[i]] += costs[i]
    a_items = np.empty(n, np.int64)
    l_items = np.empty(n, np.int64)
    l_costs = np.empty(n, np.int64)
    values = np.empty(n + 1, np.int64)
    first_b = np.empty(n + 1, np.int64)
    for _ in range(n):
        heavy = 0
        light = 0
        for p in range(1, k):
            if loads[p] > loads[heavy]:
                heavy = p
            if loads[p] < loads[light]:
                light = p
        gap = loads[heavy] - loads[light]
        if gap <= 1:
            break
        na = 0
        nl = 0
        for i in range(n):
            p = part_of[i]
            if p == heavy:
                a_items[na] = i
                na += 1
            elif p == light:
                l_items[nl] = i
                l_costs[nl] = costs[i]
                nl += 1
        if na == 0 or (nl == 0 and equal_count):
            break
        nv = 0
        if not equal_count:
            values[0] = 0
            first_b[0] = -1
            nv = 1
        if nl > 0:
            desc = order_sorted(l_costs[:nl])
            for t in range(nl - 1, -1, -1):  # ascending cost
                pos = desc[t]
                v = l_costs[pos]
                if nv > 0 and values[nv - 1] == v:
                    first_b[nv - 1] = min(first_b[nv - 1], l_items[pos])
                else:
                    values[nv] = v
                    first_b[nv] = l_items[pos]
                    nv += 1
        sorted_values = values[:nv]
        half_up = gap - gap // 2
        best = I64_MAX
        best_a = -1
        best_b = -1
        best_d = 0
        for ai in range(na):
            a = a_items[ai]
            ca = costs[a]
            lo = last_at_most(sorted_values, ca - half_up)
            for pos in range(max(lo, 0), min(lo + 2, nv)):
                d = ca - values[pos]
                if d <= 0 or d >= gap:
                    continue
                score = abs(2 * d - gap)  # in (-g, g): wraps in 2d and back, exact
                b = first_b[pos]
                if score < best or (score == best and a == best_a and b < best_b):
                    best = score
                    best_a = a
                    best_b = b
                    best_d = d
        if best_a < 0:
            break
        part_of[best_a] = light
        if best_b >= 0:
            part_of[best_b] = heavy
        loads[heavy] -= best_d
        loads[light] += best_d


@numba.njit(**JIT)
def _balance(costs, k, equal_count):
    order = order_sorted(costs)
    part_lpt, max_lpt = _lpt(costs, order, k, equal_count)
    part_kk, max_kk = _karmarkar_karp(costs, order, k, equal_count)
    part_of = part_lpt if max_lpt <= max_kk else part_kk
    _refine(costs, part_of, k, equal_count)
    n = costs.shape[0]
    ptr = np.zeros(k + 1, np.int64)
    for i in range(n):
        ptr[part_of[i] + 1] += 1
    for p in range(k):
        ptr[p + 1] += ptr[p]
    fill = ptr[:k].copy()
    items = np.empty(n, np.int64)
    for i in range(n):
        p = part_of[i]
        items[fill[p]] = i
        fill[p] += 1
    return ptr, items


def balance(costs: np.ndarray, num_parts: int, equal_count: bool):
    """LPT or Karmarkar-Karp then swap refinement, identical to ``_python.balance``."""
    return _balance(costs, int(num_parts), bool(equal_count))
