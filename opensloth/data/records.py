"""Reading chat-record files: JSONL (one JSON object per line) or a ``.json`` list, each record kept exactly as
written and named by ``file:line`` (``ChatRecord.source``), so that a bad record's error points at its line.

Imports nothing heavy (tqdm only with ``progress=True``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = ["ChatRecord", "read_chat_records"]


class ChatRecord(dict):
    """A chat record read from a file: a plain dict that also knows where it came from.

    ``source`` is ``"path:line"``: the 1-based line of a JSONL file, or the line a ``.json`` list's item starts on;
    ``opensloth.data.chat`` names a bad record by it.
    """

    source: str | None = None


def _make_record(data: dict, source: str | None) -> ChatRecord:
    rec = ChatRecord(data)
    rec.source = source
    return rec


def _json_list_items(text: str) -> list[tuple[object, int]] | None:
    """The items of a JSON list with the 1-based line each starts on; None when the text is not a list. Raises
    ValueError naming the line of a syntax error."""
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    i = len(text) - len(text.lstrip(ws + "\ufeff"))
    if not text.startswith("[", i):
        return None
    items: list[tuple[object, int]] = []
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    i += 1
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if text.startswith("]", i) and not items:
            break
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError as exc:
            raise ValueError(f"line {line_at(i)}: not valid JSON ({exc})") from None
        items.append((obj, line_at(i)))
        i = end
        while i < len(text) and text[i] in ws:
            i += 1
        if text.startswith(",", i):
            i += 1
        elif text.startswith("]", i):
            break
        else:
            raise ValueError(f"line {line_at(i)}: expected ',' or ']' after a list item")
    if text[i + 1:].strip(ws):
        raise ValueError(f"line {line_at(i + 1)}: extra data after the list")
    return items


def read_chat_records(path: str | os.PathLike, *, progress: bool = False, on_error: str = "raise") -> list[dict]:
    """The records of a JSONL file (one JSON object per non-blank line) or of a ``.json`` file holding a list.

    Each record is a ``ChatRecord`` (a dict) whose ``source`` names its file and 1-based line (where a ``.json``
    list's item starts). Nested values are kept
    exactly as written (no schema is imposed across records). A line that is not a JSON object raises ValueError
    naming file and line, or with ``on_error="skip"`` is left out, counted and logged. ``progress`` shows a tqdm bar.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r} must be 'raise' or 'skip'")
    path = Path(path)
    records: list[dict] = []
    bad: list[str] = []

    def add(obj, where: str, error: str | None = None) -> None:
        if error is None and not isinstance(obj, dict):
            error = f"is a JSON {type(obj).__name__}, expected an object (one chat record)"
        if error is not None:
            if on_error == "raise":
                raise ValueError(f"{where} {error}; fix it or pass on_error='skip'")
            bad.append(f"{where} {error}")
            return
        records.append(_make_record(obj, where))

    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            items = _json_list_items(text)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if items is None:
            data = json.loads(text)
            raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected a list of chat records")
        for obj, lineno in items:
            add(obj, f"{path}:{lineno}")
    else:
        with open(path, encoding="utf-8") as fh:
            lines = fh
            if progress:
                from tqdm import tqdm

                lines = tqdm(fh, desc=f"read {path.name}", unit=" lines", leave=False)
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    add(None, f"{path}:{lineno}", f"is not valid JSON ({exc})")
                    continue
                add(obj, f"{path}:{lineno}")
    if bad:
        logging.getLogger("opensloth").warning(
            "%s: skipped %d invalid line(s), e.g. %s", path, len(bad), "; ".join(bad[:3]))
    return records
