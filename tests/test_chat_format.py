"""Chat formatting on the real shared data with the real Qwen3 tokenizer: rendering, assistant-only labels with
exact boundaries, truncation counts, schemas, and bad input.

Oracles are independent of opensloth.data.chat: the tokenizer's own `apply_chat_template` + encode for the token
ids, and the records' message contents for what each trained run must decode to.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from opensloth.data.chat import (
    IGNORE_INDEX,
    ChatFormatError,
    detect_end_of_turn,
    encode_chat,
    record_messages,
    token_mask_from_spans,
    tokenize_chat_dataset,
)

EOT = "<|im_end|>"


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of True."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    d = np.flatnonzero(np.diff(m.astype(np.int8)))
    return list(zip(d[0::2].tolist(), d[1::2].tolist(), strict=True))


def _reference_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def hh_multi(chat_records):
    recs = [r for r in chat_records["hh_rlhf"] if len(r["messages"]) >= 4]
    assert len(recs) > 1000  # the README says 1,646 multi-turn chats
    return recs


@pytest.fixture(autouse=True)
def _opensloth_logs_propagate():
    # setup_logging() (run by scripts) turns propagation off; caplog needs it on.
    lg = logging.getLogger("opensloth")
    old, lg.propagate = lg.propagate, True
    yield
    lg.propagate = old


def test_end_of_turn_detected_for_qwen3(qwen3_tokenizer):
    assert detect_end_of_turn(qwen3_tokenizer) == EOT


@pytest.mark.parametrize("name", ["alpaca", "gsm8k", "hh_rlhf", "arena_hard"])
def test_rendering_matches_the_tokenizers_own_template(qwen3_tokenizer, chat_records, name):
    recs = chat_records[name][:40]
    ds = tokenize_chat_dataset(recs, qwen3_tokenizer, assistant_only=False, keep_text=True)
    assert ds.column_names == ["text", "input_ids", "labels"]
    for rec, row in zip(recs, ds, strict=True):
        assert row["text"] == qwen3_tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        assert row["input_ids"] == _reference_ids(qwen3_tokenizer, rec["messages"])
        assert row["labels"] == row["input_ids"]  # every token trained when assistant_only=False


def test_multiturn_assistant_labels_have_exact_boundaries(qwen3_tokenizer, hh_multi):
    tok = qwen3_tokenizer
    recs = hh_multi[:300]
    ds = tokenize_chat_dataset(recs, tok, return_assistant_masks=True)
    assert ds.column_names == ["input_ids", "labels", "assistant_masks"]
    for rec, row in zip(recs, ds, strict=True):
        ids = np.asarray(row["input_ids"])
        labels = np.asarray(row["labels"])
        assert ids.tolist() == _reference_ids(tok, rec["messages"])
        trained = labels != IGNORE_INDEX
        assert (labels[trained] == ids[trained]).all()
        assert row["assistant_masks"] == trained.astype(int).tolist()
        runs = _runs(trained)
        assistant = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        # Each trained run is exactly one assistant turn: its content plus the closing <|im_end|>, nothing else.
        assert [tok.decode(ids[a:b].tolist()) for a, b in runs] == [c + EOT for c in assistant], rec["id"]
        last = len(runs) - 1
        for k, (a, b) in enumerate(runs):
            before = tok.decode(ids[:a].tolist())
            # The role header (and Qwen3's empty think block on the final turn) stays masked.
            expected_header = "<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if k == last else "")
            assert before.endswith(expected_header), (rec["id"], k, before[-60:])
            assert b == len(ids) or tok.decode(ids[b:b + 1].tolist()) == "\n"  # the newline after <|im_end|> masked
        masked_text = tok.decode(ids[~trained].tolist())
        for m in rec["messages"]:
            if m["role"] == "user":
                assert f"<|im_start|>user\n{m['content']}{EOT}" in masked_text


def test_tricky_contents_are_located_in_the_rendered_text(qwen3_tokenizer):
    tok = qwen3_tokenizer
    messages = [
        {"role": "user", "content": "Reply with the single word assistant, then with: user"},
        {"role": "assistant", "content": "assistant"},  # also appears in every header
        {"role": "user", "content": "user"},  # also appears in every user header
        {"role": "assistant", "content": "assistant"},
        {"role": "user", "content": "Say 'Reply with the single word assistant' please"},
        {"role": "assistant", "content": "Reply with the single word assistant"},  # inside an earlier user turn
    ]
    out = encode_chat(messages, tok)
    ids, labels = np.asarray(out["input_ids"]), np.asarray(out["labels"])
    assert ids.tolist() == _reference_ids(tok, messages)
    runs = _runs(labels != IGNORE_INDEX)
    assert [tok.decode(ids[a:b].tolist()) for a, b in runs] == [
        "assistant" + EOT, "assistant" + EOT, "Reply with the single word assistant" + EOT]


def test_empty_assistant_content_trains_only_the_end_of_turn(qwen3_tokenizer):
    tok = qwen3_tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    out = encode_chat(messages, tok)
    ids, labels = np.asarray(out["input_ids"]), np.asarray(out["labels"])
    runs = _runs(labels != IGNORE_INDEX)
    assert [tok.decode(ids[a:b].tolist()) for a, b in runs] == [EOT, "ok" + EOT]


def test_reasoning_in_content(qwen3_tokenizer):
    """Qwen3 keeps the final turn's <think> block (trained as written) and drops earlier turns' reasoning from the
    rendered history (only the answer is there to train)."""
    tok = qwen3_tokenizer
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 4."},
                {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "<think>\nadd again\n</think>\n\nIt is 6."}]
    out = encode_chat(messages, tok)
    ids, labels = np.asarray(out["input_ids"]), np.asarray(out["labels"])
    assert ids.tolist() == _reference_ids(tok, messages)
    runs = _runs(labels != IGNORE_INDEX)
    assert [tok.decode(ids[a:b].tolist()) for a, b in runs] == [
        "It is 4." + EOT, "<think>\nadd again\n</think>\n\nIt is 6." + EOT]


def test_custom_template_and_end_of_turn(qwen3_tokenizer):
    tok = qwen3_tokenizer
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}<|endoftext|>\n{% endfor %}"
    assert detect_end_of_turn(tok, template) == "<|endoftext|>"
    messages = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue."}]
    out = encode_chat(messages, tok, chat_template=template)
    ids, labels = np.asarray(out["input_ids"]), np.asarray(out["labels"])
    assert tok.decode(ids.tolist()) == "user: Name a colour<|endoftext|>\nassistant: Blue.<|endoftext|>\n"
    runs = _runs(labels != IGNORE_INDEX)
    # " Blue." carries its leading space in one token, so the run starts there.
    assert [tok.decode(ids[a:b].tolist()) for a, b in runs] == [" Blue.<|endoftext|>"]


def test_capybara_sharegpt_and_messages_schemas_agree(qwen3_tokenizer):
    pairs = [("What is 2+2?", "4."), ("And 3+3?", "6.")]
    messages = [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    capybara = {"source": "x", "conversation": [{"input": q, "output": a} for q, a in pairs]}
    sharegpt = {"conversations": [t for q, a in pairs for t in ({"from": "human", "value": q},
                                                                 {"from": "gpt", "value": a})]}
    assert record_messages(capybara) == messages
    assert record_messages(sharegpt) == messages
    rows = tokenize_chat_dataset([{"messages": messages}, capybara, sharegpt], qwen3_tokenizer).to_list()
    assert rows[0] == rows[1] == rows[2]
    assert rows[0]["input_ids"] == _reference_ids(qwen3_tokenizer, messages)


def _independent_lengths(tok, recs) -> np.ndarray:
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in recs]
    return np.asarray([len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]])


def test_truncation_is_counted_and_logged(qwen3_tokenizer, chat_records, caplog):
    recs = chat_records["hh_rlhf"][:200]
    lengths = _independent_lengths(qwen3_tokenizer, recs)
    limit = 128
    assert 0 < (lengths > limit).sum() < len(recs)
    with caplog.at_level(logging.INFO, logger="opensloth"):
        ds, stats = tokenize_chat_dataset(recs, qwen3_tokenizer, max_seq_length=limit, return_stats=True)
    assert [len(x) for x in ds["input_ids"]] == np.minimum(lengths, limit).tolist()
    assert stats.truncated == int((lengths > limit).sum())
    assert stats.tokens_cut == int(np.maximum(lengths - limit, 0).sum())
    assert stats.tokens == int(np.minimum(lengths, limit).sum())
    assert stats.records_in == stats.records_out == len(recs)
    assert f"{stats.truncated} truncated to max_seq_length={limit}" in caplog.text
    # Truncation keeps the start: each row is a prefix of the untruncated encoding.
    full = tokenize_chat_dataset(recs[:20], qwen3_tokenizer)
    for short, long in zip(ds.select(range(20)), full, strict=True):
        assert short["input_ids"] == long["input_ids"][:limit]
        assert short["labels"] == long["labels"][:limit]
    dropped, dstats = tokenize_chat_dataset(recs, qwen3_tokenizer, max_seq_length=limit, overflow="drop",
                                            return_stats=True)
    assert len(dropped) == dstats.records_out == int((lengths <= limit).sum())
    assert dstats.dropped_too_long == int((lengths > limit).sum())


def test_records_longer_than_the_tokenizers_limit_raise_no_transformers_warning(capfd):
    """max_seq_length truncates and counts; transformers' "Token indices sequence length is longer than the specified
    maximum" (its own model_max_length, which we never feed the model) only alarms users for nothing."""
    from opensloth.data.chat import encode_chat
    from opensloth.presets.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = 8  # transformers warns once per tokenizer: a fresh one
    record = {"messages": [{"role": "user", "content": "tell me about the weather " * 4},
                           {"role": "assistant", "content": "it is fine today " * 4}]}
    ds = tokenize_chat_dataset([record], tokenizer, max_seq_length=1024)
    assert len(ds[0]["input_ids"]) > 8
    assert len(encode_chat(record, tokenizer)["input_ids"]) == len(ds[0]["input_ids"])
    assert "Token indices sequence length" not in capfd.readouterr().err


def test_num_proc_gives_identical_rows(qwen3_tokenizer, hh_multi):
    recs = hh_multi[:64]
    one = tokenize_chat_dataset(recs, qwen3_tokenizer, max_seq_length=256, batch_size=16)
    two = tokenize_chat_dataset(recs, qwen3_tokenizer, max_seq_length=256, batch_size=16, num_proc=2)
    assert one.to_list() == two.to_list()


def test_hf_dataset_input(qwen3_tokenizer, chat_records):
    from datasets import Dataset

    recs = chat_records["gsm8k"][:30]
    from_list = tokenize_chat_dataset(recs, qwen3_tokenizer)
    from_ds = tokenize_chat_dataset(Dataset.from_list(recs), qwen3_tokenizer)
    assert from_list.to_list() == from_ds.to_list()


GOOD = {"id": "good", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD = {
    "no_messages": ({"id": "bad", "prompt": "hi"}, "no conversation"),
    "empty": ({"id": "bad", "messages": []}, "empty conversation"),
    "unknown_role": ({"id": "bad", "messages": [{"role": "human", "content": "hi"},
                                                {"role": "assistant", "content": "x"}]}, "unknown role 'human'"),
    "int_content": ({"id": "bad", "messages": [{"role": "user", "content": 3},
                                               {"role": "assistant", "content": "x"}]}, "content is int"),
    "none_content": ({"id": "bad", "messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": None}]}, "content is NoneType"),
    "list_content": ({"id": "bad", "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                                                {"role": "assistant", "content": "x"}]}, "content is list"),
    "no_assistant": ({"id": "bad", "messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    "not_a_list": ({"id": "bad", "messages": "user: hi"}, "expected a list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_raises_naming_it(qwen3_tokenizer, case):
    bad, fragment = BAD[case]
    with pytest.raises(ChatFormatError) as err:
        tokenize_chat_dataset([GOOD, bad, GOOD], qwen3_tokenizer)
    assert "record 2 (id='bad')" in str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_skip_is_counted_and_logged(qwen3_tokenizer, case, caplog):
    bad, fragment = BAD[case]
    with caplog.at_level(logging.INFO, logger="opensloth"):
        ds, stats = tokenize_chat_dataset([GOOD, bad, GOOD], qwen3_tokenizer, on_error="skip", return_stats=True)
    assert stats.skipped == 1 and stats.records_out == len(ds) == 2
    assert "1 skipped" in caplog.text
    assert "record 2 (id='bad')" in caplog.text and fragment in caplog.text
    expected = encode_chat(GOOD, qwen3_tokenizer)
    assert all(row["labels"] == expected["labels"] for row in ds)


def test_bad_record_in_an_arrow_dataset(qwen3_tokenizer):
    from datasets import Dataset

    rows = [GOOD, {"id": "bad", "messages": [{"role": "bot", "content": "x"}]}, GOOD]
    with pytest.raises(ChatFormatError, match=r"record 2 \(id='bad'\).*unknown role 'bot'"):
        tokenize_chat_dataset(Dataset.from_list(rows), qwen3_tokenizer)
    ds, stats = tokenize_chat_dataset(Dataset.from_list(rows), qwen3_tokenizer, on_error="skip", return_stats=True)
    assert (stats.skipped, len(ds)) == (1, 2)


def test_option_validation(qwen3_tokenizer):
    with pytest.raises(ValueError, match="max_seq_length=0"):
        tokenize_chat_dataset([GOOD], qwen3_tokenizer, max_seq_length=0)
    with pytest.raises(ValueError, match="overflow='cut'"):
        tokenize_chat_dataset([GOOD], qwen3_tokenizer, overflow="cut")
    with pytest.raises(ValueError, match="on_error='ignore'"):
        tokenize_chat_dataset([GOOD], qwen3_tokenizer, on_error="ignore")


def test_token_mask_from_spans_overlap_rule():
    offsets = [(0, 3), (3, 5), (5, 9), (9, 9), (9, 12), (12, 20)]
    # span [4, 10): token (3,5) straddles the start, (9,12) straddles the end, (9,9) is zero-width inside.
    assert token_mask_from_spans(offsets, [(4, 10)]).tolist() == [False, True, True, True, True, False]
    assert token_mask_from_spans(offsets, [(0, 3), (12, 20)]).tolist() == [True, False, False, False, False, True]
    assert token_mask_from_spans(offsets, []).tolist() == [False] * 6
    # Brute-force comparison on random inputs.
    rng = np.random.default_rng(0)
    for _ in range(200):
        cuts = np.sort(rng.integers(0, 60, size=12))
        offs = list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))
        pts = np.sort(rng.choice(70, size=6, replace=False))
        spans = [(int(pts[i]), int(pts[i + 1])) for i in range(0, 6, 2)]
        want = [any(s < max(e_, s_ + 1) and e > s_ for s, e in spans) for s_, e_ in offs]
        assert token_mask_from_spans(offs, spans).tolist() == want


def _first_answer_position(tok, record) -> int:
    """Index of the first token of the record's first assistant answer, found from the tokenizer alone: the
    conversation before it rendered with the generation prompt is a prefix of the whole conversation's tokens."""
    msgs = record["messages"]
    j = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    head = tok.apply_chat_template(msgs[:j], tokenize=False, add_generation_prompt=True)
    return len(tok(head, add_special_tokens=False)["input_ids"])


def test_records_whose_answers_are_truncated_away_are_dropped_and_counted(qwen3_tokenizer, hh_multi, caplog):
    tok = qwen3_tokenizer
    recs = hh_multi[:40]
    firsts = np.asarray([_first_answer_position(tok, r) for r in recs])
    limit = int(np.median(firsts))  # about half the records keep no answer token
    keeps = firsts < limit
    assert 0 < keeps.sum() < len(recs)
    with caplog.at_level(logging.INFO, logger="opensloth"):
        ds, stats = tokenize_chat_dataset(recs, tok, max_seq_length=limit, return_stats=True)
    assert stats.records_out == len(ds) == int(keeps.sum())
    assert stats.dropped_no_trained == stats.no_trained_by_truncation == int((~keeps).sum())
    assert stats.first_answer_min == int(firsts[~keeps].min())
    assert all(any(x != IGNORE_INDEX for x in row[1:]) for row in ds["labels"])
    assert f"dropped {stats.dropped_no_trained} of {len(recs)} records that train no token" in caplog.text
    # Kept are exactly the records with an answer token inside the limit, in their order.
    want = [r for r, k in zip(recs, keeps, strict=True) if k]
    first_rows = [encode_chat(r, tok, max_seq_length=limit)["input_ids"] for r in want[:3]]
    assert ds["input_ids"][:3] == first_rows
    kept, kstats = tokenize_chat_dataset(recs, tok, max_seq_length=limit, drop_untrained=False, return_stats=True)
    assert len(kept) == len(recs) and kstats.no_trained_tokens == int((~keeps).sum())


def test_nothing_to_train_says_why_and_what_to_change(qwen3_tokenizer, hh_multi):
    from opensloth.data.chat import NothingToTrainError

    tok = qwen3_tokenizer
    recs = hh_multi[:10]
    firsts = [_first_answer_position(tok, r) for r in recs]
    limit = min(firsts)  # the earliest answer token sits at index `limit`: cut off for every record
    with pytest.raises(NothingToTrainError) as err:
        tokenize_chat_dataset(recs, tok, max_seq_length=limit)
    msg = str(err.value)
    assert f"none of the {len(recs)} records has a trained token left" in msg
    assert f"truncation at max_seq_length={limit}" in msg and f"raise max_seq_length above {limit}" in msg
    assert err.value.stats.first_answer_min == limit and err.value.stats.records_out == 0
    ok = tokenize_chat_dataset(recs, tok, max_seq_length=limit + 1)  # one answer token left for the earliest
    assert len(ok) == sum(f == limit for f in firsts)
    everything = tokenize_chat_dataset(recs, tok, max_seq_length=limit, assistant_only=False)
    assert len(everything) == len(recs)


PC = {"id": "pc", "prompt": "What is 2+2?", "completion": "4"}
PC_MSGS = {"id": "pcm", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
           "completion": [{"role": "assistant", "content": "4"}]}


def test_prompt_completion_records(qwen3_tokenizer):
    tok = qwen3_tokenizer
    as_messages = {"messages": [{"role": "user", "content": PC["prompt"]},
                                {"role": "assistant", "content": PC["completion"]}]}
    assert encode_chat(PC, tok)["labels"] == encode_chat(as_messages, tok)["labels"]
    # Message lists: rendered as the whole conversation; only the completion's assistant turn is trained.
    full = PC_MSGS["prompt"] + PC_MSGS["completion"]
    enc = encode_chat(PC_MSGS, tok)
    assert enc["input_ids"] == _reference_ids(tok, full)
    trained = [i for i, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(trained).strip() == "4" + EOT
    every_assistant = encode_chat({"messages": full}, tok)
    assert sum(x != IGNORE_INDEX for x in every_assistant["labels"]) > len(trained)  # "Hello." is trained there
    ds = tokenize_chat_dataset([PC, PC_MSGS], tok)
    assert ds["labels"] == [encode_chat(PC, tok)["labels"], enc["labels"]]
    with pytest.raises(ChatFormatError, match=r"record 1 \(id='x'\).*only one of 'prompt' and 'completion'"):
        tokenize_chat_dataset([{"id": "x", "prompt": "hi"}], tok)
    with pytest.raises(ChatFormatError, match="no assistant message in its completion"):
        tokenize_chat_dataset([{"prompt": [{"role": "user", "content": "a"}],
                                "completion": [{"role": "user", "content": "b"}]}], tok)
    with pytest.raises(ChatFormatError, match="expected two strings, or two lists of messages"):
        encode_chat({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, tok)


def test_json_list_records_are_named_by_file_and_line(qwen3_tokenizer, tmp_path):
    from opensloth.data.records import read_chat_records

    bad = {"id": "bad", "messages": [{"role": "user", "content": "q"}]}
    path = tmp_path / "chats.json"
    # pretty-printed: GOOD spans 2-13, bad starts on line 15 (1-based) after a blank line
    path.write_text("[\n" + json.dumps(GOOD, indent=2) + ",\n\n" + json.dumps(bad, indent=2) + "\n]\n",
                    encoding="utf-8")
    lines = path.read_text(encoding="utf-8").splitlines()
    bad_line = next(i for i, line in enumerate(lines, 1) if '"bad"' in line) - 1  # the line its "{" opens on
    assert lines[bad_line - 1].strip() == "{"
    recs = read_chat_records(path)
    assert [r.source for r in recs] == [f"{path}:2", f"{path}:{bad_line}"]
    with pytest.raises(ChatFormatError, match=rf"{path}:{bad_line} \(id='bad'\) has no assistant message"):
        tokenize_chat_dataset(recs, qwen3_tokenizer)
    path.write_text('[{"id": 1},\n {"id": 2}\n {"id": 3}]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"chats.json: line 3: expected ',' or ']'"):
        read_chat_records(path)
    path.write_text('{"messages": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="holds a JSON dict; expected a list"):
        read_chat_records(path)
