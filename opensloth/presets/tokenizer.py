"""The preset's own tokenizer: byte-level BPE with a fixed vocabulary built in code, and a Qwen-style chat template.

The vocabulary is: the special tokens, the 256 byte symbols of byte-level BPE (so any text encodes and decodes back
exactly), then every word piece that occurs at least twice in a fixed synthetic corpus (seed 0), most frequent
first, ties by the piece itself, up to `vocab_size`. The BPE model has no merges and `ignore_merges=True`: a word
piece that is in the vocabulary is one token, any other falls back to its bytes. Nothing is trained and nothing is
random, so every process (every DDP rank) builds the identical tokenizer without talking to the others.

Token ids: 0 `<|endoftext|>` (pad), 1 `<|im_start|>`, 2 `<|im_end|>` (eos, closes every turn).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from functools import lru_cache

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_START",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "build_tiny_tokenizer",
    "tokenizer_fingerprint",
]

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN)
VOCAB_CORPUS_RECORDS = 2000
VOCAB_CORPUS_SEED = 0

# ChatML as Qwen writes it (without Qwen3's <think> blocks), with `{% generation %}` around what the assistant is
# trained on, so `apply_chat_template(..., return_assistant_tokens_mask=True)` and TRL's assistant_only_loss work.
# Tools as Qwen renders them: the definitions in the system turn between <tools> tags (after the record's own system
# text, if any), each call in its assistant turn as <tool_call>{"name": ..., "arguments": ...}</tool_call> (trained);
# tool results are ordinary `tool` turns. A record without tools renders exactly as it did before tools were added.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{{- message['content'] if message['content'] is string else '' -}}"
    "{%- for call in (message['tool_calls'] if message['tool_calls'] is defined and message['tool_calls'] else []) -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{{- '\\n<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' -}}"
    "{{- (fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson)) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _render_plain(messages: list[dict]) -> str:
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{EOS_TOKEN}\n" for m in messages)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer writes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=4)
def _vocabulary(vocab_size: int) -> tuple[str, ...]:
    from opensloth.presets.synthetic import PIECE_PATTERN, synthetic_chat_records

    byte_char = _bytes_to_unicode()
    counts: Counter = Counter()
    for record in synthetic_chat_records(VOCAB_CORPUS_RECORDS, seed=VOCAB_CORPUS_SEED):
        text = _render_plain(record["messages"])
        for chunk in text.replace(IM_START, "\0").replace(EOS_TOKEN, "\0").split("\0"):
            counts.update(PIECE_PATTERN.findall(chunk))
    alphabet = sorted(byte_char.values())
    vocab = list(SPECIAL_TOKENS) + alphabet
    taken = set(vocab)
    pieces = Counter()
    for piece, c in counts.items():
        pieces["".join(byte_char[b] for b in piece.encode("utf-8"))] += c
    ranked = sorted((p for p, c in pieces.items() if c >= 2 and p not in taken), key=lambda p: (-pieces[p], p))
    return tuple(vocab + ranked[:max(0, vocab_size - len(vocab))])


def build_tiny_tokenizer(vocab_size: int = 1024, model_max_length: int = 4096):
    """A `transformers.PreTrainedTokenizerFast` for the tiny preset (see the module docstring).

    Args:
        vocab_size: the most tokens in the vocabulary (specials and the 256 byte symbols included); at least 259.
        model_max_length: recorded on the tokenizer (the longest sequence the model is meant to see).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    minimum = len(SPECIAL_TOKENS) + 256
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= {minimum} (3 special tokens + 256 bytes)")
    vocab = {piece: i for i, piece in enumerate(_vocabulary(vocab_size))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.name_or_path = f"opensloth/tiny-bytebpe-{len(vocab)}"
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 (16 hex digits) of a tokenizer's vocabulary, special tokens and chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": [tokenizer.eos_token, tokenizer.pad_token, getattr(tokenizer, "bos_token", None)],
        "template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
