"""The tiny preset: its own tokenizer, the synthetic chat data, the tiny Qwen3 model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from opensloth.presets import TINY, build_tiny_model, build_tiny_tokenizer, synthetic_chat_records, tiny_datasets
from opensloth.presets.synthetic import ANIMALS, animal_facts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(TINY.vocab_size)


@pytest.fixture(scope="module")
def records():
    return synthetic_chat_records(1000, seed=7)


def _run(code: str, env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# ------------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("text", [
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\n",
    "Unicode: café, naïve, 東京, Ελληνικά, emoji 🦥🚀, combining e\u0301",
    "numbers 0 7 42 1234567890 and punctuation ?!.,;:'\"()[]{}<>",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
])
def test_tokenizer_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_and_size(tok):
    assert len(tok) <= TINY.vocab_size
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    # special tokens are single ids inside text, never split into bytes
    assert tok("a<|im_end|>b", add_special_tokens=False)["input_ids"][1] == 2


def test_frequent_words_are_single_tokens(tok):
    # the vocabulary holds the corpus's words (with their leading space): one token each
    assert tok.tokenize("The cat lives in the forest.") == ["The", "Ġcat", "Ġlives", "Ġin", "Ġthe", "Ġforest", "."]
    # an unseen word falls back to its bytes, still exactly reversible
    pieces = tok.tokenize(" xylophone")
    assert len(pieces) == len(b" xylophone")


def test_chat_template_renders_chatml(tok):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                    "<|im_start|>user\nBye<|im_end|>\n")
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == text + "<|im_start|>assistant\n"
    system = tok.apply_chat_template([{"role": "system", "content": "Be brief"}] + messages[:2], tokenize=False)
    assert system.startswith("<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\n")


def test_chat_template_marks_assistant_tokens(tok):
    messages = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."},
                {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "2 plus 3 is 5.<|im_end|>You are welcome.<|im_end|>"


def test_assistant_only_labels_from_the_data_pipeline(tok):
    from opensloth.data.chat import encode_chat

    record = synthetic_chat_records(40, seed=3)[-1]
    enc = encode_chat(record, tok)
    trained = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    expected = "".join(m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant")
    assert tok.decode(trained) == expected


def test_vocabulary_identical_across_processes(tok):
    code = ("from opensloth.presets.tokenizer import _vocabulary; import hashlib, json; "
            "print(hashlib.sha256(json.dumps(_vocabulary(1024)).encode()).hexdigest())")
    digests = {_run(code, {"PYTHONHASHSEED": seed}) for seed in ("0", "12345")}
    assert len(digests) == 1
    import hashlib

    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    assert hashlib.sha256(json.dumps(vocab).encode()).hexdigest() in digests


# ------------------------------------------------------------------------------------------------ synthetic data


def test_records_are_deterministic_and_prefix_stable():
    a = synthetic_chat_records(50, seed=11)
    assert a == synthetic_chat_records(50, seed=11)
    assert a[:20] == synthetic_chat_records(20, seed=11)
    assert a[30:] == synthetic_chat_records(20, seed=11, start=30)
    assert a != synthetic_chat_records(50, seed=12)
    assert len({r["id"] for r in a}) == 50


def test_records_identical_across_processes():
    code = ("from opensloth.presets.synthetic import synthetic_chat_records; import hashlib, json; "
            "print(hashlib.sha256(json.dumps(synthetic_chat_records(200, seed=5)).encode()).hexdigest())")
    assert len({_run(code, {"PYTHONHASHSEED": seed}) for seed in ("1", "999")}) == 1


def test_train_and_eval_splits_are_disjoint():
    train, test = tiny_datasets(30, 10, seed=2)
    assert len(train) == 30 and len(test) == 10
    assert not {r["id"] for r in train} & {r["id"] for r in test}


def test_record_schema(records):
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in r["messages"])


def test_length_mix_resembles_the_shared_datasets(tok, records):
    """Token counts under the preset's own template vs the shared datasets' stats under Qwen3's (their README):
    mean 177-198, median 140-182, p90 289-380, p99 404-686, max 550-951 (arena-hard's long answers aside)."""
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
    lengths = np.array([len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]])
    assert 140 <= lengths.mean() <= 230
    assert 110 <= np.median(lengths) <= 200
    assert 280 <= np.percentile(lengths, 90) <= 460
    assert 400 <= np.percentile(lengths, 99) <= 900
    assert lengths.max() <= 1400 and lengths.min() >= 15
    multi = np.mean([len(r["messages"]) > 2 for r in records])
    assert 0.35 <= multi <= 0.55  # hh_rlhf is 70% multi-turn, alpaca and gsm8k single-turn
    assert max(len(r["messages"]) for r in records) >= 10


def test_answers_follow_fixed_templates(records):
    """Learnable on purpose: an animal always has the same habitat, food and colour, and sums are right."""
    seen = defaultdict(set)
    sums = 0
    for r in records:
        for m in r["messages"]:
            if m["role"] != "assistant":
                continue
            for animal, place in re.findall(r"The (\w+) lives in the (\w+)\.", m["content"]):
                seen[animal].add(place)
            for a, b, c in re.findall(r"^(\d+) plus (\d+) is (\d+)\.$", m["content"]):
                assert int(a) + int(b) == int(c)
                sums += 1
    assert len(seen) >= len(ANIMALS) // 2 and sums >= 10
    for animal, places in seen.items():
        assert places == {animal_facts(animal)[0]}


@pytest.mark.parametrize("bad", [{"n": -1}, {"n": 1.5}, {"n": 3, "seed": "x"}, {"n": 3, "start": -2}])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        synthetic_chat_records(**bad)


# ------------------------------------------------------------------------------------------------ model


def test_tiny_model_builds_and_runs(tok):
    import torch
    from transformers import Qwen3ForCausalLM

    model = build_tiny_model(seed=0, tokenizer=tok)
    assert isinstance(model, Qwen3ForCausalLM)
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (TINY.vocab_size, TINY.hidden_size,
                                                                       TINY.num_hidden_layers)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2e5 < n_params < 2e6
    ids = torch.tensor([tok("The cat eats fish.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], TINY.vocab_size)
    # a random model's loss sits near ln(vocab): nothing is learnt yet
    assert abs(out.loss.item() - np.log(TINY.vocab_size)) < 1.0


def test_tiny_model_init_depends_only_on_seed():
    import torch

    a, b, c = build_tiny_model(seed=1), build_tiny_model(seed=1), build_tiny_model(seed=2)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_model_rejects_a_larger_tokenizer():
    class Big:
        def __len__(self):
            return TINY.vocab_size + 1

    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model(tokenizer=Big())


def test_saved_folder_loads_with_auto_classes(tmp_path, tok):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opensloth.presets import save_tiny_model_folder

    folder = save_tiny_model_folder(tmp_path / "tiny", seed=4)
    assert save_tiny_model_folder(tmp_path / "tiny", seed=4) == folder  # reused, not rewritten
    loaded_tok = AutoTokenizer.from_pretrained(folder)
    text = "<|im_start|>user\nTell me about the owl.<|im_end|>\n"
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded_tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == \
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ref = build_tiny_model(seed=4)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert not list(tmp_path.glob("tiny.tmp-*"))
