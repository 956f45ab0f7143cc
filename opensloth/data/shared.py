"""The project's shared chat datasets (alpaca, gsm8k, hh_rlhf, arena_hard) by name, and reading chat-record files.

The shared data folder is ``$OPENSLOTH_SHARED_DATA``, else ``../shared/data`` beside the checkout; its ``chat/``
folder holds JSONL files of ``{"id", "messages"}`` records. The training scripts accept these names as datasets;
tests and benchmarks read them through here, so the file list lives in one place. Imports nothing heavy.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

SHARED_CHAT_FILES: dict[str, tuple[str, ...]] = {
    "alpaca": ("alpaca_en_demo.jsonl",),
    "gsm8k": ("gsm8k_train-00000-of-00002.jsonl", "gsm8k_train-00001-of-00002.jsonl"),
    "hh_rlhf": ("hh_rlhf_helpful_base_test.jsonl",),
    "arena_hard": ("arena_hard_v0.1.jsonl",),
}


def shared_data_dir() -> Path:
    """``$OPENSLOTH_SHARED_DATA``, else ``shared/data`` beside the repository checkout."""
    env = os.environ.get("OPENSLOTH_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def shared_chat_paths(name: str, chat_dir: str | os.PathLike | None = None) -> list[Path]:
    """The files of shared dataset ``name`` (in ``chat_dir``, default the shared data's ``chat/``); every one must
    exist."""
    if name not in SHARED_CHAT_FILES:
        raise KeyError(f"{name!r} is not a shared dataset; choose from {', '.join(SHARED_CHAT_FILES)}")
    folder = Path(chat_dir) if chat_dir is not None else shared_data_dir() / "chat"
    paths = [folder / f for f in SHARED_CHAT_FILES[name]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shared dataset {name!r}: {', '.join(missing)} not found; set "
                                "OPENSLOTH_SHARED_DATA to the shared data folder")
    return paths


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


def chat_template_token_ids(records: list[dict], tokenizer) -> list[list[int]]:
    """Token ids of each record's ``messages`` rendered with the tokenizer's chat template (no special tokens added
    on top of the template's own): the lengths the tests and benchmarks measure packing on."""
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def read_shared_chat(name: str, chat_dir: str | os.PathLike | None = None) -> list[dict]:
    """All records of shared dataset ``name``, its files concatenated in order."""
    return [r for path in shared_chat_paths(name, chat_dir) for r in read_chat_records(path)]
