"""opensloth.collate: layouts, metadata, boundary labels, bad input, and real chat data through the collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opensloth.collate import DEFAULT_METADATA, PackedDataCollator, collate_samples
from opensloth.packing import pack_lengths

IGNORE = -100


def make_samples(lengths, seed=0, vocab=1000):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(1, vocab, size=n)
        labels = ids.copy()
        labels[rng.random(n) < 0.3] = IGNORE
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def packed_row(samples):
    return {
        "input_ids": [t for s in samples for t in s["input_ids"]],
        "labels": [t for s in samples for t in s["labels"]],
        "seq_lengths": [len(s["input_ids"]) for s in samples],
    }


def expected_row(samples, width, pad_id=0):
    """Brute force: ids, boundary-masked labels and positions of one row holding ``samples`` then padding."""
    ids, labels, pos = [], [], []
    for s in samples:
        for i, (t, lab) in enumerate(zip(s["input_ids"], s["labels"], strict=True)):
            ids.append(t)
            labels.append(IGNORE if i == 0 else lab)
            pos.append(i)
    p = 0
    while len(ids) < width:
        ids.append(pad_id)
        labels.append(IGNORE)
        pos.append(p)
        p += 1
    return ids, labels, pos


def n_trained(labels) -> int:
    return int((torch.as_tensor(labels)[..., 1:] != IGNORE).sum())


# ---------------------------------------------------------------------------------------------------------------
# Flat layout
# ---------------------------------------------------------------------------------------------------------------


def test_flat_from_unpacked_samples():
    samples = make_samples([5, 1, 9, 4])
    batch = collate_samples(samples)
    ids, labels, pos = expected_row(samples, 19)
    assert set(batch) == {"input_ids", "labels", "position_ids", "packed_seq_lengths", "cu_seq_lens_q",
                          "cu_seq_lens_k", "max_length_q", "max_length_k", "use_cache"}
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (1, 19)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    assert batch["position_ids"][0].tolist() == pos
    assert batch["packed_seq_lengths"].tolist() == [5, 1, 9, 4]
    assert batch["packed_seq_lengths"].dtype == torch.int32 and batch["packed_seq_lengths"].device.type == "cpu"
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 6, 15, 19] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 9
    assert batch["use_cache"] is False
    assert n_trained(batch["labels"]) == sum(n_trained(s["labels"]) for s in samples)


def test_flat_from_packed_rows_and_mixed_features():
    samples = make_samples([3, 6, 2, 7, 1], seed=1)
    features = [packed_row(samples[:2]), samples[2], packed_row(samples[3:])]
    batch = collate_samples(features)
    ids, labels, pos = expected_row(samples, 19)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    assert batch["position_ids"][0].tolist() == pos
    assert batch["packed_seq_lengths"].tolist() == [3, 6, 2, 7, 1]


def test_flat_pad_to_multiple_of_adds_a_padding_segment():
    samples = make_samples([5, 6])
    batch = collate_samples(samples, pad_to_multiple_of=8, pad_token_id=7)
    ids, labels, pos = expected_row(samples, 16, pad_id=7)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    assert batch["position_ids"][0].tolist() == pos
    assert batch["packed_seq_lengths"].tolist() == [5, 6, 5]
    assert int(batch["cu_seq_lens_k"][-1]) == 16


def test_single_sample_batch():
    s = make_samples([6])
    batch = collate_samples(s)
    assert batch["input_ids"].shape == (1, 6)
    assert batch["labels"][0, 0] == IGNORE and batch["labels"][0, 1:].tolist() == s[0]["labels"][1:]
    assert batch["position_ids"][0].tolist() == list(range(6))
    rows = collate_samples(s, layout="rows", capacity=8)
    assert rows["input_ids"].shape == (1, 8) and rows["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]


# ---------------------------------------------------------------------------------------------------------------
# Padded layout (the fallback for models that do not keep packed samples apart)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multiple", [None, 8])
def test_padded_one_sample_per_row_from_rows_and_samples(multiple):
    samples = make_samples([5, 2, 7, 3], seed=3)
    features = [packed_row(samples[:2]), samples[2], packed_row(samples[3:])]
    batch = collate_samples(features, layout="padded", pad_to_multiple_of=multiple, pad_token_id=9)
    width = 7 if multiple is None else 8
    assert batch["input_ids"].shape == (4, width) and batch["use_cache"] is False
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids", "use_cache"}
    for r, s in enumerate(samples):
        ids, labels, _ = expected_row([s], width, pad_id=9)
        n = len(s["input_ids"])
        assert batch["input_ids"][r].tolist() == ids
        assert batch["labels"][r].tolist() == labels
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (width - n)
        assert batch["position_ids"][r].tolist() == list(range(width))  # no restart: one sequence per row
    assert n_trained(batch["labels"]) == sum(n_trained(torch.tensor(s["labels"])) for s in samples)


# ---------------------------------------------------------------------------------------------------------------
# Rows layout
# ---------------------------------------------------------------------------------------------------------------


def test_rows_one_row_per_feature_with_padding():
    samples = make_samples([4, 3, 8, 2, 2], seed=2)
    groups = [samples[:2], samples[2:3], samples[3:]]
    batch = collate_samples([packed_row(g) for g in groups], layout="rows", capacity=10, pad_token_id=5,
                            metadata=("packed_seq_lengths", "cu_seq_lens", "seq_idx"))
    assert batch["input_ids"].shape == (3, 10)
    for r, g in enumerate(groups):
        ids, labels, pos = expected_row(g, 10, pad_id=5)
        assert batch["input_ids"][r].tolist() == ids
        assert batch["labels"][r].tolist() == labels
        assert batch["position_ids"][r].tolist() == pos
    assert batch["packed_seq_lengths"].tolist() == [4, 3, 3, 8, 2, 2, 2, 6]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 10, 18, 20, 22, 24, 30]
    assert batch["seq_idx"].dtype == torch.int32
    assert batch["seq_idx"].tolist() == [[0] * 4 + [1] * 3 + [2] * 3, [0] * 8 + [1] * 2, [0] * 2 + [1] * 2 + [2] * 6]
    assert "use_cache" not in batch
    default_width = collate_samples([packed_row(g) for g in groups], layout="rows")
    assert default_width["input_ids"].shape == (3, 8)
    assert collate_samples([packed_row(g) for g in groups], layout="rows", pad_to_multiple_of=6)["input_ids"].shape \
        == (3, 12)


def test_rows_pack_true_places_samples_as_pack_lengths_says(backend):
    samples = make_samples([7, 3, 12, 5, 1, 9, 4, 4, 2], seed=3)
    lengths = [len(s["input_ids"]) for s in samples]
    features = [packed_row(samples[:3]), *samples[3:]]
    batch = collate_samples(features, layout="rows", capacity=16, pack=True, backend=backend)
    plan = pack_lengths(lengths, 16, backend=backend)
    assert batch["input_ids"].shape == (plan.n_bins, 16)
    for r, b in enumerate(plan.bins()):
        ids, labels, pos = expected_row([samples[i] for i in b], 16)
        assert batch["input_ids"][r].tolist() == ids
        assert batch["labels"][r].tolist() == labels
        assert batch["position_ids"][r].tolist() == pos
    assert n_trained(batch["labels"]) == sum(n_trained(s["labels"]) for s in samples)


def test_rows_explicit_assignment_and_its_validation():
    samples = make_samples([3, 4, 5, 2], seed=4)
    batch = collate_samples(samples, layout="rows", rows=[[2, 0], [3, 1]])
    assert batch["input_ids"].shape == (2, 8)
    for r, g in enumerate([[2, 0], [3, 1]]):
        ids, labels, pos = expected_row([samples[i] for i in g], 8)
        assert batch["input_ids"][r].tolist() == ids
        assert batch["labels"][r].tolist() == labels
        assert batch["position_ids"][r].tolist() == pos
    with pytest.raises(ValueError, match="exactly once.*sample 0 appears 2 times"):
        collate_samples(samples, layout="rows", rows=[[2, 0], [3, 0]])
    with pytest.raises(ValueError, match="out of range"):
        collate_samples(samples, layout="rows", rows=[[2, 0], [3, 1, 4]])
    with pytest.raises(ValueError, match="row 0 has 12 tokens, over the capacity 10"):
        collate_samples(samples, layout="rows", rows=[[2, 0, 1], [3]], capacity=10)


def test_dense_mask_on_request():
    from opensloth.masks import block_causal_mask

    samples = make_samples([3, 2, 4])
    batch = collate_samples([packed_row(samples[:2]), samples[2]], layout="rows", capacity=6,
                            metadata=("attention_mask",), mask_dtype=torch.float32)
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert batch["attention_mask"].shape == (2, 1, 6, 6) and batch["attention_mask"].dtype == torch.float32
    assert torch.equal(batch["attention_mask"], block_causal_mask([[3, 2], [4]], 6, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Input forms
# ---------------------------------------------------------------------------------------------------------------


def test_input_forms_agree_and_inputs_are_not_modified():
    samples = make_samples([4, 6, 3], seed=5)
    want = collate_samples(samples)
    as_numpy = [{"input_ids": np.asarray(s["input_ids"], dtype=np.int32), "labels": np.asarray(s["labels"])}
                for s in samples]
    as_torch = [{"input_ids": torch.tensor(s["input_ids"]), "labels": torch.tensor(s["labels"])} for s in samples]
    keep = [t.clone() for f in as_torch for t in f.values()]
    for features in (as_numpy, as_torch):
        got = collate_samples(features)
        for key in ("input_ids", "labels", "position_ids", "packed_seq_lengths"):
            assert torch.equal(got[key], want[key])
    assert all(torch.equal(a, b) for a, b in zip(keep, [t for f in as_torch for t in f.values()], strict=True))
    got = collate_samples([as_torch[0]])
    got["labels"][0, 2] = 12345
    assert as_torch[0]["labels"][2] != 12345


def test_labels_default_and_assistant_masks():
    batch = collate_samples([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10, 11], "assistant_masks": [0, 0, 1, 1]}])
    assert batch["labels"][0].tolist() == [IGNORE, 6, 7, IGNORE, IGNORE, 10, 11]


def test_collator_class_matches_function_and_is_configurable():
    samples = make_samples([5, 3, 8], seed=6)
    col = PackedDataCollator(pad_token_id=3, layout="rows", capacity=9, pack=True, metadata=["seq_idx"],
                             backend="python")
    want = collate_samples(samples, layout="rows", capacity=9, pack=True, pad_token_id=3, metadata=("seq_idx",),
                           backend="python")
    got = col(samples)
    assert set(got) == set(want) == {"input_ids", "labels", "position_ids", "seq_idx"}
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert PackedDataCollator().metadata == DEFAULT_METADATA
    assert set(PackedDataCollator(metadata=())(samples)) == {"input_ids", "labels", "position_ids"}


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("features", "options", "exc", "match"),
    [
        ([], {}, ValueError, "empty list"),
        ({"input_ids": [1]}, {}, TypeError, "list of dicts"),
        ([{"labels": [1]}], {}, ValueError, "no 'input_ids'"),
        ([{"input_ids": []}], {}, ValueError, "no tokens"),
        ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], {}, ValueError, "3 input_ids but 2 labels"),
        ([{"input_ids": [1, 2, 3], "seq_lengths": [1, 1]}], {}, ValueError, "sums to 2 but the row has 3"),
        ([{"input_ids": [1, 2, 3], "seq_lengths": [3, 0]}], {}, ValueError, r"\[1\] = 0"),
        ([{"input_ids": [1.5, 2.0]}], {}, TypeError, "integers"),
        ([{"input_ids": [1, 2, 3]}], {"layout": "rows", "capacity": 2}, ValueError,
         "feature 0 has 3 tokens, over the capacity 2; .*pack=True"),
        ([{"input_ids": [1, 2, 3]}], {"layout": "rows", "pack": True}, ValueError, "pack=True needs capacity"),
        ([{"input_ids": [1, 2, 3]}], {"pack": True, "capacity": 4}, ValueError, "layout='rows'"),
        ([{"input_ids": [1, 2, 3]}], {"capacity": 4}, ValueError, "flat layout"),
        ([{"input_ids": [1, 2, 3]}], {"layout": "grid"}, ValueError, "layout = 'grid'"),
        ([{"input_ids": [1, 2, 3]}], {"metadata": ("cu_seqlens",)}, ValueError, "unknown metadata"),
        ([{"input_ids": [1, 2, 3]}], {"mask_dtype": torch.int32}, TypeError, "mask_dtype"),
        ([{"input_ids": [1, 2, 3]}], {"require_seq_lengths": True}, ValueError, "remove_unused_columns=False"),
        ([{"input_ids": [1, 2, 3]}], {"layout": "rows", "capacity": 4, "pack": True, "rows": [[0]]}, ValueError,
         "not both"),
        ([{"input_ids": [1, 2, 3]}], {"layout": "padded", "metadata": ("packed_seq_lengths",)}, ValueError,
         "packing metadata"),
        ([{"input_ids": [1, 2, 3]}], {"layout": "padded", "capacity": 4, "metadata": ()}, ValueError,
         "longest sample"),
        ([{"input_ids": [1, 2, 3]}], {"layout": "padded", "pack": True, "metadata": ()}, ValueError, "layout='rows'"),
    ],
)
def test_bad_input_raises_clear_errors(features, options, exc, match):
    with pytest.raises(exc, match=match):
        collate_samples(features, **options)


def test_sample_over_capacity_when_packing_names_the_limit():
    with pytest.raises(ValueError, match="exceeds the capacity 4"):
        collate_samples(make_samples([3, 5]), layout="rows", capacity=4, pack=True, backend="python")


# ---------------------------------------------------------------------------------------------------------------
# Real data: chat records through the Qwen3 tokenizer, packed rows, the collator
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_samples(qwen3_tokenizer, chat_records):
    records = chat_records["hh_rlhf"][:60] + chat_records["alpaca"][:60] + chat_records["arena_hard"][:20]
    texts = [qwen3_tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    enc = qwen3_tokenizer(texts, add_special_tokens=False)["input_ids"]
    im_start = qwen3_tokenizer.convert_tokens_to_ids("<|im_start|>")
    samples = []
    for ids in enc:
        ids = ids[:1024]
        starts = [i for i, t in enumerate(ids) if t == im_start]
        cut = starts[-1] if starts else 0  # train on the last turn only
        labels = [IGNORE] * cut + ids[cut:]
        samples.append({"input_ids": ids, "labels": labels})
    return samples


@pytest.mark.parametrize("layout", ["flat", "rows"])
def test_real_data_tokens_and_labels_survive(real_samples, layout, qwen3_tokenizer):
    lengths = [len(s["input_ids"]) for s in real_samples]
    plan = pack_lengths(lengths, 1024, backend="python")
    rows = [packed_row([real_samples[i] for i in b]) for b in plan.bins()]
    pad = qwen3_tokenizer.pad_token_id
    batch = collate_samples(rows, layout=layout, capacity=1024 if layout == "rows" else None, pad_token_id=pad)
    order = [i for b in plan.bins() for i in b]
    if layout == "flat":
        ids, labels, pos = expected_row([real_samples[i] for i in order], sum(lengths), pad_id=pad)
        assert batch["input_ids"][0].tolist() == ids
        assert batch["labels"][0].tolist() == labels
        assert batch["position_ids"][0].tolist() == pos
        assert batch["packed_seq_lengths"].tolist() == [lengths[i] for i in order]
    else:
        assert batch["input_ids"].shape == (plan.n_bins, 1024)
        for r, b in enumerate(plan.bins()):
            ids, labels, pos = expected_row([real_samples[i] for i in b], 1024, pad_id=pad)
            assert batch["input_ids"][r].tolist() == ids
            assert batch["labels"][r].tolist() == labels
            assert batch["position_ids"][r].tolist() == pos
    assert n_trained(batch["labels"]) == sum(n_trained(s["labels"]) for s in real_samples)
    # Every sample comes back whole from cu_seq_lens alone.
    starts = batch["cu_seq_lens_q"].tolist()
    flat_ids = batch["input_ids"].reshape(-1).tolist()
    decoded = [flat_ids[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    real = [d for d in decoded if any(t != pad for t in d)]  # drop the padding segments
    assert sorted(map(tuple, real)) == sorted(tuple(s["input_ids"]) for s in real_samples)

