"""TRL's SFTTrainer on machines where its loss kernel cannot run, and a token-weighted evaluation loss.

TRL 1.x computes the SFT loss through a fused LM head whose kernels are written in triton (``trl.kernels``); without
triton or CUDA (a CPU-only torch) every training step fails. `sft_trainer_class` returns TRL's class where the
kernel can run, and otherwise a subclass whose loss is the model's own (``transformers.Trainer.compute_loss``: the
same token-averaged cross-entropy, with ``num_items_in_batch``).

Evaluation: ``Trainer.evaluation_loop`` reports the mean of per-batch mean losses, each batch repeated
``eval_batch_size`` times, and under DDP accelerate pads the last round of batches with duplicates of the first
samples (their losses are dropped after the gather, but they were already averaged into their rank's batch mean).
The reported eval loss then depends on the world size and the eval batch size. `install_token_weighted_eval` (and
the model-loss subclass, and `ddp_patch` at train time) replaces it by the token-weighted mean over the whole eval
set: sum over every trained target of the cross-entropy / the number of trained targets, each eval sample counted
once, whatever the world size and eval batch size. A batch with no trained target adds nothing (it never makes the
loss nan).
"""

from __future__ import annotations

import functools
import types
from typing import Any

from opensloth.distributed import logger

__all__ = [
    "fused_loss_available",
    "install_token_weighted_eval",
    "sft_trainer_class",
    "token_weighted_evaluation_loop",
]

_EVAL_MARK = "_opensloth_token_weighted_eval"
IGNORE_INDEX = -100
_logged: set[str] = set()


def fused_loss_available() -> bool:
    """Whether TRL's triton loss kernel can run here (triton importable and a CUDA device present)."""
    import torch

    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - a TRL without the module keeps its own loss
        return True
    return getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None and torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# Token-weighted evaluation loss
# ---------------------------------------------------------------------------------------------------------------


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def eval_batches(num_items: int, batch_size: int, world_size: int, rank: int) -> tuple[list[list[int]], int]:
    """(this rank's eval batches, how many of them to run again for nothing).

    The dataset in order, cut into batches of ``batch_size`` (the last one shorter), batch j to rank j % world_size
    (as accelerate deals them) with no sample repeated. Every rank then runs as many batches as the busiest one (the
    loss may gather across ranks at each batch, as TRL's metrics do): a rank with fewer re-runs its last batch (the
    first batch when it has none) that many times and discards the result.
    """
    starts = range(0, num_items, batch_size)
    batches = [list(range(s, min(s + batch_size, num_items))) for s in starts]
    mine = batches[rank::world_size]
    most = -(-len(batches) // world_size)
    return mine, most - len(mine)


def _target_count(trainer: Any, inputs: dict) -> int:
    """Trained targets of a batch, counted as transformers counts ``num_items_in_batch`` (shifted labels)."""
    if "shift_labels" in inputs:
        labels = inputs["shift_labels"]
    else:
        labels = inputs["labels"]
        if getattr(trainer, "_loss_shifts_labels", True):
            labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def _unsupported(trainer: Any, dataloader: Any, description: str, prediction_loss_only: bool | None) -> str | None:
    """Why the token-weighted loop cannot stand in for ``evaluation_loop`` here (None when it can)."""
    if description != "Evaluation":
        return f"{description} returns predictions"
    loss_only = prediction_loss_only if prediction_loss_only is not None else trainer.args.prediction_loss_only
    if not loss_only:
        return "compute_metrics needs the predictions"
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return "DeepSpeed and FSDP shard the model"
    if "labels" not in list(getattr(trainer, "label_names", None) or []):
        return f"the trainer's label_names are {trainer.label_names}"
    dataset = getattr(dataloader, "dataset", None)
    try:
        len(dataset)
    except TypeError:
        return "the eval dataset has no length (an IterableDataset)"
    return None


def token_weighted_evaluation_loop(trainer: Any, dataloader: Any, description: str,
                                   prediction_loss_only: bool | None = None, ignore_keys: list[str] | None = None,
                                   metric_key_prefix: str = "eval", *, original: Any = None) -> Any:
    """``Trainer.evaluation_loop`` whose ``{prefix}_loss`` is the token-weighted mean over the whole eval set.

    Runs the eval set's samples once each, in batches of ``eval_batch_size`` dealt over the ranks (`eval_batches`),
    takes each batch's mean loss from ``trainer.compute_loss`` (TRL's, Unsloth's or the model's: the same loss as
    training) times its trained-target count, and sums both over the batches and the ranks (one all-reduce).
    Falls back to ``original`` (the Trainer's loop) where predictions are asked for, for DeepSpeed/FSDP and for an
    eval dataset without a length; the log says why, once.
    """
    import torch
    from torch.utils.data import DataLoader
    from transformers.trainer_utils import EvalLoopOutput

    reason = _unsupported(trainer, dataloader, description, prediction_loss_only)
    if reason is not None:
        _log_once(f"token-weighted eval loss not used ({reason}): the Trainer's own evaluation loop runs")
        return original(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
    args = trainer.args
    model = trainer._wrap_model(trainer.model, training=False)
    if len(trainer.accelerator._models) == 0 and model is trainer.model:
        model = trainer.accelerator.prepare_model(model, evaluation_mode=True)
        if model is not trainer.model:
            trainer.model_wrapped = model
    if not trainer.is_in_train:
        if args.fp16_full_eval:
            model = model.to(dtype=torch.float16, device=args.device)
        elif args.bf16_full_eval:
            model = model.to(dtype=torch.bfloat16, device=args.device)
    model.eval()
    if hasattr(trainer.optimizer, "eval") and callable(trainer.optimizer.eval):
        trainer.optimizer.eval()
    trainer.callback_handler.eval_dataloader = dataloader

    dataset = dataloader.dataset
    world = max(1, int(args.world_size))
    rank = int(args.process_index) if world > 1 else 0
    batches, spare = eval_batches(len(dataset), args.eval_batch_size, world, rank)
    runs = batches + [batches[-1] if batches else [0]] * spare
    loader = DataLoader(dataset, batch_sampler=runs, collate_fn=dataloader.collate_fn,
                        num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory)
    loss_sum, targets = 0.0, 0
    for i, inputs in enumerate(loader):
        count = _target_count(trainer, inputs)
        inputs = trainer._prepare_inputs(inputs)
        with torch.no_grad(), trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs, return_outputs=False)
        if i < len(batches) and count > 0:
            loss_sum += float(loss.detach().double()) * count
            targets += count
        trainer.control = trainer.callback_handler.on_prediction_step(args, trainer.state, trainer.control)
    totals = torch.tensor([loss_sum, float(targets)], dtype=torch.float64)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        totals = totals.to(args.device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    loss_sum, targets = float(totals[0]), int(totals[1])
    if targets == 0:
        logger.warning("the eval set has no trained target (every label is -100): eval loss is nan")
    metrics: dict[str, float] = {f"{metric_key_prefix}_loss": loss_sum / targets if targets else float("nan")}
    if hasattr(trainer, "model_preparation_time"):
        metrics[f"{metric_key_prefix}_model_preparation_time"] = trainer.model_preparation_time
    return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(dataset))


def install_token_weighted_eval(trainer: Any) -> bool:
    """Make ``trainer.evaluate()`` report the token-weighted eval loss (wraps its ``evaluation_loop`` on the
    instance; idempotent). Returns True when it installed the wrapper, False when it was already there."""
    current = trainer.evaluation_loop
    if getattr(getattr(current, "__func__", current), _EVAL_MARK, False):
        return False

    @functools.wraps(current)
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        return token_weighted_evaluation_loop(self, dataloader, description, prediction_loss_only, ignore_keys,
                                              metric_key_prefix, original=current)

    setattr(evaluation_loop, _EVAL_MARK, True)
    trainer.evaluation_loop = types.MethodType(evaluation_loop, trainer)
    return True


# ---------------------------------------------------------------------------------------------------------------
# The trainer class
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _model_loss_subclass():
    from transformers import Trainer
    from trl import SFTTrainer

    class SFTTrainerModelLoss(SFTTrainer):
        """SFTTrainer whose loss is the model's forward loss (no triton needed) and whose eval loss is the
        token-weighted mean over the eval set."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            original = functools.partial(SFTTrainer.evaluation_loop, self)
            return token_weighted_evaluation_loop(self, dataloader, description, prediction_loss_only, ignore_keys,
                                                  metric_key_prefix, original=original)

        setattr(evaluation_loop, _EVAL_MARK, True)

    logger.info("TRL's fused LM-head loss needs triton on a GPU: SFTTrainer uses the model's own loss here")
    return SFTTrainerModelLoss


def sft_trainer_class():
    """``trl.SFTTrainer``, or its model-loss subclass where TRL's triton loss cannot run (see the module docstring)."""
    if fused_loss_available():
        from trl import SFTTrainer

        return SFTTrainer
    return _model_loss_subclass()
