"""The seed's "optimize batch samples" patch: re-cut every gradient-accumulation window a trainer fetches.

The algorithm is `opensloth.recut.repack_window` (a pure function of the window's micro-batches); this module only
puts it in a trainer's ``get_batch_samples``, on the instance, around whatever is installed when training starts
(Unsloth's included), through the train-time hook registry of `opensloth.patching.hooks`. Per-trainer state (re-cut
on or off, the work model, the last window's stats) lives in `opensloth.patching.state.trainer_state`.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Mapping
from typing import Any

from opensloth.batch import metadata_in
from opensloth.distributed import logger
from opensloth.patching.hooks import add_pre_train_hook, install_train_hook
from opensloth.patching.state import trainer_state
from opensloth.recut import WindowStats, repack_window
from opensloth.recut import _logged_reasons as _logged_reasons  # re-exported: tests clear it to log a reason again
from opensloth.sampler import WorkModel

__all__ = [
    "WindowStats",
    "add_pre_train_hook",
    "install_on_trainer",
    "patch_optimize_sft_trainer_batch_samples",
    "repack_window",
]

_MARK = "_opensloth_repack"
_install_train_hook = install_train_hook  # the name this module had for it


def _repack_enabled() -> bool:
    return os.environ.get("OPENSLOTH_REPACK", "1").strip().lower() not in ("0", "false", "no", "off")


def _recount(trainer: Any, batch_samples: list, device: Any) -> Any:
    """transformers' own count of the window's targets (gathered over the ranks when the Trainer averages tokens
    across devices), or None where this transformers has no ``Trainer._get_num_items_in_batch``."""
    from transformers import Trainer

    count = getattr(Trainer, "_get_num_items_in_batch", None)
    if count is None:
        logger.warning("this transformers has no Trainer._get_num_items_in_batch: windows of masked rows are not "
                       "recounted, so their micro-batches are weighted equally instead of by their targets")
        return None
    if device is None:
        device = getattr(getattr(trainer, "args", None), "device", None)
    return count(trainer, batch_samples, device)


def _masked_rows_window(batch_samples: list) -> bool:
    return bool(batch_samples) and all(
        isinstance(b, Mapping) and "labels" in b and "attention_mask" in metadata_in(b) for b in batch_samples)


def _make_wrapper(original: Any, trainer: Any) -> Any:
    """A bound get_batch_samples for ``trainer`` that calls ``original`` (bound) and re-cuts its window."""

    @functools.wraps(original)
    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        batch_samples, num_items_in_batch = original(epoch_iterator, num_batches, *args, **kwargs)
        if num_items_in_batch is None and _masked_rows_window(batch_samples):
            # Unsloth's counter gives up on an attention_mask shaped unlike the labels (the (P, 1, L, L) block mask of
            # opensloth.wiring's masked rows): without a count the Trainer would average micro-batch means, not
            # tokens. Every rank holds the same layout, so every rank takes this branch (the count may gather).
            device = args[0] if args else kwargs.get("device")
            num_items_in_batch = _recount(self, batch_samples, device)
        state = trainer_state(self)
        batch_samples, state.window_stats = repack_window(batch_samples, work_model=state.work_model,
                                                          repack=state.repack and _repack_enabled())
        return batch_samples, num_items_in_batch

    setattr(get_batch_samples, _MARK, True)
    return types.MethodType(get_batch_samples, trainer)


def install_on_trainer(trainer: Any, *, work_model: WorkModel | None = None, repack: bool = True) -> bool:
    """Wrap ``trainer.get_batch_samples`` as resolved now (Unsloth's included) on the instance; idempotent.

    The wrapper records each window's `WindowStats` as ``trainer_state(trainer).window_stats`` (the per-step metrics
    read them) and, when the re-cut is on for the trainer, re-cuts the window. ``repack=False`` installs the
    observer without turning on the re-cut (and without turning off a re-cut already on). Returns True when it
    installed the wrapper, False when it was already there.
    """
    current = getattr(trainer, "get_batch_samples", None)
    if current is None:
        raise AttributeError(
            f"{type(trainer).__name__} has no get_batch_samples; this transformers version is not supported by the "
            "window repack (transformers >= 4.46 has it)"
        )
    state = trainer_state(trainer)
    if repack:
        state.repack = True
    if work_model is not None:
        state.work_model = work_model
    elif state.work_model is None:
        config = getattr(getattr(trainer, "model", None), "config", None)
        state.work_model = WorkModel.for_config(config) if config is not None else WorkModel()
    if getattr(getattr(current, "__func__", current), _MARK, False):
        return False
    trainer.get_batch_samples = _make_wrapper(current, trainer)
    return True


def _repack_hook(trainer: Any) -> None:
    if install_on_trainer(trainer):
        logger.debug("window repack installed on %s.get_batch_samples", type(trainer).__name__)


def patch_optimize_sft_trainer_batch_samples(trainer: Any = None, *, work_model: WorkModel | None = None) -> None:
    """Re-cut every gradient-accumulation window's micro-batches for the least padding and even work (seed API).

    Call it any time before ``trainer.train()``: before the model and trainer exist (the seed's order), or after the
    trainer is built, or pass the ``trainer`` to wrap it now. At train time it wraps the trainer's
    ``get_batch_samples`` as installed then (Unsloth's included), on the instance; calling it again changes nothing.
    ``OPENSLOTH_REPACK=0`` turns the re-cut off at run time.
    """
    add_pre_train_hook(_repack_hook)
    if trainer is not None:
        install_on_trainer(trainer, work_model=work_model)
