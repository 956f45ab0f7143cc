"""Out-of-place loss scaling for ``Trainer.compute_loss`` (no source rewriting).

transformers 5.x ``Trainer.compute_loss`` ends with, under ``average_tokens_across_devices`` (the default) when a
``num_items_in_batch`` is passed to the model::

    loss *= loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu

That multiplies in place the tensor the model returned. A model whose loss autograd forbids modifying in place
(Unsloth's fused cross-entropy returns a view created inside a custom autograd Function) then fails with
"Output 0 of ... is a view and is being modified inplace". The fix wraps ``compute_loss``: the wrapped method runs
with ``average_tokens_across_devices`` switched off for the duration of the call (so it does not scale), and the
wrapper applies the same factor out of place. Nothing is rewritten or exec'd.

The wrapper is applied only when the installed ``compute_loss`` scales in place (its source says ``loss *=``) and
Unsloth has not already replaced it (Unsloth keeps the original as ``Trainer._old_compute_loss``, rewritten to scale
out of place); otherwise it is skipped with a log line saying why. Applying it twice changes nothing.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

from opensloth.distributed import logger

__all__ = ["apply_loss_scaling_fix", "loss_scaling_status"]

_MARK = "_opensloth_loss_scaling"
_IN_PLACE = re.compile(r"\bloss\s*\*=")


def _source(fn: Any) -> str | None:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return None


def loss_scaling_status(trainer_cls: Any = None) -> str:
    """Why the fix is or is not needed for ``trainer_cls`` (default ``transformers.Trainer``).

    One of ``"patched"`` (our wrapper is installed), ``"unsloth"`` (Unsloth replaced compute_loss with its
    out-of-place version), ``"not-in-place"`` (the installed compute_loss does not scale in place),
    ``"needs-fix"``.
    """
    if trainer_cls is None:
        from transformers import Trainer as trainer_cls
    compute_loss = trainer_cls.compute_loss
    if getattr(compute_loss, _MARK, False):
        return "patched"
    if hasattr(trainer_cls, "_old_compute_loss") or compute_loss.__name__ == "_unsloth_pre_compute_loss":
        return "unsloth"
    source = _source(compute_loss)
    if source is None or not _IN_PLACE.search(source):
        return "not-in-place"
    return "needs-fix"


def _scales(trainer: Any, num_items_in_batch: Any) -> bool:
    """The condition under which transformers' compute_loss multiplies the loss (mirrors its own test)."""
    args = trainer.args
    return bool(
        getattr(args, "average_tokens_across_devices", False)
        and (getattr(trainer, "model_accepts_loss_kwargs", False) or getattr(trainer, "compute_loss_func", None))
        and num_items_in_batch is not None
    )


def _loss_scale(trainer: Any) -> int:
    """The factor transformers applies: processes over tensor-parallel size, or n_gpu under DataParallel."""
    if getattr(trainer.args, "n_gpu", 1) > 1:
        return int(trainer.args.n_gpu)
    scale = int(trainer.accelerator.num_processes)
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is not None:
        scale //= pc.tp_size
    return scale


def _wrap(compute_loss: Any) -> Any:
    @functools.wraps(compute_loss)
    def wrapped(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if not _scales(self, num_items_in_batch):
            return compute_loss(self, model, inputs, return_outputs=return_outputs,
                                num_items_in_batch=num_items_in_batch, **kwargs)
        args = self.args
        args.average_tokens_across_devices = False
        try:
            result = compute_loss(self, model, inputs, return_outputs=return_outputs,
                                  num_items_in_batch=num_items_in_batch, **kwargs)
        finally:
            args.average_tokens_across_devices = True
        scale = _loss_scale(self)
        if isinstance(result, tuple):
            return (result[0] * scale,) + tuple(result[1:])
        return result * scale

    setattr(wrapped, _MARK, True)
    wrapped._opensloth_original = compute_loss
    return wrapped


def apply_loss_scaling_fix(trainer_cls: Any = None) -> str:
    """Make ``trainer_cls.compute_loss`` (default ``transformers.Trainer``) scale the loss out of place.

    Returns the status after the call: ``"patched"`` when the wrapper is (now) installed, or the reason it was not
    needed (``"unsloth"``, ``"not-in-place"``); see `loss_scaling_status`. Idempotent.
    """
    if trainer_cls is None:
        from transformers import Trainer as trainer_cls
    status = loss_scaling_status(trainer_cls)
    if status == "needs-fix":
        trainer_cls.compute_loss = _wrap(trainer_cls.compute_loss)
        logger.debug("loss scaling: %s.compute_loss now scales out of place", trainer_cls.__name__)
        return "patched"
    if status != "patched":
        logger.debug("loss scaling fix not applied to %s.compute_loss: %s", trainer_cls.__name__, status)
    return status


def remove_loss_scaling_fix(trainer_cls: Any = None) -> bool:
    """Undo `apply_loss_scaling_fix` (tests use it); True when something was removed."""
    if trainer_cls is None:
        from transformers import Trainer as trainer_cls
    compute_loss = trainer_cls.__dict__.get("compute_loss")
    if compute_loss is not None and getattr(compute_loss, _MARK, False):
        trainer_cls.compute_loss = compute_loss._opensloth_original
        return True
    return False
