"""opensloth.masks against brute-force definitions written with plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opensloth.masks import (
    block_causal_mask,
    cu_seq_lens_from_lengths,
    flex_block_mask,
    lengths_from_cu_seq_lens,
    lengths_from_position_ids,
    mask_boundary_labels,
    position_ids_from_lengths,
    segments_from_lengths,
    seq_idx_from_lengths,
)

# ---------------------------------------------------------------------------------------------------------------
# Brute-force references (loops over tokens, no vectorisation)
# ---------------------------------------------------------------------------------------------------------------


def ref_rows(rows: list[list[int]], width: int) -> list[list[tuple[int, int, bool]]]:
    """Per row, per token: (segment index within the row, position, is_padding)."""
    out = []
    for row in rows:
        tokens = []
        for s, n in enumerate(row):
            for p in range(n):
                tokens.append((s, p, False))
        pad_seg = len(row)
        p = 0
        while len(tokens) < width:
            tokens.append((pad_seg, p, True))
            p += 1
        out.append(tokens)
    return out


def ref_mask(rows: list[list[int]], width: int, causal: bool = True) -> torch.Tensor:
    toks = ref_rows(rows, width)
    mask = torch.zeros(len(rows), 1, width, width, dtype=torch.bool)
    for r, row in enumerate(toks):
        for i in range(width):
            for j in range(width):
                if row[i][0] == row[j][0] and (j <= i or not causal):
                    mask[r, 0, i, j] = True
    return mask


row_lists = st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=5), min_size=1, max_size=4)
flat_lists = st.lists(st.integers(1, 50), min_size=1, max_size=30)


# ---------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(rows=row_lists, extra=st.integers(0, 5))
def test_position_ids_and_seq_idx_match_brute_force(rows, extra):
    width = max([sum(r) for r in rows] + [1]) + extra
    expected = ref_rows(rows, width)
    pos = position_ids_from_lengths(rows, width)
    idx = seq_idx_from_lengths(rows, width)
    assert pos.dtype == torch.int64 and pos.shape == (len(rows), width)
    assert idx.dtype == torch.int32 and idx.shape == (len(rows), width)
    assert pos.tolist() == [[t[1] for t in row] for row in expected]
    assert idx.tolist() == [[t[0] for t in row] for row in expected]


@settings(max_examples=60, deadline=None)
@given(lengths=flat_lists)
def test_flat_round_trips(lengths):
    cu = cu_seq_lens_from_lengths(lengths)
    assert cu.dtype == torch.int32 and cu.device.type == "cpu"
    running, expected_cu = 0, [0]
    for n in lengths:
        running += n
        expected_cu.append(running)
    assert cu.tolist() == expected_cu
    assert lengths_from_cu_seq_lens(cu).tolist() == lengths
    pos = position_ids_from_lengths(lengths)
    assert pos.shape == (sum(lengths),)
    assert lengths_from_position_ids(pos).tolist() == lengths
    assert lengths_from_position_ids(pos[None]) [0].tolist() == lengths


@settings(max_examples=40, deadline=None)
@given(rows=row_lists, extra=st.integers(0, 4))
def test_rows_round_trip_padding_is_its_own_segment(rows, extra):
    width = max([sum(r) for r in rows] + [1]) + extra
    back = lengths_from_position_ids(position_ids_from_lengths(rows, width))
    for row, got in zip(rows, back, strict=True):
        pad = width - sum(row)
        assert got.tolist() == list(row) + ([pad] if pad else [])
    cu = cu_seq_lens_from_lengths(rows, width)
    assert int(cu[-1]) == len(rows) * width
    flat_with_pads = [x for row, got in zip(rows, back, strict=True) for x in got.tolist()]
    assert lengths_from_cu_seq_lens(cu).tolist() == flat_with_pads


def test_inputs_as_numpy_and_torch_and_2d():
    a = position_ids_from_lengths([3, 1, 2])
    assert torch.equal(position_ids_from_lengths(np.array([3, 1, 2], dtype=np.int32)), a)
    assert torch.equal(position_ids_from_lengths(torch.tensor([3, 1, 2])), a)
    two_d = position_ids_from_lengths(torch.tensor([[2, 2], [1, 3]]), 5)
    assert two_d.tolist() == [[0, 1, 0, 1, 0], [0, 0, 1, 2, 0]]
    assert position_ids_from_lengths([[2], [np.int64(3)]]).tolist() == [[0, 1, 0], [0, 1, 2]]


def test_empty_and_single():
    assert position_ids_from_lengths([]).shape == (0,)
    assert cu_seq_lens_from_lengths([]).tolist() == [0]
    assert position_ids_from_lengths([], 3).tolist() == [0, 1, 2]  # a row of padding only
    assert position_ids_from_lengths([[], [2]], 3).tolist() == [[0, 1, 2], [0, 1, 0]]
    assert lengths_from_position_ids(torch.zeros(0, dtype=torch.long)).tolist() == []
    assert position_ids_from_lengths([4]).tolist() == [0, 1, 2, 3]
    assert block_causal_mask([1]).tolist() == [[[[True]]]]


def test_position_rule_matches_transformers():
    from transformers.masking_utils import find_packed_sequence_indices

    pos = position_ids_from_lengths([[3, 1, 4], [2, 2]], 9)
    seq = find_packed_sequence_indices(pos)
    assert torch.equal(seq.to(torch.int32), seq_idx_from_lengths([[3, 1, 4], [2, 2]], 9))


# ---------------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(rows=row_lists, extra=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_mask_boundary_labels_brute_force(rows, extra, seed):
    width = max([sum(r) for r in rows] + [1]) + extra
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(rng.integers(-100, 50, size=(len(rows), width)))
    labels[labels < 0] = -100
    before = labels.clone()
    out = mask_boundary_labels(labels, rows)
    assert torch.equal(labels, before), "input must not be modified"
    toks = ref_rows(rows, width)
    for r in range(len(rows)):
        for i, (_, p, is_pad) in enumerate(toks[r]):
            want = -100 if (p == 0 or is_pad) else int(before[r, i])
            assert int(out[r, i]) == want


def test_boundary_masking_keeps_the_unpacked_count():
    rng = np.random.default_rng(3)
    lengths = [5, 1, 8, 3, 7]
    samples = []
    for n in lengths:
        lab = rng.integers(0, 100, size=n)
        lab[rng.random(n) < 0.3] = -100
        samples.append(lab)
    unpacked = sum(int((s[1:] != -100).sum()) for s in samples)
    packed = torch.from_numpy(np.concatenate(samples))[None]
    raw_count = int((packed[..., 1:] != -100).sum())
    masked = mask_boundary_labels(packed, lengths)
    assert int((masked[..., 1:] != -100).sum()) == unpacked
    assert raw_count >= unpacked  # the raw count includes cross-boundary targets whenever a later sample starts trained
    flat_lengths_over_rows = mask_boundary_labels(torch.arange(12).reshape(2, 6), [4, 4])  # flattened convention
    assert flat_lengths_over_rows.reshape(-1).tolist() == [-100, 1, 2, 3, -100, 5, 6, 7, -100, -100, -100, -100]


# ---------------------------------------------------------------------------------------------------------------
# Dense and flex masks
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(rows=row_lists, extra=st.integers(0, 3), causal=st.booleans())
def test_block_causal_mask_brute_force(rows, extra, causal):
    width = max([sum(r) for r in rows] + [1]) + extra
    got = block_causal_mask(rows, width, causal=causal)
    assert got.dtype == torch.bool and got.shape == (len(rows), 1, width, width)
    assert torch.equal(got, ref_mask(rows, width, causal))


def test_block_causal_mask_float_and_flat():
    ref = ref_mask([[2, 3]], 6)
    fmask = block_causal_mask([2, 3], 6, dtype=torch.float32)
    assert fmask.dtype == torch.float32
    assert torch.equal(fmask == 0, ref)
    assert torch.all(fmask[~ref] == torch.finfo(torch.float32).min)
    assert torch.equal(block_causal_mask([2, 3]), ref_mask([[2, 3]], 5))
    # Real tokens never see padding, padding never sees real tokens, every softmax row has an entry.
    m = block_causal_mask([[2, 1]], 6)[0, 0]
    assert not m[:3, 3:].any() and not m[3:, :3].any() and m.any(dim=-1).all()
    with pytest.raises(TypeError, match="floating"):
        block_causal_mask([2], dtype=torch.int64)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_block_mask_gives_the_dense_attention():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    rows, width = [[5, 3, 9], [11, 2], [1]], 20
    bm = flex_block_mask(rows, width, block_size=4)
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, width, 8) for _ in range(3))
    got = flex_attention(q, k, v, block_mask=bm)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask(rows, width))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    bm_bidir = flex_block_mask(rows, width, causal=False, block_size=4)
    got = flex_attention(q, k, v, block_mask=bm_bidir)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask(rows, width, causal=False))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_without_flex_says_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    with pytest.raises(RuntimeError, match="FlexAttention"):
        flex_block_mask([3, 2])


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: position_ids_from_lengths([3, 0, 2]), ValueError, r"lengths\[1\] = 0"),
        (lambda: position_ids_from_lengths([[3], [2, -1]]), ValueError, r"lengths\[1\]\[1\] = -1"),
        (lambda: position_ids_from_lengths([[3, 4], [2]], 6), ValueError, "row 0's samples sum to 7 tokens, over the "
                                                                         "capacity 6"),
        (lambda: position_ids_from_lengths([3, 4], 5), ValueError, "sum to 7 tokens, over the capacity 5"),
        (lambda: position_ids_from_lengths([1.5, 2]), TypeError, "integer"),
        (lambda: position_ids_from_lengths("abc"), TypeError, "sequence"),
        (lambda: position_ids_from_lengths([3], 0), ValueError, "capacity = 0"),
        (lambda: lengths_from_cu_seq_lens([1, 3]), ValueError, r"cu_seq_lens\[0\] = 1"),
        (lambda: lengths_from_cu_seq_lens([0, 3, 3]), ValueError, "strictly increase"),
        (lambda: lengths_from_cu_seq_lens([]), ValueError, "empty"),
        (lambda: mask_boundary_labels(torch.zeros(2, 4, dtype=torch.long), [[2], [2], [2]]), ValueError, "3 rows"),
        (lambda: mask_boundary_labels(torch.zeros(1, 4, dtype=torch.long), [3, 3]), ValueError, "over the capacity"),
        (lambda: lengths_from_position_ids(torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, "2-D"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_segments_pass_through():
    seg = segments_from_lengths([[2, 1], [3]], 4)
    assert seg.lengths.tolist() == [2, 1, 1, 3, 1] and seg.is_pad.tolist() == [False, False, True, False, True]
    assert torch.equal(position_ids_from_lengths(seg), position_ids_from_lengths([[2, 1], [3]], 4))
    with pytest.raises(ValueError, match="width"):
        position_ids_from_lengths(seg, 5)
