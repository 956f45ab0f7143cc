"""Per-step throughput and balance figures, logged through the Trainer (TensorBoard, console, log_history).

Every logging step adds, averaged over the optimizer steps since the previous log:

- ``opensloth/tokens_per_sec_per_gpu``: real (non-padding) tokens of all ranks / wall time / world size;
- ``opensloth/real_token_fraction``: real tokens / token slots computed (padding included), all ranks;
- ``opensloth/rank_work_max_over_mean``: the busiest rank's work over the mean rank work, per step (1.0 = every
  rank did the same work), averaged; ``..._worst``: the largest of those steps.

Work is `opensloth.sampler.WorkModel` (tokens plus an attention term). The figures come from the windows that
``get_batch_samples`` returns (the observer of `opensloth.patching.batch_samples`, installed by `attach`), gathered
over ranks once per logging step (one small all-gather, on every rank, inside ``Trainer.log``, which every rank
calls). The Trainer's own callbacks write them: TensorBoard on rank 0. ``opensloth.metrics`` re-exports this module.
"""

from __future__ import annotations

import time
import types
from typing import Any

import torch
from transformers import TrainerCallback

from opensloth.patching.batch_samples import install_on_trainer
from opensloth.patching.state import trainer_state

__all__ = ["StepFiguresCallback", "attach_step_figures", "summarize"]

PREFIX = "opensloth/"


def summarize(per_rank: torch.Tensor, num_steps: int) -> dict[str, float]:
    """Figures from a (world_size, num_steps + 3) table: each rank's per-step work, then tokens, slots, seconds."""
    table = per_rank.double().reshape(-1, num_steps + 3)
    world = table.shape[0]
    work = table[:, :num_steps]
    tokens, slots, seconds = table[:, num_steps], table[:, num_steps + 1], table[:, num_steps + 2]
    out: dict[str, float] = {}
    wall = float(seconds.max())
    if wall > 0:
        out[PREFIX + "tokens_per_sec_per_gpu"] = float(tokens.sum()) / wall / world
    if float(slots.sum()) > 0:
        out[PREFIX + "real_token_fraction"] = float(tokens.sum() / slots.sum())
    if num_steps:
        mean = work.mean(dim=0)
        ok = mean > 0
        if bool(ok.any()):
            ratio = work.max(dim=0).values[ok] / mean[ok]
            out[PREFIX + "rank_work_max_over_mean"] = float(ratio.mean())
            out[PREFIX + "rank_work_max_over_mean_worst"] = float(ratio.max())
    return out


class StepFiguresCallback(TrainerCallback):
    """Collects each optimizer step's window figures; `attach` wires it into a trainer's ``log``."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self._reset()
        self._t_last: float | None = None
        self._last_stats: Any = None

    def _reset(self) -> None:
        self.step_work: list[float] = []
        self.tokens = 0
        self.slots = 0
        self.seconds = 0.0

    def attach(self, trainer: Any) -> StepFiguresCallback:
        """Add this callback to ``trainer``, observe its windows and merge the figures into its logs (idempotent)."""
        state = trainer_state(trainer)
        if state.step_figures is not None:
            return state.step_figures
        self.trainer = trainer
        install_on_trainer(trainer, repack=False)
        trainer.add_callback(self)
        original_log = trainer.log
        callback = self

        def log(self, logs, *args, **kwargs):
            # Evaluation logs get no training figures. The keys are the same on every rank, so the ranks still
            # flush (a collective) together.
            if not any(str(k).startswith(("eval_", "test_")) for k in logs):
                logs.update(callback.flush())
            return original_log(logs, *args, **kwargs)

        trainer.log = types.MethodType(log, trainer)
        state.step_figures = self
        return self

    # -- callback events ----------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset()
        self._t_last = time.perf_counter()

    def _restart_clock(self, *args, **kwargs):
        self._t_last = time.perf_counter()

    on_evaluate = _restart_clock
    on_save = _restart_clock

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._t_last is not None:
            self.seconds += now - self._t_last
        self._t_last = now
        state = trainer_state(self.trainer, create=False)
        stats = None if state is None else state.window_stats
        if stats is None or stats is self._last_stats:  # no window seen for this step (not observed)
            self.step_work.append(0.0)
            return
        self._last_stats = stats
        self.step_work.append(float(stats.work))
        self.tokens += int(stats.real_tokens)
        self.slots += int(stats.slots)

    # -- gathering ----------------------------------------------------------------------------------------------

    def flush(self) -> dict[str, float]:
        """The figures since the last flush (gathered over ranks; every rank must call it together)."""
        num_steps = len(self.step_work)
        if num_steps == 0 or self.trainer is None:
            return {}
        local = torch.tensor(self.step_work + [self.tokens, self.slots, self.seconds], dtype=torch.float64)
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            device = self.trainer.args.device
            gathered = accelerator.gather(local.to(device=device, dtype=torch.float32)).cpu()
        else:
            gathered = local
        self._reset()
        self._t_last = time.perf_counter()
        return summarize(gathered, num_steps)


def attach_step_figures(trainer: Any) -> StepFiguresCallback:
    """Attach a `StepFiguresCallback` to ``trainer`` (idempotent); ddp_patch runs this at every train() start."""
    return StepFiguresCallback().attach(trainer)
