"""HTML previews of training batches: which tokens are trained, which are masked, where packed samples begin/end.

`debug_chat_dataloader_for_training(dataloader, tokenizer, n_example=10)` (the seed's API) writes one
self-contained page per batch under `.log/` (inline CSS and a small inline script, nothing fetched) and logs
the paths. Every row shows each token as its own span (class `tr` = trained, label != -100; `ms` = masked;
`pd` = padding), each packed sample wrapped in a `.sample` element that opens with a `.bnd` boundary marker,
and a per-row summary (tokens, samples, trained, masked, padding, fill). Tokens inside a tool call get the extra class
`tc` and tokens inside a tool result `tres` (outlined, on top of the trained/masked colour): the regions between the
chat template's markers in `TOOL_MARKERS` (Qwen/Hermes `<tool_call>`/`<tool_response>`, Mistral `[TOOL_CALLS]`/
`[TOOL_RESULTS]`, Llama 3 `ipython` turns), found in the decoded text of each sample (a format example the template
writes into the system prompt is outlined too). The inline script recounts all of it from the DOM and writes the
result into `#dom-counts`, so a browser-rendered page can be checked against the batch.

Sample boundaries come from, in order: per-row `seq_lengths`, `packed_seq_lengths`, `cu_seq_lens_q`/`cu_seq_lens_k`,
then `position_ids` (via `opensloth.masks`); without any of them a row is one sample. Padding is
`attention_mask == 0` when the batch has a mask; otherwise a row's last segment when it is all pad tokens with
label -100 (the rows layout's trailing padding segment).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from opensloth.distributed import logger

IGNORE_INDEX = -100
# (css class, opening marker, closing marker): a region from an opening marker through its closing marker (or the end
# of the sample) is a tool call ("tc") or a tool result ("tres").
TOOL_MARKERS: tuple[tuple[str, str, str], ...] = (
    ("tc", "<tool_call>", "</tool_call>"),  # Qwen2.5 / Qwen3 / Hermes
    ("tres", "<tool_response>", "</tool_response>"),
    ("tc", "[TOOL_CALLS]", "</s>"),  # Mistral
    ("tres", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
    ("tres", "<|start_header_id|>ipython<|end_header_id|>", "<|eot_id|>"),  # Llama 3.x tool results
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 16px; background: #fff; color: #222; }
table.summary { border-collapse: collapse; margin: 8px 0 16px; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
.legend span { margin-right: 12px; }
.row { margin: 14px 0; border-top: 2px solid #888; padding-top: 6px; }
.tokens { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; word-break: break-all;
          line-height: 1.7; }
.t { border-radius: 2px; }
.tr { background: #ffd59e; }
.ms { background: #d8ecd8; color: #555; }
.pd { background: #eee; color: #aaa; }
.t.sp { font-weight: bold; }
.tc { outline: 1px dashed #7b2cbf; outline-offset: -1px; color: #5a189a; }
.tres { outline: 1px dotted #0a7e8c; outline-offset: -1px; font-style: italic; }
.sample:nth-child(odd) .t { border-bottom: 2px solid #36c; }
.sample:nth-child(even) .t { border-bottom: 2px solid #c63; }
.bnd { background: #36c; color: #fff; font-size: 10px; padding: 0 3px; margin: 0 2px; border-radius: 3px; }
.note { color: #777; font-style: italic; }
#dom-counts { color: #999; font-size: 10px; white-space: pre-wrap; }
"""

# Recounts the page from the DOM (what a reader actually sees) and writes the totals into #dom-counts.
_SCRIPT = """
(function () {
  var rows = document.querySelectorAll('.row');
  var out = {rows: rows.length, tokens: 0, trained: 0, masked: 0, padding: 0, samples: 0, boundaries: 0,
             tool_call: 0, tool_result: 0, per_row: []};
  rows.forEach(function (row) {
    var r = {row: Number(row.dataset.row),
             tokens: row.querySelectorAll('.t').length,
             trained: row.querySelectorAll('.t.tr').length,
             masked: row.querySelectorAll('.t.ms').length,
             padding: row.querySelectorAll('.t.pd').length,
             tool_call: row.querySelectorAll('.t.tc').length,
             tool_result: row.querySelectorAll('.t.tres').length,
             samples: row.querySelectorAll('.sample').length,
             boundaries: row.querySelectorAll('.bnd').length,
             sample_lengths: Array.prototype.map.call(row.querySelectorAll('.sample'),
               function (s) { return s.querySelectorAll('.t').length; })};
    out.per_row.push(r);
    ['tokens', 'trained', 'masked', 'padding', 'samples', 'boundaries', 'tool_call', 'tool_result'].forEach(
      function (k) { out[k] += r[k]; });
  });
  var el = document.getElementById('dom-counts');
  el.textContent = JSON.stringify(out);
  el.setAttribute('data-ready', '1');
})();
"""


def _to_numpy(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError):  # ragged lists
        return None


def _as_rows(arr: np.ndarray) -> np.ndarray:
    return arr[None, :] if arr.ndim == 1 else arr


def _split_flat_lengths(lengths: np.ndarray, n_rows: int, width: int) -> list[np.ndarray] | None:
    """Split concatenated per-sample lengths into rows of `width` tokens (None when they don't tile the batch)."""
    lengths = lengths.astype(np.int64).ravel()
    if lengths.sum() != n_rows * width:
        return None
    out, cur, acc = [], [], 0
    for n in lengths:
        cur.append(int(n))
        acc += int(n)
        if acc == width:
            out.append(np.asarray(cur, dtype=np.int64))
            cur, acc = [], 0
        elif acc > width:
            return None
    return out if len(out) == n_rows else None


def _row_lengths(batch: dict, n_rows: int, width: int) -> tuple[list[np.ndarray] | None, str]:
    """Per-row segment lengths and the key they came from."""
    seq = batch.get("seq_lengths")
    if seq is not None:
        if isinstance(seq, (list, tuple)) and len(seq) == n_rows and all(
            np.ndim(_to_numpy(s)) == 1 for s in seq
        ):
            rows = [_to_numpy(s).astype(np.int64) for s in seq]
        else:
            arr = _to_numpy(seq)
            rows = None
            if arr is not None and arr.ndim == 2 and arr.shape[0] == n_rows:
                rows = [r[r > 0].astype(np.int64) for r in arr]  # zero-padded (B, S)
            elif arr is not None and arr.ndim == 1:
                rows = _split_flat_lengths(arr, n_rows, width)
        if rows is not None and all(int(r.sum()) <= width for r in rows):
            return rows, "seq_lengths"
    for key in ("packed_seq_lengths",):
        arr = _to_numpy(batch.get(key))
        if arr is not None:
            rows = _split_flat_lengths(arr, n_rows, width)
            if rows is not None:
                return rows, key
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        arr = _to_numpy(batch.get(key))
        if arr is not None and arr.ndim == 1 and len(arr) >= 2:
            rows = _split_flat_lengths(np.diff(arr.astype(np.int64)), n_rows, width)
            if rows is not None:
                return rows, key
    pos = _to_numpy(batch.get("position_ids"))
    if pos is not None:
        try:
            from opensloth.masks import lengths_from_position_ids
        except ImportError as exc:  # pragma: no cover - masks is part of the package
            logger.warning("position_ids present but opensloth.masks is unavailable (%s); no sample boundaries", exc)
            return None, "none"
        pos = _as_rows(pos)
        if pos.shape == (n_rows, width):
            return [np.asarray(lengths_from_position_ids(row), dtype=np.int64) for row in pos], "position_ids"
    return None, "none"


def _token_texts(tokenizer, ids: np.ndarray) -> list[str]:
    flat = [int(i) for i in ids]
    try:
        return tokenizer.batch_decode([[i] for i in flat], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
    except Exception:  # noqa: BLE001 - fall back to raw token strings
        return [str(t) for t in tokenizer.convert_ids_to_tokens(flat)]


def _tool_classes(texts: list[str], markers) -> list[str]:
    """Per token of one sample: "tc", "tres" or "" from the marker regions of the sample's decoded text."""
    ends = np.cumsum([len(t) for t in texts])
    starts = ends - np.asarray([len(t) for t in texts], dtype=np.int64)
    joined = "".join(texts)
    out = [""] * len(texts)
    regions = []
    for cls, opening, closing in markers:
        at = joined.find(opening)
        while at >= 0:
            close = joined.find(closing, at + len(opening))
            stop = len(joined) if close < 0 else close + len(closing)
            regions.append((at, stop, cls))
            at = joined.find(opening, stop)
    for a, b, cls in regions:
        first = int(np.searchsorted(ends, a, side="right"))
        last = int(np.searchsorted(starts, b, side="left"))
        for t in range(first, min(last, len(texts))):
            out[t] = out[t] or cls
    return out


def _visible(text: str) -> str:
    return html.escape(text.replace("\t", "\u2192\t").replace("\n", "\u21b5\n"), quote=False)


def _render_row(r: int, ids, labels, pad, lengths, special_ids, tokenizer, max_tokens: int | None,
                tool_markers=TOOL_MARKERS) -> tuple[str, dict]:
    width = len(ids)
    trained = labels != IGNORE_INDEX
    n_pad = int(pad.sum())
    stats = {
        "row": r, "tokens": width, "trained": int((trained & ~pad).sum()), "masked": int((~trained & ~pad).sum()),
        "padding": n_pad, "fill": (width - n_pad) / width if width else 0.0,
    }
    if lengths is None:
        lengths = np.asarray([width], dtype=np.int64)
    shown = width if max_tokens is None else min(width, max_tokens)
    texts = _token_texts(tokenizer, ids[:shown])
    parts = []
    start = 0
    n_samples = 0
    sample_lengths = []
    n_tool = {"tc": 0, "tres": 0}
    for n in lengths.tolist():
        end = start + int(n)
        is_padding = bool(pad[start:end].all()) and end > start
        if start >= shown:
            break
        if is_padding:
            parts.append(f'<span class="padding" data-start="{start}" data-len="{n}">')
        else:
            parts.append(f'<span class="sample" data-sample="{n_samples}" data-start="{start}" data-len="{n}">'
                         f'<span class="bnd" title="sample {n_samples} begins at token {start}: {n} tokens">'
                         f"\u27e6{n_samples}</span>")
            n_samples += 1
            sample_lengths.append(int(n))
        stop = min(end, shown)
        tools = _tool_classes(texts[start:stop], tool_markers) if tool_markers and not is_padding else None
        for t in range(start, stop):
            cls = "pd" if pad[t] else ("tr" if trained[t] else "ms")
            if int(ids[t]) in special_ids:
                cls += " sp"
            if tools and tools[t - start]:
                cls += " " + tools[t - start]
                n_tool[tools[t - start]] += 1
            title = html.escape(f"#{t} id={int(ids[t])} label={int(labels[t])}", quote=True)
            parts.append(f'<span class="t {cls}" data-i="{t}" title="{title}">{_visible(texts[t])}</span>')
        parts.append("</span>")
        start = end
    if shown < width:
        parts.append(f'<span class="note"> \u2026 {width - shown} more tokens not shown</span>')
    stats["samples"] = n_samples
    stats["sample_lengths"] = sample_lengths
    stats["tool_call"], stats["tool_result"] = n_tool["tc"], n_tool["tres"]
    head = (f'<div class="row" id="row-{r}" data-row="{r}" data-tokens="{width}" data-trained="{stats["trained"]}" '
            f'data-masked="{stats["masked"]}" data-padding="{n_pad}" data-samples="{n_samples}" '
            f'data-fill="{stats["fill"]:.4f}"><h2>Row {r}</h2><div class="tokens">')
    return head + "".join(parts) + "</div></div>\n", stats


def render_batch_html(
    batch: dict, tokenizer, *, title: str = "batch", max_tokens_per_row: int | None = None,
    tool_markers=TOOL_MARKERS,
) -> tuple[str, dict]:
    """Render one collated batch as a self-contained HTML page; returns `(html_text, summary)`.

    `tool_markers`: `(css class, opening, closing)` triples outlining tool calls ("tc") and tool results ("tres");
    empty to turn it off.
    """
    if not isinstance(batch, dict) or "input_ids" not in batch:
        keys = sorted(batch.keys()) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"a batch must be a dict with 'input_ids' (got {keys})")
    ids = _to_numpy(batch["input_ids"])
    if ids is None or ids.ndim not in (1, 2):
        raise ValueError("input_ids must be a 1-D or 2-D array of token ids (pad ragged rows first)")
    ids = _as_rows(ids).astype(np.int64)
    n_rows, width = ids.shape
    labels = _to_numpy(batch.get("labels"))
    labels = ids.copy() if labels is None else _as_rows(labels).astype(np.int64)
    if labels.shape != ids.shape:
        raise ValueError(f"labels shape {labels.shape} differs from input_ids shape {ids.shape}")
    row_lengths, source = _row_lengths(batch, n_rows, width)
    attn = _to_numpy(batch.get("attention_mask"))
    if attn is not None:
        attn = _as_rows(attn)
        if row_lengths is None:
            source = "attention_mask"
    pad_id = getattr(tokenizer, "pad_token_id", None)
    full_lengths = []
    for r in range(n_rows):
        lengths = row_lengths[r] if row_lengths is not None else None
        if lengths is not None and int(lengths.sum()) < width:  # lengths cover real tokens only: rest is padding
            lengths = np.append(lengths, width - int(lengths.sum()))
        full_lengths.append(lengths)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    rows_html, row_stats = [], []
    for r in range(n_rows):
        lengths = full_lengths[r]
        if attn is not None and attn.shape == ids.shape:
            pad = attn[r] == 0
        else:
            pad = np.zeros(width, dtype=bool)
            if lengths is not None and len(lengths) > 1 and pad_id is not None:
                tail = slice(width - int(lengths[-1]), width)
                if (ids[r, tail] == pad_id).all() and (labels[r, tail] == IGNORE_INDEX).all():
                    pad[tail] = True
        if lengths is None and pad.any():  # no boundaries given: real tokens and padding as separate runs
            change = np.flatnonzero(np.diff(pad.astype(np.int8))) + 1
            lengths = np.diff(np.concatenate([[0], change, [width]])).astype(np.int64)
        h, st = _render_row(r, ids[r], labels[r], pad, lengths, special_ids, tokenizer, max_tokens_per_row,
                            tool_markers)
        rows_html.append(h)
        row_stats.append(st)
    totals = {k: sum(s[k] for s in row_stats)
              for k in ("tokens", "trained", "masked", "padding", "samples", "tool_call", "tool_result")}
    summary = {"title": title, "rows": n_rows, "width": width, "boundaries_from": source, **totals,
               "fill": (totals["tokens"] - totals["padding"]) / totals["tokens"] if totals["tokens"] else 0.0,
               "per_row": row_stats}
    table = ["<table class='summary'><tr><th>row</th><th>tokens</th><th>samples</th><th>trained</th><th>masked</th>"
             "<th>padding</th><th>fill</th></tr>"]
    for s in row_stats:
        table.append(f"<tr><td><a href='#row-{s['row']}'>{s['row']}</a></td><td>{s['tokens']}</td><td>{s['samples']}"
                     f"</td><td>{s['trained']}</td><td>{s['masked']}</td><td>{s['padding']}</td>"
                     f"<td>{100 * s['fill']:.1f}%</td></tr>")
    table.append("</table>")
    safe_title = html.escape(title)
    summary_json = json.dumps(summary).replace("</", "<\\/")  # cannot close the script element
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{safe_title}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{safe_title}</h1>\n"
        f"<p>{n_rows} rows \u00d7 {width} tokens; {totals['samples']} samples (boundaries from "
        f"<code>{html.escape(source)}</code>); {totals['trained']} trained, {totals['masked']} masked, "
        f"{totals['padding']} padding; fill {100 * summary['fill']:.1f}%"
        + (f"; {totals['tool_call']} tokens in tool calls, {totals['tool_result']} in tool results"
           if totals["tool_call"] or totals["tool_result"] else "") + ".</p>\n"
        "<p class='legend'><span class='tr'>trained (label \u2260 -100)</span><span class='ms'>masked "
        "(label = -100)</span><span class='pd'>padding</span><span class='bnd'>\u27e6k</span> sample k begins"
        "<span class='tc'>tool call</span><span class='tres'>tool result</span></p>\n"
        f"<script type='application/json' id='summary'>{summary_json}</script>\n"
        + "".join(table) + "\n" + "".join(rows_html)
        + "<pre id='dom-counts' data-ready='0'></pre>\n"
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )
    return page, summary


def debug_chat_dataloader_for_training(
    dataloader: Iterable,
    tokenizer,
    n_example: int = 10,
    *,
    out_dir: str | os.PathLike = ".log",
    name: str = "dataloader",
    max_tokens_per_row: int | None = None,
    tool_markers=TOOL_MARKERS,
) -> list[str]:
    """Write an HTML page for each of the first `n_example` batches of `dataloader` under `out_dir`; log the paths.

    Accepts any iterable of batch dicts (`input_ids`, optional `labels`, `attention_mask`, `position_ids`,
    `seq_lengths`, `packed_seq_lengths`, `cu_seq_lens_q`). Returns the page paths (fewer when the loader runs out).
    """
    if not isinstance(n_example, int) or n_example < 1:
        raise ValueError(f"n_example={n_example!r} must be a positive integer (the number of batches to render)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, batch in enumerate(dataloader):
        if k >= n_example:
            break
        page, summary = render_batch_html(dict(batch), tokenizer, title=f"{name} batch {k}",
                                          max_tokens_per_row=max_tokens_per_row, tool_markers=tool_markers)
        path = out / f"{name}_batch_{k:03d}.html"
        path.write_text(page, encoding="utf-8")
        paths.append(str(path))
        logger.info("batch %d: %d rows x %d tokens, %d samples, %d trained / %d masked / %d padding "
                    "(fill %.1f%%) -> %s",
                    k, summary["rows"], summary["width"], summary["samples"], summary["trained"], summary["masked"],
                    summary["padding"], 100 * summary["fill"], path)
    if not paths:
        logger.warning("the dataloader yielded no batch; no debug page written")
    return paths


__all__ = ["TOOL_MARKERS", "debug_chat_dataloader_for_training", "render_batch_html"]
