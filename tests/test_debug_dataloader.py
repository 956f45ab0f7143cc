"""The HTML batch inspector: pages for the flat, rows and padded layouts, checked in Python and in headless
Chromium (the page's own script recounts tokens, samples and boundaries from the rendered DOM).

Expected counts come from the batch tensors built here, not from the inspector.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from opensloth._debug_dataloader import debug_chat_dataloader_for_training
from opensloth.data.chat import IGNORE_INDEX, encode_chat

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NASTY = {"id": "nasty", "messages": [
    {"role": "user", "content": "Is <script>alert('x')</script> & <b>bold</b> safe?"},
    {"role": "assistant", "content": "No: <script>document.title='pwned'</script> &amp; \"quotes\" stay text."}]}


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def samples(chat_records, qwen3_tokenizer):
    recs = [r for r in chat_records["hh_rlhf"] if len(r["messages"]) >= 4][:5] + [NASTY]
    return [encode_chat(r, qwen3_tokenizer) for r in recs]


def _flat_batch(samples):
    """Flat layout: one row, position_ids restart per sample, packed_seq_lengths, cu_seq_lens, boundary-masked."""
    ids, labels, pos, lens = [], [], [], []
    for s in samples:
        lab = list(s["labels"])
        lab[0] = IGNORE_INDEX
        ids += s["input_ids"]
        labels += lab
        pos += list(range(len(s["input_ids"])))
        lens.append(len(s["input_ids"]))
    cu = np.concatenate([[0], np.cumsum(lens)])
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos]),
            "packed_seq_lengths": torch.tensor(lens, dtype=torch.int32),
            "cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32)}, lens


def _rows_batch(samples, pad_id, capacity):
    """Rows layout: (P, capacity), trailing padding is a segment of its own (positions 0, 1, ...), label -100."""
    groups = [samples[:2], samples[2:4]]
    ids = np.full((2, capacity), pad_id)
    labels = np.full((2, capacity), IGNORE_INDEX)
    pos = np.zeros((2, capacity), dtype=np.int64)
    lens = []
    for r, group in enumerate(groups):
        at, row_lens = 0, []
        for s in group:
            n = len(s["input_ids"])
            ids[r, at:at + n] = s["input_ids"]
            labels[r, at:at + n] = s["labels"]
            labels[r, at] = IGNORE_INDEX
            pos[r, at:at + n] = np.arange(n)
            at += n
            row_lens.append(n)
        assert at < capacity
        pos[r, at:] = np.arange(capacity - at)
        lens.append(row_lens)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}, lens


def _padded_batch(samples, pad_id):
    """Padded layout: one sample per row, right padding marked by attention_mask."""
    rows = samples[4:6]
    width = max(len(s["input_ids"]) for s in rows)
    ids = np.full((2, width), pad_id)
    labels = np.full((2, width), IGNORE_INDEX)
    mask = np.zeros((2, width), dtype=np.int64)
    for r, s in enumerate(rows):
        n = len(s["input_ids"])
        ids[r, :n], labels[r, :n], mask[r, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def _expected(batch, pad):
    ids = batch["input_ids"].numpy()
    labels = batch["labels"].numpy()
    return {"rows": ids.shape[0], "tokens": int(ids.size), "trained": int(((labels != IGNORE_INDEX) & ~pad).sum()),
            "masked": int(((labels == IGNORE_INDEX) & ~pad).sum()), "padding": int(pad.sum())}


class _Spans(HTMLParser):
    """Collects per-row token spans (class, text) and sample elements from the page source."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows, self.stack, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "script":
            self.scripts += 1
        if "row" in cls and tag == "div":
            self.rows.append({"tokens": [], "samples": [], "bnd": 0})
        if tag == "span" and "sample" in cls:
            self.rows[-1]["samples"].append(int(a["data-len"]))
        if tag == "span" and "bnd" in cls and self.rows:
            self.rows[-1]["bnd"] += 1
        self.stack.append(("t" in cls and tag == "span", cls))

    def handle_endtag(self, tag):
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1][0]:
            kind = [c for c in self.stack[-1][1] if c in ("tr", "ms", "pd")][0]
            self.rows[-1]["tokens"].append((kind, data))


def _parse(path):
    p = _Spans()
    p.feed(path.read_text(encoding="utf-8"))
    return p


@pytest.fixture(scope="module")
def pages(samples, qwen3_tokenizer, tmp_path_factory):
    tok = qwen3_tokenizer
    out = tmp_path_factory.mktemp("pages")
    flat, flat_lens = _flat_batch(samples[:4])
    capacity = max(sum(len(s["input_ids"]) for s in samples[i:i + 2]) for i in (0, 2)) + 17
    rows, rows_lens = _rows_batch(samples, tok.pad_token_id, capacity)
    padded = _padded_batch(samples, tok.pad_token_id)
    batches = [flat, rows, padded]
    paths = debug_chat_dataloader_for_training(iter(batches), tok, n_example=5, out_dir=out, name="t")
    pads = [np.zeros(flat["input_ids"].shape, dtype=bool), None, padded["attention_mask"].numpy() == 0]
    rpad = np.zeros(rows["input_ids"].shape, dtype=bool)
    for r, lens in enumerate(rows_lens):
        rpad[r, sum(lens):] = True
    pads[1] = rpad
    padded_lens = [[int(m.sum())] for m in padded["attention_mask"]]
    return {"paths": paths, "batches": batches, "pads": pads, "lens": [[flat_lens], rows_lens, padded_lens]}


def test_one_page_per_batch_until_the_loader_ends(pages):
    assert [p.rsplit("/", 1)[-1] for p in pages["paths"]] == ["t_batch_000.html", "t_batch_001.html",
                                                              "t_batch_002.html"]


def test_page_source_has_every_token_labelled_and_escaped(pages, qwen3_tokenizer):
    from pathlib import Path

    tok = qwen3_tokenizer
    for path, batch, pad, lens in zip(pages["paths"], pages["batches"], pages["pads"], pages["lens"], strict=True):
        parsed = _parse(Path(path))
        ids = batch["input_ids"].numpy()
        labels = batch["labels"].numpy()
        assert len(parsed.rows) == ids.shape[0]
        assert parsed.scripts == 2  # the summary JSON and the counting script; no injected <script>
        for r, row in enumerate(parsed.rows):
            kinds = [k for k, _ in row["tokens"]]
            want = np.where(pad[r], "pd", np.where(labels[r] != IGNORE_INDEX, "tr", "ms")).tolist()
            assert kinds == want
            assert row["samples"] == lens[r] and row["bnd"] == len(lens[r])
            real = ids[r][~pad[r]]
            text = "".join(t for (k, t) in row["tokens"] if k != "pd").replace("\u21b5\n", "\n")
            assert text == tok.decode(real.tolist())
        source = Path(path).read_text(encoding="utf-8")
        assert source.count("<script") == 2 and source.count("<b>") == 0
    # The chat text with markup is in the padded page, shown as text (the decoded-text check above passed on it).
    assert "document.title" in tok.decode(pages["batches"][2]["input_ids"][1].tolist())


@pytest.mark.timeout(180)
def test_rendered_page_in_headless_chromium(pages, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium on PATH (Debian: apt-get install -y chromium)")
    for path, batch, pad, lens in zip(pages["paths"], pages["batches"], pages["pads"], pages["lens"], strict=True):
        proc = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"file://{path}"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = proc.stdout
        m = re.search(r'<pre id="dom-counts" data-ready="1">(.*?)</pre>', dom, re.S)
        assert m, "the page's script did not run (no counts in the rendered DOM)"
        counts = json.loads(html.unescape(m.group(1)))
        want = _expected(batch, pad)
        for key in ("rows", "tokens", "trained", "masked", "padding"):
            assert counts[key] == want[key], key
        assert counts["samples"] == counts["boundaries"] == sum(len(x) for x in lens)
        assert [r["sample_lengths"] for r in counts["per_row"]] == lens
        # The title was not rewritten by the escaped <script> in the chat text: it never ran.
        assert "pwned" not in re.search(r"<title>(.*?)</title>", dom, re.S).group(1)


def test_default_folder_and_seed_signature(samples, qwen3_tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    batch, _ = _flat_batch(samples[:2])
    paths = debug_chat_dataloader_for_training([batch, batch], qwen3_tokenizer, 1)
    assert paths == [".log/dataloader_batch_000.html"]
    assert (tmp_path / ".log" / "dataloader_batch_000.html").is_file()
    with pytest.raises(ValueError, match="n_example=0"):
        debug_chat_dataloader_for_training([batch], qwen3_tokenizer, 0)
