"""The seed API: make a single-GPU Unsloth/TRL script run under ``torchrun --nproc_per_node=N``.

Usage, once per process, right after importing Unsloth (if you use it)::

    from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples
    device = ddp_patch()                          # validates the env, pins cuda:{LOCAL_RANK}, fixes loss scaling
    patch_optimize_sft_trainer_batch_samples()    # re-cuts each gradient-accumulation window (least padding)
    model, tok = FastLanguageModel.from_pretrained(..., device_map=f"cuda:{device.index}")
    trainer = SFTTrainer(...); trainer.train()

Process group: ``ddp_patch`` does not initialise ``torch.distributed``. Under torchrun the Trainer (accelerate's
``PartialState``, created with the ``TrainingArguments``) does, with the backend for the device (nccl on CUDA; gloo
on CPU, which ``ddp_patch`` selects by setting ``ACCELERATE_USE_CPU=true`` when there is no CUDA) and the
``ddp_timeout`` of the arguments. ``ddp_patch`` never blocks: it reads and validates the environment, so a launch
without ``MASTER_ADDR``/``MASTER_PORT`` fails here at once with a message, instead of in a rendezvous later.

Unsloth: when Unsloth is imported and the device is a GPU, ``ddp_patch`` also switches on Unsloth's own
FlashAttention-2 varlen branch for its packed and padding-free batches where torch is older than 2.12
(`opensloth.patching.unsloth_varlen`; nothing changes on a newer torch).

``ddp_find_unused_parameters``: under DDP transformers defaults it to True for a PEFT model, which costs a graph
traversal every step and breaks reentrant gradient checkpointing. With a world size above 1 ``ddp_patch`` makes the
Trainer use False when the arguments leave it None (LoRA trains every adapter every step); set
``ddp_find_unused_parameters=True`` in your ``SFTConfig``/``TrainingArguments`` if your model skips parameters in
some steps (MoE experts, a vision tower on text-only batches).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

import torch

from opensloth.distributed import (
    DistEnv,
    DistributedEnvironmentError,
    log_all_ranks,
    logger,
    read_dist_env,
    setup_logging,
)
from opensloth.patching.batch_samples import patch_optimize_sft_trainer_batch_samples
from opensloth.patching.hooks import add_pre_train_hook

__all__ = [
    "DistributedEnvironmentError",
    "ddp_patch",
    "default_find_unused_parameters",
    "patch_optimize_sft_trainer_batch_samples",
]


@dataclass(frozen=True)
class _PatchState:
    env: DistEnv
    device: torch.device
    device_name: str


_state: _PatchState | None = None
_DDP_DEFAULTS_MARK = "_opensloth_ddp_defaults"


def _check_rendezvous(env: DistEnv, environ: Any) -> None:
    """torchrun's env:// rendezvous needs MASTER_ADDR and MASTER_PORT when more than one process takes part."""
    if env.world_size <= 1:
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        value = environ.get(name)
        if value is None or not value.strip():
            raise DistributedEnvironmentError(
                f"{name} is not set but WORLD_SIZE={env.world_size}: torch.distributed needs {name} to meet the "
                f"other ranks. Launch with `torchrun --nproc_per_node=N script.py` (it sets {name}), or export "
                f"{name} yourself"
            )
    port = environ["MASTER_PORT"].strip()
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedEnvironmentError(f"MASTER_PORT={port!r} is not a TCP port number (1..65535)")


def _pin_device(env: DistEnv) -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise DistributedEnvironmentError(
                f"LOCAL_RANK={env.local_rank} but only {count} CUDA device(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); launch at most "
                f"{count} processes per node (--nproc_per_node={count})"
            )
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank), torch.cuda.get_device_name(env.local_rank)
    if env.world_size > 1:
        # accelerate treats a torchrun launch without an accelerator as distributed (MULTI_CPU, gloo) only when
        # told to use the CPU; otherwise every rank would train alone.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return torch.device("cpu"), platform.processor() or platform.machine() or "cpu"


def default_find_unused_parameters() -> str:
    """Make DDP default to ``find_unused_parameters=False`` for trainers whose arguments leave it None.

    Wraps ``Trainer._build_accelerator_args`` (transformers 5.x builds the DDP kwargs there, in ``__init__``);
    an explicit value in the arguments always wins. Returns "patched", "already" or "unsupported" (the method is
    missing in this transformers version: set ``ddp_find_unused_parameters=False`` in your arguments yourself).
    """
    from transformers import Trainer

    build = getattr(Trainer, "_build_accelerator_args", None)
    if build is None:
        logger.warning(
            "this transformers version has no Trainer._build_accelerator_args: set ddp_find_unused_parameters=False "
            "in your TrainingArguments/SFTConfig for LoRA under DDP"
        )
        return "unsupported"
    if getattr(build, _DDP_DEFAULTS_MARK, False):
        return "already"

    @functools.wraps(build)
    def wrapped(self, *args, **kwargs):
        targs = self.args
        if getattr(targs, "ddp_find_unused_parameters", False) is None and read_dist_env().world_size > 1:
            targs.ddp_find_unused_parameters = False
            if not getattr(wrapped, "_logged", False):
                wrapped._logged = True
                logger.info("ddp_find_unused_parameters=False (LoRA uses every adapter each step; set it to True "
                            "in your arguments if your model skips parameters)")
        return build(self, *args, **kwargs)

    setattr(wrapped, _DDP_DEFAULTS_MARK, True)
    wrapped._opensloth_original = build
    Trainer._build_accelerator_args = wrapped
    return "patched"


def ddp_patch(
    *, balance_ranks: bool = True, step_figures: bool = True, token_weighted_eval: bool = True,
    log_level: int | str | None = None,
) -> torch.device:
    """Prepare this process for DDP training under torchrun (or a plain single-process run); returns its device.

    Validates LOCAL_RANK, RANK, WORLD_SIZE and LOCAL_WORLD_SIZE (DistributedEnvironmentError naming the variable and
    value: non-integers, negatives, LOCAL_RANK >= local world size, RANK >= WORLD_SIZE), and MASTER_ADDR/MASTER_PORT
    when WORLD_SIZE > 1. Pins ``cuda:{LOCAL_RANK}`` when CUDA is available, else runs on the CPU (gloo). Logs the
    rank, device and world size once per rank. Applies the out-of-place loss-scaling fix, the
    ``ddp_find_unused_parameters=False`` default (world size > 1), with ``balance_ranks`` the rank-balanced sampler at
    train time, in a single process too (`opensloth.patching.dataloader`), with ``step_figures`` the per-step
    throughput and balance figures in the Trainer's logs (`opensloth.patching.metrics`), and with
    ``token_weighted_eval`` an eval loss that is the token-weighted mean over the whole eval set at any world size
    and eval batch size (`opensloth.patching.sft_trainer.install_token_weighted_eval`; from the first ``train()`` on,
    or call it on a trainer that evaluates before training). Imports no Unsloth; safe to call twice.
    """
    global _state
    env = read_dist_env()
    _check_rendezvous(env, os.environ)
    if _state is not None and _state.env == env:
        device = _state.device
    else:
        setup_logging(log_level)
        device, name = _pin_device(env)
        _state = _PatchState(env, device, name)
        log_all_ranks(
            logging.INFO, "rank %d of %d (local rank %d of %d) on %s: %s%s",
            env.rank, env.world_size, env.local_rank, env.local_world_size, device, name,
            "" if env.launched else " (not launched by torchrun: single process)",
        )
    from opensloth.patching.loss_scaling import apply_loss_scaling_fix

    apply_loss_scaling_fix()
    if "unsloth" in sys.modules and device.type == "cuda":
        # Unsloth's packed and padding-free batches: its own varlen kernel, also where torch < 2.12 (a no-op above)
        from opensloth.patching.unsloth_varlen import switch_on_unsloth_varlen

        switch_on_unsloth_varlen()
    if env.world_size > 1:
        default_find_unused_parameters()
        if device.type == "cpu":
            from opensloth.patching.cpu_resume import allow_indexed_cpu_locations

            allow_indexed_cpu_locations()  # resume loads the optimizer onto cpu:<rank>; torch.load lacks that tag
    if balance_ranks:
        from opensloth.patching.dataloader import maybe_install_balanced_sampler

        add_pre_train_hook(maybe_install_balanced_sampler)
    if step_figures:
        add_pre_train_hook(_attach_step_figures)
    if token_weighted_eval:
        add_pre_train_hook(_install_token_weighted_eval)
    return device


def _attach_step_figures(trainer: Any) -> None:
    from opensloth.patching.metrics import attach_step_figures

    attach_step_figures(trainer)


def _install_token_weighted_eval(trainer: Any) -> None:
    from opensloth.patching.sft_trainer import install_token_weighted_eval

    install_token_weighted_eval(trainer)
