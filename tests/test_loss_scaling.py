"""The out-of-place loss-scaling fix: the unpatched Trainer fails on a loss autograd will not modify in place, the
patched one trains it with the gradients of manual out-of-place scaling; the fix is version-gated and idempotent."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from opensloth.patching import loss_scaling
from opensloth.patching.loss_scaling import apply_loss_scaling_fix, loss_scaling_status, remove_loss_scaling_fix
from tests._models import tiny_qwen3


class _ViewOfLoss(torch.autograd.Function):
    """Returns its input as a view made inside a custom Function: autograd refuses in-place ops on it, like
    Unsloth's fused cross-entropy ("Output 0 of ... is a view and is being modified inplace")."""

    @staticmethod
    def forward(ctx, loss):
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return grad


class FusedLossModel(nn.Module):
    """tiny_qwen3 whose loss comes out of _ViewOfLoss; forward takes **kwargs, so the Trainer passes
    num_items_in_batch and scales the loss under average_tokens_across_devices."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_qwen3()
        self.config = self.inner.config

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        return {"loss": _ViewOfLoss.apply(out.loss), "logits": out.logits}


def _data(n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1, 200, int(rng.integers(5, 12))).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def _collate(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    labels = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trainer(tmp_path, model, data, grad_accum=2):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2,
        gradient_accumulation_steps=grad_accum, max_steps=1, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, remove_unused_columns=False,
        train_sampling_strategy="sequential", save_strategy="no", logging_strategy="no", seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data, data_collator=_collate)


@pytest.fixture
def clean_trainer():
    """Run a test without our wrapper on transformers.Trainer, restoring the previous state afterwards."""
    from transformers import Trainer

    had = remove_loss_scaling_fix(Trainer)
    yield Trainer
    remove_loss_scaling_fix(Trainer)
    if had:
        apply_loss_scaling_fix(Trainer)


def test_installed_transformers_scales_in_place(clean_trainer):
    """The premise: transformers 5.17's compute_loss has `loss *=` (if this fails, re-check whether the fix is
    still needed: the status would say 'not-in-place')."""
    assert loss_scaling_status(clean_trainer) == "needs-fix"


def test_unpatched_trainer_fails_and_patched_trainer_trains_like_manual_scaling(tmp_path, clean_trainer):
    data = _data()
    with pytest.raises(RuntimeError, match="modified inplace"):
        _trainer(tmp_path / "a", FusedLossModel(), data).train()

    assert apply_loss_scaling_fix(clean_trainer) == "patched"
    model = FusedLossModel()
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    _trainer(tmp_path / "b", model, data).train()

    # Oracle: the same two micro-batches, each loss a sum over the window's target count, scaled out of place by
    # the world size (1 here), backward, one SGD step of lr 0.5.
    manual = FusedLossModel()
    batches = [_collate(data[0:2]), _collate(data[2:4])]
    count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        loss = manual(**b, num_items_in_batch=torch.tensor(count))["loss"]
        (loss * 1).backward()
    with torch.no_grad():
        for p in manual.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    changed = 0
    for (name, p), (_, q) in zip(model.named_parameters(), manual.named_parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=name)
        changed += int(not torch.equal(p.detach(), initial[name]))
    assert changed > 0  # the step moved the weights: the comparison is not between two untouched models


class _FakeArgs(types.SimpleNamespace):
    pass


class _InPlaceTrainer:
    """Mirrors transformers' compute_loss scaling so the wrapper can be checked with a world size of 4."""

    model_accepts_loss_kwargs = True
    compute_loss_func = None

    def __init__(self, world):
        self.args = _FakeArgs(average_tokens_across_devices=True, n_gpu=1)
        self.accelerator = types.SimpleNamespace(num_processes=world, parallelism_config=None)
        self.seen_flag = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = _ViewOfLoss.apply(inputs["x"].sum() * 1.0)
        self.seen_flag = self.args.average_tokens_across_devices
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss *= self.accelerator.num_processes
        return (loss, {"out": 1}) if return_outputs else loss


def test_wrapper_scales_out_of_place_by_the_world_size_and_restores_the_flag():
    cls = type("T", (_InPlaceTrainer,), {})
    cls.compute_loss = _InPlaceTrainer.compute_loss
    assert loss_scaling_status(cls) == "needs-fix"
    assert apply_loss_scaling_fix(cls) == "patched"
    trainer = cls(world=4)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = trainer.compute_loss(None, {"x": x}, num_items_in_batch=torch.tensor(3))
    assert trainer.seen_flag is False and trainer.args.average_tokens_across_devices is True
    assert float(loss.detach()) == 12.0
    loss.backward()
    assert x.grad.tolist() == [4.0, 4.0]
    loss, outputs = trainer.compute_loss(None, {"x": x.detach()}, return_outputs=True, num_items_in_batch=3)
    assert float(loss) == 12.0 and outputs == {"out": 1}
    # No num_items_in_batch: transformers does not scale, and neither does the wrapper.
    assert float(trainer.compute_loss(None, {"x": x.detach()})) == 3.0 and trainer.seen_flag is True


def test_flag_is_restored_when_the_wrapped_compute_loss_raises():
    class Boom(_InPlaceTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = torch.zeros(())
            loss *= 2
            raise RuntimeError("boom")

    apply_loss_scaling_fix(Boom)
    trainer = Boom(world=2)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.compute_loss(None, {}, num_items_in_batch=1)
    assert trainer.args.average_tokens_across_devices is True


def test_idempotent_and_skips_when_not_needed():
    cls = type("T2", (_InPlaceTrainer,), {"compute_loss": _InPlaceTrainer.compute_loss})
    apply_loss_scaling_fix(cls)
    first = cls.compute_loss
    assert apply_loss_scaling_fix(cls) == "patched"
    assert cls.compute_loss is first
    assert remove_loss_scaling_fix(cls) and cls.compute_loss is _InPlaceTrainer.compute_loss

    class OutOfPlace(_InPlaceTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return inputs["x"].sum() * self.accelerator.num_processes

    before = OutOfPlace.compute_loss
    assert apply_loss_scaling_fix(OutOfPlace) == "not-in-place" and OutOfPlace.compute_loss is before

    class UnslothFixed(_InPlaceTrainer):
        def _old_compute_loss(self, *a, **k):  # what Unsloth keeps after rewriting compute_loss out of place
            return None

    before = UnslothFixed.compute_loss
    assert apply_loss_scaling_fix(UnslothFixed) == "unsloth" and UnslothFixed.compute_loss is before


def test_module_imports_no_transformers_until_called():
    import subprocess
    import sys

    code = ("import sys, opensloth.patching.loss_scaling as m; "
            "print(any(k.split('.')[0] in ('transformers', 'trl', 'unsloth') for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    assert loss_scaling.__name__  # the module under test is importable here too
