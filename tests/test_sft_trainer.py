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
