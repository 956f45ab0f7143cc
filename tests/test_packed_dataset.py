"""The packed-dataset builder (opensloth.data.packed): every overlong policy, label sources, edge cases, bad input,
and the real shared data checked token by token and against TRL's pack_dataset."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

datasets = pytest.importorskip("datasets")

from opensloth.data.packed import OVERLONG_POLICIES, PackingStats, build_packed_dataset, packing_stats  # noqa: E402
from opensloth.packing import STRATEGIES  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Independent oracles
# ---------------------------------------------------------------------------------------------------------------


def rows_of(packed) -> list[tuple[list[int], list[int], list[int]]]:
    d = packed.to_dict()
    return list(zip(d["input_ids"], d["labels"], d["seq_lengths"]))


def unpack(packed, capacity: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The samples of a packed dataset, cut out of each row by its seq_lengths; checks the row invariants."""
    samples = []
    for ids, labels, seq_lengths in rows_of(packed):
        assert len(ids) == len(labels), "a row's labels must match its input_ids"
        assert len(ids) <= capacity, f"row of {len(ids)} tokens exceeds capacity {capacity}"
        assert sum(seq_lengths) == len(ids), "seq_lengths must sum to the row length"
        assert len(seq_lengths) > 0 and all(n > 0 for n in seq_lengths)
        pos = 0
        for n in seq_lengths:
            samples.append((tuple(ids[pos : pos + n]), tuple(labels[pos : pos + n])))
            pos += n
    return samples


def expected_samples(ids_list, labels_list, capacity, policy):
    """What each policy should leave, written with plain list slicing."""
    out = []
    for ids, labels in zip(ids_list, labels_list):
        if not ids:
            continue
        if len(ids) > capacity:
            if policy == "truncate":
                ids, labels = ids[:capacity], labels[:capacity]
            elif policy == "drop":
                continue
            elif policy == "split":
                for p in range(0, len(ids), capacity):
                    out.append((tuple(ids[p : p + capacity]), tuple(labels[p : p + capacity])))
                continue
        out.append((tuple(ids), tuple(labels)))
    return out


def make_dataset(lengths, *, seed=0, labels=True, start=1):
    """Samples whose tokens are unique (so any misplaced token is visible) and labels that differ from them."""
    rng = np.random.default_rng(seed)
    ids, labs = [], []
    nxt = start
    for n in lengths:
        row = list(range(nxt, nxt + n))
        nxt += n
        ids.append(row)
        labs.append([t if rng.random() < 0.7 else -100 for t in row])
    data = {"input_ids": ids}
    if labels:
        data["labels"] = labs
    return datasets.Dataset.from_dict(data), ids, labs


# ---------------------------------------------------------------------------------------------------------------
# Overlong policies
# ---------------------------------------------------------------------------------------------------------------

LENGTHS = [5, 12, 3, 0, 7, 20, 1, 8, 8, 0, 9]
CAP = 8


@pytest.mark.parametrize("policy", ["truncate", "split", "drop"])
def test_policy_keeps_exactly_the_expected_tokens(policy):
    ds, ids, labs = make_dataset(LENGTHS)
    packed, stats = build_packed_dataset(ds, CAP, overlong=policy, return_stats=True)
    got = unpack(packed, CAP)
    want = expected_samples(ids, labs, CAP, policy)
    assert Counter(got) == Counter(want)
    assert len(got) == len(want) == stats.n_samples
    assert stats.n_rows == len(packed)
    assert stats.n_tokens == sum(len(s[0]) for s in want)
    assert stats.n_empty == 2 and stats.n_input == len(LENGTHS)
    overlong = [n for n in LENGTHS if n > CAP]
    assert stats.n_overlong == len(overlong) == 3
    assert stats.lower_bound == math.ceil(stats.n_tokens / CAP)
    assert stats.efficiency == pytest.approx(stats.n_tokens / (stats.n_rows * CAP))
    if policy == "truncate":
        assert (stats.n_truncated, stats.n_truncated_tokens) == (3, sum(n - CAP for n in overlong))
        assert stats.n_split == stats.n_dropped == 0
    elif policy == "drop":
        assert (stats.n_dropped, stats.n_dropped_tokens) == (3, sum(overlong))
        assert stats.n_truncated == stats.n_split == 0
    else:
        assert (stats.n_split, stats.n_split_pieces) == (3, sum(-(-n // CAP) for n in overlong))
        assert stats.n_truncated == stats.n_dropped == 0


def test_truncate_keeps_the_prefix():
    ds = datasets.Dataset.from_dict({"input_ids": [list(range(100, 110))], "labels": [list(range(200, 210))]})
    rows = rows_of(build_packed_dataset(ds, 4))
    assert rows == [([100, 101, 102, 103], [200, 201, 202, 203], [4])]


def test_split_keeps_every_token_in_order_across_pieces():
    lengths = [23, 8, 17, 3, 16]
    cap = 8
    ds, ids, _ = make_dataset(lengths, labels=False)
    packed = build_packed_dataset(ds, cap, overlong="split")
    owner = {t: (i, p) for i, row in enumerate(ids) for p, t in enumerate(row)}  # token -> (sample, position)
    pieces: dict[int, list[tuple[int, int]]] = {}
    seen = []
    for row_ids, _, seq_lengths in rows_of(packed):
        pos = 0
        for n in seq_lengths:
            piece = row_ids[pos : pos + n]
            pos += n
            sample, first = owner[piece[0]]
            assert first % cap == 0, "pieces start at multiples of the capacity"
            assert piece == ids[sample][first : first + n], "a piece is a contiguous run of its sample, in order"
            pieces.setdefault(sample, []).append((first, n))
            seen.extend(piece)
    assert sorted(seen) == sorted(t for row in ids for t in row), "every token exactly once"
    for sample, parts in pieces.items():
        parts.sort()
        assert [first for first, _ in parts] == list(range(0, lengths[sample], cap))
        assert [n for _, n in parts] == [min(cap, lengths[sample] - f) for f, _ in parts]


def test_drop_removes_and_counts():
    ds, ids, labs = make_dataset([3, 9, 4, 10, 2])
    packed, stats = build_packed_dataset(ds, 8, overlong="drop", return_stats=True)
    got = unpack(packed, 8)
    assert sorted(len(s[0]) for s in got) == [2, 3, 4]
    assert (stats.n_dropped, stats.n_dropped_tokens, stats.n_overlong) == (2, 19, 2)
    assert all(t not in {x for s in got for x in s[0]} for t in ids[1] + ids[3])


def test_error_policy_names_index_length_capacity_and_the_alternatives():
    ds, _, _ = make_dataset([3, 4, 11, 2, 13])
    with pytest.raises(ValueError) as info:
        build_packed_dataset(ds, 8, overlong="error")
    msg = str(info.value)
    assert "sample 2" in msg and "11 tokens" in msg and "capacity 8" in msg
    for other in ("truncate", "split", "drop"):
        assert other in msg
    # Nothing overlong: "error" packs normally.
    out = build_packed_dataset(ds.select([0, 1, 3]), 8, overlong="error")
    assert sum(len(r[0]) for r in rows_of(out)) == 9


def test_policies_constant_names_every_policy():
    assert set(OVERLONG_POLICIES) == {"truncate", "split", "drop", "error"}


# ---------------------------------------------------------------------------------------------------------------
# Label sources
# ---------------------------------------------------------------------------------------------------------------


def test_no_labels_means_labels_equal_input_ids():
    ds, ids, _ = make_dataset([4, 6, 2], labels=False)
    rows = rows_of(build_packed_dataset(ds, 8))
    for row_ids, row_labels, _ in rows:
        assert row_labels == row_ids
    assert Counter(unpack(build_packed_dataset(ds, 8), 8)) == Counter((tuple(r), tuple(r)) for r in ids)


@pytest.mark.parametrize("as_bool", [False, True])
def test_assistant_masks_become_labels(as_bool):
    ids = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35]]
    masks = [[0, 0, 1, 1], [1, 0, 1], [0, 1, 1, 1, 0]]
    col = [[bool(m) for m in row] for row in masks] if as_bool else masks
    ds = datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": col})
    want = [(tuple(r), tuple(t if m else -100 for t, m in zip(r, mk))) for r, mk in zip(ids, masks)]
    assert Counter(unpack(build_packed_dataset(ds, 8), 8)) == Counter(want)


def test_labels_win_over_assistant_masks():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[-100, 7, 8]],
                                     "assistant_masks": [[1, 1, 1]], "text": ["abc"]})
    packed = build_packed_dataset(ds, 4)
    assert packed.column_names == ["input_ids", "labels", "seq_lengths"]
    assert rows_of(packed) == [([1, 2, 3], [-100, 7, 8], [3])]


def test_labels_with_their_own_offsets():
    """labels stored with a layout different from input_ids (a slice of a larger column) still line up."""
    import pyarrow as pa

    ids = pa.array([[1, 2, 3], [4, 5], [6]], type=pa.list_(pa.int64()))
    labels = pa.array([[0, 0, 0, 0], [-1, -2, -3], [-4, -5], [-6]], type=pa.list_(pa.int64())).slice(1)
    ds = datasets.Dataset(datasets.table.InMemoryTable(pa.table({"input_ids": ids, "labels": labels})))
    got = unpack(build_packed_dataset(ds, 3), 3)
    assert Counter(got) == Counter([((1, 2, 3), (-1, -2, -3)), ((4, 5), (-4, -5)), ((6,), (-6,))])


def test_label_length_mismatch_is_a_clear_error():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5]], "labels": [[1, 2], [3, 4]]})
    with pytest.raises(ValueError, match=r"row 1: labels has 2 values but input_ids has 3 tokens"):
        build_packed_dataset(ds, 8)


# ---------------------------------------------------------------------------------------------------------------
# Empty input, capacity edges, layout variants
# ---------------------------------------------------------------------------------------------------------------


def test_empty_dataset_and_all_empty_samples():
    empty = datasets.Dataset.from_dict({"input_ids": [[1]]}).select([])
    packed, stats = build_packed_dataset(empty, 16, return_stats=True)
    assert len(packed) == 0 and packed.column_names == ["input_ids", "labels", "seq_lengths"]
    assert (stats.n_rows, stats.n_samples, stats.n_input, stats.efficiency) == (0, 0, 0, 0.0)
    blanks = datasets.Dataset.from_dict({"input_ids": [[], [], []]}, features=datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int64"))}))
    packed, stats = build_packed_dataset(blanks, 16, return_stats=True)
    assert len(packed) == 0 and stats.n_empty == 3 and stats.n_input == 3


def test_empty_samples_are_dropped_and_counted():
    ds, ids, labs = make_dataset([0, 4, 0, 0, 3])
    packed, stats = build_packed_dataset(ds, 8, return_stats=True)
    assert stats.n_empty == 3 and stats.n_samples == 2
    assert Counter(unpack(packed, 8)) == Counter(expected_samples(ids, labs, 8, "truncate"))


def test_null_rows_count_as_empty():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2], None, [3]], "labels": [[5, 6], None, [7]]})
    packed, stats = build_packed_dataset(ds, 4, return_stats=True)
    assert stats.n_empty == 1 and stats.n_samples == 2
    assert rows_of(packed) == [([1, 2, 3], [5, 6, 7], [2, 1])]


@pytest.mark.parametrize("policy", ["truncate", "split", "drop"])
def test_capacity_one(policy):
    ds, ids, labs = make_dataset([1, 3, 1, 2])
    packed, stats = build_packed_dataset(ds, 1, overlong=policy, return_stats=True)
    assert all(len(r[0]) == 1 for r in rows_of(packed))
    assert Counter(unpack(packed, 1)) == Counter(expected_samples(ids, labs, 1, policy))
    assert stats.efficiency == (1.0 if stats.n_rows else 0.0)


def test_capacity_equal_to_longest_and_one_below():
    lengths = [6, 2, 4, 6, 1]
    ds, ids, labs = make_dataset(lengths)
    _, stats = build_packed_dataset(ds, 6, overlong="error", return_stats=True)
    assert stats.n_overlong == 0 and stats.n_tokens == sum(lengths)
    packed, stats = build_packed_dataset(ds, 5, return_stats=True)
    assert stats.n_overlong == 2 and stats.n_truncated_tokens == 2
    assert Counter(unpack(packed, 5)) == Counter(expected_samples(ids, labs, 5, "truncate"))


def test_capacity_larger_than_everything_gives_one_row():
    ds, ids, _ = make_dataset([5, 9, 2, 7])
    rows = rows_of(build_packed_dataset(ds, 10_000))
    assert len(rows) == 1
    assert rows[0][2] == [9, 7, 5, 2], "samples are placed longest first"
    assert rows[0][0] == ids[1] + ids[3] + ids[0] + ids[2]


def test_best_fit_placement_on_a_hand_example():
    # BFD with capacity 10: 7 -> bin0 (free 3), 6 -> bin1 (4), 4 -> bin1 (0), 3 -> bin0 (0), 2 -> bin2.
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * 3, [2] * 7, [3] * 2, [4] * 6, [5] * 4]})
    rows = rows_of(build_packed_dataset(ds, 10))
    assert [r[2] for r in rows] == [[7, 3], [6, 4], [2]]
    assert rows[0][0] == [2] * 7 + [1] * 3


def test_chunked_gather_matches_one_chunk():
    ds, _, _ = make_dataset(np.random.default_rng(3).integers(0, 40, size=300).tolist(), seed=3)
    whole = build_packed_dataset(ds, 64, overlong="split")
    for chunk in (1, 7, 100):
        assert build_packed_dataset(ds, 64, overlong="split", chunk_tokens=chunk, progress=False).to_dict() \
            == whole.to_dict()


@pytest.mark.parametrize("combine", [False, True])
@pytest.mark.parametrize("policy", ["truncate", "split", "drop"])
def test_every_gather_path_builds_the_expected_rows(backend, policy, combine, monkeypatch):
    """Each backend (native, numba, python -> the numpy gather) builds the same rows, which hold exactly the
    expected tokens, from several arrow chunks read in place (or combined first, as for many tiny chunks), into
    several output chunks, with assistant-mask labels."""
    import opensloth.data.packed as packed_mod

    monkeypatch.setattr(packed_mod, "_MIN_ROWS_PER_CHUNK", 64 if combine else 1)
    lens = [3, 17, 0, 9, 12, 1, 30, 4, 0, 11]
    ids = [list(range(i * 100, i * 100 + n)) for i, n in enumerate(lens)]
    masks = [[j % 2 for j in range(n)] for n in lens]
    part = [datasets.Dataset.from_dict({"input_ids": ids[a:b], "assistant_masks": masks[a:b]})
            for a, b in [(0, 4), (4, 5), (5, 10)]]
    ds = datasets.concatenate_datasets(part)
    assert ds.data.column("input_ids").num_chunks == 3
    assert len(packed_mod._list_column(ds.data.table, "input_ids").sources) == (1 if combine else 3)
    got = build_packed_dataset(ds, 10, overlong=policy, chunk_tokens=11, backend=backend)
    assert got.data.column("input_ids").num_chunks > 1
    labels = [[t if j % 2 else -100 for j, t in enumerate(r)] for r in ids]
    assert Counter(unpack(got, 10)) == Counter(expected_samples(ids, labels, 10, policy))
    ref = build_packed_dataset(datasets.Dataset.from_dict(ds.to_dict()), 10, overlong=policy, backend="python")
    assert got.to_dict() == ref.to_dict()


def test_indices_mapping_and_multiple_arrow_chunks():
    ds, _, _ = make_dataset(np.random.default_rng(5).integers(1, 30, size=200).tolist(), seed=5)
    view = ds.shuffle(seed=1).select(range(150))  # an indices mapping over the table
    plain = datasets.Dataset.from_dict(view.to_dict())
    assert build_packed_dataset(view, 32).to_dict() == build_packed_dataset(plain, 32).to_dict()
    parts = datasets.concatenate_datasets([plain.select(range(0, 50)), plain.select(range(50, 150))])
    assert parts.data.column("input_ids").num_chunks > 1
    assert build_packed_dataset(parts, 32).to_dict() == build_packed_dataset(plain, 32).to_dict()


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "bfd"])
def test_other_strategies_pack_every_token(strategy):
    ds, ids, labs = make_dataset(np.random.default_rng(7).integers(0, 50, size=120).tolist(), seed=7)
    packed, stats = build_packed_dataset(ds, 64, strategy=strategy, overlong="split", return_stats=True)
    assert Counter(unpack(packed, 64)) == Counter(expected_samples(ids, labs, 64, "split"))
    assert stats.strategy == strategy and stats.n_rows >= stats.lower_bound


def test_every_backend_gives_the_same_rows(backend):
    ds, _, _ = make_dataset(np.random.default_rng(11).integers(0, 70, size=400).tolist(), seed=11)
    ref = build_packed_dataset(ds, 64, overlong="split", backend="python")
    assert build_packed_dataset(ds, 64, overlong="split", backend=backend).to_dict() == ref.to_dict()


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 14), max_size=25), capacity=st.integers(1, 12),
       policy=st.sampled_from(["truncate", "split", "drop"]))
def test_property_tokens_and_labels_survive(lengths, capacity, policy):
    ds, ids, labs = make_dataset(lengths, seed=len(lengths))
    if not lengths:
        ds = datasets.Dataset.from_dict({"input_ids": [[1]], "labels": [[1]]}).select([])
    packed, stats = build_packed_dataset(ds, capacity, overlong=policy, return_stats=True)
    want = expected_samples(ids, labs, capacity, policy)
    assert Counter(unpack(packed, capacity)) == Counter(want)
    assert stats.n_rows >= stats.lower_bound == -(-sum(len(s[0]) for s in want) // capacity)


# ---------------------------------------------------------------------------------------------------------------
# DatasetDict, stats, bad input
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_dict_packs_each_split():
    train, tids, tlabs = make_dataset([5, 9, 3, 2])
    test, sids, slabs = make_dataset([4, 4], start=10_000)
    packed, stats = build_packed_dataset(datasets.DatasetDict(train=train, test=test), 8, return_stats=True)
    assert set(packed) == {"train", "test"} and set(stats) == {"train", "test"}
    assert Counter(unpack(packed["train"], 8)) == Counter(expected_samples(tids, tlabs, 8, "truncate"))
    assert Counter(unpack(packed["test"], 8)) == Counter(expected_samples(sids, slabs, 8, "truncate"))
    assert stats["test"].n_rows == 1 and stats["train"].n_truncated == 1
    assert packing_stats(packed) == stats


def test_stats_are_stored_and_survive_save_and_load(tmp_path):
    ds, _, _ = make_dataset([5, 9, 3, 2])
    packed, stats = build_packed_dataset(ds, 8, return_stats=True)
    assert isinstance(stats, PackingStats)
    assert packing_stats(packed) == stats
    packed.save_to_disk(str(tmp_path / "p"))
    again = datasets.load_from_disk(str(tmp_path / "p"))
    assert packing_stats(again) == stats
    assert again.to_dict() == packed.to_dict()
    assert packing_stats(ds) is None
    assert "rows of capacity 8" in stats.summary()


def test_output_is_deterministic_with_a_stable_fingerprint():
    ds, _, _ = make_dataset([5, 9, 3, 2, 6])
    a, b = build_packed_dataset(ds, 8), build_packed_dataset(ds, 8)
    assert a.to_dict() == b.to_dict()
    assert a._fingerprint == b._fingerprint != build_packed_dataset(ds, 9)._fingerprint


def test_bad_input_errors():
    ds, _, _ = make_dataset([3, 4])
    with pytest.raises(ValueError, match=r"no 'input_ids' column.*tokenise"):
        build_packed_dataset(datasets.Dataset.from_dict({"text": ["a"]}), 8)
    for cap in (0, -4):
        with pytest.raises(ValueError, match=rf"capacity = {cap} must be a positive integer"):
            build_packed_dataset(ds, cap)
    for cap in (2.5, True, "8", None):
        with pytest.raises(TypeError, match="capacity must be a positive integer"):
            build_packed_dataset(ds, cap)
    with pytest.raises(ValueError, match="overlong = 'chop' is not a policy"):
        build_packed_dataset(ds, 8, overlong="chop")
    with pytest.raises(ValueError, match="unknown packing strategy 'nfd'"):
        build_packed_dataset(ds, 8, strategy="nfd")
    with pytest.raises(TypeError, match="takes a datasets.Dataset or DatasetDict, got dict"):
        build_packed_dataset({"input_ids": [[1, 2]]}, 8)
    with pytest.raises(TypeError, match=r"column 'input_ids' has type string"):
        build_packed_dataset(datasets.Dataset.from_dict({"input_ids": ["a b"]}), 8)
    with pytest.raises(TypeError, match=r"column 'input_ids' holds lists of double"):
        build_packed_dataset(datasets.Dataset.from_dict({"input_ids": [[1.5, 2.0]]}), 8)
    with pytest.raises(ValueError, match="chunk_tokens"):
        build_packed_dataset(ds, 8, chunk_tokens=0)


@pytest.mark.parametrize("null_row", [None, 0, 1])
def test_decreasing_arrow_offsets_are_refused_before_any_copy(null_row):
    """The gather trusts the builder's segments because they come from list offsets; offsets that break arrow's
    rule (never decreasing; arrow's cheap validation does not check it) are refused instead of read, also under a
    null row."""
    import pyarrow as pa

    offsets = pa.array([0, 3, 1, 4], type=pa.int32()).buffers()[1]
    validity = None if null_row is None else pa.array([i != null_row for i in range(3)]).buffers()[1]
    bad = pa.ListArray.from_buffers(pa.list_(pa.int64()), 3, [validity, offsets],
                                    children=[pa.array([1, 2, 3, 4], type=pa.int64())])
    ds = datasets.Dataset(datasets.table.InMemoryTable(pa.table({"input_ids": bad})))
    with pytest.raises(ValueError, match="decreasing list offsets"):
        build_packed_dataset(ds, 8)


def test_importing_the_module_imports_no_trainer_stack():
    import subprocess
    import sys

    code = ("import sys, opensloth.data.packed; "
            "bad = [m for m in ('datasets', 'trl', 'unsloth') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# The segment gather behind the builder (opensloth.packing._gather): every implementation, one oracle
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def gather_name(backend):
    """The gather implementation that goes with each packing backend (python -> numpy)."""
    return {"python": "numpy"}.get(backend, backend)


def slices_oracle(values, starts, lengths, order=None, chunks=None):
    sources = [values] if isinstance(values, np.ndarray) else values
    idx = range(len(starts)) if order is None else order
    out = []
    for j in idx:
        src = sources[0 if chunks is None else chunks[j]]
        out.extend(src[starts[j] : starts[j] + lengths[j]].tolist())
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.int8, np.uint16, np.int32, np.int64, np.uint64, np.bool_]),
       n_sources=st.integers(1, 3))
def test_gather_property_every_implementation_equals_slicing(data, dtype, n_sources):
    from opensloth.packing import backend_error
    from opensloth.packing._gather import GATHER_BACKENDS, gather_segments

    sizes = data.draw(st.lists(st.integers(0, 12), min_size=n_sources, max_size=n_sources))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    sources = [(rng.random(n) < 0.5) if dtype == np.bool_ else
               rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, n, endpoint=True, dtype=dtype) for n in sizes]
    segs = data.draw(st.lists(st.integers(0, n_sources - 1).flatmap(
        lambda c: st.integers(0, sizes[c]).flatmap(
            lambda a: st.integers(a, sizes[c]).map(lambda b: (c, a, b - a)))), max_size=10))
    chunks = [c for c, _, _ in segs]
    starts = [a for _, a, _ in segs]
    lengths = [n for _, _, n in segs]
    order = data.draw(st.none() | st.lists(st.integers(0, len(segs) - 1), max_size=15) if segs else st.none())
    want = slices_oracle(sources, starts, lengths, order, chunks)
    for name in GATHER_BACKENDS:
        if name != "numpy" and backend_error(name) is not None:
            continue
        got = gather_segments(sources, starts, lengths, order, chunks=chunks if n_sources > 1 or segs else None,
                              backend=name)
        assert got.dtype == dtype and got.tolist() == want, name


def test_gather_large_random_input_same_on_every_implementation(gather_name):
    from opensloth.packing._gather import gather_segments

    rng = np.random.default_rng(30)
    sources = [rng.integers(-(2**40), 2**40, int(n)) for n in rng.integers(0, 5000, 8)]
    n = 3000
    chunks = rng.integers(0, 8, n)
    sizes = np.array([len(s) for s in sources])[chunks]
    starts = (rng.random(n) * (sizes + 1)).astype(np.int64)
    lengths = np.minimum(rng.integers(0, 300, n), sizes - starts)
    order = rng.permutation(n)[: n - 100]
    want = np.concatenate([sources[chunks[j]][starts[j] : starts[j] + lengths[j]] for j in order])
    out = np.empty(want.shape[0], dtype=np.int64)
    got = gather_segments(sources, starts, lengths, order, chunks=chunks, out=out, backend=gather_name)
    assert got is out
    np.testing.assert_array_equal(out, want)


def test_gather_backend_choice(monkeypatch):
    from opensloth.packing._gather import gather_backend

    assert gather_backend("python") == gather_backend("numpy") == "numpy"
    monkeypatch.setenv("OPENSLOTH_BACKEND", "python")
    assert gather_backend(None) == "numpy", "None follows the packing backend in use"
    assert gather_backend("auto") in ("native", "numba", "numpy")
    with pytest.raises(ValueError, match="unknown gather backend 'cuda'"):
        gather_backend("cuda")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(values=np.arange(5.0)), TypeError, r"values has dtype float64; token and label values must be integers"),
    (dict(values=[np.arange(5), np.arange(5, dtype=np.int32)], chunks=[0]), TypeError,
     r"values\[1\] has dtype int32 but values\[0\] has int64"),
    (dict(values=[]), ValueError, "values is an empty sequence"),
    (dict(values="abc"), TypeError, "values must be a numpy array or a sequence of them"),
    (dict(values=np.arange(6).reshape(2, 3)), ValueError, r"values must be 1-D, got shape \(2, 3\)"),
    (dict(starts=[0.5]), TypeError, "starts must hold integers, got dtype float64"),
    (dict(starts=[[0]]), ValueError, "starts must be a 1-D array"),
    (dict(lengths=[1, 2]), ValueError, "starts has 1 entries but lengths has 2"),
    (dict(lengths=[-1]), ValueError, r"lengths\[0\] = -1 is negative"),
    (dict(starts=[4], lengths=[2]), ValueError, r"segment 0 = \[4, 4 \+ 2\) lies outside its source array of 5"),
    (dict(starts=[-1]), ValueError, r"segment 0 = \[-1, -1 \+ 2\) lies outside"),
    (dict(order=[1]), ValueError, r"order\[0\] = 1 is not a segment index in \[0, 1\)"),
    (dict(values=[np.arange(5), np.arange(5)]), ValueError, "pass chunks"),
    (dict(chunks=[3]), ValueError, r"chunks\[0\] = 3 is not an index into values \(1 arrays\)"),
    (dict(chunks=[0, 0]), ValueError, "chunks has 2 entries but there are 1 segments"),
    (dict(out=np.empty(3, dtype=np.int64)), ValueError, "out has 3 elements but the segments hold 2"),
    (dict(out=np.empty(2, dtype=np.int32)), TypeError, "out has dtype int32 but the values have int64"),
    (dict(out=np.empty(4, dtype=np.int64)[::2]), ValueError, "writeable, C-contiguous 1-D"),
    (dict(out=[0, 0]), TypeError, "out must be a numpy array"),
])
def test_gather_validation_messages_are_the_same_on_every_implementation(gather_name, kwargs, error, message):
    from opensloth.packing._gather import gather_segments

    args = dict(values=np.arange(5), starts=[1], lengths=[2], order=None, chunks=None, out=None)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        gather_segments(args.pop("values"), args.pop("starts"), args.pop("lengths"), args.pop("order"),
                        backend=gather_name, **args)


def test_gather_refuses_an_output_that_overlaps_the_values(gather_name):
    from opensloth.packing._gather import gather_segments

    values = np.arange(10)
    with pytest.raises(ValueError, match="overlaps"):
        gather_segments(values, [0], [2], out=values[5:7], backend=gather_name)


def test_gather_copies_strided_values_and_accepts_lists_of_indices(gather_name):
    from opensloth.packing._gather import gather_segments

    values = np.arange(20, dtype=np.int16)[::2]  # 0, 2, ..., 18: not contiguous
    got = gather_segments(values, [1, 7], [2, 3], [1, 0, 1], backend=gather_name)
    assert got.dtype == np.int16 and got.tolist() == [14, 16, 18, 2, 4, 14, 16, 18]
    assert gather_segments(values, [], [], backend=gather_name).tolist() == []


def test_gather_handles_non_native_byte_order(gather_name):
    from opensloth.packing._gather import gather_segments

    values = np.arange(10, dtype=">i4")  # big-endian: the numba kernel used to fail to compile for it
    got = gather_segments(values, [2, 5], [2, 3], backend=gather_name)
    assert got.dtype == values.dtype and got.tolist() == [2, 3, 5, 6, 7]


def test_run_gather_refuses_an_output_of_another_size(gather_name):
    """run_gather serves the builder with pre-validated segments; a wrong-sized output must still not be written
    past its end by the unchecked numba kernel."""
    from opensloth.packing._gather import check_segments, run_gather

    seg = check_segments(np.arange(10), [0, 4], [3, 3])
    with pytest.raises(ValueError, match=r"out has 5 elements but the segments of this order hold 6|"
                                         r"the segments hold more than the 5 elements of the output"):
        run_gather(seg, np.empty(5, dtype=np.int64), gather_name)


# ---------------------------------------------------------------------------------------------------------------
# Real data: the shared chat datasets under the Qwen3 chat template
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_tokenised(shared_token_ids):
    """All shared records, tokenised with the chat template; labels hide a random prefix of each sample (a stand-in
    for the prompt) so labels differ from input_ids."""
    ids = [row for name in sorted(shared_token_ids) for row in shared_token_ids[name]]
    rng = np.random.default_rng(0)
    labels = []
    for row in ids:
        cut = int(rng.integers(0, len(row)))
        labels.append([-100] * cut + row[cut:])
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}), ids, labels


def _flat(ds, column):
    """(flat values, row offsets) of a list column, as numpy."""
    arr = ds.with_format("arrow", columns=[column])[:].column(column).combine_chunks()
    offsets = arr.offsets.to_numpy()
    return arr.values.to_numpy()[offsets[0] : offsets[-1]], offsets - offsets[0]


def _assert_same_rows(ours, theirs):
    assert len(ours) == len(theirs)
    for column in ("input_ids", "labels", "seq_lengths"):
        a_vals, a_off = _flat(ours, column)
        b_vals, b_off = _flat(theirs, column)
        np.testing.assert_array_equal(a_off, b_off, err_msg=f"{column}: row boundaries differ")
        np.testing.assert_array_equal(a_vals, b_vals, err_msg=f"{column}: values differ")


def test_shared_data_every_token_once_in_order_with_its_label(shared_tokenised):
    ds, ids, labels = shared_tokenised
    capacity = 4096
    packed, stats = build_packed_dataset(ds, capacity, return_stats=True)
    assert max(len(r) for r in ids) <= capacity, "the shared data has no sample over 4096 tokens"
    got = unpack(packed, capacity)
    want = [(tuple(i), tuple(lab)) for i, lab in zip(ids, labels)]
    assert len(got) == len(want) == stats.n_samples
    assert Counter(got) == Counter(want)
    total = sum(len(r) for r in ids)
    assert stats.n_tokens == total and stats.lower_bound == -(-total // capacity)
    assert stats.n_rows - stats.lower_bound <= max(1, stats.lower_bound // 1000), "whole-dataset BFD is near-optimal"


def test_shared_data_rows_equal_trl_pack_dataset(shared_tokenised):
    from trl.data_utils import pack_dataset

    ds, _, _ = shared_tokenised
    ours = build_packed_dataset(ds, 4096)
    # TRL packs 1000-row batches by default; over the whole dataset in one batch it runs the same BFD as ours.
    theirs = pack_dataset(ds, 4096, strategy="bfd", map_kwargs={"batch_size": len(ds)})
    _assert_same_rows(ours, theirs)
    default = pack_dataset(ds, 4096, strategy="bfd")
    assert len(ours) <= len(default)


@pytest.mark.parametrize(("policy", "trl_strategy"), [("truncate", "bfd"), ("split", "bfd_split")])
def test_shared_data_overlong_policies_equal_trl(shared_tokenised, policy, trl_strategy):
    from trl.data_utils import pack_dataset

    ds, ids, labels = shared_tokenised
    capacity = 1024
    assert sum(len(r) > capacity for r in ids) > 10, "the shared data has samples over 1024 tokens"
    ours, stats = build_packed_dataset(ds, capacity, overlong=policy, return_stats=True)
    theirs = pack_dataset(ds, capacity, strategy=trl_strategy, map_kwargs={"batch_size": len(ds)})
    _assert_same_rows(ours, theirs)
    assert stats.n_overlong == sum(len(r) > capacity for r in ids)
    if policy == "split":
        assert stats.n_tokens == sum(len(r) for r in ids)
