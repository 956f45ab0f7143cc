"""train_scripts/precompute_dataset.py's errors name its own flags: bad records, and data with nothing to train."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def precompute():
    sys.path.insert(0, str(ROOT / "train_scripts"))
    try:
        import precompute_dataset
    finally:
        sys.path.remove(str(ROOT / "train_scripts"))
    return precompute_dataset


def _records(n: int, question: str) -> list[dict]:
    return [{"id": str(i), "messages": [{"role": "user", "content": f"{question} {i}"},
                                        {"role": "assistant", "content": "an answer"}]} for i in range(n)]


def test_nothing_to_train_and_bad_records_say_which_flag(precompute, shared_data, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _records(6, "tell me more " * 20)) + "\n", encoding="utf-8")
    common = ["--data", str(path), "--tokenizer", str(shared_data / "tokenizers" / "qwen3"),
              "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as err:
        precompute.main([*common, "--max_seq_length", "16", "--name", "short"])
    msg = str(err.value)
    assert "none of the 6 records has a trained token left" in msg and "--max_seq_length" in msg
    assert not (tmp_path / "out" / "short").exists()
    assert precompute.main([*common, "--max_seq_length", "512", "--name", "ok"]) == 0
    assert "0 dropped for training no token" in capsys.readouterr().out
    path.write_text(json.dumps(_records(1, "q")[0]) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"long.jsonl:2 is not valid JSON.*pass --on_error skip"):
        precompute.main([*common, "--name", "bad"])
    path.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "q"}]}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"long.jsonl:1 \(id='x'\) has no assistant message.*--on_error skip"):
        precompute.main([*common, "--name", "bad2"])
