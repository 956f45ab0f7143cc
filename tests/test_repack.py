"""Window repack (patch_optimize_sft_trainer_batch_samples): every token, label and trained target is kept, the
count transformers uses for num_items_in_batch is unchanged, padding goes down to the exact optimum under the memory
cap, and the loss of a real (tiny) model over the window is unchanged."""

from __future__ import annotations

import itertools
import logging
import types

import numpy as np
import pytest
import torch

from opensloth.patching import batch_samples as bs
from opensloth.patching.batch_samples import repack_window
from opensloth.patching.state import trainer_state
from tests._models import tiny_qwen3

IGNORE = -100


# ---------------------------------------------------------------------------------------------------------------
# Independent oracles: read samples back from a batch without the code under test
# ---------------------------------------------------------------------------------------------------------------


def _segments_from_positions(pos_row: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(pos_row) if i == 0 or p != pos_row[i - 1] + 1]
    ends = starts[1:] + [len(pos_row)]
    return list(zip(starts, ends, strict=True))


def samples_of(batch: dict) -> list[tuple[tuple, tuple]]:
    """(token ids, effective labels) per sample, effective = -100 where transformers would not count the target.

    transformers counts labels[..., 1:] of each row, so a label at column 0 of a row is never a target.
    """
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    out = []
    mask = batch.get("attention_mask")
    for r in range(len(ids)):
        if mask is not None and mask.dim() == 2:
            cols = [c for c, m in enumerate(mask[r].tolist()) if m]
            spans = [(cols[0], cols[-1] + 1)]
            assert cols == list(range(cols[0], cols[-1] + 1)), "padding inside a row"
        else:
            spans = _segments_from_positions(batch["position_ids"][r].tolist())
        for s, e in spans:
            eff = tuple(IGNORE if c == 0 else labels[r][c] for c in range(s, e))
            out.append((tuple(ids[r][s:e]), eff))
    return out


def window_samples(batches):
    return sorted(s for b in batches for s in samples_of(b))


def num_items(batches) -> int:
    """What Trainer._get_num_items_in_batch counts: labels[..., 1:] != -100, summed over the window."""
    return int(sum((b["labels"][..., 1:] != IGNORE).sum() for b in batches))


def rand_sample(rng, n, vocab=200, prompt=0):
    ids = rng.integers(1, vocab, n).tolist()
    labels = [IGNORE] * prompt + ids[prompt:]
    return ids, labels


def padded_batch(samples, side="right", pad_id=0, position_ids=False):
    width = max(len(i) for i, _ in samples)
    ids, labels, mask, pos = [], [], [], []
    for i, lab in samples:
        pad = width - len(i)
        if side == "right":
            ids.append(i + [pad_id] * pad)
            labels.append(lab + [IGNORE] * pad)
            mask.append([1] * len(i) + [0] * pad)
            pos.append(list(range(len(i))) + [0] * pad)
        else:
            ids.append([pad_id] * pad + i)
            labels.append([IGNORE] * pad + lab)
            mask.append([0] * pad + [1] * len(i))
            pos.append([0] * pad + list(range(len(i))))
    out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
    if position_ids:
        out["position_ids"] = torch.tensor(pos)
    return out


def trl_padding_free(samples):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return collator([{"input_ids": i, "labels": lab} for i, lab in samples])


# ---------------------------------------------------------------------------------------------------------------
# Padded batches
# ---------------------------------------------------------------------------------------------------------------


def _brute_force_slots(lengths, groups, cap):
    """Least sum of (longest x size) over every split of the items into `groups` non-empty batches under `cap`."""
    best = None
    for assign in itertools.product(range(groups), repeat=len(lengths)):
        if len(set(assign)) != groups:
            continue
        cost, ok = 0, True
        for g in range(groups):
            member = [lengths[i] for i in range(len(lengths)) if assign[i] == g]
            c = max(member) * len(member)
            ok &= c <= cap
            cost += c
        if ok and (best is None or cost < best):
            best = cost
    return best


@pytest.mark.parametrize("seed", range(6))
def test_padded_right_keeps_samples_and_reaches_the_optimum(seed):
    rng = np.random.default_rng(seed)
    groups = 3
    sizes = [2, 2, 3]
    batches = [padded_batch([rand_sample(rng, int(rng.integers(2, 40)), prompt=1) for _ in range(k)]) for k in sizes]
    before_slots = sum(b["input_ids"].numel() for b in batches)
    cap = max(b["input_ids"].numel() for b in batches)
    out, stats = repack_window(batches)
    assert len(out) == groups
    assert window_samples(out) == window_samples(batches)
    assert num_items(out) == num_items(batches)
    # Right padding keeps raw labels exactly, not only the effective targets.
    raw = sorted((tuple(b["input_ids"][r][b["attention_mask"][r].bool()].tolist()),
                  tuple(b["labels"][r][b["attention_mask"][r].bool()].tolist()))
                 for b in out for r in range(b["input_ids"].shape[0]))
    raw_before = sorted((tuple(b["input_ids"][r][b["attention_mask"][r].bool()].tolist()),
                         tuple(b["labels"][r][b["attention_mask"][r].bool()].tolist()))
                        for b in batches for r in range(b["input_ids"].shape[0]))
    assert raw == raw_before
    lengths = [int(x) for b in batches for x in b["attention_mask"].sum(-1)]
    after_slots = sum(b["input_ids"].numel() for b in out)
    assert after_slots == min(before_slots, _brute_force_slots(lengths, groups, cap))
    assert max(b["input_ids"].numel() for b in out) <= cap  # memory never above the largest original micro-batch
    assert stats.slots == after_slots and stats.real_tokens == sum(lengths)
    for b in out:
        assert b["input_ids"].dtype == torch.int64 and b["attention_mask"].dtype == batches[0]["attention_mask"].dtype
        assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()  # padded with the window's pad id
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()


def test_padded_window_that_sorting_helps_is_recut():
    rng = np.random.default_rng(0)
    lens = [[50, 3], [4, 48], [49, 5]]
    batches = [padded_batch([rand_sample(rng, n) for n in pair]) for pair in lens]
    out, stats = repack_window(batches)
    assert stats.changed and stats.layout == "padded"
    # 294 slots before; the best split under the cap of 100 slots is {50, 49} {48} {5, 4, 3}: 100 + 48 + 15.
    assert sum(b["input_ids"].numel() for b in batches) == 294
    assert sum(b["input_ids"].numel() for b in out) == 163 == _brute_force_slots([50, 3, 4, 48, 49, 5], 3, 100)
    assert stats.efficiency > stats.efficiency_before
    assert window_samples(out) == window_samples(batches)


def test_padded_position_ids_are_carried_with_their_tokens():
    rng = np.random.default_rng(1)
    batches = [padded_batch([rand_sample(rng, n) for n in pair], position_ids=True) for pair in ([30, 2], [3, 29])]
    out, stats = repack_window(batches)
    assert stats.changed
    for b in out:
        for r in range(b["input_ids"].shape[0]):
            real = b["attention_mask"][r].bool()
            assert b["position_ids"][r][real].tolist() == list(range(int(real.sum())))


def test_left_padding_with_masked_first_labels_is_recut():
    rng = np.random.default_rng(2)
    samples = [rand_sample(rng, n, prompt=2) for n in (30, 3, 4, 28, 29, 5)]
    batches = [padded_batch(samples[i : i + 2], side="left") for i in range(0, 6, 2)]
    out, stats = repack_window(batches)
    assert stats.changed
    assert window_samples(out) == window_samples(batches)
    assert num_items(out) == num_items(batches)
    for b in out:  # still left-padded
        lengths = b["attention_mask"].sum(-1)
        for r, n in enumerate(lengths.tolist()):
            assert b["attention_mask"][r].tolist() == [0] * (b["input_ids"].shape[1] - n) + [1] * n


def test_left_padding_that_trains_a_first_label_passes_through(caplog):
    rng = np.random.default_rng(3)
    samples = [rand_sample(rng, n) for n in (30, 3, 4, 28)]  # labels = ids: the padded rows train their first label
    batches = [padded_batch(samples[:2], side="left"), padded_batch(samples[2:], side="left")]
    bs._logged_reasons.clear()
    with caplog.at_level(logging.INFO, logger="opensloth"):
        out, stats = repack_window(batches)
        repack_window(batches)
    assert out is batches and not stats.changed
    assert "first label" in stats.reason
    assert sum("first label" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_left_padding_untrained_first_label_at_column_zero_is_masked_when_moved():
    """A longest row (no padding) starts at column 0, so its first label is never a target; if it moves into a
    padded row its first label must become -100, or num_items_in_batch would grow."""
    rng = np.random.default_rng(4)
    a = rand_sample(rng, 20, prompt=0)  # first label trained-looking, but at column 0 in its batch
    rest = [rand_sample(rng, n, prompt=1) for n in (2, 21, 3)]
    batches = [padded_batch([a, rest[0]], side="left"), padded_batch(rest[1:], side="left")]
    assert batches[0]["attention_mask"][0].all()  # `a` is the longest of its batch: column 0
    out, stats = repack_window(batches)
    assert stats.changed
    assert num_items(out) == num_items(batches)
    assert window_samples(out) == window_samples(batches)


# ---------------------------------------------------------------------------------------------------------------
# Padding-free and packed batches
# ---------------------------------------------------------------------------------------------------------------


def _unbalanced_flat_window(rng, make):
    lens = [[60, 50, 40], [5, 6], [7, 4, 3]]
    return [make([rand_sample(rng, n, prompt=1) for n in group]) for group in lens]


def _check_flat(out, batches):
    assert window_samples(out) == window_samples(batches)
    assert num_items(out) == num_items(batches)
    for b in out:
        assert b["input_ids"].shape[0] == 1
        segs = _segments_from_positions(b["position_ids"][0].tolist())
        if "packed_seq_lengths" in b:
            assert b["packed_seq_lengths"].tolist() == [e - s for s, e in segs]
            assert b["packed_seq_lengths"].dtype == batches[0]["packed_seq_lengths"].dtype
        if "cu_seq_lens_q" in b:
            cu = [0] + list(itertools.accumulate(e - s for s, e in segs))
            assert b["cu_seq_lens_q"].tolist() == cu and b["cu_seq_lens_k"].tolist() == cu
            assert b["cu_seq_lens_q"].dtype == torch.int32
            assert int(b["max_length_q"]) == max(e - s for s, e in segs)


def test_trl_padding_free_window_is_balanced():
    rng = np.random.default_rng(5)
    batches = _unbalanced_flat_window(rng, trl_padding_free)
    out, stats = repack_window(batches)
    assert stats.changed and stats.layout == "flat"
    _check_flat(out, batches)
    assert stats.max_batch_work_after < stats.max_batch_work_before
    assert max(b["input_ids"].shape[1] for b in out) <= max(b["input_ids"].shape[1] for b in batches)
    assert set(out[0]) == set(batches[0])


def test_opensloth_flat_window_rebuilds_metadata():
    from opensloth.collate import collate_samples

    rng = np.random.default_rng(6)

    def make(samples):
        return collate_samples([{"input_ids": i, "labels": lab} for i, lab in samples], layout="flat",
                               metadata=("packed_seq_lengths", "cu_seq_lens", "seq_idx", "use_cache"))

    batches = _unbalanced_flat_window(rng, make)
    out, stats = repack_window(batches)
    assert stats.changed
    _check_flat(out, batches)
    for b in out:
        segs = _segments_from_positions(b["position_ids"][0].tolist())
        expected = [k for k, (s, e) in enumerate(segs) for _ in range(e - s)]
        assert b["seq_idx"][0].tolist() == expected
        assert b["use_cache"] is False


def test_unsloth_style_unmasked_first_sample_label_is_masked_when_moved():
    """Unsloth masks the first label of every *later* packed sample; the row's first sample keeps a label that is
    never counted (column 0). Re-cutting must not start counting it."""
    rng = np.random.default_rng(7)
    batches = []
    for group in ([60, 50, 40], [5, 6], [7, 4, 3]):
        samples = [rand_sample(rng, n) for n in group]
        b = trl_padding_free(samples)
        b["labels"][0, 0] = b["input_ids"][0, 0]  # untrained (column 0) but not -100
        b["packed_seq_lengths"] = torch.tensor(group, dtype=torch.int32)
        batches.append(b)
    out, stats = repack_window(batches)
    assert stats.changed
    _check_flat(out, batches)


def test_unmasked_boundaries_pass_through():
    rng = np.random.default_rng(8)
    batches = _unbalanced_flat_window(rng, trl_padding_free)
    for b in batches:
        b["labels"] = b["input_ids"].clone()  # every sample's first label trained across the boundary
    out, stats = repack_window(batches)
    assert out is batches and "first label" in stats.reason


def test_rows_layout_balances_whole_rows():
    from opensloth.collate import collate_samples

    rng = np.random.default_rng(9)
    capacity = 64

    def make(lengths):
        return collate_samples([{"input_ids": rand_sample(rng, n, prompt=1)[0]} for n in lengths], layout="rows",
                               capacity=capacity, pack=True, metadata=("packed_seq_lengths", "cu_seq_lens"))

    # Micro-batch 0: two rows of one long sample each (heavy attention); micro-batch 1: rows of short samples.
    batches = [make([60, 58]), make([8] * 15), make([30, 30, 31])]
    shapes = {tuple(b["input_ids"].shape) for b in batches}
    if len(shapes) != 1:
        pytest.skip(f"the packer gave rows of different counts {shapes}")
    out, stats = repack_window(batches)
    assert stats.layout == "rows"
    assert window_samples(out) == window_samples(batches)
    assert num_items(out) == num_items(batches)
    for b in out:
        assert tuple(b["input_ids"].shape) == shapes.pop() if shapes else True
        assert int(b["packed_seq_lengths"].sum()) == b["input_ids"].numel()
        cu = [0] + list(itertools.accumulate(b["packed_seq_lengths"].tolist()))
        assert b["cu_seq_lens_q"].tolist() == cu
    assert stats.max_batch_work_after <= stats.max_batch_work_before


def test_unknown_key_passes_through_and_says_why(caplog):
    rng = np.random.default_rng(10)
    batches = [padded_batch([rand_sample(rng, n) for n in pair]) for pair in ([30, 2], [3, 29])]
    for b in batches:
        b["pixel_values"] = torch.zeros(2, 3)
    bs._logged_reasons.clear()
    with caplog.at_level(logging.INFO, logger="opensloth"):
        out, stats = repack_window(batches)
    assert out is batches
    assert "pixel_values" in stats.reason
    assert any("pixel_values" in r.getMessage() for r in caplog.records)


def test_single_micro_batch_window_is_unchanged():
    rng = np.random.default_rng(11)
    batches = [padded_batch([rand_sample(rng, n) for n in (10, 3, 7)])]
    out, stats = repack_window(batches)
    assert out is batches or window_samples(out) == window_samples(batches)
    assert len(out) == 1


# ---------------------------------------------------------------------------------------------------------------
# The loss of a real model over the window is unchanged
# ---------------------------------------------------------------------------------------------------------------


def _window_loss(model, batches):
    """Sum over micro-batches of summed token cross-entropy (transformers' shift), with the window's target count."""
    total = torch.zeros((), dtype=torch.float64)
    for b in batches:
        kwargs = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "position_ids")}
        with torch.no_grad():
            logits = model(**kwargs, use_cache=False).logits.double()
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = b["labels"][:, 1:].reshape(-1)
        total += torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return total / num_items(batches)


@pytest.mark.parametrize("kind", ["right", "left", "trl_flat", "masked_rows"])
def test_window_loss_is_unchanged_on_a_tiny_model(kind):
    model = tiny_qwen3()
    rng = np.random.default_rng(12)
    groups = ([40, 3], [4, 38], [39, 5])
    if kind == "trl_flat":
        batches = [trl_padding_free([rand_sample(rng, n, prompt=1) for n in g]) for g in ([40, 30, 20], [4, 3], [5])]
    elif kind == "masked_rows":  # wire_batches' rows with a dense additive block-causal mask (Gemma 2 on Unsloth)
        from opensloth.collate import PackedDataCollator

        collate = PackedDataCollator(layout="rows", capacity=48, metadata=("attention_mask", "use_cache"),
                                     mask_dtype=torch.float32)
        rows = [[rand_sample(rng, n, prompt=1) for n in g] for g in ([30, 10], [20, 6], [12, 3], [4], [5, 2])]
        features = [{"input_ids": np.concatenate([ids for ids, _ in row]),
                     "labels": np.concatenate([lab for _, lab in row]), "seq_lengths": [len(ids) for ids, _ in row]}
                    for row in rows]
        batches = [collate(features[:3]), collate(features[3:4]), collate(features[4:])]
    else:
        batches = [padded_batch([rand_sample(rng, n, prompt=1) for n in g], side=kind) for g in groups]
    out, stats = repack_window(batches)
    assert stats.changed
    if kind == "masked_rows":
        assert all(b["attention_mask"].dtype == torch.float32 and b["attention_mask"].dim() == 4 for b in out)
    before, after = _window_loss(model, batches), _window_loss(model, out)
    assert torch.allclose(before, after, rtol=0, atol=1e-5), (before, after)


# ---------------------------------------------------------------------------------------------------------------
# Through a real Trainer: num_items_in_batch is the count the Trainer itself makes for the re-cut window
# ---------------------------------------------------------------------------------------------------------------


def test_trainer_get_batch_samples_wrapper_keeps_num_items(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_qwen3()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args)
    rng = np.random.default_rng(13)
    batches = [padded_batch([rand_sample(rng, n, prompt=1) for n in g]) for g in ([40, 3], [4, 38], [39, 5])]
    expected_batches, expected_count = trainer.get_batch_samples(iter(batches), 3, torch.device("cpu"))
    assert bs.install_on_trainer(trainer) is True
    assert bs.install_on_trainer(trainer) is False  # idempotent
    out, count = trainer.get_batch_samples(iter(batches), 3, torch.device("cpu"))
    assert int(count) == int(expected_count)
    assert int(trainer._get_num_items_in_batch(out, torch.device("cpu"))) == int(count)
    assert window_samples(out) == window_samples(expected_batches)
    assert trainer_state(trainer).window_stats.changed


def test_a_window_of_masked_rows_whose_count_was_dropped_is_recounted(tmp_path):
    """Unsloth's counter returns no count for an attention_mask shaped unlike the labels (the masked rows' 4-D block
    mask): the wrapper puts transformers' own count back, so micro-batches are weighted by their targets."""
    from transformers import Trainer, TrainingArguments

    from opensloth.collate import PackedDataCollator

    class DropsCountsOf4dMasks(Trainer):  # what Unsloth's get_batch_samples does with these batches
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
            return batches, (None if batches[0]["attention_mask"].dim() == 4 else count)

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    trainer = DropsCountsOf4dMasks(model=tiny_qwen3(), args=args)
    rng = np.random.default_rng(5)
    collate = PackedDataCollator(layout="rows", capacity=48, metadata=("attention_mask", "use_cache"),
                                 mask_dtype=torch.float32)
    rows = [[rand_sample(rng, n, prompt=3) for n in g] for g in ([30, 10], [20, 6], [12, 3])]
    features = [{"input_ids": np.concatenate([i for i, _ in r]), "labels": np.concatenate([lab for _, lab in r]),
                 "seq_lengths": [len(i) for i, _ in r]} for r in rows]
    batches = [collate(features[:2]), collate(features[2:])]
    want = sum(int((b["labels"][..., 1:] != IGNORE).sum()) for b in batches)
    assert want == sum(n - 3 for g in ([30, 10], [20, 6], [12, 3]) for n in g)  # prompts and boundaries untrained
    assert trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))[1] is None
    bs.install_on_trainer(trainer, repack=False)
    _, count = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    assert int(count) == want
    # a window with a 2-D mask whose count was dropped for another reason is left alone
    padded = [padded_batch([rand_sample(rng, n, prompt=1) for n in g]) for g in ([9, 3], [4, 8])]
    trainer.get_batch_samples = types.MethodType(lambda self, it, n, d: (list(it), None), trainer)
    bs.install_on_trainer(trainer, repack=False)
    assert trainer.get_batch_samples(iter(padded), 2, torch.device("cpu"))[1] is None


def _is_padding(sample) -> bool:
    ids, labels = sample
    return all(lab == IGNORE for lab in labels) and len(set(ids)) == 1


def _rows(rng, lengths, capacity=64):
    from opensloth.collate import collate_samples

    return collate_samples([{"input_ids": rand_sample(rng, n, prompt=1)[0]} for n in lengths], layout="rows",
                           capacity=capacity, pack=True, metadata=("packed_seq_lengths", "cu_seq_lens"))


def test_rows_padding_is_not_counted_as_real_tokens():
    rng = np.random.default_rng(3)
    batches = [_rows(rng, [40, 45]), _rows(rng, [50, 30, 20])]  # two rows each, every row with a padded tail
    assert [b["input_ids"].shape for b in batches] == [(2, 64), (2, 64)]
    _, stats = repack_window(batches, repack=False)
    assert stats.layout == "rows"
    assert stats.slots == 4 * 64
    assert stats.real_tokens == 40 + 45 + 50 + 30 + 20
    assert sorted(stats.sample_lengths) == [20, 30, 40, 45, 50]


def test_one_row_micro_batches_drop_their_padding_when_recut():
    """One row per micro-batch reads as the flat layout: the re-cut keeps every real sample and drops the pad tails."""
    rng = np.random.default_rng(4)
    batches = [_rows(rng, [60]), _rows(rng, [5, 6]), _rows(rng, [7])]
    assert all(b["input_ids"].shape == (1, 64) for b in batches)
    out, stats = repack_window(batches)
    assert stats.layout == "flat" and stats.changed
    real = sorted(s for s in window_samples(batches) if not _is_padding(s))
    assert len(real) == 4
    assert window_samples(out) == real
    assert num_items(out) == num_items(batches)
    assert stats.real_tokens == 60 + 5 + 6 + 7
    assert stats.slots_before == 3 * 64 and stats.slots == 78
    assert max(b["input_ids"].shape[1] for b in out) <= 64


def _unsloth_rows(rng, lengths, capacity=64):
    from opensloth.collate import UNSLOTH_METADATA, collate_samples

    return collate_samples([{"input_ids": rand_sample(rng, n, prompt=1)[0]} for n in lengths], layout="rows",
                           capacity=capacity, pack=True, metadata=UNSLOTH_METADATA)


def _check_packed_seq_lengths(batch):
    """packed_seq_lengths (Unsloth's key) covers the (P, L) batch, never crosses a row, and agrees with
    position_ids; read with an oracle independent of the code under test."""
    from opensloth.masks import position_ids_from_lengths

    lengths = batch["packed_seq_lengths"].tolist()
    assert batch["packed_seq_lengths"].dtype == torch.int32
    width = batch["input_ids"].shape[1]
    rows, row, used = [], [], 0
    for n in lengths:  # segments never cross a row
        row.append(n)
        used += n
        if used == width:
            rows.append(row)
            row, used = [], 0
    assert not row
    assert torch.equal(position_ids_from_lengths(rows, width).reshape(batch["position_ids"].shape),
                       batch["position_ids"])


@pytest.mark.parametrize("shapes", [[[40, 45], [50, 30, 20], [10, 12]], [[60], [5, 6], [7]]], ids=["rows", "one-row"])
def test_unsloth_keys_are_rebuilt_by_the_recut(shapes):
    """Micro-batches collated with Unsloth's own packed protocol (UNSLOTH_METADATA) come out of the re-cut with the
    same keys, packed_seq_lengths rebuilt for the new segments and use_cache still False."""
    rng = np.random.default_rng(5)
    batches = [_unsloth_rows(rng, lengths) for lengths in shapes]
    if len({b["input_ids"].shape for b in batches}) > 1:
        batches = batches[:2]
    out, stats = repack_window(batches)
    assert stats.reason is None or stats.reason == "", stats.reason
    real = sorted(s for s in window_samples(batches) if not _is_padding(s))
    assert sorted(s for s in window_samples(out) if not _is_padding(s)) == real
    assert num_items(out) == num_items(batches)
    for b in out:
        assert set(b) == set(batches[0]) == {"input_ids", "labels", "position_ids", "packed_seq_lengths", "use_cache"}
        assert b["use_cache"] is False
        _check_packed_seq_lengths(b)


def test_flat_unsloth_batches_from_the_collator_are_recut_with_their_keys():
    """The GPU path's batches (opensloth.wiring: flat layout, UNSLOTH_METADATA) from the collator itself: a re-cut
    that moves samples between micro-batches rebuilds packed_seq_lengths for every new micro-batch."""
    from opensloth.collate import UNSLOTH_METADATA, PackedDataCollator

    collator = PackedDataCollator(layout="flat", metadata=UNSLOTH_METADATA)
    windows = [[[102, 54, 62], [15], [35], [130, 182, 101, 121]], [[180, 3], [4, 5], [6, 7], [8, 9]]]
    changed = 0
    for window in windows:
        batches = [collator([{"input_ids": list(range(1, n + 1))} for n in lens]) for lens in window]
        out, stats = repack_window(batches)
        changed += stats.changed
        _check_flat(out, batches)
        for b in out:
            assert set(b) == set(batches[0]) and b["use_cache"] is False
    assert changed  # the recut did move samples, so the keys were rebuilt


@pytest.mark.parametrize("shapes", [[[60, 58], [8] * 15, [30, 30, 31]], [[60], [5, 6], [7]]], ids=["rows", "one-row"])
def test_recut_micro_batches_carry_a_record_of_their_segments(shapes):
    """Micro-batches from opensloth.collate carry their padding explicitly; the re-cut's micro-batches carry a new
    record that agrees with their keys, so the padding is never guessed downstream."""
    from opensloth.batch import PackedBatch, read_batch

    rng = np.random.default_rng(6)
    batches = [_rows(rng, lengths) for lengths in shapes]
    if len({b["input_ids"].shape for b in batches}) > 1:
        batches = batches[:2]
    out, stats = repack_window(batches)
    assert stats.changed
    for b in out:
        assert isinstance(b, PackedBatch)
        read = read_batch(b)
        assert read.padding == "record"
        assert read_batch(dict(b)).segments.is_pad.tolist() == read.segments.is_pad.tolist()


def test_a_sample_that_looks_like_padding_is_kept_when_the_batch_records_its_padding():
    """A trailing real sample of one repeated id with no trained label: the collator's record says it is a sample,
    so the flat re-cut keeps it (the padding rule alone would drop it as a padding tail)."""
    from opensloth.collate import collate_samples

    rng = np.random.default_rng(7)
    looks_like_pad = {"input_ids": [0] * 4, "labels": [IGNORE] * 4}
    windows = [[60, 50], [5], [6]]
    batches = [collate_samples([{"input_ids": rand_sample(rng, n)[0]} for n in g]
                               + ([looks_like_pad] if i == 1 else []), layout="flat") for i, g in enumerate(windows)]
    out, stats = repack_window(batches)
    assert stats.changed
    assert window_samples(out) == window_samples(batches)
    assert stats.real_tokens == 60 + 50 + 5 + 4 + 6
