"""Property tests of the packing core against brute-force references, on every backend.

The references here are written independently of the backends (plain scans, exhaustive search), so a backend that
follows the spec's tie-breaks matches them exactly. Every non-python backend must also equal the python backend.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from opensloth.packing import balance, pack_lengths, partition_padded

pytestmark = pytest.mark.sanitize
SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


@st.composite
def lengths_and_capacity(draw, max_items=60):
    capacity = draw(st.integers(1, 64))
    # Narrow value ranges produce heavy ties, which is where tie-breaks matter.
    top = draw(st.sampled_from([capacity, max(1, capacity // 2), min(capacity, 3)]))
    lengths = draw(st.lists(st.integers(1, top), min_size=1, max_size=max_items))
    return lengths, capacity


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


def descending(values):
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def reference_bfd(lengths, capacity):
    """Scan every bin: least free space that fits; among equal free space, the bin whose free space last changed
    earliest (it reached that value first)."""
    bins, free, changed = [], [], []
    for clock, i in enumerate(descending(lengths)):
        size = lengths[i]
        fits = [b for b in range(len(bins)) if free[b] >= size]
        if fits:
            b = min(fits, key=lambda b: (free[b], changed[b]))
        else:
            b = len(bins)
            bins.append([])
            free.append(capacity)
            changed.append(clock)
        bins[b].append(i)
        free[b] -= size
        changed[b] = clock
    return bins


def reference_ffd(lengths, capacity):
    bins, free = [], []
    for i in descending(lengths):
        b = next((b for b in range(len(bins)) if free[b] >= lengths[i]), None)
        if b is None:
            b = len(bins)
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def reference_exact_fit(lengths, capacity):
    """Scan the remaining items each time: the longest opens a bin; then an exact fit, else the longest that leaves a
    gap the shortest remaining item could fill, else the longest that fits."""
    remaining = set(range(len(lengths)))
    bins = []

    def pick(candidates):  # longest, then lowest index
        return min(candidates, key=lambda i: (-lengths[i], i)) if candidates else None

    while remaining:
        first = pick(remaining)
        remaining.discard(first)
        bin_, gap = [first], capacity - lengths[first]
        while gap > 0 and remaining:
            shortest = min(lengths[i] for i in remaining)
            choice = pick([i for i in remaining if lengths[i] == gap])
            if choice is None:
                choice = pick([i for i in remaining if lengths[i] <= gap - shortest])
            if choice is None:
                choice = pick([i for i in remaining if lengths[i] <= gap])
            if choice is None:
                break
            remaining.discard(choice)
            bin_.append(choice)
            gap -= lengths[choice]
        bins.append(bin_)
    return bins


def padded_cost(lengths, groups, cap):
    total = 0
    for g in groups:
        slots = max(lengths[i] for i in g) * len(g)
        if cap is not None and slots > cap:
            return None
        total += slots
    return total


def exhaustive_partition_optimum(lengths, k, cap):
    """The minimum over every assignment of items to k non-empty batches (not only contiguous ones)."""
    best = None
    n = len(lengths)
    for assignment in itertools.product(range(k), repeat=n):
        if len(set(assignment)) != k:
            continue
        groups = [[i for i in range(n) if assignment[i] == b] for b in range(k)]
        cost = padded_cost(lengths, groups, cap)
        if cost is not None and (best is None or cost < best):
            best = cost
    return best


def reference_lpt_max(costs, k, equal_count):
    n = len(costs)
    q, r = divmod(n, k)
    loads, counts = [0] * k, [0] * k
    for i in descending(costs):
        big = sum(1 for c in counts if c == q + 1)
        eligible = [p for p in range(k) if not equal_count or counts[p] < q or (counts[p] == q and big < r)]
        p = min(eligible, key=lambda p: (loads[p], p))
        loads[p] += costs[i]
        counts[p] += 1
    return max(loads)


def reference_refine(costs, parts, equal_count):
    """The swap refinement by its definition: every (a, b) pair of the heaviest and the lightest part scanned, the
    smallest (|2d - g|, a, b) taken (b = -1, a plain move, before every item)."""
    parts = [sorted(p) for p in parts]
    k = len(parts)
    for _ in range(len(costs)):
        loads = [sum(costs[i] for i in p) for p in parts]
        heavy = min(range(k), key=lambda p: (-loads[p], p))
        light = min(range(k), key=lambda p: (loads[p], p))
        gap = loads[heavy] - loads[light]
        if gap <= 1:
            break
        best = None
        for a in parts[heavy]:
            for b in ([] if equal_count else [-1]) + parts[light]:
                d = costs[a] - (costs[b] if b >= 0 else 0)
                if 0 < d < gap and (best is None or (abs(2 * d - gap), a, b) < best):
                    best = (abs(2 * d - gap), a, b)
        if best is None:
            break
        _, a, b = best
        parts[heavy] = sorted(set(parts[heavy]) - {a} | ({b} if b >= 0 else set()))
        parts[light] = sorted(set(parts[light]) - {b} | {a})
    return parts


def refine_with(backend, costs, parts, equal_count):
    """One backend's refinement on a given start (the native one is reached only through ``balance``)."""
    arr = np.asarray(costs, dtype=np.int64)
    if backend == "python":
        from opensloth.packing._python.balancing import _refine

        return _refine(arr, parts, equal_count)
    if backend == "numba":
        from opensloth.packing._numba.balancing import _refine

        part_of = np.empty(len(costs), dtype=np.int64)
        for p, items in enumerate(parts):
            part_of[items] = p
        _refine(arr, part_of, len(parts), equal_count)
        return [np.flatnonzero(part_of == p).tolist() for p in range(len(parts))]
    pytest.skip("the native refinement is reached only through balance (test_balance_identical_to_python_backend)")


# ----------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------


def check_plan_invariants(plan, lengths, capacity, descending_inside=True):
    n = len(lengths)
    arr = np.asarray(lengths)
    assert sorted(plan.items.tolist()) == list(range(n)), "every item placed exactly once"
    assert plan.bin_ptr[0] == 0 and plan.bin_ptr[-1] == n and np.all(np.diff(plan.bin_ptr) > 0)
    bins = plan.bins()
    assert len(bins) == plan.n_bins == len(plan.bin_lengths)
    for b, items in enumerate(bins):
        assert plan.bin_lengths[b] == arr[items].sum() <= capacity, "no bin over capacity"
        if descending_inside:
            keys = [(-lengths[i], i) for i in items]
            assert keys == sorted(keys), "items in placement (descending) order inside a bin"
    firsts = [(-lengths[b[0]], b[0]) for b in bins]
    assert firsts == sorted(firsts), "bins numbered in opening order"
    assert plan.n_bins >= -(-int(arr.sum()) // capacity)


@SETTINGS
@given(case=lengths_and_capacity())
def test_bfd_matches_reference(backend, case):
    lengths, capacity = case
    plan = pack_lengths(lengths, capacity, backend=backend)
    check_plan_invariants(plan, lengths, capacity)
    assert [b.tolist() for b in plan.bins()] == reference_bfd(lengths, capacity)


@SETTINGS
@given(case=lengths_and_capacity())
def test_ffd_matches_reference(backend, case):
    lengths, capacity = case
    plan = pack_lengths(lengths, capacity, strategy="ffd", backend=backend)
    check_plan_invariants(plan, lengths, capacity)
    assert [b.tolist() for b in plan.bins()] == reference_ffd(lengths, capacity)


@SETTINGS
@given(case=lengths_and_capacity())
def test_exact_fit_matches_reference(backend, case):
    lengths, capacity = case
    plan = pack_lengths(lengths, capacity, strategy="exact_fit", backend=backend)
    check_plan_invariants(plan, lengths, capacity, descending_inside=False)
    assert [b.tolist() for b in plan.bins()] == reference_exact_fit(lengths, capacity)


@SETTINGS
@given(case=lengths_and_capacity())
def test_best_is_the_smaller_of_bfd_and_exact_fit(backend, case):
    lengths, capacity = case
    best = pack_lengths(lengths, capacity, strategy="best", backend=backend)
    bfd = pack_lengths(lengths, capacity, strategy="bfd", backend=backend)
    exact = pack_lengths(lengths, capacity, strategy="exact_fit", backend=backend)
    assert best == (exact if exact.n_bins < bfd.n_bins else bfd)


@SETTINGS
@given(case=lengths_and_capacity(max_items=400), strategy=st.sampled_from(["bfd", "ffd", "exact_fit", "best"]))
def test_packing_identical_to_python_backend(backend, case, strategy):
    lengths, capacity = case
    assert pack_lengths(lengths, capacity, strategy=strategy, backend=backend) == pack_lengths(
        lengths, capacity, strategy=strategy, backend="python")


# ----------------------------------------------------------------------------------------------------------------
# Padded partition
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def partition_case(draw, max_items=7):
    lengths = draw(st.lists(st.integers(1, draw(st.sampled_from([3, 20]))), min_size=1, max_size=max_items))
    k = draw(st.integers(1, min(4, len(lengths))))
    cap = draw(st.one_of(st.none(), st.integers(max(lengths), max(lengths) * len(lengths))))
    return lengths, k, cap


@SETTINGS
@given(case=partition_case())
def test_partition_padded_is_the_exact_optimum(backend, case):
    lengths, k, cap = case
    optimum = exhaustive_partition_optimum(lengths, k, cap)
    if optimum is None:
        with pytest.raises(ValueError, match="no split"):
            partition_padded(lengths, k, max_tokens_per_batch=cap, backend=backend)
        return
    batches = [b.tolist() for b in partition_padded(lengths, k, max_tokens_per_batch=cap, backend=backend)]
    assert len(batches) == k and all(batches)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert padded_cost(lengths, batches, cap) == optimum
    # Batches are consecutive runs of the descending order, longest first.
    assert [i for b in batches for i in b] == descending(lengths)


@SETTINGS
@given(case=partition_case(max_items=9))
def test_partition_padded_is_the_canonical_optimum(backend, case):
    """Among optimal contiguous splits, the one returned has the smallest boundaries (componentwise)."""
    lengths, k, cap = case
    order = descending(lengths)
    n = len(lengths)
    optimal, best = [], None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        groups = [order[bounds[j] : bounds[j + 1]] for j in range(k)]
        cost = padded_cost(lengths, groups, cap)
        if cost is None:
            continue
        if best is None or cost < best:
            best, optimal = cost, [cuts]
        elif cost == best:
            optimal.append(cuts)
    assume(best is not None)
    batches = partition_padded(lengths, k, max_tokens_per_batch=cap, backend=backend)
    ours = tuple(np.cumsum([len(b) for b in batches])[:-1].tolist())
    assert ours in optimal
    assert all(all(a <= b for a, b in zip(ours, other)) for other in optimal)


@SETTINGS
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=300), data=st.data())
def test_partition_identical_to_python_backend(backend, lengths, data):
    k = data.draw(st.integers(1, len(lengths)))
    cap = data.draw(st.one_of(st.none(), st.integers(max(lengths), max(lengths) * len(lengths))))
    try:
        expected = partition_padded(lengths, k, max_tokens_per_batch=cap, backend="python")
    except ValueError as exc:
        with pytest.raises(ValueError) as raised:
            partition_padded(lengths, k, max_tokens_per_batch=cap, backend=backend)
        assert str(raised.value) == str(exc)
        return
    got = partition_padded(lengths, k, max_tokens_per_batch=cap, backend=backend)
    assert [b.tolist() for b in got] == [b.tolist() for b in expected]


@SETTINGS
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=150), data=st.data())
def test_partition_rows_held_at_once_never_change_the_split(backend, lengths, data):
    """The backends' memory bound (``rows`` of split points at a time, blocks recomputed) returns what the whole
    table does, caps and infeasible prefixes included."""
    from opensloth import packing

    module = packing._load(backend)
    arr = np.asarray(lengths, dtype=np.int64)
    k = data.draw(st.integers(1, len(lengths)))
    cap = data.draw(st.one_of(st.just(0), st.integers(max(lengths), max(lengths) * len(lengths))))
    rows = data.draw(st.integers(1, max(k - 1, 1)))
    whole = module.partition_padded(arr, k, cap, 0)
    part = module.partition_padded(arr, k, cap, rows)
    assert (whole[0] is None) == (part[0] is None)
    if whole[0] is not None:
        assert whole[0].tolist() == part[0].tolist() and whole[1].tolist() == part[1].tolist()


# ----------------------------------------------------------------------------------------------------------------
# Balance
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def balance_case(draw, max_items=60):
    top = draw(st.sampled_from([1, 5, 100, 10_000]))
    costs = draw(st.lists(st.integers(0, top), min_size=1, max_size=max_items))
    k = draw(st.integers(1, 9))
    return costs, k


@SETTINGS
@given(case=balance_case(), equal_count=st.booleans())
def test_balance_never_worse_than_lpt(backend, case, equal_count):
    costs, k = case
    parts = [p.tolist() for p in balance(costs, k, equal_count=equal_count, backend=backend)]
    assert len(parts) == k
    assert sorted(i for p in parts for i in p) == list(range(len(costs))), "every item exactly once"
    assert all(p == sorted(p) for p in parts)
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) <= reference_lpt_max(costs, k, equal_count)
    if equal_count:
        q, r = divmod(len(costs), k)
        assert sorted(len(p) for p in parts) == [q] * (k - r) + [q + 1] * r


@SETTINGS
@given(case=balance_case(max_items=300), equal_count=st.booleans())
def test_balance_identical_to_python_backend(backend, case, equal_count):
    costs, k = case
    got = balance(costs, k, equal_count=equal_count, backend=backend)
    expected = balance(costs, k, equal_count=equal_count, backend="python")
    assert [p.tolist() for p in got] == [p.tolist() for p in expected]


@SETTINGS
@given(case=balance_case(), equal_count=st.booleans(), data=st.data())
def test_refinement_matches_the_pairwise_definition(backend, case, equal_count, data):
    """From arbitrary starts (many rounds, every tie-break), the sorted search picks the pair the scan of every
    pair picks."""
    costs, k = case
    owner = data.draw(st.lists(st.integers(0, k - 1), min_size=len(costs), max_size=len(costs)))
    parts = [[i for i, o in enumerate(owner) if o == p] for p in range(k)]
    assert refine_with(backend, costs, parts, equal_count) == reference_refine(costs, parts, equal_count)


def test_balance_finds_a_perfect_split_lpt_misses(backend):
    # LPT on 3 3 2 2 2 into 2 parts gives 3+2+2 = 7 vs 3+2 = 5; the optimum 6/6 (3+3 | 2+2+2) is found by
    # Karmarkar-Karp or the swap refinement.
    parts = balance([3, 3, 2, 2, 2], 2, backend=backend)
    assert sorted(sum([3, 3, 2, 2, 2][i] for i in p) for p in parts) == [6, 6]
