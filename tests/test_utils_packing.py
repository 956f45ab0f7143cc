"""The seed's opensloth.utils.packing.pack() against brute-force rows and masks built with loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opensloth.packing import pack_lengths
from opensloth.utils.packing import pack

IGNORE = -100


def padded_batch(lengths, width=None, pad=0, seed=0):
    rng = np.random.default_rng(seed)
    width = width or max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    seqs = []
    for i, n in enumerate(lengths):
        s = torch.from_numpy(rng.integers(1, 500, size=n))
        lab = s.clone()
        lab[torch.from_numpy(rng.random(n) < 0.3)] = IGNORE
        ids[i, :n], labels[i, :n], mask[i, :n] = s, lab, 1
        seqs.append((s.tolist(), lab.tolist()))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, seqs


def expected(seqs, max_seql, attn_mode, pad_id, mask_boundaries=True):
    """Brute force: cut overlong sequences, place pieces as pack_lengths says, build every tensor with loops."""
    pieces = []
    for ids, lab in seqs:
        for a in range(0, len(ids), max_seql):
            pieces.append((ids[a : a + max_seql], lab[a : a + max_seql]))
    plan = pack_lengths([len(p[0]) for p in pieces], max_seql, backend="python")
    width = int(max(plan.bin_lengths))
    n_rows = plan.n_bins
    out = {
        "input_ids": [[pad_id] * width for _ in range(n_rows)],
        "labels": [[IGNORE] * width for _ in range(n_rows)],
        "position_ids": [[0] * width for _ in range(n_rows)],
        "token_mask": [[0] * width for _ in range(n_rows)],
        "attention_mask": torch.zeros(n_rows, width, width, dtype=torch.bool),
        "packed_lengths": [int(x) for x in plan.bin_lengths],
    }
    for r, b in enumerate(plan.bins()):
        col = 0
        for i in b:
            ids, lab = pieces[i]
            n = len(ids)
            for j in range(n):
                out["input_ids"][r][col + j] = ids[j]
                out["labels"][r][col + j] = IGNORE if (j == 0 and mask_boundaries) else lab[j]
                out["position_ids"][r][col + j] = j
                out["token_mask"][r][col + j] = 1
                for k in range(n):
                    allowed = {"tri": k <= j, "diag": k == j, "dense": True}[attn_mode]
                    out["attention_mask"][r, col + j, col + k] = allowed
            col += n
    return out


@pytest.mark.parametrize("attn_mode", ["tri", "diag", "dense"])
@pytest.mark.parametrize("max_seql", [8, 16, 64])
def test_pack_matches_brute_force(attn_mode, max_seql):
    batch, seqs = padded_batch([5, 13, 1, 8, 3, 20, 7], width=24, pad=9, seed=max_seql)
    got = pack(batch, max_seql=max_seql, attn_mode=attn_mode, backend="python")
    want = expected(seqs, max_seql, attn_mode, pad_id=9)  # pad id inferred from the first padded position
    assert set(got) == {"input_ids", "labels", "position_ids", "attention_mask", "packed_lengths", "token_mask"}
    for key in ("input_ids", "labels", "position_ids", "token_mask", "packed_lengths"):
        assert got[key].dtype == torch.int64, key
        assert got[key].tolist() == want[key], key
    assert got["attention_mask"].dtype == torch.bool
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert got["input_ids"].shape[1] == min(max_seql, max(want["packed_lengths"]))


def test_pack_lists_without_mask_and_seed_labels():
    seqs = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    got = pack({"input_ids": seqs}, max_seql=4, backend="python", mask_boundaries=False)
    want = expected([(s, s) for s in seqs], 4, "tri", pad_id=0, mask_boundaries=False)
    assert got["input_ids"].tolist() == want["input_ids"]
    assert got["labels"].tolist() == want["labels"]
    masked = pack({"input_ids": seqs}, max_seql=4, backend="python")
    assert masked["labels"].tolist() == expected([(s, s) for s in seqs], 4, "tri", pad_id=0)["labels"]
    assert "token_mask" not in pack({"input_ids": seqs}, max_seql=4, return_token_mask=False, backend="python")


def test_pack_keeps_every_token_and_the_trained_count():
    batch, seqs = padded_batch([30, 2, 17, 9, 9, 4, 11, 25], width=32, seed=7)
    got = pack(batch, max_seql=32, backend="python")
    real = got["token_mask"].bool()
    assert sorted(got["input_ids"][real].tolist()) == sorted(t for ids, _ in seqs for t in ids)
    unpacked = sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in seqs)
    assert int((got["labels"][:, 1:] != IGNORE).sum()) == unpacked
    assert got["packed_lengths"].tolist() == real.sum(1).tolist()


def test_pack_return_metadata_instead_of_dense_mask():
    from opensloth.masks import lengths_from_cu_seq_lens

    batch, seqs = padded_batch([5, 9, 3, 6], width=10, seed=1)
    got = pack(batch, max_seql=12, return_metadata=True, backend="python")
    dense = pack(batch, max_seql=12, backend="python")
    assert "attention_mask" not in got and got["use_cache"] is False
    assert torch.equal(got["input_ids"], dense["input_ids"]) and torch.equal(got["labels"], dense["labels"])
    width = got["input_ids"].shape[1]
    plan = pack_lengths([5, 9, 3, 6], 12, backend="python")
    segs = []
    for b in plan.bins():
        row = [[5, 9, 3, 6][i] for i in b]
        segs += row + ([width - sum(row)] if sum(row) < width else [])
    assert got["packed_seq_lengths"].tolist() == segs
    assert lengths_from_cu_seq_lens(got["cu_seq_lens_q"]).tolist() == segs
    # padding positions count 0, 1, 2, ... (its own segment) in metadata mode, stay 0 in the seed's mode
    pad = dense["token_mask"] == 0
    assert (dense["position_ids"][pad] == 0).all()
    for r in range(got["input_ids"].shape[0]):
        n = int(dense["packed_lengths"][r])
        assert got["position_ids"][r, n:].tolist() == list(range(width - n))


def test_pack_tri_mask_gives_unpacked_logits_through_sdpa():
    from tests._models import tiny_qwen3

    model = tiny_qwen3(vocab_size=512)
    batch, seqs = padded_batch([6, 3, 9, 4, 2], width=9, seed=2)
    got = pack(batch, max_seql=12, backend="python")
    with torch.no_grad():
        logits = model(input_ids=got["input_ids"], position_ids=got["position_ids"],
                       attention_mask=got["attention_mask"][:, None]).logits
        found = 0
        for r in range(got["input_ids"].shape[0]):
            row = got["input_ids"][r].tolist()
            for ids, _ in seqs:
                n = len(ids)
                for c in range(len(row) - n + 1):
                    if row[c : c + n] == ids and got["position_ids"][r, c] == 0:
                        alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                        torch.testing.assert_close(logits[r, c : c + n], alone, atol=1e-5, rtol=0)
                        found += 1
                        break
    assert found >= len(seqs)


def test_pack_pad_token_and_device():
    batch, _ = padded_batch([3, 5], width=6, pad=42)
    for pad_token_id, want in ((None, 42), (7, 7)):
        out = pack(batch, max_seql=6, pad_token_id=pad_token_id, backend="python")
        pad = out["token_mask"] == 0
        assert pad.sum() == 2 and (out["input_ids"][pad] == want).all()
    out = pack(batch, max_seql=8, device="cpu", backend="python")
    assert all(v.device.type == "cpu" for v in out.values())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (({"input_ids": [[1, 2]]},), None),
        (({"input_ids": [[1, 2]]}, 4, None, -100, None, True, "causal"), "Unknown attn_mode"),
        (({"input_ids": []},), "No sequences"),
        (({"input_ids": [[1, 2]]}, 0), "max_seql = 0"),
        (({"labels": [[1, 2]]},), "input_ids"),
        (({"input_ids": [[1, 2]], "labels": [[1, 2, 3]]},), "differ in length"),
        (({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [0, 0, 0]])},),
         "sequence 1 has no tokens"),
    ],
)
def test_pack_bad_input(args, match):
    if match is None:
        assert pack(*args, backend="python")["input_ids"].tolist() == [[1, 2]]
        return
    with pytest.raises(ValueError, match=match):
        pack(*args, backend="python")
