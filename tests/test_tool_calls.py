"""Tool-calling conversations (OpenAI / Hugging Face messages schema) on the real Qwen3 tokenizer, whose template
renders `tools` and `tool_calls`: records reach the template exactly as written, the assistant's tool calls are
trained and nothing else is, and the packed builder, the cache key, precompute_dataset.py and the HTML inspector
handle such records.

Oracles are independent of opensloth.data.chat: the tokenizer's own `apply_chat_template` for the text, and a
hand-written rendering of each assistant turn in Qwen3's format (`_expected_turn`) for what must be trained.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from opensloth.data.chat import (
    IGNORE_INDEX,
    ChatFormatError,
    TemplateDropsToolsError,
    encode_chat,
    record_messages,
    tokenize_chat_dataset,
    unified_free_form_fields,
)

EOT = "<|im_end|>"
ROOT = Path(__file__).resolve().parents[1]


def _tool(name, properties, required=()):
    return {"type": "function", "function": {
        "name": name, "description": f"{name} tool",
        "parameters": {"type": "object", "properties": properties, "required": list(required)}}}


def _call(name, arguments, *, nested=True):
    fn = {"name": name, "arguments": arguments}
    return {"type": "function", "id": f"call_{name}", "function": fn} if nested else fn


WEATHER = _tool("get_weather", {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                ["city"])
TIME = _tool("get_time", {"tz": {"type": "string"}})
SEARCH = _tool("search", {"query": {"type": "string"},
                          "filter": {"type": "object", "properties": {"year": {"type": "integer"}}}})
LOOKUP = _tool("lookup", {"id": {"type": ["string", "integer"]}})

RECORDS = [
    {"id": "single_call_no_text", "tools": [WEATHER, TIME], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "call_get_weather", "content": "{\"temp\": 21, \"unit\": \"c\"}"},
        {"role": "assistant", "content": "It is 21 °C in Paris."}]},
    {"id": "parallel_calls_with_text", "tools": [WEATHER, TIME], "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather and time in Tokyo?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            _call("get_weather", {"city": "Tokyo", "unit": "c"}), _call("get_time", {"tz": "Asia/Tokyo"})]},
        {"role": "tool", "content": "18 c"},
        {"role": "tool", "content": "09:15"},
        {"role": "assistant", "content": "18 °C, 09:15."}]},
    {"id": "nested_mixed_arguments", "tools": [SEARCH, LOOKUP], "messages": [
        {"role": "user", "content": "Find papers."},
        {"role": "assistant", "content": None, "tool_calls": [
            _call("search", {"query": "packing", "filter": {"year": 2024, "venues": ["a", None, 3.5],
                                                             "deep": {"x": {"y": True, "z": []}}}}),
            _call("lookup", "{\"id\": \"12345\"}")]},  # arguments as a JSON string, rendered verbatim
        {"role": "tool", "content": "3 papers"},
        {"role": "tool", "content": "found"},
        {"role": "assistant", "content": "Three papers; the record exists."}]},
    {"id": "multi_turn_tool_result_equals_answer", "tools": [LOOKUP], "messages": [
        {"role": "user", "content": "Look up 7."},
        {"role": "assistant", "content": "", "tool_calls": [_call("lookup", {"id": 7}, nested=False)]},
        {"role": "tool", "content": "Done."},
        {"role": "assistant", "content": "Done."},  # same text as the tool result just before it
        {"role": "user", "content": "Done."},  # and as the next user turn
        {"role": "assistant", "content": "", "tool_calls": [_call("lookup", {"id": "7"})]},
        {"role": "tool", "content": "Done."},
        {"role": "assistant", "content": "Done."}]},
    {"id": "no_tools", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
]


def _qwen3_content(msg, in_history: bool) -> str:
    """The text Qwen3 renders for an assistant message's content (reasoning-free records)."""
    content = msg.get("content") or ""
    return content.split("</think>")[-1].lstrip("\n") if in_history and "</think>" in content else content


def _expected_turn(msg, in_history: bool) -> str:
    """What must be trained for one assistant message, written from Qwen3's tool-call format (its system prompt):
    the content, then each call as <tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>, then <|im_end|>."""
    out = _qwen3_content(msg, in_history)
    for k, call in enumerate(msg.get("tool_calls") or []):
        fn = call.get("function", call)
        args = fn["arguments"]
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        block = f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {args}}}\n</tool_call>'
        out += ("\n" if out or k else "") + block
    return out + EOT


def _runs(mask) -> list[tuple[int, int]]:
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    d = np.flatnonzero(np.diff(m.astype(np.int8)))
    return list(zip(d[0::2].tolist(), d[1::2].tolist(), strict=True))


def _trained_texts(tok, row) -> list[str]:
    ids, labels = np.asarray(row["input_ids"]), np.asarray(row["labels"])
    trained = labels != IGNORE_INDEX
    assert (labels[trained] == ids[trained]).all()
    return [tok.decode(ids[a:b].tolist()) for a, b in _runs(trained)]


def _last_user(messages) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "user")


@pytest.fixture(scope="module")
def tool_rows(qwen3_tokenizer):
    return tokenize_chat_dataset(copy.deepcopy(RECORDS), qwen3_tokenizer, keep_text=True).to_list()


def test_records_render_exactly_as_the_tokenizer_renders_them(qwen3_tokenizer, tool_rows):
    tok = qwen3_tokenizer
    for rec, row in zip(RECORDS, tool_rows, strict=True):
        want = tok.apply_chat_template(rec["messages"], tools=rec.get("tools"), tokenize=False)
        assert row["text"] == want, rec["id"]
        assert row["input_ids"] == tok(want, add_special_tokens=False)["input_ids"]
        if rec.get("tools"):
            assert "# Tools" in row["text"]
            for tool in rec["tools"]:
                assert json.dumps(tool, ensure_ascii=False) in row["text"]  # each tool reached the template


def test_trained_tokens_are_exactly_the_assistants(qwen3_tokenizer, tool_rows):
    tok = qwen3_tokenizer
    for rec, row in zip(RECORDS, tool_rows, strict=True):
        msgs = rec["messages"]
        last_user = _last_user(msgs)
        expected = [_expected_turn(m, i < last_user) for i, m in enumerate(msgs) if m["role"] == "assistant"]
        assert _trained_texts(tok, row) == expected, rec["id"]
        ids, labels = np.asarray(row["input_ids"]), np.asarray(row["labels"])
        masked = tok.decode(ids[labels == IGNORE_INDEX].tolist())
        for m in msgs:  # tool results, user and system turns stay masked
            if m["role"] == "tool":
                assert f"<tool_response>\n{m['content']}\n</tool_response>" in masked
            elif m["role"] in ("user", "system"):
                assert m["content"] in masked
        for tool in rec.get("tools") or []:
            assert json.dumps(tool, ensure_ascii=False) in masked  # tool definitions stay masked


def test_a_tool_call_with_no_text_trains_the_call(qwen3_tokenizer):
    """The issue's example: the trained text was `<|im_end|>Done.<|im_end|>`; the call must be trained."""
    rec = RECORDS[0]
    out = encode_chat(rec, qwen3_tokenizer)
    runs = _trained_texts(qwen3_tokenizer, out)
    assert runs[0].startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert len(runs) == 2 and runs[1] == "It is 21 °C in Paris." + EOT


def _call_record(i, args, rec_tools):
    return {"id": str(i), "tools": rec_tools, "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [_call("f", args)]},
        {"role": "tool", "content": "result"}, {"role": "assistant", "content": "ok"}]}


TOOLS_F_G = [_tool("f", {"x": {"type": "integer"}}), _tool("g", {"y": {"type": "integer"}, "z": {"type": "object"}})]


def test_argument_keys_are_not_unified_across_records(qwen3_tokenizer):
    """Regression: records through the Dataset path rendered `{"x": 1, "y": null}` for the first record (Arrow gave
    every record every other record's keys as null); tools' schemas leaked between records the same way."""
    tok = qwen3_tokenizer
    recs = [_call_record(0, {"x": 1}, None), _call_record(1, {"y": 2}, None)]
    rows = tokenize_chat_dataset(recs, tok, keep_text=True).to_list()
    assert '"arguments": {"x": 1}}' in rows[0]["text"] and "null" not in rows[0]["text"]
    assert '"arguments": {"y": 2}}' in rows[1]["text"] and "null" not in rows[1]["text"]
    recs = [_call_record(0, {"x": 1}, TOOLS_F_G[:1]), _call_record(1, {"y": 2}, TOOLS_F_G[1:])]
    rows = tokenize_chat_dataset(recs, tok, keep_text=True).to_list()
    for r, row in zip(recs, rows, strict=True):
        assert row["text"] == tok.apply_chat_template(r["messages"], tools=r["tools"], tokenize=False)
        assert "null" not in row["text"]
    assert '"z"' not in rows[0]["text"]  # the second record's tool schema did not leak into the first


def test_any_mix_of_json_types_across_records(qwen3_tokenizer):
    """The same key with different JSON types across records used to fail with a raw pyarrow.lib.ArrowInvalid."""
    tok = qwen3_tokenizer
    recs = [_call_record(0, {"id": "12345"}, TOOLS_F_G), _call_record(1, {"id": 7}, None),
            _call_record(2, {"id": [1, {"a": None}]}, TOOLS_F_G), _call_record(3, {"id": {"b": 2.5}}, TOOLS_F_G[:1]),
            _call_record(4, {"id": None}, []), _call_record(5, "{\"id\": true}", TOOLS_F_G)]
    rows = tokenize_chat_dataset(recs, tok, keep_text=True).to_list()
    for r, row in zip(recs, rows, strict=True):
        assert row["text"] == tok.apply_chat_template(r["messages"], tools=r["tools"], tokenize=False)
        args = r["messages"][1]["tool_calls"][0]["function"]["arguments"]
        args = args if isinstance(args, str) else json.dumps(args)
        assert _trained_texts(tok, row)[0] == f'<tool_call>\n{{"name": "f", "arguments": {args}}}\n</tool_call>' + EOT
    assert "# Tools" not in rows[1]["text"]


def test_tools_argument_and_per_record_tools(qwen3_tokenizer):
    tok = qwen3_tokenizer
    with_own = RECORDS[0]
    without = {"id": "x", "messages": RECORDS[0]["messages"]}
    rows = tokenize_chat_dataset([with_own, without], tok, tools=[TIME], keep_text=True)["text"]
    assert rows[0] == tok.apply_chat_template(with_own["messages"], tools=with_own["tools"], tokenize=False)
    assert rows[1] == tok.apply_chat_template(without["messages"], tools=[TIME], tokenize=False)
    # A template-kwargs dict holding tools (precompute_dataset.py's --template_kwargs), or tools as a JSON string.
    assert tokenize_chat_dataset([without], tok, keep_text=True, **{"tools": [TIME]})["text"] == rows[1:]
    as_string = {**without, "tools": json.dumps([TIME])}
    assert encode_chat(as_string, tok)["text"] == rows[1]
    with pytest.raises(ValueError, match="the tools argument: 'tools' is"):
        tokenize_chat_dataset([without], tok, tools={"name": "f"})


def test_empty_tool_call_lists_mean_no_call(qwen3_tokenizer):
    """Datasets often write `"tool_calls": []` on every turn; that is no call (and no error on a user turn)."""
    plain = RECORDS[4]["messages"]
    padded = [{**m, "tool_calls": []} for m in plain]
    assert record_messages({"messages": padded}) == plain
    assert encode_chat(padded, qwen3_tokenizer) == encode_chat(plain, qwen3_tokenizer)


def test_enable_thinking_false_and_reasoning_in_tool_steps(qwen3_tokenizer):
    """Qwen3 quirks: with enable_thinking=False the generation prompt holds an empty think block that turns inside
    the conversation lack; reasoning of tool-calling steps is dropped from the history once a later user query
    exists, so rendering the conversation up to a turn differs from the whole conversation's text."""
    tok = qwen3_tokenizer
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning_content": "plan A", "content": "",
         "tool_calls": [_call("lookup", {"id": 1})]},
        {"role": "tool", "content": "r1"},
        {"role": "assistant", "reasoning_content": "plan B", "content": "", "tool_calls": [_call("lookup", {"id": 2})]},
        {"role": "tool", "content": "r2"},
        {"role": "assistant", "reasoning_content": "sum up", "content": "answer one"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "reasoning_content": "last", "content": "answer two"}]
    calls = [f'<tool_call>\n{{"name": "lookup", "arguments": {{"id": {i}}}}}\n</tool_call>' + EOT for i in (1, 2)]
    final = "<think>\nlast\n</think>\n\nanswer two" + EOT
    for kwargs in ({}, {"enable_thinking": False}):
        out = encode_chat(messages, tok, tools=[LOOKUP], **kwargs)
        assert out["text"] == tok.apply_chat_template(messages, tools=[LOOKUP], tokenize=False, **kwargs)
        assert _trained_texts(tok, out) == [*calls, "answer one" + EOT, final], kwargs
        # Within the last query, the tool steps' reasoning is rendered and so trained.
        tail = messages[:1] + messages[6:7] + messages[1:6]
        out = encode_chat(tail, tok, tools=[LOOKUP], **kwargs)
        assert _trained_texts(tok, out) == [
            "<think>\nplan A\n</think>\n\n" + calls[0], "<think>\nplan B\n</think>\n\n" + calls[1],
            "<think>\nsum up\n</think>\n\nanswer one" + EOT]


def test_another_template_that_renders_tool_calls(qwen3_tokenizer):
    """A template of a different shape (no generation-prompt support, calls inline, results as their own turns)."""
    template = (
        "{% for m in messages %}"
        "{% if m.role == 'assistant' %}<|im_start|>bot: {{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}{% set f = c.function if c.function is defined else c %}"
        "[CALL {{ f.name }} {{ f.arguments | tojson }}]"
        "{% endfor %}<|im_end|>\n"
        "{% elif m.role == 'tool' %}<|im_start|>result: {{ m.content }}<|im_end|>\n"
        "{% else %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    )
    messages = RECORDS[3]["messages"]
    out = encode_chat(messages, qwen3_tokenizer, chat_template=template)
    assert out["text"] == qwen3_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    runs = _trained_texts(qwen3_tokenizer, out)
    # "bot: " is the template's header (masked); the token carrying the space after it may be trained.
    assert [r.lstrip(" ") for r in runs] == ['[CALL lookup {"id": 7}]' + EOT, "Done." + EOT,
                                             '[CALL lookup {"id": "7"}]' + EOT, "Done." + EOT]


def test_sharegpt_function_call_and_observation_turns(qwen3_tokenizer):
    sharegpt = {"tools": json.dumps([LOOKUP]), "conversations": [
        {"from": "human", "value": "Look up 7."},
        {"from": "function_call", "value": json.dumps({"name": "lookup", "arguments": {"id": 7}})},
        {"from": "observation", "value": "Done."},
        {"from": "gpt", "value": "Done."}]}
    messages = record_messages(sharegpt)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "lookup", "arguments": {"id": 7}}}]
    out = encode_chat(sharegpt, qwen3_tokenizer)
    assert out["text"] == qwen3_tokenizer.apply_chat_template(messages, tools=[LOOKUP], tokenize=False)
    assert _trained_texts(qwen3_tokenizer, out) == [
        '<tool_call>\n{"name": "lookup", "arguments": {"id": 7}}\n</tool_call>' + EOT, "Done." + EOT]


def test_num_proc_and_dataset_of_json_strings_agree(qwen3_tokenizer, tool_rows):
    from datasets import Dataset

    tok = qwen3_tokenizer
    two = tokenize_chat_dataset(copy.deepcopy(RECORDS), tok, keep_text=True, num_proc=2, batch_size=2).to_list()
    assert two == tool_rows
    # An Arrow dataset that keeps each conversation and its tools as JSON strings renders them as written too.
    ds = Dataset.from_dict({"id": [r["id"] for r in RECORDS],
                            "messages": [json.dumps(r["messages"]) for r in RECORDS],
                            "tools": [json.dumps(r["tools"]) if "tools" in r else None for r in RECORDS]})
    assert tokenize_chat_dataset(ds, tok, keep_text=True).to_list() == tool_rows


def test_arrow_struct_payloads_are_named_in_a_warning(qwen3_tokenizer, caplog):
    from datasets import Dataset

    lg = logging.getLogger("opensloth")
    old, lg.propagate = lg.propagate, True
    try:
        ds = Dataset.from_list(copy.deepcopy(RECORDS[:2]))
        found = unified_free_form_fields(ds.features)
        assert "messages[].tool_calls[].function.arguments" in found
        assert "tools[].function.parameters" in found
        with caplog.at_level(logging.WARNING, logger="opensloth"):
            tokenize_chat_dataset(ds, qwen3_tokenizer)
        assert "messages[].tool_calls[].function.arguments" in caplog.text and "JSON strings" in caplog.text
    finally:
        lg.propagate = old
    assert unified_free_form_fields(Dataset.from_list([RECORDS[4]]).features) == []


BAD_TOOL_RECORDS = {
    "calls_not_a_list": ({"role": "assistant", "content": "", "tool_calls": {"name": "f"}}, "expected a list"),
    "call_without_name": ({"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]},
                          "no function name"),
    "number_arguments": ({"role": "assistant", "content": "", "tool_calls": [_call("f", 3)]}, "arguments of type int"),
    "missing_arguments": ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]},
                          "arguments of type NoneType"),
    "user_with_calls": ({"role": "user", "content": "x", "tool_calls": [_call("f", {})]}, "only assistant turns"),
    "null_content_no_calls": ({"role": "assistant", "content": None}, "content is NoneType"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOOL_RECORDS))
def test_bad_tool_records_are_named_by_file_and_line(qwen3_tokenizer, tmp_path, case, caplog):
    from opensloth.data.records import read_chat_records

    turn, fragment = BAD_TOOL_RECORDS[case]
    good = RECORDS[0]
    bad = {"id": "bad", "messages": [{"role": "user", "content": "q"}, turn,
                                     {"role": "assistant", "content": "a"}]}
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, bad, good)) + "\n", encoding="utf-8")
    records = read_chat_records(path)
    with pytest.raises(ChatFormatError) as err:
        tokenize_chat_dataset(records, qwen3_tokenizer)
    assert f"{path}:3 (id='bad')" in str(err.value) and fragment in str(err.value)
    ds, stats = tokenize_chat_dataset(records, qwen3_tokenizer, on_error="skip", return_stats=True)
    assert (stats.skipped, len(ds)) == (1, 3)
    assert f"{path}:3" in next(iter(stats.skip_reasons))


def test_bad_tools_field_and_bad_lines(qwen3_tokenizer, tmp_path, caplog):
    from opensloth.data.records import read_chat_records

    for tools, fragment in (("{not json", "not valid JSON"), ({"name": "f"}, "expected a list of tool definitions"),
                            ([1, 2], "expected a list of tool definitions")):
        with pytest.raises(ChatFormatError, match=fragment):
            tokenize_chat_dataset([{**RECORDS[0], "tools": tools}], qwen3_tokenizer)
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{broken\n[1, 2]\n\n" + json.dumps(RECORDS[1]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mixed.jsonl:2 is not valid JSON"):
        read_chat_records(path)
    lg = logging.getLogger("opensloth")
    old, lg.propagate = lg.propagate, True
    try:
        with caplog.at_level(logging.WARNING, logger="opensloth"):
            recs = read_chat_records(path, on_error="skip")
    finally:
        lg.propagate = old
    assert [r["id"] for r in recs] == [RECORDS[0]["id"], RECORDS[1]["id"]]
    assert [r.source for r in recs] == [f"{path}:1", f"{path}:5"]
    assert "skipped 2 invalid line(s)" in caplog.text and "mixed.jsonl:3 is a JSON list" in caplog.text


def test_packed_builder_keeps_tool_call_labels(qwen3_tokenizer, tool_rows, backend, monkeypatch):
    from opensloth.data.packed import build_packed_dataset

    ds = tokenize_chat_dataset(copy.deepcopy(RECORDS) * 3, qwen3_tokenizer)
    capacity = max(len(x) for x in ds["input_ids"]) * 2
    monkeypatch.setenv("OPENSLOTH_BACKEND", backend)
    packed = build_packed_dataset(ds, capacity)
    samples = {}
    for row in packed.to_list():
        at = 0
        for n in row["seq_lengths"]:
            key = tuple(row["input_ids"][at:at + n])
            samples.setdefault(key, []).append(row["labels"][at:at + n])
            at += n
        assert at == len(row["input_ids"]) <= capacity
    assert sum(len(v) for v in samples.values()) == len(ds)
    for ids, labels in zip(ds["input_ids"], ds["labels"], strict=True):
        assert labels in samples[tuple(ids)]  # every sample's labels (tool calls trained) survive packing


def test_cache_key_of_tool_records(tmp_path):
    from opensloth.data.cache import dataset_fingerprint, make_cache_key
    from opensloth.data.records import read_chat_records

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n", encoding="utf-8")
    from_file = read_chat_records(path)
    key = make_cache_key({"train": dataset_fingerprint(from_file, "full")})
    assert key == make_cache_key({"train": dataset_fingerprint(copy.deepcopy(RECORDS), "full")})
    changed = copy.deepcopy(RECORDS)
    changed[2]["messages"][1]["tool_calls"][0]["function"]["arguments"]["filter"]["deep"]["x"]["y"] = False
    assert make_cache_key({"train": dataset_fingerprint(changed, "full")}) != key
    changed = copy.deepcopy(RECORDS)
    changed[0]["tools"][0]["function"]["parameters"]["properties"]["city"]["type"] = "integer"
    assert make_cache_key({"train": dataset_fingerprint(changed, "sample")}) != make_cache_key(
        {"train": dataset_fingerprint(RECORDS, "sample")})


def test_precompute_script_on_tool_records(qwen3_tokenizer, shared_data, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "train_scripts"))
    try:
        import precompute_dataset
    finally:
        sys.path.remove(str(ROOT / "train_scripts"))
    from opensloth.data.cache import load_prepared_dataset

    path = tmp_path / "tools.jsonl"
    lines = [json.dumps(r) for r in RECORDS * 4] + ["not json"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["--data", str(path), "--tokenizer", str(shared_data / "tokenizers" / "qwen3"),
              "--output_dir", str(tmp_path / "out"), "--max_seq_length", "0"]
    with pytest.raises(SystemExit, match=r"tools.jsonl:21 is not valid JSON"):
        precompute_dataset.main([*common, "--name", "raise"])
    assert precompute_dataset.main([*common, "--name", "packed", "--on_error", "skip", "--pack", "2048",
                                    "--val_size", "5"]) == 0
    assert precompute_dataset.main([*common, "--name", "plain", "--on_error", "skip"]) == 0
    train, val, meta = load_prepared_dataset(tmp_path / "out" / "packed")
    assert meta["chat_format"] >= 2 and meta["stats"]["train"]["chat"]["records_in"] == 15
    assert len(val) > 0 and "seq_lengths" in train.column_names
    plain, _, _ = load_prepared_dataset(tmp_path / "out" / "plain")
    direct = tokenize_chat_dataset(copy.deepcopy(RECORDS) * 4, qwen3_tokenizer)
    assert plain.to_list() == direct.to_list()
    trained = [tok for row in plain for tok, lab in zip(row["input_ids"], row["labels"], strict=True)
               if lab != IGNORE_INDEX]
    assert qwen3_tokenizer.convert_tokens_to_ids("<tool_call>") in trained


def test_html_inspector_marks_tool_calls_and_results(qwen3_tokenizer, tool_rows, tmp_path):
    import torch

    from opensloth._debug_dataloader import render_batch_html

    tok = qwen3_tokenizer
    row = tool_rows[1]  # parallel calls: two <tool_call> blocks and two <tool_response> blocks
    batch = {"input_ids": torch.tensor([row["input_ids"]]), "labels": torch.tensor([row["labels"]])}
    page, summary = render_batch_html(batch, tok)
    texts = [tok.decode([i]) for i in row["input_ids"]]
    joined = "".join(texts)
    assert "tool call</span>" in page and "tool result</span>" in page  # legend entries

    def inside(opening, closing):  # tokens overlapping each opening..closing region, found independently
        ends = np.cumsum([len(t) for t in texts])
        out, at = set(), joined.find(opening)
        while at >= 0:
            stop = joined.find(closing, at) + len(closing)
            out |= {i for i in range(len(texts)) if ends[i] > at and ends[i] - len(texts[i]) < stop}
            at = joined.find(opening, stop)
        return out

    calls, results = inside("<tool_call>", "</tool_call>"), inside("<tool_response>", "</tool_response>")
    assert summary["tool_call"] == len(calls) > 0 and summary["tool_result"] == len(results) > 0
    import re

    classes = {int(i): c.split() for c, i in re.findall(r'<span class="t ([^"]*)" data-i="(\d+)"', page)}
    assert {i for i, c in classes.items() if "tc" in c} == calls
    assert {i for i, c in classes.items() if "tres" in c} == results
    labels = np.asarray(row["labels"])
    # The assistant's calls (after the system prompt's format example) are trained; every result token is masked.
    assert all(labels[i] == IGNORE_INDEX for i in results)
    system_end = joined.find(EOT)
    assert any(labels[i] != IGNORE_INDEX for i in calls if sum(len(t) for t in texts[:i]) > system_end)
    plain, plain_summary = render_batch_html(batch, tok, tool_markers=())
    assert plain_summary["tool_call"] == plain_summary["tool_result"] == 0 and ' tc"' not in plain


# --- templates that drop or reformat tool calls -------------------------------------------------------------------

def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


# ChatML that ignores `tool_calls` and `tools`, as the tiny preset's template did and many models' templates do
_NO_TOOLS_CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _no_tools_tokenizer():
    from opensloth.presets.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = _NO_TOOLS_CHATML
    return tokenizer


def test_the_tiny_presets_template_trains_tool_calls():
    from opensloth.presets.tokenizer import build_tiny_tokenizer

    tiny = build_tiny_tokenizer()
    rows = tokenize_chat_dataset([RECORDS[0], RECORDS[2]], tiny).to_list()
    trained = [tiny.decode([t for t in r["labels"] if t != IGNORE_INDEX]) for r in rows]
    assert all('<tool_call>\n{"name": ' in t for t in trained)
    assert '"get_weather"' in trained[0] and "It is 21 °C in Paris." in trained[0]


def test_a_template_that_drops_tool_calls_stops_the_run(tmp_path):
    """Regression: the tiny preset's template ignored `tool_calls` and `tools`; a tool-calling turn rendered as
    `<|im_start|>assistant\\n<|im_end|>` and trained only `<|im_end|>`, with no warning. It must stop the run naming
    the record, whatever on_error says (skipping would drop every tool record)."""
    from opensloth.data.records import read_chat_records

    tiny = _no_tools_tokenizer()
    plain = RECORDS[4]
    path = _write_jsonl(tmp_path / "calls.jsonl", [plain, plain, RECORDS[0], plain, RECORDS[1]])
    records = read_chat_records(path)
    for on_error in ("raise", "skip"):
        with pytest.raises(TemplateDropsToolsError) as err:
            tokenize_chat_dataset(records, tiny, on_error=on_error)
        msg = str(err.value)
        assert f"{path}:3 (id='single_call_no_text')" in msg and "drops tool calls" in msg, on_error
        assert "'get_weather'" in msg and "chat_template=" in msg, on_error
        if on_error == "skip":
            assert "none of the 2 records" in msg
    with pytest.raises(ChatFormatError, match="drops tool calls"):
        encode_chat(RECORDS[0], tiny)
    # Records without tools on the same template are untouched.
    assert len(tokenize_chat_dataset([plain, plain], tiny)) == 2


def test_precompute_names_the_record_whose_calls_the_template_drops(tmp_path):
    sys.path.insert(0, str(ROOT / "train_scripts"))
    try:
        import precompute_dataset
    finally:
        sys.path.remove(str(ROOT / "train_scripts"))
    _no_tools_tokenizer().save_pretrained(tmp_path / "tok")
    path = _write_jsonl(tmp_path / "calls.jsonl", [RECORDS[4], RECORDS[2]])
    with pytest.raises(SystemExit, match=r"calls.jsonl:2 \(id='nested_mixed_arguments'\): the chat template drops") \
            as err:
        precompute_dataset.main(["--data", str(path), "--tokenizer", str(tmp_path / "tok"),
                                 "--output_dir", str(tmp_path / "out")])
    assert "--on_error skip" not in str(err.value)  # skipping is no fix for a template that drops every call
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# Renders the content (`+`: fails on null content), then each call in the given form, then the tools' names.
_CHATML = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function') | map(attribute='name') "
    "| join(', ') }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{{ m.content + '' }}"
    "{% for c in m.tool_calls or [] %}{% set f = c.function if c.function is defined else c %}CALLS{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL_FORMS = {
    "json": "<tool_call>{\"name\": \"{{ f.name }}\", \"arguments\": {{ f.arguments | tojson }}}</tool_call>",
    "pretty_json": "<tool_call>\n{{ {'name': f.name, 'arguments': f.arguments} | tojson(indent=2) }}\n</tool_call>",
    "python_repr": "[{{ f.name }}({{ f.arguments }})]",  # a dict as Python writes it: single quotes, True, None
    "pythonic_kwargs": "[{{ f.name }}({% for k, v in f.arguments.items() %}{{ k }}={{ v | pprint }}"
                       "{{ ', ' if not loop.last }}{% endfor %})]",
    "llama3": "{\"name\": \"{{ f.name }}\", \"parameters\": {{ f.arguments | tojson }}}",
    "mistral": "[TOOL_CALLS] [{{ {'name': f.name, 'arguments': f.arguments | tojson, 'id': 'abcdefghi'} "
               "| tojson }}]",  # arguments JSON-encoded twice
    "xml_parameters": "<function={{ f.name }}>{% for k, v in f.arguments.items() %}<parameter={{ k }}>"
                      "{{ v | tojson if v is mapping or (v is iterable and v is not string) else v }}"
                      "</parameter>{% endfor %}</function>",
}
ARGUMENTS = {"city": "São Paulo", "query": 'say "hi"\nthen <stop> & don\'t', "n": 3, "ratio": 2.0, "x": -1.5e-7,
             "flag": True, "none": None, "nested": {"deep": [1, "two", {"k": "v"}], "empty": {}}}


@pytest.mark.parametrize("form", sorted(CALL_FORMS))
def test_templates_that_reformat_arguments_pass(qwen3_tokenizer, form):
    """No false alarm on templates that write arguments as pretty JSON, Python repr, keyword arguments, per-parameter
    XML or JSON encoded twice (Mistral-style), with non-ASCII, quotes, newlines and nested values; the call trains."""
    template = _CHATML.replace("CALLS", CALL_FORMS[form])
    rec = {"id": form, "tools": [WEATHER, SEARCH], "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", ARGUMENTS), _call("search", {})]},
        {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done"}]}
    out = encode_chat(rec, qwen3_tokenizer, chat_template=template)
    runs = _trained_texts(qwen3_tokenizer, out)
    assert "get_weather" in runs[0] and "search" in runs[0] and "Paulo" in runs[0], runs
    if form in ("json", "llama3"):  # JSON arguments given as a JSON string: written verbatim
        rec["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps(ARGUMENTS)
        encode_chat(rec, qwen3_tokenizer, chat_template=template)


@pytest.mark.parametrize(("calls", "fragment"), [
    ("[CALL {{ f.name }}]", "argument text 'city'"),  # the name only: arguments dropped
    ("{% if loop.first %}<tool_call>{{ f.name }} {{ f.arguments | tojson }}</tool_call>{% endif %}",
     "tool call 1 ('search'): its function name"),  # only the first of parallel calls
])
def test_templates_that_drop_part_of_a_call(qwen3_tokenizer, calls, fragment):
    template = _CHATML.replace("CALLS", calls)
    rec = {"id": "x", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"}),
                                                            _call("search", {"query": "q"})]},
        {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done"}]}
    with pytest.raises(ChatFormatError, match=re.escape(fragment)):
        encode_chat(rec, qwen3_tokenizer, chat_template=template)


def test_a_template_that_drops_tool_definitions(qwen3_tokenizer):
    template = _CHATML.replace("{% if tools %}", "{% if false %}").replace("CALLS", CALL_FORMS["json"])
    with pytest.raises(ChatFormatError, match=r"drops the tool definitions: tool 'get_weather'"):
        encode_chat(RECORDS[0], qwen3_tokenizer, chat_template=template)
    no_tools = {"messages": RECORDS[0]["messages"]}
    assert "get_weather" in encode_chat(no_tools, qwen3_tokenizer, chat_template=template)["text"]


def test_skip_drops_only_the_records_whose_calls_are_dropped(qwen3_tokenizer, tmp_path):
    """A template that renders the first of parallel calls only: records with one call train, those with two are
    named (raise) or skipped and counted (skip) -- not a whole-run error, since some records' calls do render."""
    from opensloth.data.records import read_chat_records

    template = _CHATML.replace("CALLS", "{% if loop.first %}" + CALL_FORMS["json"] + "{% endif %}")
    path = _write_jsonl(tmp_path / "mixed.jsonl", [RECORDS[0], RECORDS[1], RECORDS[3], RECORDS[4]])
    records = read_chat_records(path)
    with pytest.raises(ChatFormatError, match=r"mixed.jsonl:2 \(id='parallel_calls_with_text'\).*'get_time'"):
        tokenize_chat_dataset(records, qwen3_tokenizer, chat_template=template)
    ds, stats = tokenize_chat_dataset(records, qwen3_tokenizer, chat_template=template, on_error="skip",
                                      return_stats=True)
    assert (len(ds), stats.skipped) == (3, 1) and "mixed.jsonl:2" in next(iter(stats.skip_reasons))


def test_null_content_next_to_tool_calls(qwen3_tokenizer):
    """`"content": null` (or no content) next to tool calls reaches a template as written; a template that
    concatenates the content (and so fails on null) gets "" there, which means the same."""
    tok = qwen3_tokenizer
    empty = copy.deepcopy(RECORDS[0])
    null = copy.deepcopy(empty)
    null["messages"][1]["content"] = None
    absent = copy.deepcopy(empty)
    del absent["messages"][1]["content"]
    out = encode_chat(null, tok)  # Qwen3 handles null itself: rendered as written
    assert out["text"] == tok.apply_chat_template(null["messages"], tools=null["tools"], tokenize=False)
    template = _CHATML.replace("CALLS", CALL_FORMS["json"])
    with pytest.raises(TypeError):
        tok.apply_chat_template(null["messages"], tools=null["tools"], chat_template=template, tokenize=False)
    want = encode_chat(empty, tok, chat_template=template)
    assert '<tool_call>{"name": "get_weather"' in want["text"]
    for rec in (null, absent):
        assert encode_chat(rec, tok, chat_template=template) == want
    rows = tokenize_chat_dataset([null, absent, empty], tok, chat_template=template).to_list()
    assert all(r["labels"] == rows[2]["labels"] for r in rows)
    # A failure with nothing to do with null content is still reported as the template's.
    broken = template.replace("{{ m.content }}", "{{ m.content + 1 }}")
    with pytest.raises(ChatFormatError, match="the chat template failed on it"):
        encode_chat(null, tok, chat_template=broken)


def test_tool_calls_in_an_untrained_prompt_are_checked_too(qwen3_tokenizer):
    """Prompt-completion records: calls in the prompt get no span; they are looked for in the whole text."""
    rec = {"prompt": RECORDS[0]["messages"][:3], "completion": RECORDS[0]["messages"][3:]}
    out = encode_chat(rec, qwen3_tokenizer)
    assert _trained_texts(qwen3_tokenizer, out) == ["It is 21 °C in Paris." + EOT]
    with pytest.raises(ChatFormatError, match="drops tool calls"):
        encode_chat(rec, _no_tools_tokenizer())
