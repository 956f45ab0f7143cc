"""opensloth.batch, the batch contract: the writer then the reader give back every segment and which are padding, for
the flat, rows and padded layouts and every metadata preset; the collator's record of the padding survives what a
Trainer does to a batch and never reaches the model; the reader understands TRL's and Unsloth's batches and names
what is wrong with a batch whose keys contradict each other.

Expected segments are computed here from the feature lengths, not by the code under test.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from opensloth.batch import (
    DEFAULT_METADATA,
    METADATA_KEYS,
    PADDED_METADATA,
    UNSLOTH_METADATA,
    BatchFormatError,
    PackedBatch,
    metadata_in,
    metadata_tensors,
    read_batch,
    segments_from_batch,
)
from opensloth.collate import collate_samples
from opensloth.masks import Segments

IGNORE = -100
PAD = 0
PACKED_PRESETS = {
    "default": DEFAULT_METADATA,
    "unsloth": UNSLOTH_METADATA,
    "every_key": METADATA_KEYS,
    "none": (),
}


def features(lengths, seed=0):
    """One feature per sample; ids never include the pad id and the first label of each sample is trained."""
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, 500, n).tolist()} for n in lengths]


def expected_flat(lengths, multiple=None):
    """(segment lengths, is_pad, row_ptr) of the flat layout: the samples, then a padding tail."""
    total = sum(lengths)
    width = -(-total // multiple) * multiple if multiple else total
    segs, pads = list(lengths), [False] * len(lengths)
    if width > total:
        segs.append(width - total)
        pads.append(True)
    return segs, pads, [0, len(segs)], 1, width


def expected_rows(rows, lengths, capacity):
    """Rows holding the samples ``rows[r]`` (indices into ``lengths``), each padded to ``capacity``."""
    segs, pads, ptr = [], [], [0]
    for row in rows:
        used = [lengths[i] for i in row]
        segs += used
        pads += [False] * len(used)
        if sum(used) < capacity:
            segs.append(capacity - sum(used))
            pads.append(True)
        ptr.append(len(segs))
    return segs, pads, ptr, len(rows), capacity


def expected_padded(lengths, multiple=None):
    width = max(lengths)
    width = -(-width // multiple) * multiple if multiple else width
    segs, pads, ptr = [], [], [0]
    for n in lengths:
        segs.append(n)
        pads.append(False)
        if n < width:
            segs.append(width - n)
            pads.append(True)
        ptr.append(len(segs))
    return segs, pads, ptr, len(lengths), width


def assert_segments(seg: Segments, want) -> None:
    segs, pads, ptr, n_rows, width = want
    assert seg.lengths.tolist() == segs
    assert seg.is_pad.tolist() == pads
    assert seg.row_ptr.tolist() == ptr
    assert (seg.n_rows, seg.width) == (n_rows, width)


# ---------------------------------------------------------------------------------------------------------------
# Writer then reader: every layout, every preset, with the collator's record and without it
# ---------------------------------------------------------------------------------------------------------------


LAYOUT_CASES = {
    "flat": (dict(layout="flat"), lambda L: expected_flat(L)),
    "flat_padded_tail": (dict(layout="flat", pad_to_multiple_of=64), lambda L: expected_flat(L, 64)),
    "rows": (dict(layout="rows", capacity=48, rows=[[0, 2], [1], [3, 4]]),
             lambda L: expected_rows([[0, 2], [1], [3, 4]], L, 48)),
    "rows_full": (dict(layout="rows", capacity=40, rows=[[0, 1], [2, 3, 4]]),
                  lambda L: expected_rows([[0, 1], [2, 3, 4]], L, 40)),
}
LENGTHS = {"flat": [7, 3, 11, 5, 2], "flat_padded_tail": [7, 3, 11, 5, 2], "rows": [30, 17, 9, 20, 21],
           "rows_full": [25, 15, 20, 12, 8]}


@pytest.mark.parametrize("preset", list(PACKED_PRESETS))
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
@pytest.mark.parametrize("record", [True, False], ids=["record", "rule"])
def test_packed_layouts_round_trip(case, preset, record):
    options, expected = LAYOUT_CASES[case]
    lengths = LENGTHS[case]
    metadata = PACKED_PRESETS[preset]
    batch = collate_samples(features(lengths), pad_token_id=PAD, metadata=metadata, **options)
    assert isinstance(batch, PackedBatch)
    want = expected(lengths)
    assert_segments(batch.segments, want)  # what the collator recorded
    if not record:
        batch = dict(batch)  # what a Trainer that rebuilds the dict hands on
    read = read_batch(batch, pad_token_id=PAD)
    assert_segments(read.segments, want)
    assert read.layout == ("flat" if want[3] == 1 else "rows")
    has_pad = any(want[1])
    assert read.padding == ("record" if record else "rule")
    length_keys = ("packed_seq_lengths", "cu_seq_lens_q")
    expected_source = next((k for k in length_keys if k in batch), "position_ids")
    assert read.source == expected_source
    assert read.real_lengths().tolist() == [n for n, p in zip(want[0], want[1], strict=True) if not p]
    assert bool(read.pad_mask().any()) == has_pad
    assert metadata_in(batch) == tuple(m for m in METADATA_KEYS if m in metadata)


@pytest.mark.parametrize("record", [True, False], ids=["record", "rule"])
@pytest.mark.parametrize("multiple", [None, 8])
def test_padded_layout_round_trip(record, multiple):
    lengths = [9, 3, 14, 1]
    batch = collate_samples(features(lengths), layout="padded", pad_token_id=PAD, pad_to_multiple_of=multiple,
                            metadata=PADDED_METADATA)
    want = expected_padded(lengths, multiple)
    assert_segments(batch.segments, want)
    read = read_batch(batch if record else dict(batch))
    assert_segments(read.segments, want)
    assert (read.layout, read.source, read.padding) == ("padded", "attention_mask", "attention_mask")


@pytest.mark.parametrize("preset", [p for p in PACKED_PRESETS.values() if p])
def test_writer_output_is_read_back_from_hand_built_tensors(preset):
    """The writer alone, over segments with a padding segment in the middle of the flattened batch (rows)."""
    seg = Segments(lengths=np.array([3, 2, 3, 5, 3]), is_pad=np.array([False, False, True, False, True]),
                   row_ptr=np.array([0, 3, 5]), n_rows=2, width=8, nested=True)
    shape = (2, 8)
    pad_tokens = np.repeat(seg.is_pad, seg.lengths).reshape(shape)
    ids = np.where(pad_tokens, PAD, 7 + np.arange(16).reshape(shape))
    labels = np.where(pad_tokens, IGNORE, ids)
    labels.reshape(-1)[seg.starts()] = IGNORE
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
             "position_ids": torch.from_numpy(seg.positions()).reshape(shape)}
    batch.update(metadata_tensors(seg, preset))
    read = read_batch(batch, pad_token_id=PAD)
    assert read.segments.lengths.tolist() == [3, 2, 3, 5, 3]
    assert read.segments.is_pad.tolist() == [False, False, True, False, True]
    assert read.segments.row_ptr.tolist() == [0, 3, 5]
    if "packed_seq_lengths" in preset:
        assert batch["packed_seq_lengths"].dtype == torch.int32 and int(batch["packed_seq_lengths"].sum()) == 16
    if "cu_seq_lens" in preset:
        assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 13, 16] and batch["max_length_q"] == 5
    if "seq_idx" in preset:
        assert batch["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1]]


def test_a_real_sample_that_looks_like_padding_stays_a_sample_with_the_record():
    """Only the rule (no record) reads a trailing sample of one repeated id with no trained label as padding; the
    collator's record knows better."""
    feats = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [PAD] * 3, "labels": [IGNORE] * 3}]
    batch = collate_samples(feats, layout="flat", pad_token_id=PAD)
    assert read_batch(batch, pad_token_id=PAD).segments.is_pad.tolist() == [False, False]
    assert read_batch(dict(batch), pad_token_id=PAD).segments.is_pad.tolist() == [False, True]


def test_a_stale_record_is_not_trusted():
    batch = collate_samples(features([4, 6]), layout="rows", capacity=8, pad_token_id=PAD)
    assert batch.segments.lengths.tolist() == [4, 4, 6, 2]
    edited = PackedBatch(batch, segments=collate_samples(features([8, 8]), layout="rows", capacity=8).segments)
    read = read_batch(edited, pad_token_id=PAD)
    assert read.padding == "rule"
    assert read.segments.is_pad.tolist() == [False, True, False, True]


def test_seq_lengths_in_a_batch_mark_the_rest_of_each_row_as_padding():
    ids = torch.tensor([[4, 5, 6, 7, 0, 0], [1, 2, 3, 4, 5, 9]])
    batch = {"input_ids": ids, "labels": ids.clone(), "seq_lengths": [[1, 3], [2, 4]]}
    read = read_batch(batch)
    assert (read.source, read.padding) == ("seq_lengths", "seq_lengths")
    assert read.segments.lengths.tolist() == [1, 3, 2, 2, 4]
    assert read.segments.is_pad.tolist() == [False, False, True, False, False]


def test_one_dimensional_input_ids_are_one_row():
    batch = {"input_ids": np.arange(1, 8), "position_ids": np.array([0, 1, 2, 0, 1, 0, 1])}
    seg = segments_from_batch(batch)
    assert (seg.lengths.tolist(), seg.n_rows, seg.width, seg.nested) == ([3, 2, 2], 1, 7, False)


# ---------------------------------------------------------------------------------------------------------------
# The record travels with the batch and never reaches the model
# ---------------------------------------------------------------------------------------------------------------


def _record_batch():
    return collate_samples(features([5, 9, 4]), layout="rows", capacity=12, pack=True, pad_token_id=PAD)


def _same_record(a: PackedBatch, b: PackedBatch) -> None:
    assert isinstance(b, PackedBatch) and b.segments is not None
    for name in ("lengths", "is_pad", "row_ptr"):
        assert np.array_equal(getattr(a.segments, name), getattr(b.segments, name))
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key]


def test_the_record_survives_pickling_copy_and_device_moves():
    batch = _record_batch()
    _same_record(batch, pickle.loads(pickle.dumps(batch)))  # DataLoader workers
    _same_record(batch, copy.copy(batch))  # torch's pin_memory copies a mutable mapping, then updates it
    _same_record(batch, batch.to("cpu"))
    _same_record(batch, batch.to(torch.device("cpu"), non_blocking=True))
    from accelerate.utils import send_to_device

    moved = send_to_device(batch, torch.device("cpu"))
    _same_record(batch, moved)
    assert read_batch(moved).padding == "record"


def test_the_record_survives_a_dataloader_with_a_worker():
    from torch.utils.data import DataLoader

    def collate(items):
        return collate_samples([{"input_ids": list(range(1, n + 1))} for n in items], layout="rows", capacity=16,
                               pad_token_id=PAD)

    loader = DataLoader([3, 5, 7, 2], batch_size=2, collate_fn=collate, num_workers=1,
                        multiprocessing_context="fork")
    batches = list(loader)
    assert all(isinstance(b, PackedBatch) and b.segments is not None for b in batches)
    assert [read_batch(b).padding for b in batches] == ["record", "record"]


def test_the_model_receives_exactly_the_keys():
    batch = _record_batch()
    seen = {}

    def forward(**kwargs):
        seen.update(kwargs)

    forward(**batch)
    assert set(seen) == set(batch) and "segments" not in seen
    assert repr(batch).startswith("PackedBatch({")


# ---------------------------------------------------------------------------------------------------------------
# Batches from TRL's collators and with Unsloth's keys
# ---------------------------------------------------------------------------------------------------------------


def _trl(padding_free, **kwargs):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=padding_free, **kwargs)


def test_trl_padding_free_batch():
    lengths = [6, 3, 8]
    batch = _trl(True)(features(lengths))
    read = read_batch(batch, pad_token_id=PAD)
    assert (read.layout, read.source, read.padding) == ("flat", "position_ids", "rule")
    assert_segments(read.segments, expected_flat(lengths))


def test_trl_padding_free_packed_rows_with_seq_lengths():
    rows = [{"input_ids": list(range(1, 10)), "seq_lengths": [4, 5]}, {"input_ids": list(range(1, 4)),
                                                                       "seq_lengths": [3]}]
    batch = _trl(True)(rows)
    assert read_batch(batch).segments.lengths.tolist() == [4, 5, 3]


def test_trl_padding_free_with_pad_to_multiple_of_marks_its_tail():
    """TRL pads position_ids with 0, so every padding token starts a segment; the last one is padding by the rule."""
    batch = _trl(True, pad_to_multiple_of=8)(features([6, 3]))
    read = read_batch(batch, pad_token_id=PAD)
    assert read.segments.lengths.tolist() == [6, 3, 1, 1, 1, 1, 1, 1, 1]
    assert read.segments.is_pad.tolist() == [False] * 8 + [True]


def test_unsloth_keys():
    """Unsloth's collator wrapper adds packed_seq_lengths (int32) to TRL's padding-free batch."""
    lengths = [6, 3, 8]
    batch = _trl(True)(features(lengths))
    batch["packed_seq_lengths"] = torch.tensor(lengths, dtype=torch.int32)
    read = read_batch(batch)
    assert (read.source, read.layout) == ("packed_seq_lengths", "flat")
    assert_segments(read.segments, expected_flat(lengths))


def test_trl_padded_batch():
    lengths = [6, 3, 8]
    batch = _trl(False)(features(lengths))
    read = read_batch(batch)
    assert (read.layout, read.source, read.padding) == ("padded", "attention_mask", "attention_mask")
    assert_segments(read.segments, expected_padded(lengths))


def test_left_padded_batch():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    batch = {"input_ids": torch.ones(3, 4, dtype=torch.long), "attention_mask": mask}
    seg = segments_from_batch(batch)
    assert seg.lengths.tolist() == [2, 2, 4, 1, 3]
    assert seg.is_pad.tolist() == [True, False, False, True, False]
    assert seg.row_ptr.tolist() == [0, 2, 3, 5]


# ---------------------------------------------------------------------------------------------------------------
# Contradictions are named
# ---------------------------------------------------------------------------------------------------------------


def _flat(lengths, metadata):
    return dict(collate_samples(features(lengths), layout="flat", metadata=metadata))


PSL, CU = ("packed_seq_lengths",), ("cu_seq_lens",)


@pytest.mark.parametrize("metadata,edit,match", [
    (PSL, lambda b: b.update(packed_seq_lengths=torch.tensor([3, 3], dtype=torch.int32)),
     "sums to 6 but the batch has 9"),
    (PSL, lambda b: b.update(packed_seq_lengths=torch.tensor([4, 0, 5], dtype=torch.int32)), "at least one token"),
    (CU, lambda b: b.update(cu_seq_lens_q=torch.tensor([0, 5, 4, 9], dtype=torch.int32)), "cu_seq_lens_q"),
    (DEFAULT_METADATA, lambda b: b.update(cu_seq_lens_k=torch.tensor([0, 5, 9], dtype=torch.int32)),
     "cu_seq_lens_k and packed_seq_lengths describe different segments"),
    (PSL, lambda b: b.update(packed_seq_lengths=torch.tensor([5, 4], dtype=torch.int32)), "do not restart"),
    (PSL, lambda b: b.update(labels=torch.zeros(1, 4, dtype=torch.long)), "labels have shape"),
    (PSL, lambda b: b.update(position_ids=torch.zeros(2, 9, dtype=torch.long)), "position_ids have shape"),
])
def test_contradictions_raise(metadata, edit, match):
    batch = _flat([4, 5], metadata)
    assert read_batch(batch).segments.lengths.tolist() == [4, 5]
    edit(batch)
    with pytest.raises(BatchFormatError, match=match):
        read_batch(batch)


def test_segment_crossing_a_row_raises():
    batch = dict(collate_samples(features([4, 4]), layout="rows", capacity=6))
    batch["packed_seq_lengths"] = torch.tensor([4, 4, 4], dtype=torch.int32)
    batch.pop("position_ids")
    with pytest.raises(BatchFormatError, match="crosses a row boundary"):
        read_batch(batch)


@pytest.mark.parametrize("mask,match", [([[1, 0, 1]], "padding between real tokens"), ([[0, 0, 0]], "no real token")])
def test_bad_padding_masks_raise(mask, match):
    with pytest.raises(BatchFormatError, match=match):
        read_batch({"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.tensor(mask)})


def test_not_a_batch():
    with pytest.raises(BatchFormatError, match="input_ids"):
        read_batch({"labels": torch.zeros(1, 3)})
    assert issubclass(BatchFormatError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# Metadata names
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", ["check_metadata", "collate_samples", "PackedDataCollator"])
def test_the_removed_opensloth_varlen_name_is_refused_with_the_valid_ones(build):
    """The Qwen3-only attention route and its ``"opensloth_varlen"`` metadata are gone: asking for it is an error
    that lists the names there are and points to Unsloth's own protocol, never a batch without packing metadata."""
    from opensloth.batch import check_metadata
    from opensloth.collate import PackedDataCollator

    calls = {
        "check_metadata": lambda: check_metadata(("opensloth_varlen", "use_cache"), "rows"),
        "collate_samples": lambda: collate_samples(features([3, 4]), metadata=("opensloth_varlen", "use_cache")),
        "PackedDataCollator": lambda: PackedDataCollator(layout="rows", capacity=8, metadata="opensloth_varlen"),
    }
    with pytest.raises(ValueError, match=r"unknown metadata keys \['opensloth_varlen'\]") as info:
        calls[build]()
    message = str(info.value)
    for name in ("packed_seq_lengths", "cu_seq_lens", "seq_idx", "attention_mask", "use_cache"):
        assert repr(name) in message
    assert "UNSLOTH_METADATA" in message and "layout='flat'" in message


def test_an_unknown_metadata_name_lists_the_valid_ones():
    from opensloth.batch import check_metadata

    with pytest.raises(ValueError, match=r"unknown metadata keys \['cu_seqlens'\]; choose from \(") as info:
        check_metadata(("packed_seq_lengths", "cu_seqlens"))
    assert "opensloth_varlen" not in str(info.value)  # the removal note only where that name was asked for
    assert "opensloth_varlen" not in METADATA_KEYS
