"""Plug `opensloth.sampler.BalancedBatchSampler` into an HF Trainer's training DataLoader.

The Trainer builds its training DataLoader in ``get_train_dataloader`` and hands it to ``accelerator.prepare``,
which wraps a batch sampler in ``BatchSamplerShard``: batch ``i`` goes to rank ``i % world_size``. The balanced
sampler runs in its global mode there (``rank=None``): it yields every rank's micro-batches interleaved in exactly
that order, and its per-epoch batch count is a multiple of the world size with ``batch_size = None`` (variable-size
batches allowed), so accelerate's sharding hands each rank its own plan, with nothing dropped or repeated.

``use_balanced_sampler(trainer)`` replaces ``trainer.get_train_dataloader`` on the instance. `ddp_patch` installs
it automatically at ``train()`` time, at any world size (one process included, so that it follows the curve of N
ranks), when the training dataset is map-style and the trainer uses the default random sampling
(``train_sampling_strategy="random"``); ``OPENSLOTH_BALANCE_RANKS=0`` or ``ddp_patch(balance_ranks=False)`` turns
that off.
"""

from __future__ import annotations

import os
import types
from functools import partial
from typing import Any

import numpy as np

from opensloth.distributed import logger
from opensloth.patching.state import trainer_state
from opensloth.sampler import BalancedBatchSampler, WorkModel

__all__ = ["dataset_lengths", "maybe_install_balanced_sampler", "use_balanced_sampler"]

_MARK = "_opensloth_balanced_loader"


def dataset_lengths(dataset: Any, *, seq_lengths_key: str = "seq_lengths",
                    length_column: str | None = "length") -> tuple[np.ndarray | None, list | None]:
    """(token lengths, per-row sample lengths or None) of every item of a map-style dataset.

    Packed rows (a ``seq_lengths`` column) give both; otherwise the ``length_column`` if the dataset has one, else
    the length of each item's ``input_ids``. Returns (None, None) for a dataset without a length.
    """
    try:
        n = len(dataset)
    except TypeError:
        return None, None
    columns = getattr(dataset, "column_names", None)
    if columns is not None:  # a datasets.Dataset: read columns through Arrow, without decoding rows
        if seq_lengths_key in columns:
            rows = [list(r) for r in dataset.with_format(None)[seq_lengths_key]]
            return np.asarray([sum(r) for r in rows], dtype=np.int64), rows
        if length_column and length_column in columns:
            return np.asarray(dataset.with_format(None)[length_column], dtype=np.int64), None
        if "input_ids" in columns:
            import pyarrow.compute as pc

            col = dataset.with_format("arrow")[:]["input_ids"]
            return np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False), dtype=np.int64), None
        return None, None
    lengths, rows = np.empty(n, dtype=np.int64), []
    for i in range(n):
        item = dataset[i]
        if not hasattr(item, "get") or item.get("input_ids") is None:
            return None, None
        lengths[i] = len(item["input_ids"])
        if seq_lengths_key in item:
            rows.append(list(item[seq_lengths_key]))
    return lengths, (rows if len(rows) == n else None)


def _training_dataloader(self, sampler: BalancedBatchSampler):
    """What ``Trainer._get_dataloader`` does for training, with our batch sampler in place of batch_size/sampler."""
    from torch.utils.data import DataLoader

    dataset, collator = self.train_dataset, self.data_collator
    try:
        import datasets

        is_hf = isinstance(dataset, datasets.Dataset)
    except ImportError:
        is_hf = False
    if is_hf and hasattr(self, "_remove_unused_columns"):
        dataset = self._remove_unused_columns(dataset, description="Training")
    elif hasattr(self, "_get_collator_with_removed_columns"):
        collator = self._get_collator_with_removed_columns(collator, description="Training")
    args = self.args
    params: dict[str, Any] = {
        "batch_sampler": sampler,
        "collate_fn": collator,
        "num_workers": args.dataloader_num_workers,
        "pin_memory": args.dataloader_pin_memory,
    }
    if args.dataloader_num_workers > 0:
        params["persistent_workers"] = args.dataloader_persistent_workers
        params["prefetch_factor"] = args.dataloader_prefetch_factor
        params["multiprocessing_context"] = args.dataloader_multiprocessing_context
        try:
            from transformers.trainer_utils import seed_worker

            params["worker_init_fn"] = partial(seed_worker, num_workers=args.dataloader_num_workers,
                                               rank=args.process_index)
        except (ImportError, TypeError):
            pass
    loader = self.accelerator.prepare(DataLoader(dataset, **params))
    shard = getattr(loader, "batch_sampler", None)
    if shard is not sampler and getattr(shard, "batch_sampler", None) is sampler:
        if getattr(shard, "split_batches", False):
            raise ValueError(
                "accelerate's split_batches=True splits every batch across ranks, which breaks the balanced plan; "
                "leave AcceleratorConfig(split_batches=False) (the default) with the balanced sampler"
            )
        # DataLoaderShard.set_epoch reaches a sharded batch sampler through `.sampler`, before and after
        # skip_first_batches (checkpoint resume); BatchSamplerShard has none of its own.
        shard.sampler = sampler
    return loader


def use_balanced_sampler(
    trainer: Any,
    *,
    lengths: Any = None,
    seq_lengths: Any = None,
    work_model: WorkModel | None = None,
    window_steps: int = 32,
    row_capacity: int | None = None,
    balance_across_steps: bool | None = None,
) -> BalancedBatchSampler:
    """Train ``trainer`` with a `BalancedBatchSampler` (replaces ``get_train_dataloader`` on the instance).

    Lengths come from the training dataset unless given (read once, here). The sampler takes the trainer's
    micro-batch size, gradient accumulation, world size, seed (``data_seed`` if set) and ``dataloader_drop_last``
    each time the dataloader is built; the one in use is ``trainer_state(trainer).sampler``
    (`opensloth.patching.state`), and the one built now is returned. ``row_capacity``: the collator pads packed rows
    to this width (the rows layout), so a row's padding is work too; leave None for flat micro-batches.
    ``balance_across_steps``: the sampler's opt-in that changes which samples each step trains (None:
    ``OPENSLOTH_BALANCE_ACROSS_STEPS``). Raises ValueError when the dataset's
    lengths cannot be read or the dataset is too small for one step.
    """
    args = trainer.args
    if lengths is None and seq_lengths is None:
        lengths, seq_lengths = dataset_lengths(trainer.train_dataset, length_column=args.length_column_name)
        if lengths is None:
            raise ValueError(
                f"cannot read per-item lengths from the training dataset ({type(trainer.train_dataset).__name__}); "
                "pass lengths= (tokens per item) or seq_lengths= (per-row sample lengths)"
            )
    if work_model is None:
        config = getattr(getattr(trainer, "model", None), "config", None)
        work_model = WorkModel.for_config(config) if config is not None else WorkModel()

    def make_sampler(self) -> BalancedBatchSampler:
        # Built from the arguments at each call: auto_find_batch_size may lower the batch size between attempts.
        targs = self.args
        return BalancedBatchSampler(
            lengths,
            seq_lengths=seq_lengths,
            batch_size=getattr(self, "_train_batch_size", None) or targs.train_batch_size,
            grad_accum=targs.gradient_accumulation_steps,
            world_size=max(1, targs.world_size),
            rank=None,
            seed=targs.data_seed if getattr(targs, "data_seed", None) is not None else targs.seed,
            drop_last=targs.dataloader_drop_last,
            work_model=work_model,
            window_steps=window_steps,
            row_capacity=row_capacity if seq_lengths is not None else None,
            balance_across_steps=balance_across_steps,
        )

    def get_train_dataloader(self):
        state = trainer_state(self)
        state.sampler = make_sampler(self)
        return _training_dataloader(self, state.sampler)

    sampler = make_sampler(trainer)  # validates now (a too-small dataset fails here, not at train time)
    setattr(get_train_dataloader, _MARK, True)
    trainer.get_train_dataloader = types.MethodType(get_train_dataloader, trainer)
    trainer_state(trainer).sampler = sampler
    logger.info(
        "balanced sampler: %d items, %d optimizer steps per epoch, %d micro-batches per rank",
        sampler.num_items, sampler.num_steps, sampler.batches_per_rank(),
    )
    return sampler


def _enabled() -> bool:
    return os.environ.get("OPENSLOTH_BALANCE_RANKS", "1").strip().lower() not in ("0", "false", "no", "off")


def maybe_install_balanced_sampler(trainer: Any) -> bool:
    """Pre-train hook: install the balanced sampler when it applies (see the module docstring); True if it did."""
    current = getattr(trainer, "get_train_dataloader", None)
    if getattr(getattr(current, "__func__", current), _MARK, False) or not _enabled():
        return False
    args = trainer.args
    # World size 1 too: the plan depends only on the global batch, so one process trains the same samples per step
    # as N ranks do, and the single-GPU run of a script is the curve its N-GPU run follows.
    strategy = str(getattr(args, "train_sampling_strategy", "random"))
    if strategy.split(".")[-1].lower() != "random" or getattr(args, "group_by_length", False):
        logger.debug("balanced sampler not installed: train_sampling_strategy=%s was chosen explicitly", strategy)
        return False
    try:
        use_balanced_sampler(trainer)
    except (ValueError, TypeError) as exc:
        logger.warning("balanced sampler not installed: %s", exc)
        return False
    return True
