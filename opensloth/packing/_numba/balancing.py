"""Balance kernels: LPT, Karmarkar-Karp and swap refinement, identical to ``_python/balance.py``."""

from __future__ import annotations

import numba
import numpy as np

from ._common import I64_MAX, JIT, last_at_most, order_sorted


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
def _initial_item(order, s, i, k, equal_count):
    """Item i of initial state s (-1: an empty subset): one item, or a group of k items of the descending order."""
    n = order.shape[0]
    if equal_count:
        t = s * k + i
        return order[t] if t < n else -1
    return order[s] if i == 0 else -1


@numba.njit(**JIT, inline="always")
def _stream_spread(costs, order, s, k):
    """The spread of initial state s without equal_count: its one item's cost, or 0 when k == 1."""
    return costs[order[s]] if k > 1 else 0


@numba.njit(**JIT)
def _karmarkar_karp(costs, order, k, equal_count):
    """The spec's k-way largest differencing; returns the part of each item (part = final subset position) and the
    largest subset sum. The heap orders states by (spread descending, creation); its payload is an initial state
    s >= 0, read from ``order`` when it is merged (no n x k arrays), or -1 - slot for a merged state, whose k subset
    sums (descending) sit at ``sums[slot*k:(slot+1)*k]`` and whose subsets are linked lists of items (head/tail per
    subset, ``nxt`` per item), so merging two subsets is O(1). A merged state reuses a slot it consumed; slots grow
    by doubling, so memory follows the live merged states."""
    n = order.shape[0]
    nstates = (n + k - 1) // k if equal_count else n
    slots = 4
    sums = np.empty(slots * k, np.int64)
    head = np.empty(slots * k, np.int64)
    tail = np.empty(slots * k, np.int64)  # read only where head >= 0
    free = np.empty(slots, np.int64)
    nfree = 0
    used = 0
    nxt = np.empty(n, np.int64)  # read only before a list's tail
    h_spread = np.empty(nstates, np.int64)
    h_serial = np.empty(nstates, np.int64)
    h_state = np.empty(nstates, np.int64)
    size = 0
    # Without equal_count the initial states (one item each, spread = its cost, or 0 when k == 1) already come in
    # heap order, s ascending: they stay in that stream and the heap holds only merged states, which are created
    # later and so lose every tie to them.
    stream = not equal_count
    next_init = 0 if stream else nstates
    if not stream:
        for s in range(nstates):
            first = _initial_item(order, s, 0, k, equal_count)
            last = _initial_item(order, s, k - 1, k, equal_count)
            spread = costs[first] - (costs[last] if last >= 0 else 0)
            size = _heap_push(h_spread, h_serial, h_state, size, -spread, s, s)
    serial = nstates
    m_sum = np.empty(k, np.int64)
    m_head = np.empty(k, np.int64)
    m_tail = np.empty(k, np.int64)
    rank = np.empty(k, np.int64)
    while size + nstates - next_init > 1:
        if next_init < nstates and (size == 0 or _pair_less(-_stream_spread(costs, order, next_init, k), next_init,
                                                            h_spread[0], h_serial[0])):
            pa = next_init
            next_init += 1
        else:
            pa = h_state[0]
            size = _heap_pop(h_spread, h_serial, h_state, size)
        if next_init < nstates and (size == 0 or _pair_less(-_stream_spread(costs, order, next_init, k), next_init,
                                                            h_spread[0], h_serial[0])):
            pb = next_init
            next_init += 1
        else:
            pb = h_state[0]
            size = _heap_pop(h_spread, h_serial, h_state, size)
        for i in range(k):
            j = k - 1 - i
            if pa >= 0:
                ha = _initial_item(order, pa, i, k, equal_count)
                ta = ha
                sa = costs[ha] if ha >= 0 else 0
            else:
                at = (-1 - pa) * k + i
                ha = head[at]
                ta = tail[at]
                sa = sums[at]
            if pb >= 0:
                hb = _initial_item(order, pb, j, k, equal_count)
                tb = hb
                sb = costs[hb] if hb >= 0 else 0
            else:
                bt = (-1 - pb) * k + j
                hb = head[bt]
                tb = tail[bt]
                sb = sums[bt]
            m_sum[i] = sa + sb
            if ha < 0:
                m_head[i] = hb
                m_tail[i] = tb
            elif hb < 0:
                m_head[i] = ha
                m_tail[i] = ta
            else:
                nxt[ta] = hb
                m_head[i] = ha
                m_tail[i] = tb
        _stable_rank_desc(m_sum, rank)
        if pa < 0:
            slot = -1 - pa
            if pb < 0:
                free[nfree] = -1 - pb
                nfree += 1
        elif pb < 0:
            slot = -1 - pb
        elif nfree > 0:
            nfree -= 1
            slot = free[nfree]
        else:
            if used == slots:
                slots *= 2
                sums = _grown(sums, slots * k)
                head = _grown(head, slots * k)
                tail = _grown(tail, slots * k)
                free = _grown(free, slots)
            slot = used
            used += 1
        base = slot * k
        for i in range(k):
            r = rank[i]
            sums[base + i] = m_sum[r]
            head[base + i] = m_head[r]
            tail[base + i] = m_tail[r]
        size = _heap_push(h_spread, h_serial, h_state, size, -(sums[base] - sums[base + k - 1]), serial, -1 - slot)
        serial += 1
    part_of = np.empty(n, np.int64)
    p = h_state[0] if size > 0 else next_init
    for i in range(k):
        if p >= 0:
            x = _initial_item(order, p, i, k, equal_count)
            end = x
        else:
            x = head[(-1 - p) * k + i]
            end = tail[(-1 - p) * k + i]
        if x < 0:
            continue
        while True:
            part_of[x] = i
            if x == end:
                break
            x = nxt[x]
    first = _initial_item(order, p, 0, k, equal_count) if p >= 0 else -1
    return part_of, (costs[first] if p >= 0 else sums[(-1 - p) * k])


@numba.njit(**JIT)
def _grown(values, size):
    out = np.empty(size, np.int64)
    out[: values.shape[0]] = values
    return out


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
