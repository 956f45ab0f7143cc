"""HTML previews of training batches: which tokens are trained, which are masked, where packed samples begin/end.

`debug_chat_dataloader_for_training(dataloader, tokenizer, n_example=10)` (the seed's API) writes one
self-contained page per batch under `.log/` (inline CSS and a small inline script, nothing fetched) and logs
the paths; under torchrun each rank writes its own pages (`<name>_rank<r>_batch_<k>.html`). Every row reads as
text: each token is its own span (class `tr` = trained, label != -100; `ms` = masked), the spans join into the
decoded text (a character split over several byte tokens is shown once, on the token that completes it; the
others are empty) and lines break only between words, with a thin line marking each token boundary. A run of
padding is one marker (`pd`, "155 pad tokens", its count in `data-n`). Each packed sample is wrapped in a `.sample`
element that opens with a `.bnd` boundary marker and is underlined in alternating colours; a legend names every
colour, outline and marker, and a table gives the per-row summary (tokens, samples, trained, masked, padding,
fill). Tokens inside a tool call get the extra class
`tc` and tokens inside a tool result `tres` (outlined, on top of the trained/masked colour): the regions between the
chat template's markers in `TOOL_MARKERS` (Qwen/Hermes `<tool_call>`/`<tool_response>`, Mistral `[TOOL_CALLS]`/
`[TOOL_RESULTS]`, Llama 3 `ipython` turns), found in the decoded text of each sample (a format example the template
writes into the system prompt is outlined too). The inline script recounts all of it from the DOM and writes the
result into `#dom-counts` (hidden) and a one-line check against the batch into `#dom-check`, so a
browser-rendered page can be checked against the batch. `raw=True` adds the batch summary as JSON.

Samples and padding are read with the batch contract's reader (`opensloth.batch.read_batch`, with the tokenizer's
pad id): boundaries from a 2-D `attention_mask`, per-row `seq_lengths`, `packed_seq_lengths`,
`cu_seq_lens_q`/`cu_seq_lens_k` or `position_ids`, padding from the collator's record, the mask or the contract's
padding rule. A batch whose keys contradict each other is shown from its `position_ids` (or
as one sample per row), with the reason on the page and in the log.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from opensloth.batch import (
    ATTENTION_MASK,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    POSITION_IDS,
    BatchFormatError,
    BatchSegments,
    read_batch,
)
from opensloth.distributed import logger

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
.legend { line-height: 2; }
.legend > span { display: inline-block; margin-right: 14px; }
.legend .key { font-family: ui-monospace, monospace; font-size: 13px; padding: 0 3px; }
.row { margin: 14px 0; border-top: 2px solid #888; padding-top: 6px; }
.row h2 { font-size: 15px; margin: 4px 0; }
.row h2 small { font-weight: normal; color: #555; }
/* Lines break between words only (a word longer than the line may still wrap); tokens never split a word. */
.tokens { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; word-break: normal;
          overflow-wrap: anywhere; line-height: 1.8; }
.t + .t { box-shadow: inset 1px 0 0 rgba(0, 0, 0, 0.22); }
.tr { background: #ffd59e; }
.ms { background: #d8ecd8; color: #555; }
.pd { background: #e4e4e4; color: #777; font-style: italic; font-size: 11px; padding: 0 4px; border-radius: 3px; }
.t.sp { font-weight: bold; }
.tc { outline: 1px dashed #7b2cbf; outline-offset: -1px; color: #5a189a; }
.tres { outline: 1px dotted #0a7e8c; outline-offset: -1px; font-style: italic; }
.sample:nth-child(odd) .t, .u1 { border-bottom: 2px solid #36c; }
.sample:nth-child(even) .t, .u2 { border-bottom: 2px solid #c63; }
.bnd { background: #36c; color: #fff; font-size: 10px; padding: 0 3px; margin: 0 2px; border-radius: 3px; }
.sep { box-shadow: inset 1px 0 0 rgba(0, 0, 0, 0.5); }
.note { color: #555; }
#dom-check { color: #777; font-size: 12px; }
#dom-counts { display: none; }
"""

# Recounts the page from the DOM (what a reader actually sees) and writes the totals into #dom-counts.
_SCRIPT = """
(function () {
  var rows = document.querySelectorAll('.row');
  var out = {rows: rows.length, tokens: 0, trained: 0, masked: 0, padding: 0, samples: 0, boundaries: 0,
             tool_call: 0, tool_result: 0, per_row: []};
  // a padding run is one element standing for data-n tokens
  function count(el, sel) {
    var n = 0;
    el.querySelectorAll(sel).forEach(function (t) { n += t.dataset.n ? Number(t.dataset.n) : 1; });
    return n;
  }
  rows.forEach(function (row) {
    var r = {row: Number(row.dataset.row),
             tokens: count(row, '.t'),
             trained: count(row, '.t.tr'),
             masked: count(row, '.t.ms'),
             padding: count(row, '.t.pd'),
             tool_call: count(row, '.t.tc'),
             tool_result: count(row, '.t.tres'),
             samples: row.querySelectorAll('.sample').length,
             boundaries: row.querySelectorAll('.bnd').length,
             sample_lengths: Array.prototype.map.call(row.querySelectorAll('.sample'),
               function (s) { return count(s, '.t'); })};
    out.per_row.push(r);
    ['tokens', 'trained', 'masked', 'padding', 'samples', 'boundaries', 'tool_call', 'tool_result'].forEach(
      function (k) { out[k] += r[k]; });
  });
  var el = document.getElementById('dom-counts');
  el.textContent = JSON.stringify(out);
  el.setAttribute('data-ready', '1');
  var want = JSON.parse(document.getElementById('summary').textContent);
  var keys = ['tokens', 'trained', 'masked', 'padding', 'samples'];
  var bad = keys.filter(function (k) { return want.shown[k] !== out[k]; });
  document.getElementById('dom-check').textContent = bad.length === 0
    ? 'Page check: this page shows ' + out.tokens + ' tokens (' + out.trained + ' trained, ' + out.masked +
      ' masked, ' + out.padding + ' padding) in ' + out.samples + ' samples, as in the batch.'
    : 'Page check FAILED: the page differs from the batch in ' + bad.join(', ') + '.';
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


def _read_segments(batch: dict, pad_id: int | None) -> tuple[BatchSegments | None, str | None]:
    """The batch's segments by the contract's reader; if its keys contradict each other, from the position ids and
    mask alone (or nothing), with the reason."""
    try:
        return read_batch(batch, pad_token_id=pad_id), None
    except BatchFormatError as exc:
        reason = str(exc)
    fallback = {k: batch[k] for k in (INPUT_IDS, LABELS, POSITION_IDS, ATTENTION_MASK) if batch.get(k) is not None}
    try:
        return read_batch(fallback, pad_token_id=pad_id), reason
    except BatchFormatError:
        return None, reason


_CONTEXT = 6  # tokens of left context when decoding one token (covers a 4-byte character split over 4 tokens)


def _decode_all(tokenizer, seqs: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(seqs, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _token_texts(tokenizer, ids) -> list[str]:
    """Each token's share of the decoded text, so that the pieces join into `tokenizer.decode(ids)`.

    A token is decoded after up to `_CONTEXT` tokens of left context (what the context decodes to is cut off), so
    word-start markers (SentencePiece's leading space) come out as in the whole text. A token that ends inside a
    character (byte-level BPE splits multi-byte characters) gets "" and the token that completes the character gets
    all of it."""
    flat = [int(i) for i in ids]
    n = len(flat)
    if n == 0:
        return []
    try:
        full = _decode_all(tokenizer, [flat[max(0, i - _CONTEXT):i + 1] for i in range(n)])
        base = _decode_all(tokenizer, [flat[max(0, i - _CONTEXT):i] for i in range(n)])
    except Exception:  # noqa: BLE001 - fall back to raw token strings
        return [str(t) for t in tokenizer.convert_ids_to_tokens(flat)]
    texts: list[str] = []
    pending = None  # the first of the tokens just before this one that end inside a character
    for i in range(n):
        if pending is None:
            b, f = base[i], full[i]
        else:  # the text of tokens pending..i together, after the context of the first
            left = max(0, pending - _CONTEXT)
            b, f = _decode_all(tokenizer, [flat[left:pending], flat[left:i + 1]])
        k = len(b) if f.startswith(b) else next(j for j in range(len(f) + 1) if j == len(f) or j == len(b)
                                                  or f[j] != b[j])
        t = f[k:]
        if t.endswith("\ufffd") and i + 1 < n and i - (i if pending is None else pending) < 4:
            pending = i if pending is None else pending
            texts.append("")
            continue
        texts.append(t)
        pending = None
    return texts


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


def _runs_of(mask: np.ndarray) -> list[tuple[int, int, bool]]:
    """(start, end, value) of the maximal runs of equal values of a boolean array."""
    if len(mask) == 0:
        return []
    change = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [len(mask)]]).tolist()
    return [(a, b, bool(mask[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _pad_run(a: int, b: int, ids) -> str:
    n = b - a
    first = int(ids[a])
    same = bool((np.asarray(ids[a:b]) == first).all())
    title = html.escape(f"#{a}-#{b - 1}: {n} padding token{'s' if n != 1 else ''}"
                        + (f" (id={first})" if same else ""), quote=True)
    return (f'<span class="t pd" data-i="{a}" data-n="{n}" title="{title}">{n} pad token{"s" if n != 1 else ""}'
            f"</span>")


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
    shown_stats = {"tokens": shown, "trained": int((trained[:shown] & ~pad[:shown]).sum()),
                   "masked": int((~trained[:shown] & ~pad[:shown]).sum()), "padding": int(pad[:shown].sum())}
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
        for a, b, is_pad in _runs_of(pad[start:stop]):
            a, b = a + start, b + start
            if is_pad:
                parts.append(_pad_run(a, b, ids))
                continue
            texts = _token_texts(tokenizer, ids[a:b])  # decoded run by run: pieces join into the run's text
            tools = _tool_classes(texts, tool_markers) if tool_markers else None
            for t in range(a, b):
                cls = "tr" if trained[t] else "ms"
                if int(ids[t]) in special_ids:
                    cls += " sp"
                if tools and tools[t - a]:
                    cls += " " + tools[t - a]
                    n_tool[tools[t - a]] += 1
                title = html.escape(f"#{t} id={int(ids[t])} label={int(labels[t])}", quote=True)
                parts.append(f'<span class="t {cls}" data-i="{t}" title="{title}">{_visible(texts[t - a])}</span>')
        parts.append("</span>")
        start = end
    if shown < width:
        parts.append(f'<span class="note"> \u2026 {width - shown} more tokens not shown</span>')
    stats["samples"] = n_samples
    stats["sample_lengths"] = sample_lengths
    stats["tool_call"], stats["tool_result"] = n_tool["tc"], n_tool["tres"]
    stats["shown"] = {**shown_stats, "samples": n_samples}
    line = (f"{width} tokens, {n_samples} sample{'s' if n_samples != 1 else ''}, {stats['trained']} trained, "
            f"{stats['masked']} masked, {n_pad} padding (fill {100 * stats['fill']:.1f}%)")
    head = (f'<div class="row" id="row-{r}" data-row="{r}" data-tokens="{width}" data-trained="{stats["trained"]}" '
            f'data-masked="{stats["masked"]}" data-padding="{n_pad}" data-samples="{n_samples}" '
            f'data-fill="{stats["fill"]:.4f}"><h2>Row {r} <small>{line}</small></h2><div class="tokens">')
    return head + "".join(parts) + "</div></div>\n", stats


_LEGEND = (
    "<p class='legend'>"
    "<span><span class='key tr'>text</span> trained token (label \u2260 -100)</span> "
    "<span><span class='key ms'>text</span> masked token (label = -100: prompt, system, tool output)</span> "
    "<span><span class='key pd'>155 pad tokens</span> a run of padding</span> "
    "<span><span class='key ms sp'>&lt;|im_end|&gt;</span> bold: special token</span> "
    "<span><span class='key ms'>ab</span><span class='key ms sep'>cd</span> thin line: token boundary</span> "
    "<span><span class='bnd'>\u27e6k</span> sample k begins</span> "
    "<span><span class='key ms u1'>sample 0</span> <span class='key ms u2'>sample 1</span> underline: blue and "
    "orange alternate between consecutive samples of a row</span> "
    "<span><span class='key ms tc'>call</span> dashed outline: inside a tool call</span> "
    "<span><span class='key ms tres'>result</span> dotted outline: inside a tool result</span> "
    "<span>hover a token: its position, id and label</span></p>\n"
)


def render_batch_html(
    batch: dict, tokenizer, *, title: str = "batch", max_tokens_per_row: int | None = None,
    tool_markers=TOOL_MARKERS, note: str | None = None, raw: bool = False,
) -> tuple[str, dict]:
    """Render one collated batch as a self-contained HTML page; returns `(html_text, summary)`.

    `tool_markers`: `(css class, opening, closing)` triples outlining tool calls ("tc") and tool results ("tres");
    empty to turn it off. `note`: a line of text under the title. `raw`: also show the summary as JSON.
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
    pad_id = getattr(tokenizer, "pad_token_id", None)
    read, problem = _read_segments(batch, pad_id)
    if problem is not None:
        logger.warning("%s: the batch's boundary keys contradict each other (%s); showing %s", title, problem,
                       "the boundaries of its position_ids" if read is not None else "one sample per row")
        note = (note + " " if note else "") + f"Boundary keys ignored: {problem}."
    if read is not None and (read.segments.n_rows, read.segments.width) != (n_rows, width):
        read = None
    source = read.source if read is not None else "none"
    pads = read.pad_mask() if read is not None else np.zeros((n_rows, width), dtype=bool)
    whole_rows = [(np.asarray([width], dtype=np.int64), None)] * n_rows  # no boundaries: a row is one sample
    row_segments = read.row_segments() if read is not None else whole_rows
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    rows_html, row_stats = [], []
    for r in range(n_rows):
        h, st = _render_row(r, ids[r], labels[r], pads[r], row_segments[r][0], special_ids, tokenizer,
                            max_tokens_per_row, tool_markers)
        rows_html.append(h)
        row_stats.append(st)
    totals = {k: sum(s[k] for s in row_stats)
              for k in ("tokens", "trained", "masked", "padding", "samples", "tool_call", "tool_result")}
    shown = {k: sum(s["shown"][k] for s in row_stats) for k in ("tokens", "trained", "masked", "padding", "samples")}
    summary = {"title": title, "rows": n_rows, "width": width, "boundaries_from": source, **totals,
               "fill": (totals["tokens"] - totals["padding"]) / totals["tokens"] if totals["tokens"] else 0.0,
               "shown": shown, "per_row": row_stats}
    table = ["<table class='summary'><tr><th>row</th><th>tokens</th><th>samples</th><th>trained</th><th>masked</th>"
             "<th>padding</th><th>fill</th></tr>"]
    for s in row_stats:
        table.append(f"<tr><td><a href='#row-{s['row']}'>{s['row']}</a></td><td>{s['tokens']}</td><td>{s['samples']}"
                     f"</td><td>{s['trained']}</td><td>{s['masked']}</td><td>{s['padding']}</td>"
                     f"<td>{100 * s['fill']:.1f}%</td></tr>")
    table.append("</table>")
    safe_title = html.escape(title)
    summary_json = json.dumps(summary).replace("</", "<\\/")  # cannot close the script element
    raw_block = ""
    if raw:
        raw_block = ("<details open><summary>summary as JSON</summary><pre>"
                     + html.escape(json.dumps(summary, indent=1)) + "</pre></details>\n")
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{safe_title}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{safe_title}</h1>\n"
        + (f"<p class='note'>{html.escape(note)}</p>\n" if note else "")
        + f"<p>{n_rows} row{'s' if n_rows != 1 else ''} \u00d7 {width} tokens; {totals['samples']} samples "
        f"(boundaries from <code>{html.escape(source)}</code>); {totals['trained']} trained, "
        f"{totals['masked']} masked, {totals['padding']} padding; fill {100 * summary['fill']:.1f}%"
        + (f"; {totals['tool_call']} tokens in tool calls, {totals['tool_result']} in tool results"
           if totals["tool_call"] or totals["tool_result"] else "") + ".</p>\n"
        + _LEGEND
        + f"<script type='application/json' id='summary'>{summary_json}</script>\n"
        + "".join(table) + "\n" + "".join(rows_html)
        + "<p id='dom-check'></p>\n<pre id='dom-counts' data-ready='0'></pre>\n" + raw_block
        + f"<script>{_SCRIPT}</script>\n</body></html>\n"
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
    rank: int | None | str = "auto",
    note: str | None = None,
    raw: bool = False,
) -> list[str]:
    """Write an HTML page for each of the first `n_example` batches of `dataloader` under `out_dir`; log the paths.

    Accepts any iterable of batch dicts (`input_ids`, optional `labels`, `attention_mask`, `position_ids`,
    `seq_lengths`, `packed_seq_lengths`, `cu_seq_lens_q`). Returns the page paths (fewer when the loader runs out).
    Pages are named `<name>_batch_<k>.html`, or `<name>_rank<r>_batch_<k>.html` for `rank=r`; "auto" takes the rank
    from torchrun's environment when the world size is above 1 (so ranks never overwrite each other's pages).
    `note` is shown under each page's title; `raw` adds the batch summary as JSON.
    """
    if not isinstance(n_example, int) or n_example < 1:
        raise ValueError(f"n_example={n_example!r} must be a positive integer (the number of batches to render)")
    if rank == "auto":
        from opensloth.distributed import read_dist_env

        env = read_dist_env()
        rank = env.rank if env.world_size > 1 else None
    elif rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise ValueError(f"rank={rank!r} must be 'auto', None or a non-negative integer")
    stem = name if rank is None else f"{name}_rank{rank}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, batch in enumerate(dataloader):
        if k >= n_example:
            break
        title = f"{name} batch {k}" if rank is None else f"{name} rank {rank} batch {k}"
        batch = batch if isinstance(batch, dict) else dict(batch)  # a PackedBatch keeps its record of the padding
        page, summary = render_batch_html(batch, tokenizer, title=title, max_tokens_per_row=max_tokens_per_row,
                                          tool_markers=tool_markers, note=note, raw=raw)
        path = out / f"{stem}_batch_{k:03d}.html"
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
