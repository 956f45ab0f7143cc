"""Balance items over parts, the spec: LPT, Karmarkar-Karp, swap refinement (see ``csrc/balance.cpp``)."""

from __future__ import annotations

import heapq
from bisect import insort

import numpy as np

from ._common import csr, descending_order

_NO_CANDIDATE = np.iinfo(np.int64).max



def _lpt(costs: list[int], order: list[int], num_parts: int, equal_count: bool) -> list[list[int]]:
    """Longest processing time first: each item (descending cost) to the lightest eligible part, lowest index on a
    tie. With ``equal_count``, a part holds at most ``q = n // num_parts`` items, or ``q + 1`` for the first ``r =
    n % num_parts`` parts to reach ``q + 1``."""
    n = len(order)
    q, r = divmod(n, num_parts)
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    heap = [(0, p) for p in range(num_parts)]  # (load, part): lightest first, lowest index on a tie
    big = 0  # parts holding q + 1 items
    for idx in order:
        while True:
            load, p = heapq.heappop(heap)
            count = len(parts[p])
            if not equal_count or count < q or (count == q and big < r):
                break
            # A part with q items once r parts hold q + 1 can never take another: it leaves the heap for good.
        parts[p].append(idx)
        if len(parts[p]) == q + 1:
            big += 1
        if not equal_count or len(parts[p]) <= q:
            heapq.heappush(heap, (load + costs[idx], p))
    return parts


def _karmarkar_karp(costs: list[int], order: list[int], num_parts: int, equal_count: bool) -> list[list[int]]:
    """Largest differencing method, k-way.

    Each partial solution is ``num_parts`` subsets sorted by sum descending (stable). Start: each item alone in the
    first subset (or, with ``equal_count``, consecutive groups of ``num_parts`` items of the descending order, one per
    subset, padded with zero-cost placeholders to a multiple of ``num_parts``). Repeatedly take the two solutions with
    the largest spread (max - min; ties: the one created first), merge the i-th largest subset of the first with the
    i-th smallest of the second, re-sort, and put it back with the next creation number.
    """
    k = num_parts
    n = len(order)
    n_init = -(-n // k) if equal_count else n

    def initial(s: int) -> tuple[list[int], list[list[int]]]:
        # Built when first merged, so memory follows the live solutions, not n x num_parts.
        group = order[s * k : s * k + k] if equal_count else order[s : s + 1]
        group = group + [-1] * (k - len(group))
        return [costs[i] if i >= 0 else 0 for i in group], [[i] if i >= 0 else [] for i in group]

    def initial_spread(s: int) -> int:
        first = order[s * k] if equal_count else order[s]
        last = (order[s * k + k - 1] if s * k + k - 1 < n else -1) if equal_count else (order[s] if k == 1 else -1)
        return costs[first] - (costs[last] if last >= 0 else 0)

    heap = [(-initial_spread(s), s) for s in range(n_init)]
    heapq.heapify(heap)
    merged: dict[int, tuple[list[int], list[list[int]]]] = {}  # creation number -> solution, while it is live
    serial = n_init
    while len(heap) > 1:
        _, a = heapq.heappop(heap)
        _, b = heapq.heappop(heap)
        sums_a, sets_a = merged.pop(a) if a >= n_init else initial(a)
        sums_b, sets_b = merged.pop(b) if b >= n_init else initial(b)
        sums = [sums_a[i] + sums_b[k - 1 - i] for i in range(k)]
        sets = []
        for i in range(k):
            # Membership is all that matters (parts are sorted at the end): extend the larger list with the smaller.
            x, y = sets_a[i], sets_b[k - 1 - i]
            if len(x) < len(y):
                x, y = y, x
            x.extend(y)
            sets.append(x)
        rank = sorted(range(k), key=lambda i: -sums[i])  # stable: ties keep merge position
        merged[serial] = ([sums[i] for i in rank], [sets[i] for i in rank])
        heapq.heappush(heap, (-(merged[serial][0][0] - merged[serial][0][-1]), serial))
        serial += 1
    _, last = heap[0]
    return (merged[last] if last >= n_init else initial(last))[1]


def _refine(costs: np.ndarray, parts: list[list[int]], equal_count: bool) -> list[list[int]]:
    """Swap refinement between the heaviest and the lightest part.

    Repeat: H = heaviest part, L = lightest (lowest index on ties), gap g = load(H) - load(L). Candidates: swap item
    a of H with item b of L, or (without ``equal_count``) move a from H to L (written b = -1), when the transferred
    cost d = c[a] - c[b] (c[-1] = 0) satisfies 0 < d < g. Take the candidate with the smallest (|2d - g|, a, b), b
    ordered -1 first then ascending; stop when there is none, or after ``len(costs)`` rounds. Each round strictly
    lowers the sum of squared loads and never raises the maximum.

    Search: |2d - g| falls as c[b] nears c[a] - g/2 from either side, so for each a the best b is one of two
    neighbours of c[a] - g/2 among the distinct costs of L (sorted; each with its first candidate in b order), and
    a round costs O((|H| + |L|) log |L|) instead of a scan of every pair.
    """
    parts = [sorted(p) for p in parts]
    loads = [int(costs[p].sum()) if p else 0 for p in parts]
    for _ in range(len(costs)):
        heavy = max(range(len(parts)), key=lambda i: (loads[i], -i))
        light = min(range(len(parts)), key=lambda i: (loads[i], i))
        gap = loads[heavy] - loads[light]
        if gap <= 1:
            break
        a_items = np.asarray(parts[heavy], dtype=np.int64)
        b_items = np.asarray(([-1] if not equal_count else []) + parts[light], dtype=np.int64)
        if a_items.size == 0 or b_items.size == 0:
            break
        cb = np.where(b_items >= 0, costs[np.maximum(b_items, 0)], 0)
        values, first = np.unique(cb, return_index=True)  # distinct costs ascending, first occurrence in b order
        first_b = b_items[first]
        ca = costs[a_items]
        # lo: the largest cost <= c[a] - ceil(g/2) (d >= g/2); hi: the smallest cost >= c[a] - floor(g/2) (d <= g/2).
        lo = np.searchsorted(values, ca - (gap - gap // 2), side="right") - 1
        hi = np.searchsorted(values, ca - gap // 2, side="left")
        scores, bs = [], []
        for pos, ok in ((lo, lo >= 0), (hi, hi < values.size)):
            pos = np.clip(pos, 0, values.size - 1)
            d = ca - values[pos]
            # 2d - g lies in (-g, g) where 0 < d < g: int64 wraps in 2d and back, so the result is exact.
            scores.append(np.where(ok & (d > 0) & (d < gap), np.abs(2 * d - gap), _NO_CANDIDATE))
            bs.append(first_b[pos])
        take_hi = (scores[1] < scores[0]) | ((scores[1] == scores[0]) & (bs[1] < bs[0]))
        score = np.where(take_hi, scores[1], scores[0])
        ai = int(np.argmin(score))  # the first minimum: a ascending
        if score[ai] == _NO_CANDIDATE:
            break
        a = int(a_items[ai])
        b = int(bs[1][ai] if take_hi[ai] else bs[0][ai])
        moved = int(costs[a]) - (int(costs[b]) if b >= 0 else 0)
        parts[heavy].remove(a)
        insort(parts[light], a)
        if b >= 0:
            parts[light].remove(b)
            insort(parts[heavy], b)
        loads[heavy] -= moved
        loads[light] += moved
    return parts


def balance(costs: np.ndarray, num_parts: int, equal_count: bool):
    """Minimise the largest part: the better of LPT and Karmarkar-Karp (LPT on a tie), then swap refinement.

    Parts are compared by their maximum load. Output: each part's indices ascending, parts in the order of the
    chosen method (LPT: part number; Karmarkar-Karp: final subset order, heaviest first), then refined in place.
    """
    cost_list = costs.tolist()
    order = descending_order(costs).tolist()
    lpt = _lpt(cost_list, order, num_parts, equal_count)
    kk = _karmarkar_karp(cost_list, order, num_parts, equal_count)

    def max_load(parts):
        return max(sum(cost_list[i] for i in p) for p in parts)

    chosen = lpt if max_load(lpt) <= max_load(kk) else kk
    parts = _refine(costs, chosen, equal_count)
    ptr = csr([len(p) for p in parts])
    items = np.asarray([i for p in parts for i in p], dtype=np.int64)
    return ptr, items
