"""One call that turns (backend, packing mode, max_seq_length) into the collator and the attention setup.

`wire_batches` is what the training scripts, the examples and the GPU benchmark call; nothing else assembles the
collator for a training run.

- ``packing="none"``: TRL's padded collator (one sample per row, padded to the micro-batch's longest).
- Unsloth (``backend="unsloth"``), every other mode: Unsloth's own packed protocol, the one its attention reads for
  every architecture it supports: one flat (1, T) row per micro-batch with ``position_ids`` restarting per sample
  and ``packed_seq_lengths`` (`opensloth.collate` ``layout="flat"``, `UNSLOTH_METADATA` of `opensloth.batch`). On
  torch < 2.12 Unsloth's own FlashAttention-2 varlen branch is switched on (`opensloth.patching.unsloth_varlen`),
  so attention is one varlen call per layer there too, as on the torch that ``pip install unsloth`` brings. What
  Unsloth's own ``packing=True`` also switches on is switched on too (`opensloth.patching.unsloth_packing`): varlen
  attention for models on the transformers modeling path here, FA3 / FA4 kernels during training through
  `BatchWiring.attach` on the trainer.
- transformers + peft (``backend="hf"``): the flat layout for padding-free samples and one-row micro-batches, else
  fixed-capacity rows (transformers builds the block-causal mask from ``position_ids``: per row, not over the whole
  micro-batch).

Then the model is asked whether it keeps packed samples apart (`opensloth.attention_check`: three tiny forwards
through this very collator). If it does not (Unsloth runs Gemma 2's softcapped attention without packing support
unless flash-attn is installed, for one), on Unsloth the next candidate is ``layout="masked_rows"``: packed rows
(P, L = max_seq_length) with ``position_ids`` restarting per sample and a dense additive block-causal ``attention_mask``
(P, 1, L, L) in the model's dtype, which Unsloth's explicit-matmul attention adds to its scores once its
keep-the-mask flag is set (`opensloth.patching.unsloth_mask`). It costs P * L * L mask elements and the scores
attention materialises anyway on that path; it is tried only when the model has no sliding window shorter than
``max_seq_length`` (one mask serves every layer, so it could not window the sliding layers), and kept only when the
same check passes through it. Otherwise the run switches to ``layout="padded"``: every sample its own row, the same
samples per step and the same loss, more padding. A warning says which, once. Under torchrun every rank checks;
once the process group is up (the Trainer's arguments start it) the ranks agree on each outcome (the most cautious
wins), and before that each rank's check is the same deterministic probe of the same weights.

The check runs through the very collator and forward the trainer uses, so it also catches boundary keys that get
lost on the way. (A watch over every training forward was tried and dropped: a labelled single-sample forward
without positions is legitimate, e.g. an evaluation of one sample, and cannot be told from a packed row that lost
its keys.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from opensloth.attention_check import PackedAttentionCheck, check_packed_attention
from opensloth.batch import UNSLOTH_METADATA
from opensloth.distributed import logger

__all__ = ["PACKING_MODES", "UNSLOTH_METADATA", "BatchWiring", "check_packed_dataset", "wire_batches"]

PACKING_MODES = ("none", "padding_free", "packed", "balanced")


@dataclass(frozen=True)
class BatchWiring:
    """What `wire_batches` chose. ``layout``: ``"trl_padded"``, ``"flat"``, ``"rows"``, ``"masked_rows"`` or
    ``"padded"``. ``check``: the packed-attention check of the chosen collator (None when not run). ``varlen``: the
    outcome of Unsloth's varlen switch (None off Unsloth). ``fallback``: why packing left the collator first chosen
    (for masked or padded rows), or None."""

    collator: Callable[..., Mapping[str, Any]]
    layout: str
    check: PackedAttentionCheck | None = None
    varlen: str | None = None
    fallback: str | None = None

    @property
    def packed(self) -> bool:
        return self.layout in ("flat", "rows", "masked_rows")

    def attach(self, trainer: Any) -> None:
        """Call once on the trainer built with this collator: on Unsloth's flat protocol it sets up what Unsloth's
        own ``packing=True`` sets up on its trainer (FA3 / FA4 flash kernels during ``train()`` where installed and
        Unsloth's own conditions and probe pass: `opensloth.patching.unsloth_packing`). Nothing on other backends and
        layouts."""
        if self.varlen is not None and self.layout == "flat":
            from opensloth.patching.unsloth_packing import scope_unsloth_flash_impl

            scope_unsloth_flash_impl(trainer, getattr(trainer, "model", None))


def _model_name(model: Any) -> str:
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # under PEFT
    config = getattr(base, "config", None)
    return f"{type(base).__name__} ({getattr(config, 'model_type', '?')})"


def _agree(honoured: bool) -> bool:
    """All ranks take the packed path only if every rank's check passed (collators must match across ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return honoured
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([1 if honoured else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _packed_collator(backend: str, packing: str, max_seq_length: int, pad_token_id: int,
                     per_device_batch_size: int):
    from opensloth.collate import PackedDataCollator

    if backend == "unsloth":
        return PackedDataCollator(pad_token_id=pad_token_id, layout="flat", metadata=UNSLOTH_METADATA), "flat"
    if packing == "padding_free" or per_device_batch_size == 1:
        return PackedDataCollator(pad_token_id=pad_token_id, layout="flat"), "flat"
    return PackedDataCollator(pad_token_id=pad_token_id, layout="rows", capacity=max_seq_length), "rows"


def check_packed_dataset(dataset: Any, max_seq_length: int) -> None:
    """Raise ValueError when ``dataset``'s packed rows (their capacity recorded by `opensloth.data.packed`) are wider
    than ``max_seq_length``: the run would be configured for shorter rows than it trains on."""
    from opensloth.data.packed import packing_stats

    stats = packing_stats(dataset) if dataset is not None else None
    if stats is not None and not isinstance(stats, dict) and stats.capacity > max_seq_length:
        raise ValueError(f"the packed dataset's rows hold up to {stats.capacity} tokens, above max_seq_length = "
                         f"{max_seq_length}; raise max_seq_length to {stats.capacity}, or pack the data again at "
                         f"{max_seq_length}")


def wire_batches(model: Any, *, backend: str, packing: str, max_seq_length: int, pad_token_id: int,
                 per_device_batch_size: int = 1, check: bool = True, dataset: Any = None) -> BatchWiring:
    """Choose the collator (and switch on Unsloth's varlen branch) for ``packing`` on ``backend``; check that
    ``model`` keeps packed samples apart and fall back to padded rows when it does not (module docstring).

    ``backend``: ``"unsloth"`` or ``"hf"``. ``packing``: one of `PACKING_MODES`. ``check=False`` skips the
    packed-attention check (and trusts the metadata). ``dataset``: the training dataset, whose recorded packing
    capacity is checked against ``max_seq_length`` (`check_packed_dataset`). Raises ValueError for an unknown backend
    or mode, or rows wider than ``max_seq_length``.
    """
    if backend not in ("unsloth", "hf"):
        raise ValueError(f"backend = {backend!r}; choose 'unsloth' or 'hf'")
    if packing not in PACKING_MODES:
        raise ValueError(f"packing = {packing!r}; choose one of {PACKING_MODES}")
    if not (isinstance(max_seq_length, int) and max_seq_length > 0):
        raise ValueError(f"max_seq_length = {max_seq_length!r} must be a positive int")
    check_packed_dataset(dataset, max_seq_length)
    if packing == "none":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return BatchWiring(DataCollatorForLanguageModeling(pad_token_id=pad_token_id), "trl_padded")
    varlen = None
    if backend == "unsloth":
        from opensloth.patching.unsloth_packing import enable_unsloth_packed_attention
        from opensloth.patching.unsloth_varlen import switch_on_unsloth_varlen

        varlen = switch_on_unsloth_varlen()
        enable_unsloth_packed_attention()  # before the check: the check then covers it
    collator, layout = _packed_collator(backend, packing, max_seq_length, pad_token_id, per_device_batch_size)
    result = None
    honoured = True
    if check:
        result = check_packed_attention(model, collator, max_tokens=max_seq_length)
        honoured = result.honoured
        if not result.conclusive:
            logger.warning("packed attention of %s could not be verified: %s; training packed anyway",
                           _model_name(model), result.describe())
    if not _agree(honoured):
        reason = (f"{_model_name(model)} on {backend} " + (result.describe() if result is not None and not honoured
                                                            else "(another rank's check failed)"))
        if backend == "unsloth":
            masked = _masked_rows(model, max_seq_length, pad_token_id, varlen, reason)
            if masked is not None:
                return masked
        from opensloth.collate import PackedDataCollator

        logger.warning("%s. Training this model on padded rows instead: every sample its own row, the same samples "
                       "and loss per step, more padding: slower, and a micro-batch of packed rows becomes every "
                       "sample they hold, so it takes far more memory (lower the per-device batch size if it runs "
                       "out). Packed attention for it needs a backend that reads the packing metadata (e.g. "
                       "flash-attn with softcapping for Gemma 2 on Unsloth)", reason)
        return BatchWiring(PackedDataCollator(pad_token_id=pad_token_id, layout="padded"),
                           "padded", result, varlen, reason)
    if result is not None:
        logger.info("packed attention of %s: %s", _model_name(model), result.describe())
    return BatchWiring(collator, layout, result, varlen)


def _sliding_window(model: Any) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/Qwen3 keep the attribute but do not window
        return None
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def _compute_dtype(model: Any) -> torch.dtype:
    """The dtype activations run in: the config's (Unsloth sets it), else the input embeddings', else float32."""
    config = getattr(model, "config", None)
    dtype = getattr(config, "dtype", None)  # transformers 5 (torch_dtype is its deprecated alias)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    dtype = getattr(getattr(embeddings, "weight", None), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _masked_rows(model: Any, max_seq_length: int, pad_token_id: int, varlen: str | None,
                 reason: str) -> BatchWiring | None:
    """The dense block-causal mask route on Unsloth (module docstring), or None when it does not apply or the check
    does not pass through it (the model's flag is then put back as it was)."""
    from opensloth.collate import PackedDataCollator
    from opensloth.patching.unsloth_mask import keep_unsloth_attention_mask

    window = _sliding_window(model)
    if window is not None and window < max_seq_length:
        logger.info("%s: no dense-mask route, its sliding window (%d) is shorter than max_seq_length (%d)",
                    _model_name(model), window, max_seq_length)
        return None
    loaded = getattr(model, "max_seq_length", None)  # Unsloth's, from from_pretrained
    if isinstance(loaded, int) and loaded < max_seq_length:
        # Unsloth cuts longer inputs at its max_seq_length along the last dimension, the mask's key axis only
        logger.info("%s: no dense-mask route, the model was loaded with max_seq_length = %d, below %d",
                    _model_name(model), loaded, max_seq_length)
        return None
    try:
        restore = keep_unsloth_attention_mask(model)
    except ValueError as err:
        logger.info("%s: no dense-mask route: %s", _model_name(model), err)
        return None
    collator = PackedDataCollator(pad_token_id=pad_token_id, layout="rows", capacity=max_seq_length,
                                  metadata=("attention_mask", "use_cache"), mask_dtype=_compute_dtype(model))
    kept = False
    try:
        result = check_packed_attention(model, collator, max_tokens=max_seq_length)
        kept = _agree(result.honoured and result.conclusive)
    finally:
        if not kept:
            restore()
    if not kept:
        logger.info("%s with a dense block-causal mask: %s", _model_name(model), result.describe())
        return None
    logger.warning("%s. Training this model on packed rows with a dense block-causal attention mask instead (%s): "
                   "the same samples per step, attention over each whole row, so a micro-batch of P rows of L tokens "
                   "costs P * L * L mask and score elements per layer (lower the per-device batch size if it runs "
                   "out of memory). Unsloth does not count the targets of batches with a 4-D mask; OpenSloth's window "
                   "patch (patch_optimize_sft_trainer_batch_samples, opensloth train) counts them, without it the "
                   "micro-batches of a step are weighted equally. flash-attn with softcapping would let Unsloth run "
                   "it packed without the mask", reason, result.describe())
    return BatchWiring(collator, "masked_rows", result, varlen, reason)
