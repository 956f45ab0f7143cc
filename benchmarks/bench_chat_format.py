"""Chat formatting cost of locating assistant turns from the template's own renderings, on the shared chat data.

For each shared dataset (Qwen3 tokenizer and template), measured side by side in one run:

- ``render once``: ``apply_chat_template`` once per record, the floor any chat-template formatter pays (the
  previous span search did this plus a text search);
- ``render + spans``: ``opensloth.data.chat.render_with_spans`` per record (the conversation, plus one render up to
  each assistant turn, plus one through each earlier turn that is not plain text), and how many renders it made;
- ``tokenize_chat_dataset``: the whole pipeline (both ``datasets.map`` passes, encoding with offsets, labels).

Run: ``python benchmarks/bench_chat_format.py`` (writes benchmarks/results/chat_format.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import machine_header, markdown_table, write_result  # noqa: E402
from benchmarks._shared_data import SHARED_CHAT_FILES, read_shared_chat, shared_data_dir  # noqa: E402
from opensloth.data.chat import (  # noqa: E402
    detect_end_of_turn,
    probe_chat_template,
    record_messages,
    render_with_spans,
    tokenize_chat_dataset,
)


class _CountingTokenizer:
    """Forwards to a tokenizer and counts apply_chat_template calls."""

    def __init__(self, tok):
        self._tok, self.renders = tok, 0

    def apply_chat_template(self, *args, **kwargs):
        self.renders += 1
        return self._tok.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000, help="first N records of each dataset")
    parser.add_argument("--repeat", type=int, default=3, help="timing rounds (the fastest is reported)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    args = parser.parse_args()
    chat_dir = shared_data_dir() / "chat"
    tok_dir = shared_data_dir() / "tokenizers" / "qwen3"
    if not tok_dir.is_dir():
        raise SystemExit(f"the shared data ({shared_data_dir()}) is needed: it holds the chats and the tokenizer")
    from transformers import AutoTokenizer

    logging.getLogger("opensloth").setLevel(logging.WARNING)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    eot, probe = detect_end_of_turn(tok), probe_chat_template(tok)
    rows = []
    for name in SHARED_CHAT_FILES:
        records = read_shared_chat(name, chat_dir)[: args.records]
        conversations = [record_messages(r) for r in records]
        turns = sum(m["role"] == "assistant" for c in conversations for m in c) / len(records)
        counting = _CountingTokenizer(tok)
        for c in conversations:
            render_with_spans(c, counting, end_of_turn=eot, probe=probe)
        t_once = best_of(lambda cs=conversations: [tok.apply_chat_template(c, tokenize=False) for c in cs],
                         args.repeat)
        t_spans = best_of(lambda cs=conversations: [render_with_spans(c, tok, end_of_turn=eot, probe=probe)
                                                    for c in cs], args.repeat)
        t_all = best_of(lambda rs=records: tokenize_chat_dataset(rs, tok), args.repeat)
        rows.append([name, len(records), round(turns, 2), round(counting.renders / len(records), 2),
                     round(1e6 * t_once / len(records)), round(1e6 * t_spans / len(records)),
                     round(1e6 * t_all / len(records)), f"{100 * (t_spans - t_once) / t_all:.0f}%"])
        print(rows[-1], flush=True)
    table = markdown_table(
        ["dataset", "records", "assistant turns / record", "renders / record", "render once (us/record)",
         "render + spans (us/record)", "tokenize_chat_dataset (us/record)", "extra rendering / whole pipeline"],
        rows)
    body = (table + "\n\nOne process, best of the timing rounds. `extra rendering / whole pipeline`: what the "
            "renders beyond the first cost, as a share of the whole `tokenize_chat_dataset` time.")
    print(body)
    if not args.no_write:
        path = write_result("chat_format", "Chat formatting", [("Locating assistant turns", body)],
                            header=machine_header(packages=("transformers", "tokenizers", "datasets", "jinja2")))
        print(f"written to {path}")


if __name__ == "__main__":
    main()
