"""sft_trainer_class: TRL's SFTTrainer where its triton loss runs, a model-loss subclass elsewhere (this CPU)."""

from __future__ import annotations

import pytest
import torch

from opensloth.collate import PackedDataCollator
from opensloth.patching.sft_trainer import fused_loss_available, sft_trainer_class
from tests._models import tiny_qwen3


def _trainer(cls, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    data = Dataset.from_dict({"input_ids": [list(range(1, 1 + n)) for n in (5, 9, 7, 12)]})
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, max_steps=2,
                     report_to=[], save_strategy="no", disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True},
                     remove_unused_columns=False, learning_rate=1e-2)
    from opensloth.presets import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(300)
    return cls(model=tiny_qwen3(vocab_size=len(tokenizer)), args=args, train_dataset=data,
               processing_class=tokenizer, data_collator=PackedDataCollator())


@pytest.mark.skipif(fused_loss_available(), reason="TRL's fused loss runs here: SFTTrainer is returned unchanged")
def test_cpu_gets_the_model_loss_subclass_which_trains(tmp_path):
    from trl import SFTTrainer

    cls = sft_trainer_class()
    assert cls is not SFTTrainer and issubclass(cls, SFTTrainer)
    assert sft_trainer_class() is cls  # built once
    batch = PackedDataCollator()([{"input_ids": [3, 4, 5, 6]}, {"input_ids": [7, 8, 9]}])
    trainer = _trainer(cls, tmp_path)
    with torch.no_grad():
        expected = trainer.model(**batch).loss
        assert torch.allclose(trainer.compute_loss(trainer.model, batch), expected)
        # TRL's own compute_loss needs its triton kernel, which this machine lacks: that is why the subclass exists
        with pytest.raises((AttributeError, TypeError, RuntimeError)):
            SFTTrainer.compute_loss(trainer, trainer.model, batch)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


# ---------------------------------------------------------------------------------------------------------------
# Token-weighted eval loss
# ---------------------------------------------------------------------------------------------------------------

# Eval samples of very different lengths; items 2 and 3 have no trained target, so with eval batches of 2 one batch
# holds no trained token at all.
_EVAL_LENGTHS = [30, 4, 9, 6, 17, 3, 25]


def _eval_data():
    import numpy as np

    rng = np.random.default_rng(3)
    out = []
    for i, n in enumerate(_EVAL_LENGTHS):
        ids = rng.integers(1, 250, n).tolist()
        labels = [-100] * n if i in (2, 3) else [-100] + ids[1:]
        if i == 4:
            labels[5:9] = [-100] * 4  # a prompt span
        out.append({"input_ids": ids, "labels": labels})
    return out


def _padded_collate(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    labels = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference_eval_loss(model, data) -> float:
    """Sum of the cross-entropy over every trained target of every sample, one sample at a time, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for f in data:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1].double()
            labels = torch.tensor(f["labels"][1:])
            keep = labels != -100
            if keep.any():
                total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
                count += int(keep.sum())
    return total / count


def _eval_trainer(tmp_path, eval_batch_size, *, token_weighted):
    from transformers import Trainer, TrainingArguments

    from opensloth.patching.sft_trainer import install_token_weighted_eval

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=
                             eval_batch_size, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=tiny_qwen3(), args=args, eval_dataset=_eval_data(), data_collator=_padded_collate)
    if token_weighted:
        assert install_token_weighted_eval(trainer) and not install_token_weighted_eval(trainer)
    return trainer


def test_eval_loss_is_the_token_weighted_mean_at_every_eval_batch_size(tmp_path):
    import math

    reference = _reference_eval_loss(tiny_qwen3(), _eval_data())
    losses = {bs: _eval_trainer(tmp_path, bs, token_weighted=True).evaluate()["eval_loss"] for bs in (1, 2, 3, 8)}
    for bs, loss in losses.items():
        assert math.isfinite(loss)
        assert loss == pytest.approx(reference, abs=1e-6), (bs, loss, reference)
    # the Trainer's own loop (a mean of per-batch means) differs, or is nan on the batch with no trained target
    plain = [_eval_trainer(tmp_path, bs, token_weighted=False).evaluate()["eval_loss"] for bs in (1, 3)]
    assert all(not math.isfinite(p) or abs(p - reference) > 1e-4 for p in plain)


def test_eval_batches_deal_every_sample_once_and_equal_run_counts():
    from opensloth.patching.sft_trainer import eval_batches

    for n, bs, world in [(7, 2, 1), (7, 2, 2), (7, 3, 4), (2, 4, 4), (16, 2, 4), (0, 2, 2)]:
        per_rank = [eval_batches(n, bs, world, r) for r in range(world)]
        seen = sorted(i for batches, _ in per_rank for b in batches for i in b)
        assert seen == list(range(n))
        assert len({len(batches) + spare for batches, spare in per_rank}) == 1  # the same number of runs
        assert all(len(b) <= bs for batches, _ in per_rank for b in batches)


@pytest.mark.skipif(fused_loss_available(), reason="TRL's fused loss runs here: SFTTrainer is returned unchanged")
def test_model_loss_subclass_reports_the_token_weighted_eval_loss(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from opensloth.presets import build_tiny_tokenizer

    data = _eval_data()
    tokenizer = build_tiny_tokenizer(300)
    reference = _reference_eval_loss(tiny_qwen3(vocab_size=len(tokenizer)), data)
    for bs in (2, 3):
        # bf16=False: SFTConfig's default bf16 would run the CPU forward under bf16 autocast
        args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, per_device_eval_batch_size=bs, report_to=[],
                         bf16=False, disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True},
                         remove_unused_columns=False)
        trainer = sft_trainer_class()(model=tiny_qwen3(vocab_size=len(tokenizer)), args=args,
                                      train_dataset=Dataset.from_list(data), eval_dataset=Dataset.from_list(data),
                                      processing_class=tokenizer, data_collator=PackedDataCollator())
        assert trainer.evaluate()["eval_loss"] == pytest.approx(reference, abs=1e-6)
