"""The HTML batch inspector: pages for the flat, rows and padded layouts, checked in Python and in headless
Chromium (the page's own script recounts tokens, samples and boundaries from the rendered DOM).

Expected counts come from the batch tensors built here, not from the inspector.
"""

from __future__ import annotations

import html
import itertools
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
    """Collects per-row token spans [kind, text, tokens it stands for] (a padding run stands for its data-n tokens),
    sample elements and padding runs from the page source."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows, self.stack, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "script":
            self.scripts += 1
        if "row" in cls and tag == "div":
            self.rows.append({"tokens": [], "samples": [], "bnd": 0, "pad_runs": []})
        if tag == "span" and "sample" in cls:
            self.rows[-1]["samples"].append(int(a["data-len"]))
        if tag == "span" and "bnd" in cls and self.rows:
            self.rows[-1]["bnd"] += 1
        is_token = "t" in cls and tag == "span" and bool(self.rows)
        if is_token:
            kind = [c for c in cls if c in ("tr", "ms", "pd")][0]
            n = int(a.get("data-n", 1))
            self.rows[-1]["tokens"].append([kind, "", n])
            if kind == "pd":
                self.rows[-1]["pad_runs"].append(n)
        self.stack.append(is_token)

    def handle_endtag(self, tag):
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1]:
            self.rows[-1]["tokens"][-1][1] += data


def _kinds(row) -> list[str]:
    return [k for k, _, n in row["tokens"] for _ in range(n)]


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
            want = np.where(pad[r], "pd", np.where(labels[r] != IGNORE_INDEX, "tr", "ms")).tolist()
            assert _kinds(row) == want
            assert row["samples"] == lens[r] and row["bnd"] == len(lens[r])
            # padding: one marker per run of padding tokens, saying how many
            runs = [len(list(g)) for v, g in itertools.groupby(pad[r].tolist()) if v]
            assert row["pad_runs"] == runs
            assert all(t == f"{n} pad tokens" for k, t, n in row["tokens"] if k == "pd" and n > 1)
            real = ids[r][~pad[r]]
            text = "".join(t for (k, t, _) in row["tokens"] if k != "pd").replace("\u21b5\n", "\n")
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


# Measures, in the rendered page, every place where a line ends between two tokens of one word or inside a token
# without whitespace: what a reader sees as a word broken mid-line ("T he crab").
_BREAK_PROBE = """<script>
(function () {
  var out = {wraps: 0, midword: 0, examples: []};
  function lines(el) {
    var tops = [];
    Array.prototype.forEach.call(el.getClientRects(), function (r) {
      if (r.width > 0 && tops.indexOf(Math.round(r.top)) < 0) tops.push(Math.round(r.top));
    });
    return tops;
  }
  document.querySelectorAll('.tokens').forEach(function (box) {
    var toks = Array.prototype.filter.call(box.querySelectorAll('.t'), function (t) {
      return !t.classList.contains('pd') && t.textContent.length > 0; });
    toks.forEach(function (t) {
      if (lines(t).length > 1 && !/\\s/.test(t.textContent)) { out.midword++; out.examples.push(t.textContent); }
    });
    for (var i = 1; i < toks.length; i++) {
      var a = toks[i - 1], b = toks[i];
      if (a.parentNode !== b.parentNode) continue;  // a sample boundary (its marker sits between them)
      if (a.classList.contains('sp') || b.classList.contains('sp')) continue;  // a special token is a word
      var la = lines(a), lb = lines(b);
      if (!la.length || !lb.length) continue;
      if (lb[0] > la[la.length - 1] + 2) {
        out.wraps++;
        if (!/\\s$/.test(a.textContent) && !/^\\s/.test(b.textContent)) {
          out.midword++;
          if (out.examples.length < 8) out.examples.push(a.textContent + '|' + b.textContent);
        }
      }
    }
  });
  var el = document.createElement('pre');
  el.id = 'break-probe';
  el.textContent = JSON.stringify(out);
  document.body.appendChild(el);
})();
</script>"""


@pytest.mark.timeout(180)
def test_no_word_breaks_mid_line_in_headless_chromium(pages, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium on PATH (Debian: apt-get install -y chromium)")
    from pathlib import Path

    total_wraps = 0
    for path in pages["paths"]:
        probe = tmp_path / Path(path).name
        probe.write_text(Path(path).read_text(encoding="utf-8").replace("</body>", _BREAK_PROBE + "</body>"),
                         encoding="utf-8")
        proc = subprocess.run(
            [browser, *CHROMIUM_FLAGS, "--window-size=420,3000", f"--user-data-dir={tmp_path / 'profile'}",
             "--dump-dom", f"file://{probe}"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        m = re.search(r'<pre id="break-probe">(.*?)</pre>', proc.stdout, re.S)
        assert m, "the probe did not run"
        found = json.loads(html.unescape(m.group(1)))
        assert found["midword"] == 0, found["examples"]
        total_wraps += found["wraps"]
    assert total_wraps > 50  # the narrow window did wrap the text many times


def test_tokens_join_into_text_even_inside_multibyte_characters(qwen3_tokenizer):
    from opensloth._debug_dataloader import _token_texts, render_batch_html

    tok = qwen3_tokenizer
    text = "The crab 螃蟹 walks sideways 🦀🦀, café naïve — done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    singles = tok.batch_decode([[i] for i in ids])
    assert any("\ufffd" in t for t in singles)  # byte-level BPE splits some characters over tokens
    pieces = _token_texts(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # a token that ends inside a character shows nothing; the one completing it shows it all
    page, _ = render_batch_html({"input_ids": torch.tensor([ids])}, tok)
    parsed = _Spans()
    parsed.feed(page)
    assert "".join(t for _, t, _ in parsed.rows[0]["tokens"]) == text
    assert len(parsed.rows[0]["tokens"]) == len(ids)


def test_legend_names_every_style_on_the_page(pages, qwen3_tokenizer, tool_free_page_classes=("tr", "ms", "pd")):
    from pathlib import Path

    from opensloth._debug_dataloader import render_batch_html

    row = encode_chat({"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}, qwen3_tokenizer)
    tool_page, _ = render_batch_html({"input_ids": torch.tensor([row["input_ids"]]),
                                      "labels": torch.tensor([row["labels"]])}, qwen3_tokenizer)
    sources = [Path(p).read_text(encoding="utf-8") for p in pages["paths"]] + [tool_page]
    used = set()
    for source in sources:
        for classes in re.findall(r'<span class="t ([^"]*)"', source):
            used |= set(classes.split())
    assert {"tr", "ms", "pd", "sp", "tc", "tres"} <= used
    legend = re.search(r"<p class='legend'>(.*?)</p>", sources[0], re.S).group(1)
    for cls in used:
        assert re.search(rf"class='key [^']*\b{cls}\b", legend), cls
    assert "class='bnd'" in legend and "token boundary" in legend
    # the two underline colours of consecutive samples are shown and named
    assert "class='key ms u1'" in legend and "class='key ms u2'" in legend and "underline" in legend


def test_no_raw_dump_unless_asked(samples, qwen3_tokenizer):
    from opensloth._debug_dataloader import render_batch_html

    batch, _ = _flat_batch(samples[:2])
    page, summary = render_batch_html(batch, qwen3_tokenizer)
    visible = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    assert "per_row" not in visible and "<details" not in visible
    assert re.search(r"#dom-counts \{ display: none; \}", page)  # the DOM counts are for machines
    assert "id='dom-check'" in page  # a one-line check a person reads
    raw, _ = render_batch_html(batch, qwen3_tokenizer, raw=True)
    assert "<details" in raw and "per_row" in re.sub(r"<script.*?</script>", "", raw, flags=re.S)


def test_pages_carry_the_rank(samples, qwen3_tokenizer, tmp_path, monkeypatch):
    batch, _ = _flat_batch(samples[:2])
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    one = debug_chat_dataloader_for_training([batch], qwen3_tokenizer, 1, out_dir=tmp_path, name="a")
    assert [p.rsplit("/", 1)[-1] for p in one] == ["a_batch_000.html"]  # one process: the seed's names
    two = debug_chat_dataloader_for_training([batch], qwen3_tokenizer, 1, out_dir=tmp_path, name="a", rank=1,
                                             note="rank 1's micro-batches")
    assert [p.rsplit("/", 1)[-1] for p in two] == ["a_rank1_batch_000.html"]
    text = (tmp_path / "a_rank1_batch_000.html").read_text(encoding="utf-8")
    assert "<title>a rank 1 batch 0</title>" in text and "rank 1&#x27;s micro-batches" in text
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    auto = debug_chat_dataloader_for_training([batch], qwen3_tokenizer, 1, out_dir=tmp_path, name="b")
    assert [p.rsplit("/", 1)[-1] for p in auto] == ["b_rank1_batch_000.html"]
    with pytest.raises(ValueError, match="rank=-1"):
        debug_chat_dataloader_for_training([batch], qwen3_tokenizer, 1, out_dir=tmp_path, rank=-1)


def test_contradicting_boundary_keys_are_named_and_position_ids_shown(samples, qwen3_tokenizer, caplog):
    import logging

    from opensloth._debug_dataloader import render_batch_html

    batch, lens = _flat_batch(samples[:3])
    batch["packed_seq_lengths"] = torch.tensor([sum(lens)], dtype=torch.int32)  # one sample: positions say three
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        page, summary = render_batch_html(batch, qwen3_tokenizer, title="bad")
    assert summary["boundaries_from"] == "position_ids"
    assert summary["per_row"][0]["sample_lengths"] == lens
    assert "Boundary keys ignored" in page and "describe different segments" in page
    assert any("contradict" in r.getMessage() for r in caplog.records)


def test_collator_batches_show_their_recorded_padding(samples, qwen3_tokenizer):
    """A batch from opensloth.collate carries its padding: a real sample of pad tokens with no trained label at the
    end of a row stays a sample (the padding rule alone would call it padding)."""
    from opensloth._debug_dataloader import render_batch_html
    from opensloth.collate import collate_samples

    pad = qwen3_tokenizer.pad_token_id
    feats = [{"input_ids": samples[0]["input_ids"], "labels": samples[0]["labels"]},
             {"input_ids": [pad] * 3, "labels": [IGNORE_INDEX] * 3}]
    batch = collate_samples(feats, layout="rows", capacity=len(samples[0]["input_ids"]) + 3, rows=[[0, 1]],
                            pad_token_id=pad)
    _, summary = render_batch_html(batch, qwen3_tokenizer)
    assert summary["samples"] == 2 and summary["padding"] == 0
    _, rule = render_batch_html(dict(batch), qwen3_tokenizer)  # without the record, the rule reads it as padding
    assert rule["samples"] == 1 and rule["padding"] == 3
