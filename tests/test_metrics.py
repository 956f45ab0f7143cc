"""Per-step figures: the summary arithmetic against hand-computed values, and a real Trainer run whose logs (and
TensorBoard event file) carry tokens/s/GPU, the real-token fraction measured independently from its batches, and the
rank-work ratio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opensloth.metrics import PREFIX, attach_step_figures, summarize


def test_summarize_against_hand_computed_figures():
    # Two ranks, three steps: rank works, then tokens, slots, seconds.
    table = torch.tensor([
        [10.0, 20.0, 30.0, 600.0, 800.0, 2.0],
        [30.0, 20.0, 10.0, 400.0, 700.0, 2.5],
    ])
    out = summarize(table.flatten(), 3)
    assert out[PREFIX + "tokens_per_sec_per_gpu"] == pytest.approx(1000 / 2.5 / 2)
    assert out[PREFIX + "real_token_fraction"] == pytest.approx(1000 / 1500)
    ratios = [30 / 20, 20 / 20, 30 / 20]
    assert out[PREFIX + "rank_work_max_over_mean"] == pytest.approx(np.mean(ratios))
    assert out[PREFIX + "rank_work_max_over_mean_worst"] == pytest.approx(1.5)
    assert summarize(torch.tensor([0.0, 0.0, 0.0]), 0) == {}  # nothing logged without time or tokens


def test_trainer_logs_figures_to_history_and_tensorboard(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    from tests._models import tiny_qwen3

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    rng = np.random.default_rng(0)
    data = [{"input_ids": rng.integers(1, 250, int(n)).tolist()} for n in rng.integers(3, 40, 8)]
    real, slots = [], []

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
        mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features])
        real.append(int(mask.sum()))
        slots.append(ids.numel())
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=2, logging_steps=1, report_to=["tensorboard"],
        remove_unused_columns=False, train_sampling_strategy="sequential", save_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=tiny_qwen3(), args=args, train_dataset=data, data_collator=collate)
    callback = attach_step_figures(trainer)
    assert attach_step_figures(trainer) is callback  # idempotent
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for step, h in enumerate(logged):
        window = slice(2 * step, 2 * step + 2)
        assert h[PREFIX + "real_token_fraction"] == pytest.approx(sum(real[window]) / sum(slots[window]))
        assert h[PREFIX + "tokens_per_sec_per_gpu"] > 0
        assert h[PREFIX + "rank_work_max_over_mean"] == pytest.approx(1.0)  # one rank
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")]
    assert runs, "no TensorBoard event file"
    tags = set()
    for run in runs:
        acc = EventAccumulator(str(run))
        acc.Reload()
        tags |= set(acc.Tags().get("scalars", []))
    assert any(t.endswith(PREFIX + "real_token_fraction") for t in tags), tags
    assert any(t.endswith(PREFIX + "tokens_per_sec_per_gpu") for t in tags), tags


def test_evaluation_logs_carry_no_training_figures(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tests._models import tiny_qwen3

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = Trainer(model=tiny_qwen3(), args=args, train_dataset=[{"input_ids": [1, 2, 3]}])
    callback = attach_step_figures(trainer)
    callback.step_work, callback.tokens, callback.slots, callback.seconds = [5.0], 10, 20, 1.0
    trainer.log({"eval_loss": 0.5})
    assert not any(k.startswith(PREFIX) for k in trainer.state.log_history[-1])
    assert callback.step_work == [5.0], "an evaluation log must not consume the training figures"
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1][PREFIX + "real_token_fraction"] == pytest.approx(0.5)

