"""Numba-backend checks the shared backend suite does not reach: big inputs, the huge-capacity code paths, the
convex-hull shortcut of the padded partition, heavy ties, and what importing the module compiles.

The oracle is the python backend (the spec): a separate implementation with its own data structures.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from opensloth.packing import _python as spec

pytest.importorskip("numba", reason="numba is not installed, so there is no numba backend to check")
from opensloth.packing import _numba as nb  # noqa: E402
from opensloth.packing._numba import _common as nb_common  # noqa: E402
from opensloth.packing._numba import pack as nb_pack  # noqa: E402
from opensloth.packing._numba import partition as nb_partition  # noqa: E402


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)


def lognormal(rng, n, median=400, sigma=0.9, low=8, high=4096):
    return np.clip(rng.lognormal(np.log(median), sigma, n).round(), low, high).astype(np.int64)


def check_bins(ptr, items, bin_lengths, lengths, capacity):
    """Independent of any backend: every item once, bins within capacity, bin_lengths the sums."""
    assert ptr[0] == 0 and ptr[-1] == len(lengths) and np.all(np.diff(ptr) > 0)
    np.testing.assert_array_equal(np.sort(items), np.arange(len(lengths)))
    sums = np.add.reduceat(lengths[items], ptr[:-1])
    np.testing.assert_array_equal(sums, bin_lengths)
    assert bin_lengths.max() <= capacity


# ----------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_bfd_identical_on_big_lognormal(n):
    lengths = lognormal(np.random.default_rng(n), n)
    got = nb.pack_bfd(lengths, 4096)
    check_bins(*got, lengths, 4096)
    assert_same(got, spec.pack_bfd(lengths, 4096))


def test_ffd_and_exact_fit_identical_on_big_input():
    lengths = lognormal(np.random.default_rng(1), 30_000)
    assert_same(nb.pack_ffd(lengths, 4096), spec.pack_ffd(lengths, 4096))
    assert_same(nb.pack_exact_fit(lengths, 4096), spec.pack_exact_fit(lengths, 4096))


@pytest.mark.parametrize("capacity", [10**9, 10**15, 2**63 - 1])
def test_huge_capacity_takes_the_sorted_path_and_matches(capacity):
    rng = np.random.default_rng(capacity % 1000)
    n = 20_000
    assert not nb_common.use_counting(n, capacity)
    # Few distinct values (many equal free spaces) and many distinct ones, both far apart.
    lengths = np.concatenate([
        rng.integers(1, capacity // 3, n // 2, dtype=np.int64),
        rng.choice(np.array([capacity // 7, capacity // 5, capacity // 2], dtype=np.int64), n - n // 2),
    ])
    rng.shuffle(lengths)
    for name in ("pack_bfd", "pack_ffd", "pack_exact_fit"):
        got = getattr(nb, name)(lengths, capacity)
        check_bins(*got, lengths, capacity)
        assert_same(got, getattr(spec, name)(lengths, capacity))


@pytest.mark.parametrize("seed", range(6))
def test_both_code_paths_agree_with_the_spec_at_small_capacity(seed):
    """The counting and the comparison-sort paths are separate code; force each on the same input."""
    rng = np.random.default_rng(seed)
    capacity = int(rng.choice([7, 64, 4096, 50_000]))
    n = int(rng.integers(1, 30_000))
    top = int(rng.choice([capacity, max(1, capacity // 3), min(capacity, 4)]))
    lengths = rng.integers(1, top + 1, n, dtype=np.int64)
    want_bfd = spec.pack_bfd(lengths, capacity)
    for proto in (nb_common.I32_PROTO, nb_common.I64_PROTO):  # index arrays: int32 normally, int64 past 2**31 items
        assert_same(nb_pack._bfd_counting(lengths, capacity, proto), want_bfd)
    assert_same(nb_pack._bfd_sorted(lengths, capacity), want_bfd)
    want_ffd = spec.pack_ffd(lengths, capacity)
    want_exact = spec.pack_exact_fit(lengths, capacity)
    for counting in (True, False):
        assert_same(nb_pack._pack_ffd(lengths, capacity, counting), want_ffd)
        assert_same(nb_pack._pack_exact_fit(lengths, capacity, counting), want_exact)


@pytest.mark.parametrize("value", [1, 2, 3, 2048, 4096])
def test_heavy_ties(value):
    """All lengths equal, then two alternating values: every queue tie-break is exercised."""
    n = 50_001
    for lengths in (np.full(n, value, dtype=np.int64),
                    np.where(np.arange(n) % 3 == 0, value, max(1, value // 2)).astype(np.int64)):
        for name in ("pack_bfd", "pack_ffd", "pack_exact_fit"):
            assert_same(getattr(nb, name)(lengths, 4096), getattr(spec, name)(lengths, 4096))
    per_bin = 4096 // value
    ptr, _, _ = nb.pack_bfd(np.full(n, value, dtype=np.int64), 4096)
    assert len(ptr) - 1 == -(-n // per_bin)


def test_capacity_one():
    lengths = np.ones(1000, dtype=np.int64)
    for name in ("pack_bfd", "pack_ffd", "pack_exact_fit"):
        ptr, items, bin_lengths = getattr(nb, name)(lengths, 1)
        np.testing.assert_array_equal(ptr, np.arange(1001))
        np.testing.assert_array_equal(items, np.arange(1000))
        np.testing.assert_array_equal(bin_lengths, np.ones(1000))


@pytest.mark.parametrize("capacity", [1, 4096, 10**12])
def test_single_item(capacity):
    lengths = np.array([capacity], dtype=np.int64)
    for name in ("pack_bfd", "pack_ffd", "pack_exact_fit"):
        ptr, items, bin_lengths = getattr(nb, name)(lengths, capacity)
        assert ptr.tolist() == [0, 1] and items.tolist() == [0] and bin_lengths.tolist() == [capacity]
    ptr, items = nb.partition_padded(lengths, 1, 0)
    assert ptr.tolist() == [0, 1] and items.tolist() == [0]
    ptr, items = nb.balance(lengths, 3, False)
    assert ptr.tolist() == [0, 1, 1, 1] and items.tolist() == [0]


# ----------------------------------------------------------------------------------------------------------------
# Padded partition
# ----------------------------------------------------------------------------------------------------------------


def test_partition_identical_on_a_window_of_1024():
    lengths = lognormal(np.random.default_rng(3), 1024)
    for num_batches, cap in [(64, 0), (64, int(lengths.max()) * 40), (7, 0), (1, 0)]:
        got = nb.partition_padded(lengths, num_batches, cap)
        assert_same(got, spec.partition_padded(lengths, num_batches, cap))


@pytest.mark.parametrize("seed", range(4))
def test_partition_hull_equals_the_divide_and_conquer(seed):
    """The O(n) hull row must pick, cell for cell, what the spec's divide and conquer picks, ties included."""
    rng = np.random.default_rng(seed)
    for _ in range(150):
        n = int(rng.integers(1, 400))
        lengths = rng.choice(np.array([1, 2, 3, 5, 8, 100, 101, 4096], dtype=np.int64), n) if rng.random() < 0.5 \
            else rng.integers(1, int(rng.choice([3, 50, 10**6])), n, dtype=np.int64)
        k = int(rng.integers(1, n + 1))
        hull = nb_partition.solve(lengths, k, 0, allow_hull=True)
        dc = nb_partition.solve(lengths, k, 0, allow_hull=False)
        assert hull[0] == dc[0]
        np.testing.assert_array_equal(hull[1], dc[1])
        np.testing.assert_array_equal(hull[2], dc[2])


def test_partition_cap_infeasible_and_overflow_edges():
    lengths = np.array([5, 5, 5, 5, 1], dtype=np.int64)
    assert nb.partition_padded(lengths, 2, 9) == (None, None)
    assert spec.partition_padded(lengths, 2, 9) == (None, None)
    assert_same(nb.partition_padded(lengths, 3, 10), spec.partition_padded(lengths, 3, 10))
    # Products near 2**62 take the divide-and-conquer path (no hull) and must wrap exactly as numpy does.
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(2, 30))
        big = rng.integers(1, 2**62 // int(rng.integers(1, 4 * n)), n, dtype=np.int64)
        k = int(rng.integers(1, n + 1))
        got, want = nb.partition_padded(big, k, 0), spec.partition_padded(big, k, 0)
        if want[0] is None:
            assert got == (None, None)
        else:
            assert_same(got, want)


# ----------------------------------------------------------------------------------------------------------------
# Balance
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_parts", [1, 2, 8, 63, 64, 65, 200])
@pytest.mark.parametrize("equal_count", [False, True])
def test_balance_identical(num_parts, equal_count):
    """Both stable sorts of the merged subsets (insertion up to 64 parts, merge sort above) and both choices."""
    rng = np.random.default_rng(num_parts)
    for costs in (rng.integers(0, 10**6, 700, dtype=np.int64), rng.integers(0, 3, 300, dtype=np.int64),
                  np.full(130, 7, dtype=np.int64)):
        assert_same(nb.balance(costs, num_parts, equal_count), spec.balance(costs, num_parts, equal_count))


def test_balance_bigger_input_and_independent_checks():
    costs = np.random.default_rng(9).integers(1, 10**6, 3000, dtype=np.int64)
    got = nb.balance(costs, 8, True)
    assert_same(got, spec.balance(costs, 8, True))
    ptr, items = got
    np.testing.assert_array_equal(np.sort(items), np.arange(3000))
    sizes = np.diff(ptr)
    assert sizes.min() == sizes.max() == 375
    loads = np.add.reduceat(costs[items], ptr[:-1])
    assert loads.max() - loads.min() <= costs.max()


# ----------------------------------------------------------------------------------------------------------------
# Module hygiene
# ----------------------------------------------------------------------------------------------------------------


def test_import_compiles_nothing_and_kernels_are_cached_nogil():
    code = (
        "import importlib, pkgutil, numba, opensloth.packing._numba as pkg\n"
        "mods = [importlib.import_module(f'{pkg.__name__}.{m.name}') for m in pkgutil.iter_modules(pkg.__path__)]\n"
        "assert {'pack', 'partition', 'balancing', 'gather'} <= {m.__name__.rsplit('.', 1)[1] for m in mods}, mods\n"
        "kernels = {id(v): v for m in mods for v in vars(m).values()\n"
        "           if isinstance(v, numba.core.registry.CPUDispatcher)}.values()\n"
        "assert len(kernels) > 10, kernels\n"
        "bad = [k.__name__ for k in kernels if k.signatures or not k.targetoptions.get('nogil')]\n"
        "assert not bad, bad\n"
        "assert all(k._cache.__class__.__name__ == 'FunctionCache' for k in kernels)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
