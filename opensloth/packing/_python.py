"""Pure-Python packing backend: the written specification.

Every rule here, tie-breaks included, is normative: the numba and native backends must return identical arrays
for every valid input. Inputs arrive validated (see ``opensloth.packing``): int64, C-contiguous, non-empty,
within their limits.

Backend interface (shared by ``_numba.py`` and ``opensloth._native``):

- ``pack_bfd(lengths, capacity) -> (bin_ptr, items, bin_lengths)``
- ``pack_ffd(lengths, capacity) -> (bin_ptr, items, bin_lengths)``
- ``pack_exact_fit(lengths, capacity) -> (bin_ptr, items, bin_lengths)``
- ``partition_padded(lengths, num_batches, cap) -> (batch_ptr, items)``, ``cap == 0`` meaning no cap, and
  ``(None, None)`` when no split meets the cap
- ``balance(costs, num_parts, equal_count) -> (part_ptr, items)``

All arrays are int64 and freshly allocated.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections import deque

import numpy as np

# A cost no feasible padded partition reaches (lengths x counts stay far below it for any realistic input).
INF = np.int64(1) << np.int64(62)
_NO_CANDIDATE = np.iinfo(np.int64).max


def descending_order(values: np.ndarray) -> np.ndarray:
    """Indices sorted by value descending, ties by index ascending (the one sort order every algorithm uses)."""
    return np.argsort(-values, kind="stable").astype(np.int64)


def _csr(groups_sizes: list[int] | np.ndarray) -> np.ndarray:
    ptr = np.zeros(len(groups_sizes) + 1, dtype=np.int64)
    np.cumsum(groups_sizes, out=ptr[1:])
    return ptr


# ---------------------------------------------------------------------------------------------------------------
# Best-fit decreasing
# ---------------------------------------------------------------------------------------------------------------


def pack_bfd(lengths: np.ndarray, capacity: int):
    """Best-fit decreasing.

    Items go in descending order. Each item goes to the bin whose free space is the smallest that still holds it;
    among bins with exactly that free space, the one that reached that free space first (a FIFO queue per free-space
    value). When no open bin fits, a new bin opens (free space = capacity). Bins are numbered in opening order and
    list their items in placement order. The same rule as TRL's ``_pack_bfd``.
    """
    order = descending_order(lengths)
    sizes = lengths.tolist()
    free_values: list[int] = []  # sorted distinct free-space values held by at least one open bin
    queues: dict[int, deque] = {}  # free space -> FIFO of bin ids with that free space
    bin_of_item = np.empty(len(sizes), dtype=np.int64)
    bin_lengths: list[int] = []
    for idx in order.tolist():
        size = sizes[idx]
        pos = bisect_left(free_values, size)
        if pos == len(free_values):
            b = len(bin_lengths)
            bin_lengths.append(0)
            space = capacity
        else:
            space = free_values[pos]
            queue = queues[space]
            b = queue.popleft()
            if not queue:
                del free_values[pos]
        bin_of_item[idx] = b
        bin_lengths[b] += size
        left = space - size
        if left > 0:
            queue = queues.get(left)
            if queue is None:
                queue = queues[left] = deque()
            if not queue:
                insort(free_values, left)
            queue.append(b)
    return _plan_from_assignment(order, bin_of_item, bin_lengths)


def _plan_from_assignment(order: np.ndarray, bin_of_item: np.ndarray, bin_lengths: list[int]):
    """CSR arrays from each item's bin, keeping placement (= descending) order inside every bin."""
    bins_in_order = bin_of_item[order]
    # A stable sort by bin keeps each bin's items in placement order.
    items = order[np.argsort(bins_in_order, kind="stable")]
    bl = np.asarray(bin_lengths, dtype=np.int64)
    counts = np.bincount(bin_of_item, minlength=len(bin_lengths)).astype(np.int64)
    return _csr(counts), items.astype(np.int64), bl


# ---------------------------------------------------------------------------------------------------------------
# First-fit decreasing
# ---------------------------------------------------------------------------------------------------------------


def pack_ffd(lengths: np.ndarray, capacity: int):
    """First-fit decreasing: descending order, each item to the lowest-numbered bin with enough free space.

    A max-segment-tree over bin slots finds that bin in O(log n); slots not yet opened hold ``capacity``, so the
    leftmost slot that fits is either an open bin or the next new one.
    """
    order = descending_order(lengths)
    sizes = lengths.tolist()
    n = len(sizes)
    leaves = 1
    while leaves < n:
        leaves *= 2
    tree = [capacity] * (2 * leaves)
    bin_of_item = np.empty(n, dtype=np.int64)
    bin_lengths: list[int] = []
    for idx in order.tolist():
        size = sizes[idx]
        node = 1
        while node < leaves:
            node = 2 * node if tree[2 * node] >= size else 2 * node + 1
        b = node - leaves
        if b == len(bin_lengths):
            bin_lengths.append(0)
        bin_of_item[idx] = b
        bin_lengths[b] += size
        tree[node] -= size
        node //= 2
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left >= right else right
            node //= 2
    return _plan_from_assignment(order, bin_of_item, bin_lengths)


# ---------------------------------------------------------------------------------------------------------------
# Exact-fit: one bin at a time, closing gaps exactly
# ---------------------------------------------------------------------------------------------------------------


def pack_exact_fit(lengths: np.ndarray, capacity: int):
    """Fill one bin at a time so that gaps close exactly.

    Among items of equal length the lowest index is always taken first. A bin opens with the longest remaining
    item; then, while it has free space g > 0 and items remain, with m the shortest remaining length, it takes:
    an item of length exactly g if one remains; otherwise the longest remaining item of length <= g - m (so the gap
    left can still be filled); otherwise the longest remaining item of length <= g; and closes when nothing fits.
    Bins are numbered in the order they are filled and list their items in placement order. BFD leaves gaps smaller
    than the shortest item when the lengths are narrow (GSM8K: +0.7% bins); this rule closes them.
    """
    order = np.argsort(lengths, kind="stable")  # ascending length, index ascending within a length
    sorted_lengths = lengths[order]
    distinct, first = np.unique(sorted_lengths, return_index=True)
    values = distinct.tolist()  # sorted distinct lengths that still have items
    next_pos = dict(zip(values, first.tolist()))  # length -> position in `order` of its next item
    remaining = dict(zip(values, np.diff(np.append(first, len(order))).tolist()))
    order_list = order.tolist()

    def take(value: int) -> int:
        pos = next_pos[value]
        next_pos[value] = pos + 1
        remaining[value] -= 1
        if remaining[value] == 0:
            del values[bisect_left(values, value)]
        return order_list[pos]

    def longest_at_most(limit: int):
        pos = bisect_left(values, limit + 1)
        return values[pos - 1] if pos else None

    bins: list[list[int]] = []
    bin_lengths: list[int] = []
    while values:
        first_value = values[-1]
        items = [take(first_value)]
        gap = capacity - first_value
        while gap > 0 and values:
            if remaining.get(gap, 0) > 0:
                value = gap
            else:
                value = longest_at_most(gap - values[0])
                if value is None:
                    value = longest_at_most(gap)
                    if value is None:
                        break
            items.append(take(value))
            gap -= value
        bins.append(items)
        bin_lengths.append(capacity - gap)
    ptr = _csr([len(b) for b in bins])
    return ptr, np.asarray([i for b in bins for i in b], dtype=np.int64), np.asarray(bin_lengths, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Exact padded partition
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Balance
# ---------------------------------------------------------------------------------------------------------------


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
    states: list[tuple[list[int], list[list[int]]]] = []
    if equal_count:
        padded = order + [-1] * ((-len(order)) % k)
        for g in range(0, len(padded), k):
            group = padded[g : g + k]
            states.append(([costs[i] if i >= 0 else 0 for i in group], [[i] if i >= 0 else [] for i in group]))
    else:
        for idx in order:
            states.append(([costs[idx]] + [0] * (k - 1), [[idx]] + [[] for _ in range(k - 1)]))
    heap = []
    for seq, (sums, _) in enumerate(states):
        heap.append((-(sums[0] - sums[-1]), seq))
    heapq.heapify(heap)
    serial = len(states)
    while len(heap) > 1:
        _, a = heapq.heappop(heap)
        _, b = heapq.heappop(heap)
        sums_a, sets_a = states[a]
        sums_b, sets_b = states[b]
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
        sums = [sums[i] for i in rank]
        sets = [sets[i] for i in rank]
        states[a] = states[b] = None  # free memory
        states.append((sums, sets))
        heapq.heappush(heap, (-(sums[0] - sums[-1]), serial))
        serial += 1
    _, last = heap[0]
    return states[last][1]


def _refine(costs: np.ndarray, parts: list[list[int]], equal_count: bool) -> list[list[int]]:
    """Swap refinement between the heaviest and the lightest part.

    Repeat: H = heaviest part, L = lightest (lowest index on ties), gap g = load(H) - load(L). Candidates: swap item
    a of H with item b of L, or (without ``equal_count``) move a from H to L (written b = -1), when the transferred
    cost d = c[a] - c[b] (c[-1] = 0) satisfies 0 < d < g. Take the candidate with the smallest (|2d - g|, a, b);
    stop when there is none, or after ``len(costs)`` rounds. Each round strictly lowers the sum of squared loads and
    never raises the maximum.
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
        best = None  # (score, row, column) of the first minimum in (a, b) order
        rows_per_chunk = max(1, (1 << 22) // b_items.size)
        for start in range(0, a_items.size, rows_per_chunk):
            d = costs[a_items[start : start + rows_per_chunk]][:, None] - cb[None, :]
            score = np.where((d > 0) & (d < gap), np.abs(2 * d - gap), _NO_CANDIDATE)
            flat = int(np.argmin(score))  # rows are a ascending, columns b ascending (-1 first)
            row, col = divmod(flat, b_items.size)
            if score[row, col] != _NO_CANDIDATE and (best is None or score[row, col] < best[0]):
                best = (int(score[row, col]), start + row, col)
        if best is None:
            break
        _, ai, bi = best
        a, b = int(a_items[ai]), int(b_items[bi])
        moved = int(costs[a_items[ai]] - cb[bi])
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
    ptr = _csr([len(p) for p in parts])
    items = np.asarray([i for p in parts for i in p], dtype=np.int64)
    return ptr, items
