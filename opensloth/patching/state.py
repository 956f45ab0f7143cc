"""What OpenSloth keeps on a trainer: one `TrainerState` object under one attribute.

The patches of this package (window re-cut, balanced sampler, per-step figures) read and write their per-trainer
state here instead of on attributes of their own. ``trainer_state(trainer)`` returns it (creating it on first use);
``trainer_state(trainer, create=False)`` returns None for a trainer no patch has touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TrainerState", "trainer_state"]

_ATTR = "_opensloth"


@dataclass
class TrainerState:
    """Per-trainer state of OpenSloth's patches.

    ``repack``: the window re-cut is on for this trainer (`opensloth.patching.batch_samples`; the observer records
    ``window_stats`` either way). ``work_model``: the `opensloth.sampler.WorkModel` the re-cut balances.
    ``window_stats``: the `opensloth.recut.WindowStats` of the last window ``get_batch_samples`` returned.
    ``sampler``: the `opensloth.sampler.BalancedBatchSampler` of the training dataloader in use
    (`opensloth.patching.dataloader`). ``step_figures``: the attached
    `opensloth.patching.metrics.StepFiguresCallback`.
    """

    repack: bool = False
    work_model: Any = None
    window_stats: Any = None
    sampler: Any = None
    step_figures: Any = None


def trainer_state(trainer: Any, *, create: bool = True) -> TrainerState | None:
    """The `TrainerState` of ``trainer`` (created on first use; None when ``create=False`` and there is none)."""
    state = getattr(trainer, _ATTR, None)
    if state is None and create:
        state = TrainerState()
        setattr(trainer, _ATTR, state)
    return state
