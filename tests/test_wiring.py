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

