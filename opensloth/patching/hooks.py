"""One registry of functions run at the start of every ``transformers.Trainer.train`` call.

Why at train time: Unsloth installs its own ``Trainer.get_batch_samples`` (which does not call the one it replaces)
when a model is loaded, after the seed's ``patch_optimize_sft_trainer_batch_samples()`` call, so a class-level
wrapper installed at patch time would be dropped; a hook that wraps the trainer instance when ``train()`` starts
wraps whatever is installed then. ``ddp_patch`` registers the balanced sampler, the per-step figures and the
token-weighted eval loss here too.

``Trainer.train`` is wrapped once (marked, so a second install changes nothing); the hooks live in the class
attribute ``Trainer._opensloth_pre_train_hooks`` in the order they were added, each at most once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["add_pre_train_hook", "install_train_hook"]

_TRAIN_MARK = "_opensloth_train_hook"
_HOOKS_ATTR = "_opensloth_pre_train_hooks"


def install_train_hook() -> None:
    """Wrap ``transformers.Trainer.train`` once so that it runs the registered hooks before training."""
    from transformers import Trainer

    if _HOOKS_ATTR not in Trainer.__dict__:
        setattr(Trainer, _HOOKS_ATTR, [])
    train = Trainer.train
    if getattr(train, _TRAIN_MARK, False):
        return

    @functools.wraps(train)
    def wrapped_train(self, *args, **kwargs):
        hooks = getattr(type(self), _HOOKS_ATTR, ())
        for hook in list(hooks):
            hook(self)
        return train(self, *args, **kwargs)

    setattr(wrapped_train, _TRAIN_MARK, True)
    Trainer.train = wrapped_train


def add_pre_train_hook(hook: Callable[[Any], Any]) -> None:
    """Run ``hook(trainer)`` at the start of every ``Trainer.train`` call (idempotent per hook)."""
    from transformers import Trainer

    install_train_hook()
    hooks = getattr(Trainer, _HOOKS_ATTR)
    if hook not in hooks:
        hooks.append(hook)
