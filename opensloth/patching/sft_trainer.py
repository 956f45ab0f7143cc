"""TRL's SFTTrainer on machines where its loss kernel cannot run.

TRL 1.x computes the SFT loss through a fused LM head whose kernels are written in triton (``trl.kernels``); without
triton or CUDA (a CPU-only torch) every training step fails. `sft_trainer_class` returns TRL's class where the
kernel can run, and otherwise a subclass whose loss is the model's own (``transformers.Trainer.compute_loss``: the
same token-averaged cross-entropy, with ``num_items_in_batch``).
"""

from __future__ import annotations

import functools

from opensloth.distributed import logger


def fused_loss_available() -> bool:
    """Whether TRL's triton loss kernel can run here (triton importable and a CUDA device present)."""
    import torch

    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - a TRL without the module keeps its own loss
        return True
    return getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None and torch.cuda.is_available()


@functools.cache
def _model_loss_subclass():
    from transformers import Trainer
    from trl import SFTTrainer

    class SFTTrainerModelLoss(SFTTrainer):
        """SFTTrainer whose loss is the model's forward loss (no triton needed)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    logger.info("TRL's fused LM-head loss needs triton on a GPU: SFTTrainer uses the model's own loss here")
    return SFTTrainerModelLoss


def sft_trainer_class():
    """``trl.SFTTrainer``, or its model-loss subclass where TRL's triton loss cannot run (see the module docstring)."""
    if fused_loss_available():
        from trl import SFTTrainer

        return SFTTrainer
    return _model_loss_subclass()
