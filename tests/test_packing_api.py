"""Packing core: public API, backend selection, input validation and worked examples, on every backend."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch

import opensloth.packing as packing
from opensloth.packing import PackPlan, available_backends, balance, get_backend, pack_lengths, partition_padded

# ----------------------------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------------------------


def test_available_backends_fastest_first_and_python_always_there():
    names = available_backends()
    assert "python" in names
    assert list(names) == [n for n in packing.BACKEND_NAMES if n in names]


def test_get_backend_follows_env(monkeypatch, backend):
    monkeypatch.setenv("OPENSLOTH_BACKEND", backend)
    assert get_backend() == backend
    monkeypatch.setenv("OPENSLOTH_BACKEND", "auto")
    assert get_backend() == available_backends()[0]


def test_unknown_backend_name_is_a_value_error(monkeypatch):
    monkeypatch.setenv("OPENSLOTH_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown packing backend 'cuda'.*OPENSLOTH_BACKEND"):
        get_backend()
    with pytest.raises(ValueError, match="unknown packing backend 'fast'.*backend="):
        pack_lengths([1], 4, backend="fast")


def test_missing_backend_raises_import_error_with_reason(monkeypatch):
    """Asking for a backend that does not load never falls back silently."""

    def broken(name):
        raise ImportError(f"simulated: {name} is not built")

    monkeypatch.setattr(packing, "_loaded", {})
    monkeypatch.setattr(packing, "_load_errors", {})
    monkeypatch.setattr(packing, "_import_backend", broken)
    monkeypatch.setenv("OPENSLOTH_BACKEND", "native")
    with pytest.raises(ImportError, match="simulated: native is not built"):
        pack_lengths([1, 2], 4)
    with pytest.raises(ImportError, match="simulated: numba"):
        pack_lengths([1, 2], 4, backend="numba")


def test_native_version_mismatch_is_refused(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("opensloth._native")
    fake.__version__ = "0.0.0-stale"
    monkeypatch.setitem(sys.modules, "opensloth._native", fake)
    with pytest.raises(ImportError, match="built for opensloth 0.0.0-stale.*rebuild"):
        packing._import_backend("native")


# ----------------------------------------------------------------------------------------------------------------
# Validation: the same error whichever backend runs
# ----------------------------------------------------------------------------------------------------------------

BAD_LENGTHS = [
    ([], 8, ValueError, r"lengths is empty"),
    ([3, 0, 2], 8, ValueError, r"lengths\[1\] = 0 is below the minimum 1"),
    ([3, 2, -4], 8, ValueError, r"lengths\[2\] = -4 is below the minimum 1"),
    ([3, 9, 2], 8, ValueError, r"lengths\[1\] = 9 exceeds the capacity 8.*truncate or split"),
    ([1.0, 2.5], 8, ValueError, r"lengths\[1\] = 2.5 has a fractional part"),
    ([1.0, float("nan")], 8, ValueError, r"lengths\[1\] = nan is not a finite number"),
    ([1.0, float("inf")], 8, ValueError, r"lengths\[1\] = inf is not a finite number"),
    (["a", 2], 8, TypeError, r"lengths\[0\] = 'a' is a str"),
    ([1, True], 8, TypeError, r"lengths\[1\] = True is a bool"),
    (np.ones((2, 2), dtype=np.int64), 8, ValueError, r"must be 1-D, got shape \(2, 2\)"),
    (np.array([True, False]), 8, TypeError, r"dtype bool"),
    ("123", 8, TypeError, r"got str"),
    (None, 8, TypeError, r"got NoneType"),
    (np.array([2**63], dtype=np.uint64), 8, ValueError, r"does not fit in int64"),
    ([1, 2], 0, ValueError, r"capacity = 0 must be a positive integer"),
    ([1, 2], -5, ValueError, r"capacity = -5 must be a positive integer"),
    ([1, 2], 2.5, ValueError, r"capacity = 2.5 must be a positive integer"),
    ([1, 2], "8", TypeError, r"capacity must be a positive integer, got '8'"),
    ([1, 2], True, TypeError, r"capacity must be a positive integer, got True"),
]


@pytest.mark.parametrize("lengths,capacity,exc,pattern", BAD_LENGTHS)
def test_pack_lengths_rejects_bad_input(backend, lengths, capacity, exc, pattern):
    with pytest.raises(exc, match=pattern):
        pack_lengths(lengths, capacity, backend=backend)


def test_unknown_strategy(backend):
    with pytest.raises(ValueError, match="unknown packing strategy 'nf'"):
        pack_lengths([1, 2], 4, strategy="nf", backend=backend)


@pytest.mark.parametrize(
    "lengths,k,cap,pattern",
    [
        ([1, 2], 3, None, r"num_batches = 3 exceeds the number of items 2"),
        ([1, 2], 0, None, r"num_batches = 0 must be a positive integer"),
        ([4, 0], 1, None, r"lengths\[1\] = 0 is below the minimum 1"),
        ([4, 9], 1, 8, r"lengths\[1\] = 9 exceeds max_tokens_per_batch 8.*single sample must fit"),
        ([4, 4, 4], 1, 8, r"no split of 3 items into 1 batches.*max_tokens_per_batch = 8"),
        ([1, 2], 1, 0, r"max_tokens_per_batch = 0 must be a positive integer"),
        ([2**61] * 3, 1, None, r"lengths\[0\] = 2305843009213693952 exceeds 1537228672809129301.*below 2\*\*62"),
    ],
)
def test_partition_padded_rejects_bad_input(backend, lengths, k, cap, pattern):
    with pytest.raises(ValueError, match=pattern):
        partition_padded(lengths, k, max_tokens_per_batch=cap, backend=backend)


@pytest.mark.parametrize(
    "costs,k,exc,pattern",
    [
        ([], 2, ValueError, r"costs is empty"),
        ([3, -1], 2, ValueError, r"costs\[1\] = -1 is below the minimum 0"),
        ([3, 1.5], 2, ValueError, r"costs\[1\] = 1.5 has a fractional part"),
        ([3, 1], 0, ValueError, r"num_parts = 0 must be a positive integer"),
        ([3, 1], 2.0001, ValueError, r"num_parts = 2.0001 must be a positive integer"),
        ([2**62] * 3, 2, ValueError, r"costs\[0\] = 4611686018427387904 exceeds 3074457345618258602"),
        ([3, 1], 10**11, ValueError, r"num_parts = 100000000000 exceeds 65536 \(the larger of the 2 items and "
                                     r"65536\): parts beyond the item count stay empty"),
    ],
)
def test_balance_rejects_bad_input(backend, costs, k, exc, pattern):
    with pytest.raises(exc, match=pattern):
        balance(costs, k, backend=backend)


def test_balance_overflow_check_applies_to_generators(backend):
    with pytest.raises(ValueError, match=r"costs\[0\] = 4611686018427387904 exceeds 3074457345618258602"):
        balance((c for c in [2**62] * 3), 2, backend=backend)


def test_balance_rejects_non_bool_equal_count(backend):
    with pytest.raises(TypeError, match="equal_count must be True or False"):
        balance([1, 2], 2, equal_count="yes", backend=backend)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: list(v),
        lambda v: tuple(v),
        lambda v: np.asarray(v, dtype=np.int8),
        lambda v: np.asarray(v, dtype=np.uint16),
        lambda v: np.asarray(v, dtype=np.int32)[::-1][::-1],
        lambda v: np.asarray(v, dtype=np.float32),
        lambda v: np.repeat(np.asarray(v, dtype=np.int64), 2)[::2],  # non-contiguous view
        lambda v: torch.tensor(v, dtype=torch.int32),
        lambda v: torch.tensor(v, dtype=torch.float64),
        lambda v: torch.tensor(v, dtype=torch.bfloat16),  # no numpy dtype: read exactly through float64
        lambda v: torch.tensor(v, dtype=torch.float16),
        lambda v: torch.tensor(v, dtype=torch.float32).to(torch.float8_e4m3fn),
        lambda v: np.ma.array(v, mask=np.zeros(len(v), dtype=bool)),  # a masked array with nothing masked
    ],
    ids=["list", "tuple", "int8", "uint16", "int32", "float32", "strided", "torch-int32", "torch-float64",
         "torch-bfloat16", "torch-float16", "torch-float8", "masked-none-masked"],
)
def test_accepted_input_types_give_the_same_plan(backend, make):
    values = [7, 3, 5, 1, 8, 2, 2, 6]
    reference = pack_lengths(values, 10, backend=backend)
    assert pack_lengths(make(values), 10, backend=backend) == reference


def test_bfloat16_tensors_are_checked_like_other_floats(backend):
    with pytest.raises(ValueError, match=r"lengths\[1\] = 2.5 has a fractional part"):
        pack_lengths(torch.tensor([4.0, 2.5], dtype=torch.bfloat16), 8, backend=backend)
    costs = torch.tensor([3, 3, 2, 2, 2], dtype=torch.bfloat16)
    assert [p.tolist() for p in balance(costs, 2, backend=backend)] == \
        [p.tolist() for p in balance([3, 3, 2, 2, 2], 2, backend=backend)]
    assert [p.tolist() for p in partition_padded(costs, 2, backend=backend)] == \
        [p.tolist() for p in partition_padded([3, 3, 2, 2, 2], 2, backend=backend)]


def test_tensor_dtypes_numpy_cannot_hold_are_a_clear_type_error(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        tensor = torch.tensor([1, 2]).to(torch.complex32)
    with pytest.raises(TypeError, match=r"lengths is a torch tensor of dtype torch.complex32.*lengths\.long\(\)"):
        pack_lengths(tensor, 8, backend=backend)


_MASKED = np.ma.array([3, 5, 2, 4], mask=[False, True, False, True])
_MASKED_MESSAGE = (r"{name} is a numpy masked array with 2 masked values \(the first at index 1\).*"
                   r"{name}\.compressed\(\).*{name}\.filled\(")


@pytest.mark.parametrize("call,name", [
    (lambda b: pack_lengths(_MASKED, 8, backend=b), "lengths"),
    (lambda b: partition_padded(_MASKED, 2, backend=b), "lengths"),
    (lambda b: balance(_MASKED, 2, backend=b), "costs"),
], ids=["pack_lengths", "partition_padded", "balance"])
def test_masked_values_are_refused_not_silently_used(backend, call, name):
    """A masked entry must not be packed as if it were data: every function refuses it and says how to drop or fill
    it (before, the mask was ignored and item 1 was packed with its hidden value)."""
    with pytest.raises(ValueError, match=_MASKED_MESSAGE.format(name=name)):
        call(backend)


@pytest.mark.parametrize("kwargs,name", [
    (dict(values=np.ma.array(np.arange(6), mask=[0, 1, 0, 1, 0, 0])), "values"),
    (dict(values=[np.arange(6), np.ma.array(np.arange(6), mask=[0, 1, 0, 1, 0, 0])], chunks=[1]), r"values\[1\]"),
    (dict(starts=np.ma.array([0, 1, 2, 3], mask=[0, 1, 0, 1])), "starts"),
    (dict(lengths=np.ma.array([1, 1, 1, 1], mask=[0, 1, 0, 1])), "lengths"),
    (dict(order=np.ma.array([0, 1, 2, 3], mask=[0, 1, 0, 1])), "order"),
], ids=["values", "values-chunk", "starts", "lengths", "order"])
def test_gather_refuses_masked_arrays(backend, kwargs, name):
    from opensloth.packing._gather import gather_segments

    args = dict(values=np.arange(6), starts=[0], lengths=[1], order=None, chunks=None)
    if "values" not in kwargs or "chunks" in kwargs:
        args.update(starts=[0, 1, 2, 3], lengths=[1, 1, 1, 1])
    args.update(kwargs)
    with pytest.raises(ValueError, match=_MASKED_MESSAGE.format(name=name)):
        gather_segments(args.pop("values"), args.pop("starts"), args.pop("lengths"), args.pop("order"),
                        backend=backend, **args)


def test_inputs_are_not_modified(backend):
    arr = np.array([5, 1, 4, 4, 2], dtype=np.int64)
    before = arr.copy()
    pack_lengths(arr, 6, backend=backend)
    partition_padded(arr, 2, backend=backend)
    balance(arr, 2, backend=backend)
    np.testing.assert_array_equal(arr, before)


# ----------------------------------------------------------------------------------------------------------------
# Worked examples (expected values derived by hand from the documented rules)
# ----------------------------------------------------------------------------------------------------------------


def test_bfd_worked_example_with_fifo_tie(backend):
    # Order: 5(i0) 4(i2) 3(i1) 2(i3) 2(i4) 1(i5). 5 -> bin0 (free 1); 4 -> bin1 (free 2); 3 -> bin2 (free 3);
    # 2(i3) -> bin1 (free 2 is the best fit; free 0); 2(i4) -> bin2 (free 3 -> 1); 1(i5): bins 0 and 2 both have
    # free space 1; bin0 reached it first (FIFO), so bin0.
    plan = pack_lengths([5, 3, 4, 2, 2, 1], 6, backend=backend)
    assert [b.tolist() for b in plan.bins()] == [[0, 5], [2, 3], [1, 4]]
    assert plan.bin_lengths.tolist() == [6, 6, 5]
    assert plan.bin_ptr.tolist() == [0, 2, 4, 6]
    assert plan.n_bins == 3 and len(plan) == 3 and plan.n_items == 6
    assert plan.efficiency == pytest.approx(17 / 18)
    assert plan.items.dtype == np.int64 and plan.bin_ptr.dtype == np.int64 and plan.bin_lengths.dtype == np.int64


def test_ffd_worked_example(backend):
    # Order 6 5 4 3 2 2 at capacity 8: 6 -> b0 (2 left), 5 -> b1 (3), 4 -> b2 (4), 3 -> b1 (first fit; 0 left),
    # 2(i4) -> b0 (first fit; 0 left), 2(i5) -> b2 (2 left). BFD differs on the last two: 2(i4) -> b0 (free 2, best)
    plan = pack_lengths([6, 5, 4, 3, 2, 2], 8, strategy="ffd", backend=backend)
    assert [b.tolist() for b in plan.bins()] == [[0, 4], [1, 3], [2, 5]]


def test_bfd_and_ffd_differ_where_best_fit_matters(backend):
    # Capacity 13, order 10(i0) 8(i1) 7(i2) 5(i3) 5(i4) 1(i5): 10 -> b0 (3 left), 8 -> b1 (5), 7 -> b2 (6),
    # 5(i3) -> b1 (0) in both, 5(i4) -> b2 (1) in both. For 1(i5) the free spaces are b0 = 3 and b2 = 1:
    # first fit takes b0, best fit takes b2.
    lengths = [10, 8, 7, 5, 5, 1]
    assert [b.tolist() for b in pack_lengths(lengths, 13, backend=backend).bins()] == [[0], [1, 3], [2, 4, 5]]
    assert [b.tolist() for b in pack_lengths(lengths, 13, strategy="ffd", backend=backend).bins()] == [
        [0, 5], [1, 3], [2, 4]]


def test_single_item_and_capacity_one(backend):
    plan = pack_lengths([3], 3, backend=backend)
    assert plan.bins()[0].tolist() == [0] and plan.bin_lengths.tolist() == [3]
    plan = pack_lengths([1, 1, 1], 1, backend=backend)
    assert [b.tolist() for b in plan.bins()] == [[0], [1], [2]]


def test_partition_padded_worked_example_and_canonical_tie(backend):
    # Sorted: 10(i0) 9(i3) 8(i5) 2(i4) 1(i1) 1(i2). Splits (by sorted position) costing 34: |10|9 8|2 1 1|,
    # |10 9|8|2 1 1| and |10 9 8|2|1 1|; every other split costs more. The canonical one has the smallest
    # boundaries: (1, 3).
    batches = partition_padded([10, 1, 1, 9, 2, 8], 3, backend=backend)
    assert [b.tolist() for b in batches] == [[0], [3, 5], [4, 1, 2]]
    assert all(b.dtype == np.int64 for b in batches)


def test_partition_padded_with_cap(backend):
    # Sorted 6(i0) 5(i1) 5(i2) 5(i3). Two batches: |6|5 5 5| costs 6 + 15 = 21 (best), |6 5|5 5| 12 + 10 = 22,
    # |6 5 5|5| 18 + 5 = 23. A cap of 14 forbids the 15-slot batch, leaving |6 5|5 5|; a cap of 11 leaves nothing.
    lengths = [6, 5, 5, 5]
    assert [b.tolist() for b in partition_padded(lengths, 2, backend=backend)] == [[0], [1, 2, 3]]
    capped = partition_padded(lengths, 2, max_tokens_per_batch=14, backend=backend)
    assert [b.tolist() for b in capped] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="no split of 4 items into 2 batches"):
        partition_padded(lengths, 2, max_tokens_per_batch=11, backend=backend)
    # Three batches: |6|5|5 5| and |6|5 5|5| both cost 21; the canonical split has the smaller boundaries.
    assert [b.tolist() for b in partition_padded(lengths, 3, max_tokens_per_batch=14, backend=backend)] == [
        [0], [1], [2, 3]]


def test_partition_single_batch_and_one_per_item(backend):
    assert [b.tolist() for b in partition_padded([2, 5, 3], 1, backend=backend)] == [[1, 2, 0]]
    assert [b.tolist() for b in partition_padded([2, 5, 3], 3, backend=backend)] == [[1], [2], [0]]


def test_balance_examples(backend):
    parts = balance([10, 1, 1, 9, 2, 8, 7, 7], 3, backend=backend)
    assert sorted(i for p in parts for i in p.tolist()) == list(range(8))
    loads = sorted(int(np.asarray([10, 1, 1, 9, 2, 8, 7, 7])[p].sum()) for p in parts)
    assert max(loads) == 16  # the optimum: 45 over 3 parts, and 10, 9 and 8 can't be evened out below 16
    parts = balance([5, 5, 5, 5], 2, equal_count=True, backend=backend)
    assert sorted(len(p) for p in parts) == [2, 2]
    for p in parts:
        assert p.tolist() == sorted(p.tolist())


def test_balance_more_parts_than_items(backend):
    parts = balance([4, 2], 4, backend=backend)
    assert len(parts) == 4
    assert sorted(len(p) for p in parts) == [0, 0, 1, 1]
    parts = balance([4, 2, 9], 5, equal_count=True, backend=backend)
    assert sorted(len(p) for p in parts) == [0, 0, 1, 1, 1]


def test_balance_zero_costs(backend):
    parts = balance([0, 0, 0, 0, 0], 2, equal_count=True, backend=backend)
    assert sorted(len(p) for p in parts) == [2, 3]


def test_packplan_helpers():
    plan = PackPlan(bin_ptr=np.array([0, 2, 3]), items=np.array([1, 0, 2]), bin_lengths=np.array([5, 2]),
                    capacity=6)
    assert plan.bin(0).tolist() == [1, 0] and plan.bin(1).tolist() == [2]
    assert "n_bins=2" in repr(plan)
    assert plan != PackPlan(bin_ptr=np.array([0, 3]), items=np.array([1, 0, 2]), bin_lengths=np.array([7]),
                            capacity=8)


# ----------------------------------------------------------------------------------------------------------------
# Memory at scale (scaled-down; real sizes are in benchmarks/bench_packing_scale.py)
# ----------------------------------------------------------------------------------------------------------------


def _traced_peak(fn) -> int:
    """Peak bytes that Python and numpy allocate while fn runs (numpy reports its buffers to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["one bin", "many bins"])
def test_python_bfd_memory_stays_linear_when_free_spaces_are_all_distinct(kind):
    """At a huge capacity every placement makes a new free-space value. The spec kept an (empty) queue for every
    value ever reached: about 930 bytes per item (9 GB at 10M lengths); it must stay a small multiple of the
    arrays it returns."""
    from opensloth.packing import _python as spec

    n = 30_000
    rng = np.random.default_rng(0)
    capacity = 2**40
    lengths = rng.integers(8, 4096, n) if kind == "one bin" else rng.integers(1, capacity, n)
    plan = spec.pack_bfd(lengths.astype(np.int64), capacity)
    assert (len(plan[2]) == 1) == (kind == "one bin")
    assert _traced_peak(lambda: spec.pack_bfd(lengths.astype(np.int64), capacity)) < 300 * n


def _even_costs(n: int) -> np.ndarray:
    """Even costs whose total is 2 mod 4: two parts cannot be equal, and no move or swap (every d even) closes a
    gap of 2, so the refinement's last round finds no candidate after inspecting every pair."""
    costs = 2 * np.random.default_rng(1).integers(1, 1000, n)
    if costs.sum() % 4 == 0:
        costs[0] += 2
    return costs


@functools.cache
def _python_balance(n: int, equal_count: bool) -> list[list[int]]:
    return [p.tolist() for p in balance(_even_costs(n), 2, equal_count=equal_count, backend="python")]


@pytest.mark.parametrize("equal_count", [False, True])
def test_balance_refinement_round_without_a_candidate_at_scale(backend, equal_count):
    """60k items in 2 parts: the round that finds no candidate used to scan 30k x 30k pairs in numba and python
    (a minute in python at this size, hours at 10M); the sorted search is O(n log n) on every backend."""
    n = 60_000
    costs = _even_costs(n)
    parts = [p.tolist() for p in balance(costs, 2, equal_count=equal_count, backend=backend)]
    loads = sorted(int(costs[p].sum()) for p in parts)
    assert loads[1] - loads[0] == 2
    assert parts == _python_balance(n, equal_count)


def test_python_refinement_never_builds_pair_arrays():
    """The spec's refinement scanned pairs in chunks of 4M (over 100 MB of temporary arrays: ~14 kB per item at 10k
    items); the sorted search needs arrays as long as the two parts."""
    n = 10_000
    costs = _even_costs(n)
    assert _traced_peak(lambda: balance(costs, 2, backend="python")) < 1000 * n


def test_partition_padded_refuses_what_will_not_fit_before_allocating(backend, monkeypatch):
    """10M lengths into 1,024 batches used to die in bad_alloc / numba 'Allocation failed' (a 4-8 GB table per 1M
    lengths); the need is now computed first and a call above the limit is refused with the numbers and the fix."""
    monkeypatch.setenv("OPENSLOTH_PACKING_MEMORY_GB", "0.001")
    with pytest.raises(ValueError, match=r"partition_padded of 20,000 lengths into 100 batches needs about "
                                         r"[\d.]+ MiB of working memory even holding split points for \d+ batches at "
                                         r"a time, above the limit of 1\.0 MiB \(OPENSLOTH_PACKING_MEMORY_GB\); "
                                         r"partition fewer lengths per call .* raise OPENSLOTH_PACKING_MEMORY_GB"):
        partition_padded(np.ones(20_000, dtype=np.int64), 100, backend=backend)
    assert len(partition_padded(np.ones(500, dtype=np.int64), 100, backend=backend)) == 100  # 0.05 MiB


@pytest.mark.parametrize("raw", ["lots", "0", "-2", "nan", "inf"])
def test_memory_limit_must_be_a_positive_number_of_gib(raw, monkeypatch):
    monkeypatch.setenv("OPENSLOTH_PACKING_MEMORY_GB", raw)
    with pytest.raises(ValueError, match=rf"OPENSLOTH_PACKING_MEMORY_GB='{raw}' is not a positive number of GiB"):
        partition_padded([3, 1, 2], 2)


def test_partition_padded_in_blocks_gives_the_same_split(backend, monkeypatch):
    """With the table budget at 0 every call holds only ~sqrt(2 K) rows of split points and recomputes the rest:
    the same batches, caps and infeasible prefixes included."""
    from opensloth.packing import _validate

    rng = np.random.default_rng(4)
    cases = []
    for _ in range(40):
        n = int(rng.integers(1, 120))
        lengths = rng.integers(1, int(rng.choice([3, 50, 5000])), n)
        k = int(rng.integers(1, n + 1))
        cap = None if rng.random() < 0.5 else int(rng.integers(lengths.max(), lengths.max() * n + 1))
        cases.append((lengths, k, cap))

    def run():
        out = []
        for lengths, k, cap in cases:
            try:
                out.append([b.tolist() for b in partition_padded(lengths, k, max_tokens_per_batch=cap,
                                                                 backend=backend)])
            except ValueError as exc:
                out.append(str(exc))
        return out

    whole = run()
    monkeypatch.setattr(_validate, "PARTITION_TABLE_BYTES", 0)
    assert any(_validate.partition_rows(len(lengths), k) < k - 1 for lengths, k, _ in cases)
    assert run() == whole


_PEAK_SCRIPT = """
import sys
import numpy as np
from opensloth import packing
from benchmarks._peak_memory import peak_added, peak_start

function, backend, n, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
values = np.random.default_rng(0).integers(1, 4096, n)
call = getattr(packing, function)
call(values[:300], 20, backend=backend)  # imports, numba kernels
start, exact = peak_start()
call(values, k, backend=backend)
print(peak_added(start, exact))
"""


def _peak_added(function: str, backend: str, n: int, k: int) -> int:
    """Bytes of resident memory ``opensloth.packing.<function>(values, k)`` adds at its peak, in a fresh process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]  # the child imports benchmarks._peak_memory
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, function, backend, str(n), str(k)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_partition_padded_peak_memory_is_what_was_planned(backend):
    """The peak the call adds stays within the planned need, far below the full table of split points it used to
    allocate (200k lengths into 700 batches: 533 MiB native, 1.07 GiB numba and python)."""
    from opensloth.packing import _validate

    if backend == "python":  # too slow at that size: the same check at a small one, with every row block recomputed
        n, k = 150, 120
        lengths = np.random.default_rng(0).integers(1, 4096, n)
        partition_padded(lengths[:20], 5, backend=backend)
        table = _validate.PARTITION_TABLE_BYTES
        try:
            _validate.PARTITION_TABLE_BYTES = 0
            rows = _validate.partition_rows(n, k)
            peak = _traced_peak(lambda: partition_padded(lengths, k, backend=backend))
        finally:
            _validate.PARTITION_TABLE_BYTES = table
        slack = 16 << 10
    else:
        n, k = 200_000, 700
        rows = _validate.partition_rows(n, k)
        peak = _peak_added("partition_padded", backend, n, k)
        slack = 16 << 20
    need = _validate.partition_memory(n, k, rows)
    assert rows < k - 1 and need * 4 < (k - 1) * (n + 1) * 8
    assert peak <= need + slack


def test_balance_memory_follows_the_live_solutions_not_items_times_parts(backend):
    """Karmarkar-Karp starts from one partial solution per item (or group), each of num_parts subsets. The numba and
    python backends built them all up front: n x num_parts sums and lists (40k items into 2,000 parts: 1.5 GB numba,
    6 GB python; ~22 kB per item in python at 3k items into 300 parts). They are now built when first merged, as
    natively, so memory follows the live solutions."""
    if backend == "python":  # the same at a size pure Python runs in seconds
        n, k = 3000, 300
        costs = np.random.default_rng(0).integers(1, 4096, n)
        balance(costs[:10], 3, backend=backend)
        assert _traced_peak(lambda: balance(costs, k, backend=backend)) < 1000 * n
        return
    assert _peak_added("balance", backend, 40_000, 2000) < 64 << 20
