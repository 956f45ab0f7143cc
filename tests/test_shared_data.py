"""The development data helper (benchmarks/_shared_data.py: the shared chat datasets by name) and the library's
chat-record file reading (opensloth.data.records) with clear errors."""

from __future__ import annotations

import json

import pytest

from benchmarks._shared_data import SHARED_CHAT_FILES, read_shared_chat, shared_chat_paths
from opensloth.data.records import read_chat_records


def test_every_shared_dataset_reads_as_chat_records(shared_data):
    for name in SHARED_CHAT_FILES:
        records = read_shared_chat(name)
        assert records and all(isinstance(r["messages"], list) and r["messages"] for r in records)
    # gsm8k is two files, concatenated in order
    first, second = (read_chat_records(p) for p in shared_chat_paths("gsm8k"))
    assert read_shared_chat("gsm8k") == first + second


def test_unknown_name_and_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(KeyError, match="not a shared dataset; choose from alpaca, gsm8k"):
        shared_chat_paths("capybara")
    with pytest.raises(FileNotFoundError, match="alpaca_en_demo.jsonl not found; set OPENSLOTH_SHARED_DATA"):
        shared_chat_paths("alpaca", tmp_path)


def test_shared_data_dir_follows_the_environment(tmp_path, monkeypatch):
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "alpaca_en_demo.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    monkeypatch.setenv("OPENSLOTH_SHARED_DATA", str(tmp_path))
    assert read_shared_chat("alpaca") == [{"messages": [{"role": "user", "content": "hi"}]}]


def test_read_chat_records_jsonl_json_and_bad_lines(tmp_path):
    good = [{"messages": [{"role": "user", "content": "a"}]}, {"messages": [{"role": "user", "content": "b"}]}]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps(good[0]) + "\n\n" + json.dumps(good[1]) + "\n")
    assert read_chat_records(jsonl) == good
    assert read_chat_records(jsonl, progress=True) == good
    as_list = tmp_path / "x.json"
    as_list.write_text(json.dumps(good))
    assert read_chat_records(as_list) == good
    as_dict = tmp_path / "d.json"
    as_dict.write_text(json.dumps({"messages": []}))
    with pytest.raises(ValueError, match="holds a JSON dict; expected a list of chat records"):
        read_chat_records(as_dict)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not valid JSON"):
        read_chat_records(broken)


def test_chat_template_token_ids_match_the_training_tokenisation(chat_records, qwen3_tokenizer):
    """The ids the tests and benchmarks measure are the ones the training pipeline feeds the model."""
    from benchmarks._shared_data import chat_template_token_ids
    from opensloth.data.chat import tokenize_chat_dataset

    records = chat_records["hh_rlhf"][:16] + chat_records["gsm8k"][:16]
    ids = chat_template_token_ids(records, qwen3_tokenizer)
    assert ids == [list(x) for x in tokenize_chat_dataset(records, qwen3_tokenizer)["input_ids"]]
    assert qwen3_tokenizer.decode(ids[0]).startswith("<|im_start|>")
