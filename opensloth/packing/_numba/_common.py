"""What the numba kernels share: the sort orders, the bitset, small array helpers, the jit options.

Every kernel is ``@numba.njit(**JIT)``: importing compiles nothing; a kernel compiles on its first call and numba
caches the machine code in ``__pycache__``, so later processes load it.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

JIT = {"cache": True, "nogil": True}

INF = np.int64(1) << np.int64(62)  # the spec's INF for padded partitions
I64_MAX = np.iinfo(np.int64).max
# Capacities up to this (or up to 2 x the item count) use counting sort and structures indexed by free space;
# larger ones use a comparison sort and structures over the distinct lengths (memory O(n), never O(capacity)).
COUNTING_MIN_LIMIT = 1 << 16


I32_PROTO = np.zeros(1, np.int32)
I64_PROTO = np.zeros(1, np.int64)


def use_counting(n: int, capacity: int) -> bool:
    return capacity <= max(COUNTING_MIN_LIMIT, 2 * n)


def index_proto(n: int) -> np.ndarray:
    """An array whose dtype the kernels use for item indices and bin numbers: int32 when they fit."""
    return I32_PROTO if n < 2**31 - 1 else I64_PROTO


def order_for(lengths: np.ndarray, capacity: int, counting: bool) -> np.ndarray:
    """The descending order (length descending, index ascending) by counting sort or by radix sort."""
    if counting:
        return order_counting(lengths, capacity, index_proto(lengths.shape[0]))[0]
    return order_sorted(lengths)


@numba.njit(**JIT)
def order_counting(lengths, capacity, proto):
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


@numba.njit(**JIT)
def order_sorted(values):
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


@numba.njit(**JIT)
def filled(n, value):
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = value
    return out


@numba.njit(**JIT)
def last_at_most(sorted_values, v):
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


# A multi-level bitset of int64 words over [0, universe): level 0 holds one bit per value, level l+1 one bit per
# non-zero word of level l, up to a single top word. ``offs[l]`` is where level l starts in ``bits``.


@numba.njit(**JIT)
def bitset_new(universe):
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


@numba.njit(**JIT, inline="always")
def bitset_test(bits, x):
    return (bits[x >> 6] >> (x & 63)) & 1 != 0


@numba.njit(**JIT, inline="always")
def bitset_set(bits, offs, x):
    nlev = offs.shape[0] - 1
    for lev in range(nlev):
        w = x >> 6
        k = offs[lev] + w
        old = bits[k]
        bits[k] = old | (np.int64(1) << (x & 63))
        if old != 0:
            break
        x = w


@numba.njit(**JIT, inline="always")
def bitset_clear(bits, offs, x):
    nlev = offs.shape[0] - 1
    for lev in range(nlev):
        w = x >> 6
        k = offs[lev] + w
        v = bits[k] & ~(np.int64(1) << (x & 63))
        bits[k] = v
        if v != 0:
            break
        x = w


@numba.njit(**JIT, inline="always")
def bitset_next(bits, offs, x):
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
