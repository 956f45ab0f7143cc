"""Numba packing backend: the algorithms of ``_python.py`` (the spec) as compiled kernels, identical output.

Every kernel is ``@numba.njit(cache=True, nogil=True)``: importing this module compiles nothing; each kernel
compiles on its first call and numba caches the machine code in ``__pycache__``, so later processes load it.
Inputs arrive validated by ``opensloth.packing`` (int64, C-contiguous, 1-D, non-empty, within their limits).

Backend interface (see ``_python.py``):

- ``pack_bfd(lengths, capacity) -> (bin_ptr, items, bin_lengths)``
- ``pack_ffd(lengths, capacity) -> (bin_ptr, items, bin_lengths)``
- ``pack_exact_fit(lengths, capacity) -> (bin_ptr, items, bin_lengths)``
- ``partition_padded(lengths, num_batches, cap) -> (batch_ptr, items)`` or ``(None, None)``
- ``balance(costs, num_parts, equal_count) -> (part_ptr, items)``
"""

from __future__ import annotations

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

__all__ = ["balance", "pack_bfd", "pack_exact_fit", "pack_ffd", "partition_padded"]

_JIT = {"cache": True, "nogil": True}

INF = np.int64(1) << np.int64(62)  # the spec's INF for padded partitions
_I64_MAX = np.iinfo(np.int64).max
# Capacities up to this (or up to 2 x the item count) use counting sort and structures indexed by free space;
# larger ones use a comparison sort and structures over the distinct lengths (memory O(n), never O(capacity)).
COUNTING_MIN_LIMIT = 1 << 16


_I32_PROTO = np.zeros(1, np.int32)
_I64_PROTO = np.zeros(1, np.int64)


def _use_counting(n: int, capacity: int) -> bool:
    return capacity <= max(COUNTING_MIN_LIMIT, 2 * n)


def _index_proto(n: int) -> np.ndarray:
    """An array whose dtype the kernels use for item indices and bin numbers: int32 when they fit."""
    return _I32_PROTO if n < 2**31 - 1 else _I64_PROTO


def _order(lengths: np.ndarray, capacity: int, counting: bool) -> np.ndarray:
    """The descending order (length descending, index ascending) by counting sort or by radix sort."""
    if counting:
        return _order_counting(lengths, capacity, _index_proto(lengths.shape[0]))[0]
    return _order_sorted(lengths)


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _order_counting(lengths, capacity, proto):
    """Indices by length descending, ties by index ascending, for lengths in [1, capacity]: a counting sort.

    Also returns ``ends``: the items of length v are ``order[ends[v + 1]:ends[v]]`` (``ends[capacity + 1] = 0``).
    ``order`` has the dtype of ``proto`` (int32 halves the memory traffic when the indices fit).
    """
    n = lengths.shape[0]
    ends = np.zeros(capacity + 2, np.int64)
    for i in range(n):
        ends[lengths[i]] += 1
    pos = 0
    for v in range(capacity, 0, -1):
        c = ends[v]
        ends[v] = pos
        pos += c
    order = np.empty(n, proto.dtype)
    for i in range(n):
        v = lengths[i]
        order[ends[v]] = i
        ends[v] += 1
    return order, ends


@numba.njit(**_JIT)
def _order_sorted(values):
    """Indices by value descending, ties by index ascending, for values >= 0: an LSD radix sort (stable) of
    ``max - value`` over the bytes in which the values differ. (Plain loops: numba's np.argsort costs seconds of
    compilation.)"""
    n = values.shape[0]
    hi = values[0]
    lo = values[0]
    for i in range(1, n):
        v = values[i]
        if v > hi:
            hi = v
        if v < lo:
            lo = v
    span = hi - lo
    order = np.empty(n, np.int64)
    keys = np.empty(n, np.int64)
    for i in range(n):
        order[i] = i
        keys[i] = hi - values[i]
    if span == 0:
        return order
    order_tmp = np.empty(n, np.int64)
    keys_tmp = np.empty(n, np.int64)
    counts = np.empty(257, np.int64)
    shift = 0
    while shift < 64 and (span >> shift) != 0:
        for d in range(257):
            counts[d] = 0
        for i in range(n):
            counts[((keys[i] >> shift) & 255) + 1] += 1
        for d in range(256):
            counts[d + 1] += counts[d]
        for i in range(n):
            d = (keys[i] >> shift) & 255
            p = counts[d]
            counts[d] = p + 1
            order_tmp[p] = order[i]
            keys_tmp[p] = keys[i]
        order, order_tmp = order_tmp, order
        keys, keys_tmp = keys_tmp, keys
        shift += 8
    return order


@numba.njit(**_JIT)
def _filled(n, value):
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = value
    return out


@numba.njit(**_JIT)
def _last_at_most(sorted_values, v):
    """The last position of an ascending array whose value is <= v (-1 when none)."""
    lo = 0
    hi = sorted_values.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if sorted_values[mid] <= v:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@numba.njit(**_JIT)
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


# A multi-level bitset of int64 words over [0, universe): level 0 holds one bit per value, level l+1 one bit per
# non-zero word of level l, up to a single top word. ``offs[l]`` is where level l starts in ``bits``.


@numba.njit(**_JIT)
def _bitset_new(universe):
    nlev = 0
    s = universe
    while True:
        w = (s + 63) >> 6
        nlev += 1
        if w <= 1:
            break
        s = w
    offs = np.empty(nlev + 1, np.int64)
    offs[0] = 0
    s = universe
    for lev in range(nlev):
        w = (s + 63) >> 6
        if w < 1:
            w = 1
        offs[lev + 1] = offs[lev] + w
        s = w
    return np.zeros(offs[nlev], np.int64), offs


@numba.njit(**_JIT, inline="always")
def _bitset_test(bits, x):
    return (bits[x >> 6] >> (x & 63)) & 1 != 0


@numba.njit(**_JIT, inline="always")
def _bitset_set(bits, offs, x):
    nlev = offs.shape[0] - 1
    for lev in range(nlev):
        w = x >> 6
        k = offs[lev] + w
        old = bits[k]
        bits[k] = old | (np.int64(1) << (x & 63))
        if old != 0:
            break
        x = w


@numba.njit(**_JIT, inline="always")
def _bitset_clear(bits, offs, x):
    nlev = offs.shape[0] - 1
    for lev in range(nlev):
        w = x >> 6
        k = offs[lev] + w
        v = bits[k] & ~(np.int64(1) << (x & 63))
        bits[k] = v
        if v != 0:
            break
        x = w


@numba.njit(**_JIT, inline="always")
def _bitset_next(bits, offs, x):
    """The smallest set value >= x, or -1."""
    nlev = offs.shape[0] - 1
    lev = 0
    found = False
    while lev < nlev:
        w = x >> 6
        if w >= offs[lev + 1] - offs[lev]:
            return -1
        m = bits[offs[lev] + w] & (np.int64(-1) << (x & 63))
        if m != 0:
            x = (w << 6) | trailing_zeros(m)
            found = True
            break
        x = w + 1
        lev += 1
    if not found:
        return -1
    while lev > 0:
        lev -= 1
        x = (x << 6) | trailing_zeros(bits[offs[lev] + x])
    return x


# ---------------------------------------------------------------------------------------------------------------
# Best-fit decreasing
# ---------------------------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _bfd_counting(lengths, capacity, proto):
    """BFD with a counting sort, a bitset over free-space values and a FIFO queue of bins per free-space value
    (intrusive linked lists: head/tail per value, next per bin; head/tail are read only where the bitset says the
    value is held). Memory O(n + capacity)."""
    n = lengths.shape[0]
    order, ends = _order_counting(lengths, capacity, proto)
    bits, offs = _bitset_new(capacity)
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
            f = _bitset_next(bits, offs, size) if size < capacity else -1
            if f < 0:
                b = nbins
                nbins += 1
                left = capacity - size
            else:
                b = head[f]
                if b == tail[f]:
                    _bitset_clear(bits, offs, f)
                else:
                    head[f] = nxt[b]
                left = f - size
            placed_bin[t] = b
            if left > 0:
                if _bitset_test(bits, left):
                    nxt[tail[left]] = b
                else:
                    head[left] = b
                    _bitset_set(bits, offs, left)
                tail[left] = b
            t += 1
    # A bin is full unless it waits in a free-space queue.
    bin_len = _filled(nbins, capacity)
    v = _bitset_next(bits, offs, 1) if capacity > 1 else -1
    while v >= 0:
        b = head[v]
        while True:
            bin_len[b] = capacity - v
            if b == tail[v]:
                break
            b = nxt[b]
        v = _bitset_next(bits, offs, v + 1) if v + 1 < capacity else -1
    return _csr_from_placement(order, placed_bin, bin_len, nbins)


# Pairing heaps of bins keyed by (free space, arrival number): the arrival number makes equal free spaces FIFO.


@numba.njit(**_JIT)
def _ph_meld(a, b, key, seq, child, sib):
    if key[b] < key[a] or (key[b] == key[a] and seq[b] < seq[a]):
        a, b = b, a
    sib[b] = child[a]
    child[a] = b
    return a


@numba.njit(**_JIT)
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


@numba.njit(**_JIT)
def _bfd_sorted(lengths, capacity):
    """BFD for any capacity in O(n log n) time and O(n) memory.

    Open bins are grouped by the largest distinct item length that their free space reaches (bins below the
    smallest length can never take an item and are dropped). An item of the t-th distinct length fits exactly the
    bins of groups >= t; a bitset over groups finds the first non-empty one, and a pairing heap per group keyed by
    (free space, arrival) yields its best bin, the same bin the spec's FIFO queues give.
    """
    n = lengths.shape[0]
    order = _order_sorted(lengths)
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
    bits, offs = _bitset_new(d)
    root = _filled(d, -1)
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
        g = _bitset_next(bits, offs, group_of[t])
        if g < 0:
            b = nbins
            nbins += 1
            space = capacity
        else:
            b = root[g]
            r = _ph_pop(b, key, seq, child, sib)
            root[g] = r
            if r < 0:
                _bitset_clear(bits, offs, g)
            space = key[b]
        placed_bin[t] = b
        bin_len[b] += size
        left = space - size
        if left >= smallest:
            gl = _last_at_most(uniq, left)
            key[b] = left
            seq[b] = arrivals
            arrivals += 1
            child[b] = -1
            sib[b] = -1
            if root[gl] < 0:
                root[gl] = b
                _bitset_set(bits, offs, gl)
            else:
                root[gl] = _ph_meld(root[gl], b, key, seq, child, sib)
    return _csr_from_placement(order, placed_bin, bin_len, nbins)


def pack_bfd(lengths: np.ndarray, capacity: int):
    """Best-fit decreasing, identical to ``_python.pack_bfd``."""
    capacity = int(capacity)
    if _use_counting(lengths.shape[0], capacity):
        return _bfd_counting(lengths, capacity, _index_proto(lengths.shape[0]))
    return _bfd_sorted(lengths, capacity)


# ---------------------------------------------------------------------------------------------------------------
# First-fit decreasing
# ---------------------------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
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
        if total > _I64_MAX - v:
            max_bins = n  # the sum overflows int64: no bound below n
            break
        total += v
    if max_bins == 0:
        max_bins = min(n, 2 * (total // capacity) + 2)
    leaves = 1
    while leaves < max_bins:
        leaves *= 2
    tree = _filled(2 * leaves, capacity)
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
    return _pack_ffd(lengths, capacity, _use_counting(lengths.shape[0], capacity))


def _pack_ffd(lengths: np.ndarray, capacity: int, counting: bool):
    return _ffd(lengths, capacity, _order(lengths, capacity, counting))


# ---------------------------------------------------------------------------------------------------------------
# Exact fit
# ---------------------------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
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


@numba.njit(**_JIT)
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
    bits, offs = _bitset_new(d)
    for r in range(d):
        _bitset_set(bits, offs, r)
    shortest = d - 1  # the remaining rank of the shortest length; -1 once every item is placed
    items = np.empty(n, np.int64)
    ptr = np.zeros(n + 1, np.int64)
    bin_len = np.empty(n, np.int64)
    nbins = 0
    placed = 0
    while shortest >= 0:
        r = _bitset_next(bits, offs, 0)
        gap = capacity
        while True:
            items[placed] = order[pos[r]]
            placed += 1
            pos[r] += 1
            remaining[r] -= 1
            if remaining[r] == 0:
                _bitset_clear(bits, offs, r)
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
                r = _bitset_next(bits, offs, r0)
            if r < 0:
                r0 = _rank_at_most(val, table, gap)
                if r0 < d:
                    r = _bitset_next(bits, offs, r0)
                if r < 0:
                    break
        bin_len[nbins] = capacity - gap
        nbins += 1
        ptr[nbins] = placed
    return ptr[: nbins + 1].copy(), items, bin_len[:nbins].copy()


def pack_exact_fit(lengths: np.ndarray, capacity: int):
    """Exact fit, identical to ``_python.pack_exact_fit``."""
    capacity = int(capacity)
    return _pack_exact_fit(lengths, capacity, _use_counting(lengths.shape[0], capacity))


def _pack_exact_fit(lengths: np.ndarray, capacity: int, counting: bool):
    return _exact_fit(lengths, capacity, _order(lengths, capacity, counting), counting)


# ---------------------------------------------------------------------------------------------------------------
# Exact padded partition
# ---------------------------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
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


@numba.njit(**_JIT)
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


@numba.njit(**_JIT)
def _partition(lengths, num_batches, cap, allow_hull):
    """The spec's DP over the sorted lengths; returns (feasible, batch_ptr, order)."""
    order = _order_sorted(lengths)
    s = lengths[order]
    n = s.shape[0]
    inf = INF
    cap_value = inf if cap == 0 else cap
    prev = _filled(n + 1, inf)
    for j in range(1, n + 1):
        single = s[0] * j
        prev[j] = single if single <= cap_value else inf
    # The hull is exact when no batch can pass the cap and no cost or hull product can overflow.
    s0 = s[0]
    hull = allow_hull and (cap == 0 or s0 <= cap // n) and float(s0) * float(s0) * float(n) < 2.0**60
    argmins = np.zeros((max(num_batches - 1, 1), n + 1), np.int64)
    cur = np.empty(n + 1, np.int64)
    intercept = np.empty(n + 1, np.int64)
    dq = np.empty(n + 1, np.int64)
    depth = 4
    m = n + 1
    while m:
        depth += 2
        m >>= 1
    st = np.empty((depth, 4), np.int64)
    for k in range(2, num_batches + 1):
        if hull:
            _partition_hull_row(s, prev, cur, argmins[k - 2], k, intercept, dq)
        else:
            _partition_dc_row(s, prev, cur, argmins[k - 2], k, cap_value, st)
        prev, cur = cur, prev
    ptr = np.zeros(num_batches + 1, np.int64)
    if prev[n] >= inf:
        return False, ptr, order
    ptr[num_batches] = n
    j = n
    for k in range(num_batches, 1, -1):
        j = argmins[k - 2, j]
        ptr[k - 1] = j
    return True, ptr, order


def partition_padded(lengths: np.ndarray, num_batches: int, cap: int):
    """Exact padded partition, identical to ``_python.partition_padded``; ``(None, None)`` when infeasible."""
    ok, ptr, order = _partition(lengths, int(num_batches), int(cap), True)
    if not ok:
        return None, None
    return ptr, order


# ---------------------------------------------------------------------------------------------------------------
# Balance
# ---------------------------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _pair_less(a1, a2, b1, b2):
    return a1 < b1 or (a1 == b1 and a2 < b2)


@numba.njit(**_JIT)
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


@numba.njit(**_JIT)
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


@numba.njit(**_JIT)
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


@numba.njit(**_JIT)
def _stable_rank_desc(values, rank):
    """rank = indices of values sorted descending, ties in index order (stable)."""
    k = values.shape[0]
    if k > 64:
        sorted_rank = _order_sorted(values)
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


@numba.njit(**_JIT)
def _karmarkar_karp(costs, order, k, equal_count):
    """The spec's k-way largest differencing; returns the part of each item (part = final subset position) and the
    largest subset sum. State s keeps its k subset sums (descending) at ``sums[s*k:(s+1)*k]`` and its subsets as
    linked lists of items (head/tail per subset, ``nxt`` per item), so merging two subsets is O(1). A merged state
    reuses the slot of the first state it consumed; the heap orders states by (spread descending, creation)."""
    n = order.shape[0]
    nstates = (n + k - 1) // k if equal_count else n
    sums = np.zeros(nstates * k, np.int64)
    head = _filled(nstates * k, -1)
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


@numba.njit(**_JIT)
def _refine(costs, part_of, k, equal_count):
    """The spec's swap refinement between the heaviest and the lightest part, in place on ``part_of``."""
    n = costs.shape[0]
    loads = np.zeros(k, np.int64)
    for i in range(n):
        loads[part_of[i]] += costs[i]
    a_items = np.empty(n, np.int64)
    b_items = np.empty(n + 1, np.int64)
    b_costs = np.empty(n + 1, np.int64)
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
        nb = 0
        if not equal_count:
            b_items[0] = -1
            b_costs[0] = 0
            nb = 1
        for i in range(n):
            p = part_of[i]
            if p == heavy:
                a_items[na] = i
                na += 1
            elif p == light:
                b_items[nb] = i
                b_costs[nb] = costs[i]
                nb += 1
        if na == 0 or nb == 0:
            break
        best = _I64_MAX
        best_a = -1
        best_b = -1
        best_d = 0
        for ai in range(na):
            ca = costs[a_items[ai]]
            for bi in range(nb):
                d = ca - b_costs[bi]
                if d > 0 and d < gap:
                    score = abs(2 * d - gap)
                    if score < best:
                        best = score
                        best_a = a_items[ai]
                        best_b = b_items[bi]
                        best_d = d
        if best_a < 0:
            break
        part_of[best_a] = light
        if best_b >= 0:
            part_of[best_b] = heavy
        loads[heavy] -= best_d
        loads[light] += best_d


@numba.njit(**_JIT)
def _balance(costs, k, equal_count):
    order = _order_sorted(costs)
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
