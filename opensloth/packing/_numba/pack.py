"""Bin packing kernels: best-fit decreasing, first-fit decreasing and exact fit, identical to ``_python/pack.py``.

Capacities up to ``COUNTING_MIN_LIMIT`` (or twice the item count) use a counting sort and structures indexed by free
space; larger ones a radix sort and structures over the distinct lengths (memory O(n), never O(capacity)).
"""

from __future__ import annotations

import numba
import numpy as np

from ._common import (
    I64_MAX,
    JIT,
    bitset_clear,
    bitset_new,
    bitset_next,
    bitset_set,
    bitset_test,
    filled,
    index_proto,
    last_at_most,
    order_counting,
    order_for,
    order_sorted,
    use_counting,
)


@numba.njit(**JIT)
def _csr_from_placement(order, placed_bin, bin_len, nbins):
    """CSR arrays from the bin of each placed item (placement order): bins in opening order, items as placed."""
    n = order.shape[0]
    ptr = np.zeros(nbins + 1, np.int64)
    for t in range(n):
        ptr[placed_bin[t] + 1] += 1
    for b in range(nbins):
        ptr[b + 1] += ptr[b]
    fill = ptr[:nbins].copy()
    items = np.empty(n, np.int64)
    for t in range(n):
        b = placed_bin[t]
        items[fill[b]] = order[t]
        fill[b] += 1
    return ptr, items, bin_len[:nbins].copy() if bin_len.shape[0] != nbins else bin_len


# ---------------------------------------------------------------------------------------------------------------
# Best-fit decreasing
# ---------------------------------------------------------------------------------------------------------------


@numba.njit(**JIT)
def _bfd_counting(lengths, capacity, proto):
    """BFD with a counting sort, a bitset over free-space values and a FIFO queue of bins per free-space value
    (intrusive linked lists: head/tail per value, next per bin; head/tail are read only where the bitset says the
    value is held). Memory O(n + capacity)."""
    n = lengths.shape[0]
    order, ends = order_counting(lengths, capacity, proto)
    bits, offs = bitset_new(capacity)
    head = np.empty(capacity, proto.dtype)
    tail = np.empty(capacity, proto.dtype)
    nxt = np.empty(n, proto.dtype)
    placed_bin = np.empty(n, proto.dtype)
    nbins = 0
    t = 0
    # Walking the runs of equal length (rather than reading lengths[order[t]]) keeps the size off the critical path.
    for size in range(capacity, 0, -1):
        end = ends[size]
        while t < end:
            f = bitset_next(bits, offs, size) if size < capacity else -1
            if f < 0:
                b = nbins
                nbins += 1
                left = capacity - size
            else:
                b = head[f]
                if b == tail[f]:
                    bitset_clear(bits, offs, f)
                else:
                    head[f] = nxt[b]
                left = f - size
            placed_bin[t] = b
            if left > 0:
                if bitset_test(bits, left):
                    nxt[tail[left]] = b
                else:
                    head[left] = b
                    bitset_set(bits, offs, left)
                tail[left] = b
            t += 1
    # A bin is full unless it waits in a free-space queue.
    bin_len = filled(nbins, capacity)
    v = bitset_next(bits, offs, 1) if capacity > 1 else -1
    while v >= 0:
        b = head[v]
        while True:
            bin_len[b] = capacity - v
            if b == tail[v]:
                break
            b = nxt[b]
        v = bitset_next(bits, offs, v + 1) if v + 1 < capacity else -1
    return _csr_from_placement(order, placed_bin, bin_len, nbins)


# Pairing heaps of bins keyed by (free space, arrival number): the arrival number makes equal free spaces FIFO.


@numba.njit(**JIT)
def _ph_meld(a, b, key, seq, child, sib):
    if key[b] < key[a] or (key[b] == key[a] and seq[b] < seq[a]):
        a, b = b, a
    sib[b] = child[a]
    child[a] = b
    return a


@numba.njit(**JIT)
def _ph_pop(r, key, seq, child, sib):
    """Meld the children of root r (two-pass pairing); returns the new root or -1."""
    c = child[r]
    if c < 0:
        return -1
    acc = -1  # first pass: melded pairs, pushed onto a list linked through sib (so it ends reversed)
    while c >= 0:
        a = c
        b = sib[a]
        if b < 0:
            sib[a] = acc
            acc = a
            break
        c = sib[b]
        sib[a] = -1
        sib[b] = -1
        m = _ph_meld(a, b, key, seq, child, sib)
        sib[m] = acc
        acc = m
    res = acc  # second pass: meld right to left
    nx = sib[res]
    sib[res] = -1
    while nx >= 0:
        cur = nx
        nx = sib[cur]
        sib[cur] = -1
        res = _ph_meld(res, cur, key, seq, child, sib)
    return res


@numba.njit(**JIT)
def _bfd_sorted(lengths, capacity):
    """BFD for any capacity in O(n log n) time and O(n) memory.

    Open bins are grouped by the largest distinct item length that their free space reaches (bins below the
    smallest length can never take an item and are dropped). An item of the t-th distinct length fits exactly the
    bins of groups >= t; a bitset over groups finds the first non-empty one, and a pairing heap per group keyed by
    (free space, arrival) yields its best bin, the same bin the spec's FIFO queues give.
    """
    n = lengths.shape[0]
    order = order_sorted(lengths)
    # Distinct lengths ascending, and each placed item's group.
    uniq = np.empty(n, np.int64)
    group_of = np.empty(n, np.int64)
    d = 0
    for t in range(n - 1, -1, -1):
        v = lengths[order[t]]
        if d == 0 or uniq[d - 1] != v:
            uniq[d] = v
            d += 1
        group_of[t] = d - 1
    uniq = uniq[:d]
    smallest = uniq[0]
    bits, offs = bitset_new(d)
    root = filled(d, -1)
    key = np.empty(n, np.int64)
    seq = np.empty(n, np.int64)
    child = np.empty(n, np.int64)
    sib = np.empty(n, np.int64)
    placed_bin = np.empty(n, np.int64)
    bin_len = np.zeros(n, np.int64)
    nbins = 0
    arrivals = 0
    for t in range(n):
        size = lengths[order[t]]
        g = bitset_next(bits, offs, group_of[t])
        if g < 0:
            b = nbins
            nbins += 1
            space = capacity
        else:
            b = root[g]
            r = _ph_pop(b, key, seq, child, sib)
            root[g] = r
            if r < 0:
                bitset_clear(bits, offs, g)
            space = key[b]
        placed_bin[t] = b
        bin_len[b] += size
        left = space - size
        if left >= smallest:
            gl = last_at_most(uniq, left)
            key[b] = left
            seq[b] = arrivals
            arrivals += 1
            child[b] = -1
            sib[b] = -1
            if root[gl] < 0:
                root[gl] = b
                bitset_set(bits, offs, gl)
            else:
                root[gl] = _ph_meld(root[gl], b, key, seq, child, sib)
    return _csr_from_placement(order, placed_bin, bin_len, nbins)


def pack_bfd(lengths: np.ndarray, capacity: int):
    """Best-fit decreasing, identical to ``_python.pack_bfd``."""
    capacity = int(capacity)
    if use_counting(lengths.shape[0], capacity):
        return _bfd_counting(lengths, capacity, index_proto(lengths.shape[0]))
    return _bfd_sorted(lengths, capacity)


# ---------------------------------------------------------------------------------------------------------------
# First-fit decreasing
# ---------------------------------------------------------------------------------------------------------------


@numba.njit(**JIT)
def _ffd(lengths, capacity, order):
    """FFD: a max segment tree over bin slots (unopened slots hold ``capacity``), leftmost slot that fits.

    First fit leaves at most one bin at most half full (a later such bin's items would have fitted the earlier one),
    so it opens at most 2 * sum / capacity + 1 bins: the tree needs only that many slots, and finds the same bins.
    """
    n = lengths.shape[0]
    total = 0
    max_bins = 0
    for i in range(n):
        v = lengths[i]
        if total > I64_MAX - v:
            max_bins = n  # the sum overflows int64: no bound below n
            break
        total += v
    if max_bins == 0:
        max_bins = min(n, 2 * (total // capacity) + 2)
    leaves = 1
    while leaves < max_bins:
        leaves *= 2
    tree = filled(2 * leaves, capacity)
    placed_bin = np.empty(n, order.dtype)
    nbins = 0
    for t in range(n):
        size = lengths[order[t]]
        node = 1
        while node < leaves:
            node = 2 * node if tree[2 * node] >= size else 2 * node + 1
        b = node - leaves
        if b == nbins:
            nbins += 1
        placed_bin[t] = b
        tree[node] -= size
        node >>= 1
        while node:
            left = tree[2 * node]
            right = tree[2 * node + 1]
            best = left if left >= right else right
            if tree[node] == best:
                break  # ancestors already hold the right maxima
            tree[node] = best
            node >>= 1
    bin_len = np.empty(nbins, np.int64)
    for b in range(nbins):
        bin_len[b] = capacity - tree[leaves + b]
    return _csr_from_placement(order, placed_bin, bin_len, nbins)


def pack_ffd(lengths: np.ndarray, capacity: int):
    """First-fit decreasing, identical to ``_python.pack_ffd``."""
    capacity = int(capacity)
    return _pack_ffd(lengths, capacity, use_counting(lengths.shape[0], capacity))


def _pack_ffd(lengths: np.ndarray, capacity: int, counting: bool):
    return _ffd(lengths, capacity, order_for(lengths, capacity, counting))


# ---------------------------------------------------------------------------------------------------------------
# Exact fit
# ---------------------------------------------------------------------------------------------------------------


@numba.njit(**JIT)
def _rank_at_most(val, table, v):
    """The first rank (distinct values, descending) whose value is <= v; len(val) when none."""
    if v < 0:
        return val.shape[0]
    if table.shape[0] > 0:
        return table[v]
    lo = 0
    hi = val.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if val[mid] > v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(**JIT)
def _exact_fit(lengths, capacity, order, counting):
    """The spec's exact fit over the distinct lengths ("ranks", longest first): a bitset of ranks that still have
    items answers "longest remaining length <= limit" and "longest remaining"; the shortest remaining only ever
    grows, so a pointer tracks it. With ``counting`` a table maps every length to its rank in O(1); otherwise a
    binary search does (memory O(n) for any capacity)."""
    n = lengths.shape[0]
    val = np.empty(n, np.int64)
    pos = np.empty(n, np.int64)
    remaining = np.zeros(n, np.int64)
    d = 0
    for t in range(n):
        v = lengths[order[t]]
        if d == 0 or val[d - 1] != v:
            val[d] = v
            pos[d] = t
            d += 1
        remaining[d - 1] += 1
    val = val[:d]
    if counting:
        table = np.empty(capacity + 1, np.int64)
        r = 0
        for v in range(capacity, -1, -1):
            while r < d and val[r] > v:
                r += 1
            table[v] = r
    else:
        table = np.empty(0, np.int64)
    bits, offs = bitset_new(d)
    for r in range(d):
        bitset_set(bits, offs, r)
    shortest = d - 1  # the remaining rank of the shortest length; -1 once every item is placed
    items = np.empty(n, np.int64)
    ptr = np.zeros(n + 1, np.int64)
    bin_len = np.empty(n, np.int64)
    nbins = 0
    placed = 0
    while shortest >= 0:
        r = bitset_next(bits, offs, 0)
        gap = capacity
        while True:
            items[placed] = order[pos[r]]
            placed += 1
            pos[r] += 1
            remaining[r] -= 1
            if remaining[r] == 0:
                bitset_clear(bits, offs, r)
                while shortest >= 0 and remaining[shortest] == 0:
                    shortest -= 1
            gap -= val[r]
            if gap <= 0 or shortest < 0:
                break
            r = _rank_at_most(val, table, gap)
            if r < d and val[r] == gap and remaining[r] > 0:
                continue
            r = -1
            r0 = _rank_at_most(val, table, gap - val[shortest])
            if r0 < d:
                r = bitset_next(bits, offs, r0)
            if r < 0:
                r0 = _rank_at_most(val, table, gap)
                if r0 < d:
                    r = bitset_next(bits, offs, r0)
                if r < 0:
                    break
        bin_len[nbins] = capacity - gap
        nbins += 1
        ptr[nbins] = placed
    return ptr[: nbins + 1].copy(), items, bin_len[:nbins].copy()


def pack_exact_fit(lengths: np.ndarray, capacity: int):
    """Exact fit, identical to ``_python.pack_exact_fit``."""
    capacity = int(capacity)
    return _pack_exact_fit(lengths, capacity, use_counting(lengths.shape[0], capacity))


def _pack_exact_fit(lengths: np.ndarray, capacity: int, counting: bool):
    return _exact_fit(lengths, capacity, order_for(lengths, capacity, counting), counting)
