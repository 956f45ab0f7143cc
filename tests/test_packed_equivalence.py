"""Packed == unpacked: tiny random Qwen3 and Llama models (fp32, CPU, sdpa and eager) give every sample inside a
packed batch the logits it gets alone, and the packed batch the summed loss of the samples alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opensloth.collate import collate_samples
from opensloth.packing import pack_lengths
from tests._models import tiny_llama, tiny_qwen3

IGNORE = -100
VOCAB = 256
LENGTHS = [7, 1, 12, 5, 9, 3, 16, 2]
CAPACITY = 20
ATOL = 1e-5
ARCHS = {"qwen3": tiny_qwen3, "llama": tiny_llama}


def make_samples(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(0, VOCAB, size=n)
        labels = ids.copy()
        labels[rng.random(n) < 0.25] = IGNORE
        out.append({"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)})
    return out


@pytest.fixture(scope="module", params=[(a, i) for a in ARCHS for i in ("sdpa", "eager")], ids=lambda p: "-".join(p))
def model(request):
    arch, impl = request.param
    return ARCHS[arch](vocab_size=VOCAB, attn_implementation=impl), impl


@pytest.fixture(scope="module")
def samples():
    return make_samples()


@pytest.fixture(scope="module")
def reference(model, samples):
    """Per sample, run alone: logits (n, V) and the summed next-token loss over its own labels."""
    m, _ = model
    out = []
    with torch.no_grad():
        for s in samples:
            logits = m(input_ids=s["input_ids"][None], use_cache=False).logits[0]
            loss = F.cross_entropy(logits[:-1], s["labels"][1:], ignore_index=IGNORE, reduction="sum")
            out.append((logits, loss))
    return out


def packed_rows(samples, plan):
    return [
        {
            "input_ids": torch.cat([samples[i]["input_ids"] for i in b]),
            "labels": torch.cat([samples[i]["labels"] for i in b]),
            "seq_lengths": [len(samples[i]["input_ids"]) for i in b],
        }
        for b in plan.bins()
    ]


def build(case: str, samples, impl: str):
    """(batch, placements): placements[k] = (row, start) of sample k, known from the input order or the plan."""
    plan = pack_lengths(LENGTHS, CAPACITY, backend="python")
    dense = case.endswith("dense")
    opts = {"metadata": ("attention_mask",), "mask_dtype": torch.bool if impl == "sdpa" else torch.float32} \
        if dense else {}
    if case.startswith("padded"):
        # one sample per row, in input order (the rows' samples in plan order for packed-row features)
        features = samples if "samples" in case else packed_rows(samples, plan)
        order = list(range(len(samples))) if "samples" in case else [i for b in plan.bins() for i in b]
        batch = collate_samples(features, layout="padded", metadata=("use_cache",))
        return batch, {i: (r, 0) for r, i in enumerate(order)}
    if case.startswith("flat"):
        features = samples if "samples" in case else packed_rows(samples, plan)
        order = list(range(len(samples))) if "samples" in case else [i for b in plan.bins() for i in b]
        pad = {"pad_to_multiple_of": 32} if "padded" in case else {}
        batch = collate_samples(features, **pad, **opts)
        placements, start = {}, 0
        for i in order:
            placements[i] = (0, start)
            start += LENGTHS[i]
    else:
        if "repack" in case:
            batch = collate_samples(samples, layout="rows", capacity=CAPACITY, pack=True, backend="python", **opts)
        else:
            batch = collate_samples(packed_rows(samples, plan), layout="rows", capacity=CAPACITY, **opts)
        placements = {}
        for r, b in enumerate(plan.bins()):
            start = 0
            for i in b:
                placements[i] = (r, start)
                start += LENGTHS[i]
    return batch, placements


CASES = ["flat-samples", "flat-rows", "flat-padded", "rows-features", "rows-repack",
         "flat-samples-dense", "flat-padded-dense", "rows-repack-dense", "padded-samples", "padded-rows"]


@pytest.mark.parametrize("case", CASES)
def test_packed_logits_and_loss_equal_unpacked(model, samples, reference, case):
    m, impl = model
    batch, placements = build(case, samples, impl)
    assert ("attention_mask" in batch) == (case.endswith("dense") or case.startswith("padded"))
    if case.startswith(("rows", "padded")):
        assert batch["input_ids"].shape[0] > 1 and (batch["labels"] == IGNORE).any()
    with torch.no_grad():
        logits = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for k, s in enumerate(samples):
        r, start = placements[k]
        n = len(s["input_ids"])
        assert torch.equal(batch["input_ids"][r, start : start + n], s["input_ids"])
        torch.testing.assert_close(logits[r, start : start + n], reference[k][0], atol=ATOL, rtol=0)

    labels = batch["labels"]
    n_items = int((labels[..., 1:] != IGNORE).sum())
    assert n_items == sum(int((s["labels"][1:] != IGNORE).sum()) for s in samples)
    want = torch.stack([ref[1] for ref in reference]).sum()
    got = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # The model's own loss (transformers' ForCausalLMLoss) over the whole batch dict, normalised by num_items.
    with torch.no_grad():
        out = m(**batch, num_items_in_batch=torch.tensor(n_items))
    torch.testing.assert_close(out.loss * n_items, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("metadata", [("seq_idx", "use_cache"), ("packed_seq_lengths", "cu_seq_lens", "seq_idx",
                                                                   "use_cache")])
def test_every_extra_metadata_key_is_harmless(model, samples, reference, metadata):
    m, _ = model
    batch = collate_samples(samples, metadata=metadata)
    with torch.no_grad():
        logits = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
    start = 0
    for k, s in enumerate(samples):
        n = len(s["input_ids"])
        torch.testing.assert_close(logits[0, start : start + n], reference[k][0], atol=ATOL, rtol=0)
        start += n


# ---------------------------------------------------------------------------------------------------------------
# Negative controls: the checks above detect leakage and cross-boundary targets
# ---------------------------------------------------------------------------------------------------------------


def test_control_positions_not_reset_leak_between_samples(samples, reference):
    m = tiny_qwen3(vocab_size=VOCAB)
    batch = collate_samples(samples)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    with torch.no_grad():
        logits = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ref = tiny_qwen3(vocab_size=VOCAB)(input_ids=samples[2]["input_ids"][None], use_cache=False).logits[0]
    start = sum(LENGTHS[:2])
    assert (logits[0, start : start + LENGTHS[2]] - ref).abs().max() > 1e-3


def test_control_without_use_cache_false_transformers_ignores_position_ids(samples):
    """transformers 5.x builds the packed mask from position_ids only without a KV cache, and Qwen3 makes one
    whenever use_cache is on (the config default): the reason DEFAULT_METADATA carries use_cache=False."""
    m = tiny_qwen3(vocab_size=VOCAB)
    m.train()
    batch = collate_samples(samples, metadata=("packed_seq_lengths",))
    ref = m(input_ids=samples[2]["input_ids"][None], use_cache=False).logits[0]
    logits = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
    start = sum(LENGTHS[:2])
    assert (logits[0, start : start + LENGTHS[2]] - ref).abs().max() > 1e-3


def test_control_unmasked_boundaries_change_the_loss(samples, reference):
    m = tiny_qwen3(vocab_size=VOCAB)
    batch = collate_samples(samples)
    raw = torch.cat([s["labels"] for s in samples])[None]
    with torch.no_grad():
        logits = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
    want = sum(
        F.cross_entropy(lg[:-1], s["labels"][1:], ignore_index=IGNORE, reduction="sum")
        for lg, s in zip(torch.split(logits[0], LENGTHS), samples, strict=True)
    )
    got_raw = F.cross_entropy(logits[0, :-1], raw[0, 1:], ignore_index=IGNORE, reduction="sum")
    got = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert (got_raw - want).abs() > 1e-2
