"""The seed's ``pack()``: pack a padded batch into rows with block-pattern attention masks.

Seed-compatible import path ``opensloth.utils.packing.pack``, now on ``opensloth.packing.pack_lengths`` (best-fit
decreasing, the native/numba/python backends) and vectorised (no loop over samples or tokens in Python).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from opensloth.batch import (
    ATTENTION_MASK,
    CU_SEQ_LENS_K,
    CU_SEQ_LENS_Q,
    DEFAULT_METADATA,
    INPUT_IDS,
    LABELS,
    PACKED_SEQ_LENGTHS,
    POSITION_IDS,
    PackedBatch,
    metadata_tensors,
)
from opensloth.collate import _assemble
from opensloth.masks import Segments, dense_segment_mask

__all__ = ["ATTN_MODES", "pack"]

ATTN_MODES = ("tri", "diag", "dense")


def _rows(values: Any, name: str) -> list[np.ndarray]:
    """A (B, L) tensor/array or a list of 1-D sequences -> list of 1-D int64 arrays (views where possible)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray) and values.ndim == 2:
        arr = values
        if arr.dtype.kind not in "iub":
            raise TypeError(f"batch[{name!r}] must hold integers, got dtype {arr.dtype}")
        return list(arr.astype(np.int64, copy=False))
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise ValueError(f"batch[{name!r}] must be (B, L) or a list of 1-D sequences, got shape {values.shape}")
    out = []
    for i, row in enumerate(values):
        if isinstance(row, torch.Tensor):
            row = row.detach().cpu().numpy()
        arr = np.asarray(row)
        if arr.ndim != 1:
            raise ValueError(f"batch[{name!r}][{i}] must be 1-D, got shape {arr.shape}")
        if arr.size and (arr.dtype.kind not in "iub"):
            raise TypeError(f"batch[{name!r}][{i}] must hold integers, got dtype {arr.dtype}")
        out.append(arr.astype(np.int64, copy=False))
    return out


def _block_pattern(seg: Segments, attn_mode: str) -> torch.Tensor:
    """(P, L, L) bool: the seed's per-sample block pattern; padding rows and columns all False."""
    block = {"tri": "causal", "diag": "identity", "dense": "full"}[attn_mode]
    return dense_segment_mask(seg, block, on=True, off=False, dtype=torch.bool, pad_block="none")[:, 0]


def pack(
    batch: Mapping[str, Any],
    max_seql: int = 64,
    pad_token_id: int | None = None,
    pad_label_id: int = -100,
    device: torch.device | str | None = None,
    return_token_mask: bool = True,
    attn_mode: str = "tri",
    *,
    return_metadata: bool = False,
    mask_boundaries: bool = True,
    backend: str | None = None,
) -> dict[str, torch.Tensor]:
    """Pack a batch of B sequences into P rows of at most ``max_seql`` tokens (best-fit decreasing).

    ``batch`` (the seed's input): ``input_ids`` as a (B, L) tensor/array or a list of 1-D sequences; optional
    ``attention_mask`` (B, L), whose row sums give each sequence's length (right padding is dropped); ``labels``
    like ``input_ids`` (defaults to ``input_ids``). A sequence longer than ``max_seql`` is cut into consecutive
    pieces of ``max_seql`` tokens (the last one shorter), each packed as a sample of its own.

    ``pad_token_id`` defaults to the token found at the first padded position of the batch (where the attention
    mask is 0), else 0. The width is trimmed to ``L_eff = min(max_seql, longest row)``.

    Returns (the seed's keys): ``input_ids``, ``labels`` (P, L_eff) int64 (padding = ``pad_label_id``),
    ``position_ids`` (P, L_eff) int64 restarting at 0 for every sample, ``attention_mask`` (P, L_eff, L_eff) bool,
    ``packed_lengths`` (P,) int64 real tokens per row, and ``token_mask`` (P, L_eff) int64 (1 = real token) when
    ``return_token_mask``. ``attention_mask`` follows ``attn_mode`` inside every sample's diagonal block, with
    padding rows and columns all False (as in the seed):

    - ``"tri"``: lower-triangular, block-causal (causal LM training; the default);
    - ``"diag"``: the identity (each token sees only itself);
    - ``"dense"``: the full block (bidirectional within each sample).

    ``return_metadata=True`` returns no dense mask; instead ``packed_seq_lengths``, ``cu_seq_lens_q``/``_k``,
    ``max_length_q``/``_k`` and ``use_cache=False`` (`opensloth.batch.DEFAULT_METADATA`), and the padding of each row
    becomes a segment of its own (positions 0, 1, 2, ...) as the batch contract (`opensloth.batch`) wants; the
    result is then an `opensloth.batch.PackedBatch` whose ``segments`` record the padding. In the dense-mask mode
    padding positions are 0, as in the seed.

    Unlike the seed, ``mask_boundaries=True`` (default) sets the label of the first token of every packed sample to
    ``pad_label_id``, so no sample is trained to predict the next sample's first token and the number of trained
    targets equals the unpacked count; pass False for the seed's raw labels.
    """
    if attn_mode not in ATTN_MODES:
        raise ValueError(f"Unknown attn_mode={attn_mode!r}; use one of {ATTN_MODES} ('tri' for causal LMs)")
    if isinstance(max_seql, bool) or not isinstance(max_seql, (int, np.integer)) or max_seql <= 0:
        raise ValueError(f"max_seql = {max_seql!r} must be a positive integer (the row capacity)")
    max_seql = int(max_seql)
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("batch must be a dict with 'input_ids' (and optionally 'attention_mask', 'labels')")
    ids_rows = _rows(batch["input_ids"], "input_ids")
    n_seq = len(ids_rows)
    if n_seq == 0:
        raise ValueError("No sequences to pack: batch['input_ids'] is empty")
    label_rows = _rows(batch["labels"], "labels") if batch.get("labels") is not None else ids_rows
    if len(label_rows) != n_seq:
        raise ValueError(f"batch has {n_seq} input_ids rows but {len(label_rows)} labels rows")
    full = np.fromiter((r.shape[0] for r in ids_rows), dtype=np.int64, count=n_seq)
    if not np.array_equal(full, np.fromiter((r.shape[0] for r in label_rows), dtype=np.int64, count=n_seq)):
        i = int(np.argmax(full != np.fromiter((r.shape[0] for r in label_rows), dtype=np.int64, count=n_seq)))
        raise ValueError(f"input_ids[{i}] and labels[{i}] differ in length")

    mask = batch.get("attention_mask")
    if mask is not None:
        mask_rows = _rows(mask, "attention_mask")
        if len(mask_rows) != n_seq:
            raise ValueError(f"batch has {n_seq} input_ids rows but {len(mask_rows)} attention_mask rows")
        lengths = np.fromiter((int(np.count_nonzero(m)) for m in mask_rows), dtype=np.int64, count=n_seq)
        if (lengths > full).any():
            i = int(np.argmax(lengths > full))
            raise ValueError(
                f"attention_mask[{i}] marks {int(lengths[i])} tokens but input_ids[{i}] has {int(full[i])}")
        if pad_token_id is None:
            padded = np.flatnonzero(lengths < full)
            pad_token_id = int(ids_rows[padded[0]][lengths[padded[0]]]) if padded.size else 0
    else:
        lengths = full
    if pad_token_id is None:
        pad_token_id = 0
    if (lengths < 1).any():
        i = int(np.argmax(lengths < 1))
        raise ValueError(f"sequence {i} has no tokens (attention_mask all 0 or an empty row); drop it before packing")

    if mask is None and all(r.shape[0] == lengths[i] for i, r in enumerate(ids_rows)):
        ids = np.concatenate(ids_rows)
        labels = np.concatenate(label_rows)
    else:
        ids = np.concatenate([r[:n] for r, n in zip(ids_rows, lengths.tolist(), strict=True)])
        labels = np.concatenate([r[:n] for r, n in zip(label_rows, lengths.tolist(), strict=True)])

    # Sequences over capacity become consecutive pieces: max_seql, ..., max_seql, remainder.
    n_pieces = -(-lengths // max_seql)
    piece_lengths = np.full(int(n_pieces.sum()), max_seql, dtype=np.int64)
    last = np.cumsum(n_pieces) - 1
    piece_lengths[last] = lengths - (n_pieces - 1) * max_seql

    from opensloth.packing import pack_lengths

    plan = pack_lengths(piece_lengths, max_seql, backend=backend)
    width = int(plan.bin_lengths.max())
    # _assemble masks the first label of every piece (and may do it in place): keep the raw ones for the seed mode.
    raw_first = None if mask_boundaries else labels[np.cumsum(piece_lengths) - piece_lengths][plan.items]
    grid_ids, grid_labels, seg = _assemble(ids, labels, piece_lengths, plan.items, plan.bin_ptr, width,
                                           pad_token_id=int(pad_token_id), ignore_index=int(pad_label_id))
    if raw_first is not None:
        grid_labels[seg.starts()[~seg.is_pad]] = raw_first
    shape = (seg.n_rows, width)
    token_mask_np = ~np.repeat(seg.is_pad, seg.lengths)
    positions = seg.positions()
    out: dict[str, Any] = {
        INPUT_IDS: torch.from_numpy(grid_ids).reshape(shape),
        LABELS: torch.from_numpy(grid_labels).reshape(shape),
    }
    if return_metadata:
        out[POSITION_IDS] = torch.from_numpy(positions).reshape(shape)
        out.update(metadata_tensors(seg, DEFAULT_METADATA))
    else:
        out[POSITION_IDS] = torch.from_numpy(np.where(token_mask_np, positions, 0)).reshape(shape)
        out[ATTENTION_MASK] = _block_pattern(seg, attn_mode)
    out["packed_lengths"] = torch.from_numpy(plan.bin_lengths.astype(np.int64))
    if return_token_mask:
        out["token_mask"] = torch.from_numpy(token_mask_np.astype(np.int64)).reshape(shape)
    if device is not None:
        cpu_keys = (PACKED_SEQ_LENGTHS, CU_SEQ_LENS_Q, CU_SEQ_LENS_K)  # the contract keeps these on the CPU
        out = {k: v.to(device) if isinstance(v, torch.Tensor) and k not in cpu_keys else v for k, v in out.items()}
    return PackedBatch(out, segments=seg) if return_metadata else out
