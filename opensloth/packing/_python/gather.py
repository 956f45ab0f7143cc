"""Segment gather with numpy: one element-index gather (the python backend's ``gather_segments``)."""

from __future__ import annotations

import numpy as np


def flatten_sources(sources, chunks, starts):
    """One flat array and each segment's start in it (the sources concatenated when there are several)."""
    if len(sources) == 1:
        return sources[0], starts
    base = np.zeros(len(sources), dtype=np.int64)
    np.cumsum([s.shape[0] for s in sources[:-1]], out=base[1:])
    return np.concatenate(sources), starts + base[chunks]


def segments_held(lengths: np.ndarray, order: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """The order as an array, after checking that ``out`` holds exactly its segments (the copy loops trust it)."""
    if order is None:
        order = np.arange(lengths.shape[0], dtype=np.int64)
    held = int(lengths[order].sum())
    if held != out.shape[0]:
        raise ValueError(f"out has {out.shape[0]} elements but the segments of this order hold {held}")
    return order


def gather_segments(sources, chunks, starts, lengths, order, out) -> int:
    """Copy ``sources[chunks[j]][starts[j] : starts[j] + lengths[j]]`` for each ``j`` of ``order`` (None: every
    segment) back to back into ``out``; returns the elements written. Inputs arrive validated
    (``opensloth.packing._validate.check_segments``); several sources are concatenated first."""
    values, starts = flatten_sources(sources, chunks, starts)
    order = segments_held(lengths, order, out)
    lens = lengths[order]
    ends = np.cumsum(lens)
    shift = np.repeat(starts[order] - (ends - lens), lens)
    np.take(values, np.arange(out.shape[0], dtype=np.int64) + shift, out=out, mode="clip")  # indices checked
    return out.shape[0]
