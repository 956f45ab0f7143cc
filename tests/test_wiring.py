"""opensloth.wiring.wire_batches: the collator and attention setup per backend and packing mode, the fallback to
padded rows for a model that lets packed samples attend to each other, and the watch over the batch keys."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from opensloth.collate import PackedDataCollator
from opensloth.wiring import wire_batches
from tests._models import tiny_qwen3


class LosesBoundaries(torch.nn.Module):
    """A model whose forward drops positions and packing metadata: what a backend that ignores them does."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids=None, labels=None, **kwargs):
        return self.inner(input_ids=input_ids, labels=labels, use_cache=False)


def wire(model, **options):
    defaults = dict(backend="hf", packing="packed", max_seq_length=64, pad_token_id=0, per_device_batch_size=2)
    return wire_batches(model, **{**defaults, **options})


@pytest.mark.parametrize(("packing", "batch", "layout"), [
    ("none", 2, "trl_padded"), ("padding_free", 2, "flat"), ("packed", 1, "flat"), ("packed", 2, "rows"),
    ("balanced", 2, "rows")])
def test_hf_backend_layouts(packing, batch, layout):
    wiring = wire(tiny_qwen3(), packing=packing, per_device_batch_size=batch)
    assert wiring.layout == layout and wiring.fallback is None and wiring.varlen is None
    assert wiring.packed == (layout in ("flat", "rows"))
    if packing != "none":
        assert wiring.check.honoured and wiring.check.conclusive
        assert isinstance(wiring.collator, PackedDataCollator) and wiring.collator.layout == layout


def test_unsloth_backend_sends_unsloths_protocol(caplog):
    """Without Unsloth (this CPU) the varlen switch reports itself unavailable; the batches are Unsloth's flat
    protocol all the same, and a transformers model reads them correctly."""
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        wiring = wire(tiny_qwen3(), backend="unsloth")
    assert wiring.varlen == "unavailable" and wiring.layout == "flat" and wiring.check.honoured
    assert wiring.collator.metadata == ("packed_seq_lengths", "use_cache")
    batch = wiring.collator([{"input_ids": [5, 6, 7, 8, 9], "seq_lengths": [2, 3]}])
    assert batch["packed_seq_lengths"].tolist() == [2, 3] and batch["position_ids"].tolist() == [[0, 1, 0, 1, 2]]


def test_a_model_that_leaks_trains_on_padded_rows(caplog):
    model = LosesBoundaries(tiny_qwen3())
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        wiring = wire(model)
    assert wiring.layout == "padded" and not wiring.packed
    assert not wiring.check.honoured and wiring.check.conclusive
    assert "padded rows" in caplog.text and "attend to each other" in caplog.text
    assert "lower the per-device batch size" in caplog.text  # padded rows of every sample: far more memory
    # the fallback is correct for this model: one sample per row, plain causal attention
    from opensloth.attention_check import check_packed_attention

    assert check_packed_attention(model, wiring.collator).honoured
    row = {"input_ids": np.arange(10, 19), "labels": np.arange(10, 19), "seq_lengths": np.array([4, 5])}
    batch = wiring.collator([row])
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"].sum().item() == 9


class ReadsOnlyAKeptMask(torch.nn.Module):
    """What Unsloth does with Gemma 2 when flash-attn is missing: training forwards drop positions and packing
    metadata, and keep a 4-D attention_mask only when the backbone carries Unsloth's _unsloth_keep_padding_mask."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, labels=None, attention_mask=None, position_ids=None, **kwargs):
        if getattr(self.inner.model, "_unsloth_keep_padding_mask", False) and getattr(attention_mask, "ndim", 0) == 4:
            return self.inner(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=False)
        return self.inner(input_ids=input_ids, labels=labels, use_cache=False)


def _loss_of(model, batch):
    with torch.no_grad():
        return float(model(**batch).loss)


def test_unsloth_model_that_reads_only_a_kept_mask_trains_masked_rows(caplog):
    model = ReadsOnlyAKeptMask(tiny_qwen3())
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        wiring = wire(model, backend="unsloth")
    assert wiring.layout == "masked_rows" and wiring.packed and wiring.check.honoured and wiring.check.conclusive
    assert "attend to each other" in wiring.fallback and "dense block-causal attention mask" in caplog.text
    assert model.inner.model._unsloth_keep_padding_mask is True
    rows = [{"input_ids": np.arange(10, 19), "labels": np.arange(10, 19), "seq_lengths": np.array([4, 5])},
            {"input_ids": np.arange(30, 36), "labels": np.arange(30, 36), "seq_lengths": np.array([6])}]
    batch = wiring.collator(rows)
    assert batch["attention_mask"].shape == (2, 1, 64, 64) and batch["attention_mask"].dtype == torch.float32
    assert "packed_seq_lengths" not in batch  # the mask alone carries the boundaries on this route
    # the oracle: each sample alone, token-weighted (every sample's first token has no target)
    alone = [(np.arange(10, 14), 3), (np.arange(14, 19), 4), (np.arange(30, 36), 5)]
    want = sum(_loss_of(model.inner, {"input_ids": torch.as_tensor(ids)[None],
                                      "labels": torch.as_tensor(ids)[None]}) * n for ids, n in alone) / 12
    assert abs(_loss_of(model, batch) - want) < 1e-5


@pytest.mark.parametrize("reason", ["leaks", "window", "loaded_shorter"])
def test_unsloth_masked_rows_route_falls_back_to_padded_rows(reason, caplog):
    """A model that reads no mask either, whose sliding window is shorter than the rows (one mask cannot window the
    sliding layers), or that Unsloth loaded for shorter inputs (it would cut the mask's key axis only): padded rows,
    and Unsloth's flag is left as it was."""
    if reason == "leaks":
        model = LosesBoundaries(tiny_qwen3())
    elif reason == "window":
        model = ReadsOnlyAKeptMask(tiny_qwen3(sliding_window=32, use_sliding_window=True))
    else:
        model = ReadsOnlyAKeptMask(tiny_qwen3())
        model.max_seq_length = 48
    with caplog.at_level(logging.INFO, logger="opensloth"):
        wiring = wire(model, backend="unsloth")
    assert wiring.layout == "padded" and not wiring.packed and not wiring.check.honoured
    assert not hasattr(model.inner.model, "_unsloth_keep_padding_mask")
    assert ("sliding window (32) is shorter than max_seq_length (64)" in caplog.text) == (reason == "window")
    assert ("loaded with max_seq_length = 48, below 64" in caplog.text) == (reason == "loaded_shorter")


def test_masked_rows_mask_takes_the_models_compute_dtype():
    from opensloth.wiring import _compute_dtype

    model = tiny_qwen3()
    assert _compute_dtype(model) == torch.float32  # no config dtype: the embeddings'
    model.config.dtype = torch.bfloat16  # what Unsloth's from_pretrained records, whatever dtype a layer holds
    assert _compute_dtype(model) == torch.bfloat16
    model.config.dtype = "float16"
    assert _compute_dtype(model) == torch.float16


def test_check_can_be_skipped():
    wiring = wire(LosesBoundaries(tiny_qwen3()), check=False)
    assert wiring.check is None and wiring.layout == "rows"


def test_wiring_adds_no_hook_to_the_model():
    """A labelled single-sample forward without positions is legitimate (evaluating one sample): wiring must not
    watch forwards (a watch that raised on those was removed after it fired in the GPU benchmark's evaluation)."""
    model = tiny_qwen3()
    wire(model, per_device_batch_size=1)
    assert not model._forward_pre_hooks and not model._forward_hooks
    ids = torch.arange(10, 20)[None]
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize(("options", "match"), [
    ({"backend": "vllm"}, "backend = 'vllm'"), ({"packing": "bfd"}, "packing = 'bfd'"),
    ({"max_seq_length": 0}, "max_seq_length = 0")])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        wire(tiny_qwen3(), **options)


def test_the_packed_datasets_capacity_is_checked():
    from datasets import Dataset

    from opensloth.data.packed import build_packed_dataset

    samples = Dataset.from_dict({"input_ids": [[1] * n for n in (5, 9, 3, 12, 7)],
                                 "labels": [[1] * n for n in (5, 9, 3, 12, 7)]})
    rows = build_packed_dataset(samples, 16)
    wire(tiny_qwen3(), max_seq_length=16, dataset=rows)  # fits
    with pytest.raises(ValueError, match="rows hold up to 16 tokens, above max_seq_length = 12; raise"):
        wire(tiny_qwen3(), max_seq_length=12, dataset=rows)
    wire(tiny_qwen3(), max_seq_length=12, dataset=samples)  # unpacked samples record no capacity: nothing to check

