"""Checks specific to the native backend (opensloth._native): build version, the numpy boundary, the GIL, and
identity with the python spec on inputs the property tests do not reach (large n, huge capacities, extreme ties).

Cross-backend properties on small inputs live in test_packing_properties.py; this file is skipped as a whole when
the native module does not load.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import opensloth
from opensloth import packing
from opensloth.packing import _python as spec
from opensloth.packing import backend_error

_ERROR = backend_error("native")
if _ERROR is not None:
    pytest.skip(f"native backend unavailable: {_ERROR}", allow_module_level=True)

from opensloth import _native  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKERS = ("pack_bfd", "pack_ffd", "pack_exact_fit")


def lognormal(n: int, seed: int, median: float = 400, sigma: float = 0.9, lo: int = 8, hi: int = 4096) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n), lo, hi).astype(np.int64)


def assert_same(native_result, spec_result):
    assert len(native_result) == len(spec_result)
    for got, want in zip(native_result, spec_result):
        if want is None:
            assert got is None
            continue
        assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got.ndim == 1
        np.testing.assert_array_equal(got, want)


def check_packing(lengths: np.ndarray, capacity: int, bin_ptr, items, bin_lengths):
    """Independent validity check: every item exactly once, bin lengths add up, nothing over capacity."""
    assert bin_ptr[0] == 0 and bin_ptr[-1] == len(lengths) and np.all(np.diff(bin_ptr) > 0)
    assert np.array_equal(np.sort(items), np.arange(len(lengths)))
    sums = np.add.reduceat(lengths[items], bin_ptr[:-1])
    np.testing.assert_array_equal(sums, bin_lengths)
    assert bin_lengths.max() <= capacity


# ---------------------------------------------------------------------------------------------------------------
# Build and boundary
# ---------------------------------------------------------------------------------------------------------------


def test_version_is_the_one_setup_py_builds_from():
    init = (ROOT / "opensloth" / "__init__.py").read_text()
    declared = re.search(r'__version__ = "([^"]+)"', init).group(1)
    assert _native.__version__ == declared == opensloth.__version__


def test_package_refuses_a_build_of_another_version(monkeypatch):
    monkeypatch.setattr(_native, "__version__", "0.0.0-stale")
    with pytest.raises(ImportError, match="rebuild"):
        packing._import_backend("native")


@pytest.mark.parametrize("bad", [
    np.array([3, 1, 2], dtype=np.int32),
    np.array([3.0, 1.0, 2.0]),
    np.arange(1, 7, dtype=np.int64)[::2],  # not contiguous
    [3, 1, 2],
])
def test_inputs_other_than_contiguous_int64_are_rejected_not_copied(bad):
    with pytest.raises(TypeError):
        _native.pack_bfd(bad, 10)


def test_out_of_range_lengths_raise_instead_of_corrupting_memory():
    with pytest.raises(ValueError, match=r"lengths\[1\] = 11"):
        _native.pack_bfd(np.array([1, 11], dtype=np.int64), 10)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 0"):
        _native.pack_ffd(np.array([0, 1], dtype=np.int64), 10)
    with pytest.raises(ValueError):
        _native.pack_bfd(np.zeros(0, dtype=np.int64), 10)
    with pytest.raises(ValueError, match=r"costs\[0\] = -1"):
        _native.balance(np.array([-1, 2], dtype=np.int64), 2, False)
    with pytest.raises(ValueError):
        _native.partition_padded(np.array([1, 2], dtype=np.int64), 3, 0)


def test_results_are_fresh_writeable_int64_arrays_that_outlive_the_input():
    lengths = lognormal(1000, seed=1)
    results = _native.pack_bfd(lengths, 4096)
    expected = [r.copy() for r in results]
    del lengths
    for r in results:
        assert r.dtype == np.int64 and r.flags.c_contiguous and r.flags.writeable and r.flags.owndata is False
        r[0] = r[0]  # writeable in place
    again = _native.pack_bfd(lognormal(1000, seed=1), 4096)
    for a, b, c in zip(results, expected, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        assert not np.shares_memory(a, c)


# ---------------------------------------------------------------------------------------------------------------
# GIL
# ---------------------------------------------------------------------------------------------------------------


def _main_thread_steps_during(call, attempts: int = 3) -> int:
    """Run ``call`` in a worker thread under a 30 s switch interval and count the main thread's wake-ups (Python
    work between short waits) before the call returns; the best of ``attempts`` runs.

    A thread holding the GIL keeps it until it blocks, so if ``call`` held the GIL the main thread could resume only
    after it returned: 0 wake-ups in every attempt. A released GIL lets the main thread run during the call; a few
    attempts keep a busy machine (the main thread scheduled late) from passing for a held GIL.
    """
    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    best = 0
    try:
        for _ in range(attempts):
            started, finished = threading.Event(), threading.Event()
            errors = []

            def worker(started, finished, errors):
                started.set()
                try:
                    call()
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    errors.append(exc)
                finished.set()

            thread = threading.Thread(target=worker, args=(started, finished, errors))
            thread.start()
            started.wait()
            steps = 0
            while not finished.wait(0.0005):  # each wait releases the GIL, so the worker can finish
                steps += 1
            thread.join()
            if errors:
                raise errors[0]
            best = max(best, steps)
            if best:
                break
    finally:
        sys.setswitchinterval(old)
    return best


def test_gil_is_released_while_packing():
    """The main thread runs Python code while pack_bfd works in another thread."""
    lengths = lognormal(3_000_000, seed=2)
    out = {}
    steps = _main_thread_steps_during(lambda: out.update(plan=_native.pack_bfd(lengths, 4096)))
    assert steps > 0, "the main thread could not run during pack_bfd: the GIL was held"
    check_packing(lengths, 4096, *out["plan"])


def test_concurrent_calls_from_threads_give_the_single_threaded_results():
    inputs = [lognormal(50_000 + 1000 * k, seed=10 + k, hi=4096 if k % 2 else 2048) for k in range(6)]
    capacities = [4096 if k % 2 else 2048 for k in range(6)]
    calls = []
    for lengths, capacity in zip(inputs, capacities):
        calls += [(_native.pack_bfd, (lengths, capacity)), (_native.pack_ffd, (lengths, capacity)),
                  (_native.pack_exact_fit, (lengths, capacity)), (_native.balance, (lengths, 8, False))]
    expected = [fn(*args) for fn, args in calls]
    results: list = [None] * len(calls)
    barrier = threading.Barrier(4)

    def run(offset):
        barrier.wait()
        for _ in range(2):
            for i in range(offset, len(calls), 4):
                fn, args = calls[i]
                results[i] = fn(*args)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert_same(got, want)
    # And the single-threaded results are the spec's.
    assert_same(expected[0], spec.pack_bfd(inputs[0], capacities[0]))


# ---------------------------------------------------------------------------------------------------------------
# Identity with the python spec where the property tests do not reach
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,n", [("pack_bfd", 1_000_000), ("pack_exact_fit", 1_000_000), ("pack_ffd", 200_000)])
def test_large_inputs_identical_to_python(name, n):
    lengths = lognormal(n, seed=3)
    got = getattr(_native, name)(lengths, 4096)
    assert_same(got, getattr(spec, name)(lengths, 4096))
    check_packing(lengths, 4096, *got)


@pytest.mark.parametrize("capacity,high", [
    (10**12, 10**12),  # comparison sort and an ordered map of free space
    (10**9, 5000),  # counting sort of the lengths, ordered map of free space
    (70_001, 70_001),  # just above the dense free-space limit for this n
    (2**63 - 1, 2**63 - 1),
])
@pytest.mark.parametrize("name", PACKERS)
def test_huge_capacities_identical_to_python(name, capacity, high):
    rng = np.random.default_rng(capacity % 1000)
    lengths = rng.integers(1, high, 3000, endpoint=True, dtype=np.int64)
    lengths[::7] = lengths[0]  # ties among huge values too
    got = getattr(_native, name)(lengths, capacity)
    assert_same(got, getattr(spec, name)(lengths, capacity))
    check_packing(lengths, capacity, *got)


def tie_cases():
    rng = np.random.default_rng(4)
    return {
        "all-equal": (np.full(5000, 700, dtype=np.int64), 4096),
        "all-equal-exact": (np.full(4096, 1024, dtype=np.int64), 4096),
        "two-values": (rng.choice(np.array([1, 2], dtype=np.int64), 5000), 3),
        "capacity-1": (np.ones(2000, dtype=np.int64), 1),
        "all-full": (np.full(300, 50, dtype=np.int64), 50),
        "single": (np.array([7], dtype=np.int64), 7),
        "single-small": (np.array([1], dtype=np.int64), 10**12),
        "halves": (rng.choice(np.array([2048, 2049, 2047], dtype=np.int64), 3000), 4096),
        "few-values": (rng.choice(np.array([1, 3, 100, 1000, 4000], dtype=np.int64), 20000), 4096),
    }


@pytest.mark.parametrize("case", list(tie_cases()))
@pytest.mark.parametrize("name", PACKERS)
def test_heavy_ties_and_edge_shapes_identical_to_python(name, case):
    lengths, capacity = tie_cases()[case]
    got = getattr(_native, name)(lengths, capacity)
    assert_same(got, getattr(spec, name)(lengths, capacity))
    check_packing(lengths, capacity, *got)


def test_capacity_one_gives_one_bin_per_item_in_index_order():
    bin_ptr, items, bin_lengths = _native.pack_bfd(np.ones(1000, dtype=np.int64), 1)
    np.testing.assert_array_equal(items, np.arange(1000))
    np.testing.assert_array_equal(bin_ptr, np.arange(1001))
    np.testing.assert_array_equal(bin_lengths, np.ones(1000))


@pytest.mark.parametrize("n,num_batches,cap", [
    (1024, 64, 0),  # the O(n)-per-row hull
    (1024, 64, 4096 * 1024),  # a cap that cannot bind: the hull too
    (1024, 64, 4096 * 24),  # a binding cap: divide and conquer
    (1024, 1, 0),
    (1024, 7, 0),
    (120, 120, 0),  # one item per batch
    (120, 119, 4096 * 2),
])
def test_partition_window_identical_to_python(n, num_batches, cap):
    lengths = lognormal(n, seed=5)
    assert_same(_native.partition_padded(lengths, num_batches, cap), spec.partition_padded(lengths, num_batches, cap))


@pytest.mark.parametrize("lengths,num_batches,cap", [
    (np.full(500, 9, dtype=np.int64), 17, 0),
    (np.full(500, 9, dtype=np.int64), 17, 9 * 30),
    (np.array([5], dtype=np.int64), 1, 0),
    (np.array([5, 5, 5], dtype=np.int64), 3, 5),
    (np.array([4, 4, 4, 4], dtype=np.int64), 2, 7),  # no split meets the cap
    (np.array([2**61, 2**61 - 1, 3, 2**60, 1, 1], dtype=np.int64), 3, 0),  # costs beyond INF: numpy's arithmetic
])
def test_partition_edge_cases_identical_to_python(lengths, num_batches, cap):
    assert_same(_native.partition_padded(lengths, num_batches, cap), spec.partition_padded(lengths, num_batches, cap))


@pytest.mark.parametrize("equal_count", [False, True])
@pytest.mark.parametrize("costs,num_parts", [
    (lognormal(3000, seed=6), 8),
    (lognormal(3000, seed=7), 64),
    (np.zeros(100, dtype=np.int64), 4),
    (np.full(101, 13, dtype=np.int64), 4),
    (np.array([5], dtype=np.int64), 3),
    (np.array([10, 9, 8], dtype=np.int64), 5),
    (np.random.default_rng(8).integers(0, 3, 500).astype(np.int64), 7),
    (np.random.default_rng(9).integers(0, 2**62 // 1000, 1000).astype(np.int64), 6),  # large sums, no overflow
])
def test_balance_identical_to_python(costs, num_parts, equal_count):
    got = _native.balance(costs, num_parts, equal_count)
    assert_same(got, spec.balance(costs, num_parts, equal_count))
    ptr, items = got
    assert len(ptr) == num_parts + 1 and np.array_equal(np.sort(items), np.arange(len(costs)))
    if equal_count:
        sizes = np.diff(ptr)
        assert sizes.max() - sizes.min() <= 1


# ---------------------------------------------------------------------------------------------------------------
# Segment gather (_native.gather_segments), the copy behind the packed-dataset builder
# ---------------------------------------------------------------------------------------------------------------

GATHER_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.bool_]


def i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def gather_oracle(sources, chunks, starts, lengths, order):
    """The definition, one Python slice per segment."""
    idx = range(len(starts)) if order is None else order
    parts = [sources[0 if chunks is None else chunks[j]][starts[j] : starts[j] + lengths[j]] for j in idx]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=sources[0].dtype)


def random_segments(rng, dtype, n_sources, n_segments, n_order):
    """Sources of one dtype with distinct-looking values, and random in-bounds segments (some empty) and an
    order with repeats."""
    info = np.iinfo(dtype) if dtype != np.bool_ else None
    sources = []
    for _ in range(n_sources):
        size = int(rng.integers(0, 300))
        if dtype == np.bool_:
            sources.append(rng.random(size) < 0.5)
        else:
            sources.append(rng.integers(info.min, info.max, size, endpoint=True, dtype=dtype))
    chunks = rng.integers(0, n_sources, n_segments).astype(np.int64)
    sizes = np.array([len(s) for s in sources])[chunks]
    starts = (rng.random(n_segments) * (sizes + 1)).astype(np.int64)
    lengths = (rng.random(n_segments) * (sizes - starts + 1)).astype(np.int64)
    order = rng.integers(0, n_segments, n_order).astype(np.int64) if n_segments else i64([])
    return sources, chunks, starts, lengths, order


@pytest.mark.parametrize("dtype", GATHER_DTYPES)
def test_gather_matches_slicing_for_every_value_dtype(dtype):
    rng = np.random.default_rng(20)
    for n_sources in (1, 4):
        sources, chunks, starts, lengths, order = random_segments(rng, dtype, n_sources, 200, 500)
        want = gather_oracle(sources, chunks, starts, lengths, order)
        out = np.empty(len(want), dtype=dtype)
        assert _native.gather_segments(sources, chunks, starts, lengths, order, out) == len(want)
        np.testing.assert_array_equal(out, want)
        assert out.dtype == dtype


def test_gather_one_source_without_chunks_or_order():
    values = np.arange(100, 120, dtype=np.int32)
    starts, lengths = i64([5, 0, 19, 3]), i64([3, 2, 1, 0])
    out = np.full(6, -1, dtype=np.int32)
    assert _native.gather_segments([values], None, starts, lengths, None, out) == 6
    assert out.tolist() == [105, 106, 107, 100, 101, 119]
    out = np.full(7, -1, dtype=np.int32)
    _native.gather_segments([values], None, starts, lengths, i64([2, 0, 2, 3, 1]), out)
    assert out.tolist() == [119, 105, 106, 107, 119, 100, 101]


def test_gather_empty_inputs():
    values = np.arange(4, dtype=np.int64)
    out = np.empty(0, dtype=np.int64)
    assert _native.gather_segments([values], None, i64([]), i64([]), None, out) == 0
    assert _native.gather_segments([values], None, i64([2, 4]), i64([0, 0]), i64([1, 0, 1]), out) == 0
    empty = np.empty(0, dtype=np.int64)
    assert _native.gather_segments([empty], None, i64([0]), i64([0]), None, out) == 0


def test_gather_reads_sources_in_place_and_writes_only_out():
    sources = [np.arange(10, dtype=np.int64), np.arange(50, 60, dtype=np.int64)]
    sources[1].flags.writeable = False  # arrow buffers come to numpy read-only
    before = [s.copy() for s in sources]
    out = np.empty(7, dtype=np.int64)
    _native.gather_segments(sources, i64([1, 0]), i64([2, 6]), i64([3, 4]), None, out)
    assert out.tolist() == [52, 53, 54, 6, 7, 8, 9]
    for s, b in zip(sources, before):
        np.testing.assert_array_equal(s, b)


@pytest.mark.parametrize("case,message", [
    (dict(order=[0, 2]), r"order\[1\] = 2 is not a segment index in \[0, 2\)"),
    (dict(order=[-1]), r"order\[0\] = -1"),
    (dict(chunks=[0, 2]), r"chunks\[1\] = 2 is not a source index in \[0, 2\)"),
    (dict(chunks=[-1, 0]), r"chunks\[0\] = -1"),
    (dict(starts=[-1, 0]), r"segment 0 = \[-1, -1 \+ 2\) lies outside source 0 of 5 elements"),
    (dict(starts=[4, 0]), r"segment 0 = \[4, 4 \+ 2\) lies outside source 0 of 5 elements"),
    (dict(starts=[2**62, 0]), r"segment 0 .* lies outside"),
    (dict(lengths=[-2, 1]), r"lengths\[0\] = -2 is negative"),
    (dict(lengths=[2**62, 1]), r"lies outside source 0"),
    (dict(out=4), r"the segments hold more than the 4 elements of the output"),
    (dict(out=9), r"the segments hold 5 elements but the output has 9"),
])
def test_gather_bad_indices_raise_instead_of_touching_memory(case, message):
    """Every index is checked before use: bad input raises ValueError (under ASan/UBSan too, where an out-of-bounds
    read or write would abort the run)."""
    sources = [np.arange(5, dtype=np.int64), np.arange(10, 13, dtype=np.int64)]
    args = dict(chunks=[0, 1], starts=[1, 0], lengths=[2, 3], order=None, out=5)
    args.update(case)
    out = np.zeros(args["out"], dtype=np.int64)
    with pytest.raises(ValueError, match=message):
        _native.gather_segments(sources, i64(args["chunks"]), i64(args["starts"]), i64(args["lengths"]),
                                None if args["order"] is None else i64(args["order"]), out)


def test_gather_rejects_bad_arrays():
    v = np.arange(10, dtype=np.int64)
    s, n = i64([0]), i64([2])
    out = np.empty(2, dtype=np.int64)
    with pytest.raises(TypeError, match="has another dtype than out"):
        _native.gather_segments([v.astype(np.int32)], None, s, n, None, out)
    with pytest.raises(TypeError, match="has another dtype than out"):
        _native.gather_segments([v, v.astype(np.uint64)], i64([0]), s, n, None, out)
    with pytest.raises(TypeError, match="integers or booleans"):
        _native.gather_segments([v.astype(np.float64)], None, s, n, None, out.astype(np.float64))
    with pytest.raises(TypeError, match="C-contiguous"):
        _native.gather_segments([np.arange(20, dtype=np.int64)[::2]], None, s, n, None, out)
    with pytest.raises(TypeError, match=r"sources\[0\] must be a numpy array"):
        _native.gather_segments([list(range(10))], None, s, n, None, out)
    with pytest.raises(ValueError, match="must be 1-D"):
        _native.gather_segments([v.reshape(2, 5)], None, s, n, None, out)
    with pytest.raises(TypeError):  # index arrays must be int64 already (never converted)
        _native.gather_segments([v], None, s.astype(np.int32), n, None, out)
    with pytest.raises(TypeError, match="order must be None or a C-contiguous int64"):
        _native.gather_segments([v], None, s, n, [0], out)
    with pytest.raises(ValueError, match="one entry per segment"):
        _native.gather_segments([v], None, i64([0, 1]), n, None, out)
    with pytest.raises(ValueError, match="at least one source"):
        _native.gather_segments([], None, s, n, None, out)
    with pytest.raises(ValueError, match="several sources need a chunk index"):
        _native.gather_segments([v, v], None, s, n, None, out)
    with pytest.raises(ValueError, match="overlaps the output"):
        _native.gather_segments([v], None, s, n, None, v[3:5])
    read_only = out.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError):
        _native.gather_segments([v], None, s, n, None, read_only)


def test_gather_releases_the_gil():
    """As for pack_bfd: the main thread runs Python while a long gather is inside C++."""
    rng = np.random.default_rng(21)
    values = rng.integers(0, 2**31 - 1, 12_000_000, dtype=np.int32)
    lengths = np.full(60_000, 200, dtype=np.int64)
    starts = rng.integers(0, len(values) - 200, len(lengths)).astype(np.int64)
    order = rng.permutation(len(lengths)).astype(np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.int32)

    def gather_three_times():
        for _ in range(3):
            _native.gather_segments([values], None, starts, lengths, order, out)

    steps = _main_thread_steps_during(gather_three_times)
    assert steps > 0, "the main thread could not run during gather_segments: the GIL was held"
    j = int(order[12_345])
    np.testing.assert_array_equal(out[12_345 * 200 : 12_346 * 200], values[starts[j] : starts[j] + 200])
