"""Unsloth's Qwen3 attention on OpenSloth's packed rows through torch's FlashAttention-2 varlen kernel.

Why: on torch < 2.12 Unsloth 2026.10.9 cannot use torch's varlen attention (it needs ``enable_gqa``), so every
packed batch runs one SDPA call per run of equal-length documents, per layer and pass, and a batch carrying
``packed_seq_lengths`` also skips Unsloth's per-block ``torch.compile``. Given (P, L) rows with no metadata, Unsloth
runs plain causal attention over each row: packed documents attend to each other and the loss is silently wrong.

What (the "V2" path): the collator sends two keys of its own (``opensloth.collate`` metadata
``"opensloth_varlen"``): ``opensloth_cu_seqlens`` int32 (S + 1,) over the flattened P x L tokens (every row's padding
tail a segment of its own) and ``opensloth_max_seqlen``, a constant int bound. `enable_unsloth_varlen` wraps two
module globals of ``unsloth.models.qwen3`` (no source edits):

- ``get_packed_info_from_kwargs``: when the key is in the attention kwargs, returns a `VarlenInfo` marker instead of
  Unsloth's metadata; otherwise the original runs.
- ``run_attention``: for a `VarlenInfo`, one ``torch.ops.aten._flash_attention_forward`` call over all segments
  (grouped K/V heads as they are, causal), the layout of Unsloth's own FLASH_VARLEN branch; otherwise the original.

and ``unsloth.models.llama.get_packed_info_from_kwargs`` so that a one-row batch carrying the key is not re-read
from ``position_ids`` (a host sync, and it would add ``packed_seq_lengths``). The batch keeps Unsloth's compiled
blocks (no ``packed_seq_lengths``), has static shapes for ``layout="rows"``, and needs no host sync in attention.
A forward pre-hook on the model moves the key to the model's device, checks it, marks its length dynamic for
torch.compile (S changes every batch) and, on the first forwards, checks that the wrapper really ran: if Unsloth's
attention never called it, the key was ignored and documents attended to each other, so it raises.

The patch is gated on the Unsloth versions it was read against (`SUPPORTED_UNSLOTH_VERSIONS`), is idempotent, wraps
whatever is installed at the time, and raises when a target is missing. Unsloth's own varlen branch on
``packed_seq_lengths`` batches (the wired GPU path) is switched on by `opensloth.patching.unsloth_varlen`.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, NamedTuple

import torch

from opensloth.batch import VARLEN_CU_SEQLENS_KEY, VARLEN_MAX_SEQLEN_KEY
from opensloth.distributed import logger

__all__ = [
    "CU_SEQLENS_KEY",
    "MAX_SEQLEN_KEY",
    "SUPPORTED_UNSLOTH_VERSIONS",
    "UnslothPatchError",
    "VarlenInfo",
    "enable_unsloth_varlen",
    "flash_varlen_attention",
    "patch_unsloth_varlen_attention",
    "varlen_status",
]

SUPPORTED_UNSLOTH_VERSIONS = ("2026.10.9",)
CU_SEQLENS_KEY = VARLEN_CU_SEQLENS_KEY  # the batch keys opensloth.collate writes
MAX_SEQLEN_KEY = VARLEN_MAX_SEQLEN_KEY
_QWEN3 = "unsloth.models.qwen3"
_LLAMA = "unsloth.models.llama"
_DISPATCH = "unsloth.utils.attention_dispatch"
_PACKING = "unsloth.utils.packing"
_MARK = "_opensloth_varlen_wrapper"
_HOOKS_ATTR = "_opensloth_varlen_hooks"
_INT32_ELEMENTS = 2**31
_FORCE_ENV = "OPENSLOTH_UNSLOTH_ANY_VERSION"


class UnslothPatchError(RuntimeError):
    """Unsloth is not the version the patch was read against, a patch target is missing, or the patch never ran."""


class VarlenInfo(NamedTuple):
    """What the wrapped ``get_packed_info_from_kwargs`` hands to the wrapped ``run_attention``."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


# Calls of the attention wrapper seen eagerly, and how many times torch.compile traced it into a graph.
_counts = {"eager_calls": 0, "traced": 0, "checked_forwards": 0}


@torch._dynamo.assume_constant_result
def _note_traced() -> bool:
    # Dynamo runs a function marked assume_constant_result once, while tracing, and bakes its result into the graph:
    # the count records that the wrapper was compiled in, with no guard and no side effect replayed per call.
    _counts["traced"] += 1
    return True


def _note_call() -> None:
    if torch.compiler.is_compiling():
        _note_traced()
    else:
        _counts["eager_calls"] += 1


def varlen_status() -> dict[str, Any]:
    """Counters and state: ``eager_calls`` (wrapper calls outside torch.compile), ``traced`` (times it was compiled
    into a graph), ``checked_forwards`` (model forwards the pre-hook saw with the key before the check passed), and
    which module globals are wrapped now."""
    status = dict(_counts)
    for name, attr in ((_QWEN3, "get_packed_info_from_kwargs"), (_QWEN3, "run_attention"),
                       (_LLAMA, "get_packed_info_from_kwargs")):
        module = _loaded(name)
        status[f"{name}.{attr}"] = bool(module is not None and getattr(getattr(module, attr, None), _MARK, False))
    return status


def _reset_counts() -> None:
    for key in _counts:
        _counts[key] = 0


# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------


def flash_varlen_attention(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, *, scale: float | None = None) -> torch.Tensor:
    """Causal attention over every segment of the flattened batch, one FlashAttention-2 varlen launch.

    Q (B, H, L, D), K and V (B, H_kv, L, D) with H a multiple of H_kv (grouped heads are taken as they are), fp16 or
    bf16 on CUDA; ``cu_seqlens`` int32 (S + 1,) on the same device, from 0 to B * L; ``max_seqlen`` an upper bound
    of the segment lengths. Returns (B, L, H, D). Differentiable (aten's flash backward).
    """
    bsz, n_heads, q_len, head_dim = Q.shape
    n_kv = K.shape[1]
    q = Q.transpose(1, 2).reshape(bsz * q_len, n_heads, head_dim)
    k = K.transpose(1, 2).reshape(bsz * q_len, n_kv, head_dim)
    v = V.transpose(1, 2).reshape(bsz * q_len, n_kv, head_dim)
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, scale=scale
    )[0]
    return out.view(bsz, q_len, n_heads, head_dim)


# ---------------------------------------------------------------------------------------------------------------
# Wrappers of Unsloth's module globals
# ---------------------------------------------------------------------------------------------------------------


def _varlen_info(kwargs: dict, device: Any) -> VarlenInfo:
    cu = kwargs[CU_SEQLENS_KEY]
    max_seqlen = kwargs.get(MAX_SEQLEN_KEY)
    if max_seqlen is None:
        raise ValueError(f"the batch has {CU_SEQLENS_KEY} but no {MAX_SEQLEN_KEY}; collate with "
                         f"opensloth.collate metadata 'opensloth_varlen', which sends both")
    if cu.device != torch.device(device):
        cu = cu.to(device=device, non_blocking=True)
    return VarlenInfo(cu, max_seqlen)


def _wrap_attention_packed_info(original: Any) -> Any:
    @functools.wraps(original)
    def get_packed_info_from_kwargs(kwargs, device, *args, **more):
        if isinstance(kwargs, dict) and kwargs.get(CU_SEQLENS_KEY) is not None:
            return _varlen_info(kwargs, device)
        return original(kwargs, device, *args, **more)

    setattr(get_packed_info_from_kwargs, _MARK, True)
    get_packed_info_from_kwargs._opensloth_original = original
    return get_packed_info_from_kwargs


def _wrap_model_packed_info(original: Any) -> Any:
    """unsloth.models.llama's name: called with position_ids by the model forward (batch size 1, to infer lengths),
    and without by Llama's own attention, which this patch does not route."""

    @functools.wraps(original)
    def get_packed_info_from_kwargs(kwargs, device, *args, **more):
        if isinstance(kwargs, dict) and kwargs.get(CU_SEQLENS_KEY) is not None:
            if args or more.get("position_ids") is not None:
                return None  # the attention reads our key; no lengths from position_ids, no packed_seq_lengths
            raise UnslothPatchError(
                f"{CU_SEQLENS_KEY} reached unsloth.models.llama's attention, which OpenSloth does not route (only "
                f"Qwen3 is supported); collate without the 'opensloth_varlen' metadata for this model"
            )
        return original(kwargs, device, *args, **more)

    setattr(get_packed_info_from_kwargs, _MARK, True)
    get_packed_info_from_kwargs._opensloth_original = original
    return get_packed_info_from_kwargs


def _run_varlen(config: Any, context: Any, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                info: VarlenInfo) -> torch.Tensor:
    if context.attention_mask is not None:
        raise ValueError(f"a batch with {CU_SEQLENS_KEY} must not carry an attention_mask (the segments are the mask)")
    if context.kv_seq_len != context.q_len:
        raise ValueError(f"{CU_SEQLENS_KEY} is for training forwards without a KV cache (q_len {context.q_len}, "
                         f"kv_seq_len {context.kv_seq_len}); pass use_cache=False")
    if getattr(context, "sliding_window", None) is not None or getattr(context, "prefix_seg_info", None) is not None:
        raise ValueError(f"{CU_SEQLENS_KEY} does not support sliding-window or shared-prefix attention")
    if not getattr(context, "is_causal", True):
        raise ValueError(f"{CU_SEQLENS_KEY} routes causal attention only")
    if Q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"FlashAttention-2 varlen needs fp16/bf16 tensors, got {Q.dtype}; load the model in "
                         f"bf16/4-bit or collate without the 'opensloth_varlen' metadata")
    _note_call()
    scale = (getattr(config, "flash_varlen_kwargs", None) or {}).get("softmax_scale")
    if K.dtype != Q.dtype:
        K, V = K.to(Q.dtype), V.to(Q.dtype)
    return flash_varlen_attention(Q, K, V, info.cu_seqlens, info.max_seqlen, scale=scale)


def _wrap_run_attention(original: Any) -> Any:
    @functools.wraps(original)
    def run_attention(*args, **kwargs):
        context = kwargs.get("context")
        if context is not None and isinstance(getattr(context, "seq_info", None), VarlenInfo):
            return _run_varlen(kwargs.get("config"), context, kwargs["Q"], kwargs["K"], kwargs["V"],
                               context.seq_info)
        return original(*args, **kwargs)

    setattr(run_attention, _MARK, True)
    run_attention._opensloth_original = original
    return run_attention


# ---------------------------------------------------------------------------------------------------------------
# Installing
# ---------------------------------------------------------------------------------------------------------------


def _loaded(name: str) -> Any:
    import sys

    return sys.modules.get(name)


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UnslothPatchError(f"cannot import {name} ({exc}); OpenSloth's varlen attention patches Unsloth "
                                f"{', '.join(SUPPORTED_UNSLOTH_VERSIONS)}: `import unsloth` first") from exc


def _check_version(allow_untested: bool) -> str:
    unsloth = _import("unsloth")
    version = str(getattr(unsloth, "__version__", "unknown"))
    if version in SUPPORTED_UNSLOTH_VERSIONS:
        return version
    if allow_untested or os.environ.get(_FORCE_ENV, "0") == "1":
        logger.warning("Unsloth %s is not a version the varlen attention patch was read against (%s); patching "
                       "anyway because it was asked for", version, ", ".join(SUPPORTED_UNSLOTH_VERSIONS))
        return version
    raise UnslothPatchError(
        f"Unsloth {version} is installed; OpenSloth's varlen attention patch was read against "
        f"{', '.join(SUPPORTED_UNSLOTH_VERSIONS)} and wraps its internal names. Install unsloth=="
        f"{SUPPORTED_UNSLOTH_VERSIONS[-1]}, or pass allow_untested=True (or set {_FORCE_ENV}=1) and check the "
        f"packed-equals-unpacked GPU test (tests/gpu) on your version"
    )


def _install(module: Any, attr: str, wrap: Any) -> bool:
    current = getattr(module, attr, None)
    if current is None or not callable(current):
        raise UnslothPatchError(
            f"{module.__name__}.{attr} is missing; this Unsloth version changed the attention path the varlen patch "
            f"wraps (read against {', '.join(SUPPORTED_UNSLOTH_VERSIONS)})"
        )
    if getattr(current, _MARK, False):
        return False
    setattr(module, attr, wrap(current))
    return True


def patch_unsloth_varlen_attention(*, allow_untested: bool = False) -> str:
    """Wrap Unsloth's Qwen3 ``get_packed_info_from_kwargs`` and ``run_attention`` (and the Llama model-level
    ``get_packed_info_from_kwargs``) so batches carrying ``opensloth_cu_seqlens`` run FlashAttention-2 varlen.

    Returns "patched" or "already". Raises `UnslothPatchError` for an Unsloth version outside
    `SUPPORTED_UNSLOTH_VERSIONS` (unless ``allow_untested``) or a missing target. Batches without the key are
    untouched. Import Unsloth first.
    """
    version = _check_version(allow_untested)
    qwen3 = _import(_QWEN3)
    llama = _import(_LLAMA)
    changed = _install(qwen3, "get_packed_info_from_kwargs", _wrap_attention_packed_info)
    changed |= _install(qwen3, "run_attention", _wrap_run_attention)
    changed |= _install(llama, "get_packed_info_from_kwargs", _wrap_model_packed_info)
    if changed:
        logger.info("Unsloth %s: Qwen3 attention runs FlashAttention-2 varlen on batches with %s", version,
                    CU_SEQLENS_KEY)
        return "patched"
    return "already"


def _model_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) or config


def _check_int32_limit(model: Any, n_segments: int, total: int) -> None:
    """FlashAttention-2's varlen backward indexes a (total + 128 * S) x H x D buffer with int32."""
    config = _model_config(model)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (
        getattr(config, "hidden_size", 0) // heads if heads else None)
    if not heads or not head_dim:
        return
    elements = (total + 128 * n_segments) * heads * (-(-head_dim // 32) * 32)
    if elements >= _INT32_ELEMENTS:
        raise ValueError(
            f"the batch holds {n_segments} segments over {total} tokens: FlashAttention-2's varlen backward would "
            f"index {elements:,} elements with int32 (limit {_INT32_ELEMENTS:,}) and fault; put fewer tokens or "
            f"segments in one micro-batch"
        )


def _pre_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    cu = kwargs.get(CU_SEQLENS_KEY)
    if cu is None:
        return None
    if "packed_seq_lengths" in kwargs:
        raise ValueError(f"the batch carries both {CU_SEQLENS_KEY} and packed_seq_lengths; collate with metadata "
                         f"opensloth.collate.UNSLOTH_VARLEN_METADATA only (packed_seq_lengths switches off Unsloth's "
                         f"compiled blocks and, with several rows, builds a (P*L)^2 mask)")
    max_seqlen = kwargs.get(MAX_SEQLEN_KEY)
    if isinstance(max_seqlen, torch.Tensor) and max_seqlen.numel() == 1:
        max_seqlen = int(max_seqlen.item())  # a collator that tensorised it; a host read once per forward
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen <= 0:
        raise ValueError(f"{MAX_SEQLEN_KEY} = {max_seqlen!r} must be a positive int (a constant bound of the segment "
                         f"lengths, e.g. max_seq_length)")
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{CU_SEQLENS_KEY} must be a 1-D tensor of S + 1 offsets, got "
                         f"{type(cu).__name__} {tuple(getattr(cu, 'shape', ()))}")
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    if isinstance(ref, torch.Tensor):
        total = ref.shape[0] * ref.shape[1]
        _check_int32_limit(module, cu.numel() - 1, total)
        if cu.device != ref.device or cu.dtype != torch.int32:
            cu = cu.to(device=ref.device, dtype=torch.int32, non_blocking=True)
    kwargs = {**kwargs, CU_SEQLENS_KEY: cu, MAX_SEQLEN_KEY: max_seqlen}
    # S changes every batch: without the mark every compiled block recompiles once before going dynamic.
    torch._dynamo.maybe_mark_dynamic(cu, 0)
    hooks = module.__dict__.get(_HOOKS_ATTR)
    if hooks is not None and not hooks["verified"]:
        hooks["before"] = _counts["eager_calls"] + _counts["traced"]
        hooks["pending"] = True
    return args, kwargs


def _post_hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
    hooks = module.__dict__.get(_HOOKS_ATTR)
    if hooks is None or hooks["verified"] or not hooks.get("pending"):
        return
    hooks["pending"] = False
    _counts["checked_forwards"] += 1
    if _counts["eager_calls"] + _counts["traced"] > hooks["before"]:
        hooks["verified"] = True
        return
    raise UnslothPatchError(
        f"the batch carried {CU_SEQLENS_KEY} but Unsloth's attention never called OpenSloth's varlen wrapper: the "
        f"packed documents attended to each other. Was the model loaded with FastLanguageModel (Qwen3), and was "
        f"unsloth.models.qwen3 re-imported or re-patched after enable_unsloth_varlen? Status: {varlen_status()}"
    )


def enable_unsloth_varlen(model: Any, *, allow_untested: bool = False) -> Any:
    """Make ``model`` (an Unsloth FastLanguageModel Qwen3, PEFT-wrapped or not) train on batches collated with
    ``opensloth.collate`` metadata ``"opensloth_varlen"`` through FlashAttention-2 varlen. Returns the model.

    Applies `patch_unsloth_varlen_attention`, lets packed rows exceed ``max_seq_length`` (Unsloth would truncate
    a longer flat batch), and registers a forward pre-hook (moves and checks the key, marks it dynamic for
    torch.compile) and a post-hook that raises `UnslothPatchError` if the first forward carrying the key never
    reached the wrapper. Safe to call twice.
    """
    patch_unsloth_varlen_attention(allow_untested=allow_untested)
    packing = _import(_PACKING)
    mark = getattr(packing, "mark_allow_overlength", None)
    if mark is None:
        raise UnslothPatchError(f"{_PACKING}.mark_allow_overlength is missing (read against "
                                f"{', '.join(SUPPORTED_UNSLOTH_VERSIONS)})")
    mark(model)
    if _HOOKS_ATTR not in model.__dict__:
        state = {"verified": False, "pending": False, "before": 0}
        state["handles"] = (model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                            model.register_forward_hook(_post_hook, with_kwargs=True))
        model.__dict__[_HOOKS_ATTR] = state
    return model
