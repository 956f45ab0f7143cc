"""Per-step throughput and balance figures: moved to `opensloth.patching.metrics` (this path keeps working)."""

from opensloth.patching.metrics import PREFIX, StepFiguresCallback, attach_step_figures, summarize

__all__ = ["PREFIX", "StepFiguresCallback", "attach_step_figures", "summarize"]
