"""Chat records -> rendered text -> token ids with assistant-only labels, truncation counted.

Pipeline (both steps are `Dataset.map(batched=True, num_proc=..., remove_columns=...)`):

1. Render: each record's conversation (`messages`, Capybara's `conversation` of input/output pairs, or ShareGPT's
   `conversations` of from/value turns) is validated and rendered once with `tokenizer.apply_chat_template`
   into a `text` column, together with the character spans of the assistant turns *in that rendered text*.
2. Tokenise: `text` is encoded with offsets (no special tokens added: the template already wrote them) and
   the character spans are mapped to tokens, giving `input_ids` and `labels` (and optionally `assistant_masks`).

Which tokens of an assistant turn are trained (labels == input_ids; every other token gets -100):
from the first character of the assistant's content as the template rendered it, through the end-of-turn
token that closes the turn (`<|im_end|>` for Qwen/ChatML). The role header (`<|im_start|>assistant\\n`),
anything the template inserts before the content (Qwen3's empty `<think>\\n\\n</think>\\n\\n` block on the last
turn), the newline after the end-of-turn token, and all user/system/tool turns are masked. Reasoning written in
the content (`<think>...</think>answer`) is trained where the template renders it (Qwen3: the final turn); where
the template drops it from the history (Qwen3: earlier turns) only the answer is there to train. A token whose
characters straddle a span edge is trained (it is needed to produce the content). The spans are found in the
rendered conversation, never by rendering turns one at a time: Qwen3 renders the last assistant turn
differently from earlier ones, so per-turn renders do not concatenate to the real text.

Bad records (no conversation field, an empty conversation, an unknown role, non-string content, no assistant
turn when training assistant-only, a content the template dropped) raise `ChatFormatError` naming the record,
or with `on_error="skip"` are dropped and counted in the log. Records longer than `max_seq_length` are
truncated (or dropped with `overflow="drop"`); either way they are counted and logged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from opensloth.distributed import logger

IGNORE_INDEX = -100
KNOWN_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}
# Fields tried, in order, when `messages_field` is not given.
CONVERSATION_FIELDS = ("messages", "conversation", "conversations")


class ChatFormatError(ValueError):
    """A record cannot be turned into a correctly labelled conversation; the message names the record."""


def _record_name(index: int | None, record: Mapping | None) -> str:
    name = f"record {index}" if index is not None else "record"
    if isinstance(record, Mapping):
        rid = record.get("id")
        if rid is not None:
            name += f" (id={rid!r})"
    return name


def record_messages(record: Mapping, index: int | None = None, *, messages_field: str | None = None) -> list[dict]:
    """Return a record's conversation as validated `[{"role", "content"}, ...]`.

    Accepts `messages` (role/content), Capybara's `conversation` (list of `{"input", "output"}` pairs: input is
    the user's turn, output the assistant's) and ShareGPT's `conversations` (`{"from", "value"}` with
    human/gpt/system). Extra per-message keys (`tool_calls`, `reasoning_content`, ...) are kept.

    Raises ChatFormatError naming the record for a missing field, an empty conversation, an unknown role or a
    non-string content.
    """
    name = _record_name(index, record)
    if not isinstance(record, Mapping):
        raise ChatFormatError(f"{name} is a {type(record).__name__}, expected a dict with a 'messages' list")
    if messages_field is not None:
        fields = (messages_field,)
    else:
        fields = tuple(f for f in CONVERSATION_FIELDS if record.get(f) is not None)
    if not fields or record.get(fields[0]) is None:
        expected = list(CONVERSATION_FIELDS) if messages_field is None else [messages_field]
        raise ChatFormatError(
            f"{name} has no conversation: expected one of the fields {expected}, found {sorted(record.keys())}; "
            f"pass messages_field=... to name the column"
        )
    field_name = fields[0]
    turns = record[field_name]
    if not isinstance(turns, Sequence) or isinstance(turns, (str, bytes)):
        raise ChatFormatError(f"{name}: field {field_name!r} is a {type(turns).__name__}, expected a list of turns")
    if len(turns) == 0:
        raise ChatFormatError(f"{name}: field {field_name!r} is an empty conversation")

    messages: list[dict] = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ChatFormatError(f"{name}: turn {j} of {field_name!r} is a {type(turn).__name__}, expected a dict")
        if "input" in turn and "output" in turn and "role" not in turn:  # Capybara pair
            for role, key in (("user", "input"), ("assistant", "output")):
                value = turn[key]
                if not isinstance(value, str):
                    raise ChatFormatError(
                        f"{name}: turn {j} {key!r} is {type(value).__name__} {value!r:.60}, expected a string"
                    )
                messages.append({"role": role, "content": value})
            continue
        if "role" in turn and turn.get("role") is not None:
            role, content = turn["role"], turn.get("content")
            if role not in KNOWN_ROLES:
                raise ChatFormatError(
                    f"{name}: message {j} has unknown role {role!r}; known roles are {list(KNOWN_ROLES)} "
                    f"(map other names, e.g. 'human'->'user', 'gpt'->'assistant', before formatting)"
                )
            msg = {k: v for k, v in turn.items() if v is not None}
        elif "from" in turn:
            raw_role = turn["from"]
            if raw_role not in SHAREGPT_ROLES:
                raise ChatFormatError(
                    f"{name}: turn {j} has unknown ShareGPT role {raw_role!r}; known: {sorted(SHAREGPT_ROLES)}"
                )
            role, content = SHAREGPT_ROLES[raw_role], turn.get("value")
            msg = {"role": role}
        else:
            raise ChatFormatError(
                f"{name}: turn {j} has neither 'role'/'content', 'from'/'value' nor 'input'/'output' keys "
                f"(keys: {sorted(turn.keys())})"
            )
        if not isinstance(content, str):
            raise ChatFormatError(
                f"{name}: message {j} (role {role!r}) content is {type(content).__name__} {content!r:.60}, expected "
                f"a string (multimodal content lists are not supported)"
            )
        msg["content"] = content
        messages.append(msg)
    return messages


def detect_end_of_turn(tokenizer, chat_template: str | None = None) -> str | None:
    """The special-token string the chat template writes right after an assistant's content, or None.

    Found by rendering a probe conversation and taking the longest added/special token that the text after the
    assistant content starts with (`<|im_end|>` for Qwen/ChatML, `<|eot_id|>` for Llama 3); falls back to
    `tokenizer.eos_token` when it appears after the content.
    """
    probe = "OPENSLOTH_PROBE_ANSWER_7f3a"
    convo = [{"role": "user", "content": "OPENSLOTH_PROBE_QUESTION"}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(convo, tokenize=False, chat_template=chat_template)
    except Exception as exc:  # noqa: BLE001 - a template may refuse the probe; fall back to eos
        logger.warning("could not render a probe conversation to find the end-of-turn token (%s)", exc)
        return getattr(tokenizer, "eos_token", None)
    pos = text.find(probe)
    if pos < 0:
        return None
    suffix = text[pos + len(probe):]
    candidates = set()
    try:
        candidates.update(tokenizer.get_added_vocab().keys())
    except Exception:  # noqa: BLE001 - slow tokenizers without added vocab
        pass
    candidates.update(t for t in getattr(tokenizer, "all_special_tokens", []) or [])
    matches = [c for c in candidates if c and suffix.startswith(c)]
    if matches:
        return max(matches, key=len)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos in suffix:
        return eos
    return None


def _content_variants(content: str) -> list[str]:
    """The content, then the forms templates commonly render it in (stripped, the answer after `</think>`)."""
    out = [content]
    for v in (content.strip("\n"), content.strip()):
        if v not in out:
            out.append(v)
    if "</think>" in content:
        answer = content.split("</think>")[-1].lstrip("\n")
        if answer not in out:
            out.append(answer)
    return out


def _locate(text: str, content: str, cursor: int, eot: str | None) -> tuple[int, int] | None:
    """Where `content` sits in `text` at or after `cursor`, preferring an occurrence closed by `eot`."""
    if content == "":
        if eot is None:
            return None
        p = text.find(eot, cursor)
        return None if p < 0 else (p, p)
    first = None
    for variant in _content_variants(content):
        if variant == "":
            continue
        p = text.find(variant, cursor)
        while p >= 0:
            end = p + len(variant)
            if eot is None or text.startswith(eot, end):
                return p, end
            if first is None:
                first = (p, end)
            p = text.find(variant, p + 1)
        if first is not None:
            return first
    return None


def render_with_spans(
    messages: list[dict],
    tokenizer,
    *,
    end_of_turn: str | None = "auto",
    chat_template: str | None = None,
    record_name: str = "record",
    **template_kwargs: Any,
) -> tuple[str, list[tuple[int, int]]]:
    """Render a validated conversation once and find each assistant turn's trained character span in it.

    Returns `(text, spans)`: spans are `(start, end)` character offsets into `text`, one per assistant message,
    from the start of its rendered content through the end-of-turn string that closes it (inclusive).
    """
    if end_of_turn == "auto":
        end_of_turn = detect_end_of_turn(tokenizer, chat_template)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, chat_template=chat_template, **template_kwargs
    )
    if not isinstance(text, str):
        raise ChatFormatError(f"{record_name}: apply_chat_template returned {type(text).__name__}, not text")
    spans: list[tuple[int, int]] = []
    cursor = 0
    for j, msg in enumerate(messages):
        found = _locate(text, msg["content"], cursor, end_of_turn)
        if found is None:
            raise ChatFormatError(
                f"{record_name}: the content of message {j} (role {msg['role']!r}, {msg['content']!r:.60}) does not "
                f"appear in the rendered text after character {cursor}; the chat template dropped or rewrote it, so "
                f"its labels cannot be placed (fix the record, or pass on_error='skip')"
            )
        start, end = found
        if msg["role"] == "assistant":
            if end_of_turn is not None:
                close = text.find(end_of_turn, end)
                if close < 0:
                    raise ChatFormatError(
                        f"{record_name}: assistant message {j} is not closed by the end-of-turn token "
                        f"{end_of_turn!r} in the rendered text"
                    )
                end = close + len(end_of_turn)
            spans.append((start, end))
            cursor = end
        else:
            cursor = end + (len(end_of_turn) if end_of_turn and text.startswith(end_of_turn, end) else 0)
    return text, spans


def token_mask_from_spans(offsets, spans: Sequence[Sequence[int]]) -> np.ndarray:
    """Boolean mask over tokens: True where a token's character range overlaps one of the sorted `spans`."""
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0 or len(offs) == 0:
        return np.zeros(len(offs), dtype=bool)
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    starts, ends = sp[:, 0], sp[:, 1]
    # First span ending after the token starts; the token overlaps it when that span starts before the token ends.
    idx = np.searchsorted(ends, offs[:, 0], side="right")
    inside = idx < len(sp)
    ok = np.zeros(len(offs), dtype=bool)
    ok[inside] = starts[idx[inside]] < np.maximum(offs[inside, 1], offs[inside, 0] + 1)
    return ok


@dataclass
class ChatTokenizeStats:
    """Counts from one formatting run; also logged."""

    records_in: int = 0
    records_out: int = 0
    skipped: int = 0
    skip_reasons: dict = field(default_factory=dict)
    truncated: int = 0
    dropped_too_long: int = 0
    tokens: int = 0
    tokens_cut: int = 0
    trained_tokens: int = 0
    trained_tokens_cut: int = 0
    no_trained_tokens: int = 0
    max_seq_length: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def log(self) -> None:
        logger.info(
            "chat formatting: %d records in, %d out; %d skipped; %d truncated to max_seq_length=%s (%d tokens cut, "
            "%d of them trained); %d dropped as too long; %d tokens kept, %d trained; %d records have no trained token",
            self.records_in, self.records_out, self.skipped, self.truncated, self.max_seq_length, self.tokens_cut,
            self.trained_tokens_cut, self.dropped_too_long, self.tokens, self.trained_tokens, self.no_trained_tokens,
        )
        if self.skipped:
            for reason, count in sorted(self.skip_reasons.items(), key=lambda kv: -kv[1])[:5]:
                logger.warning("skipped %d record(s): %s", count, reason)


def _check_options(max_seq_length, overflow, on_error) -> None:
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length < 1):
        raise ValueError(f"max_seq_length={max_seq_length!r} must be a positive integer or None (no limit)")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow={overflow!r} must be 'truncate' (keep the first max_seq_length tokens) or 'drop'")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r} must be 'raise' or 'skip'")


def _encode_one(ids, offsets, spans, assistant_only: bool, max_seq_length: int | None):
    """Labels for one rendered text; returns (ids, labels, mask, n_full, n_trained_full)."""
    ids = np.asarray(ids, dtype=np.int64)
    if offsets is None:
        mask = np.ones(len(ids), dtype=bool)
    else:
        mask = token_mask_from_spans(offsets, spans)
    if not assistant_only:
        trained = np.ones(len(ids), dtype=bool)
    else:
        trained = mask
    labels = np.where(trained, ids, IGNORE_INDEX)
    n_full, n_trained_full = len(ids), int(trained.sum())
    if max_seq_length is not None and len(ids) > max_seq_length:
        ids, labels, mask = ids[:max_seq_length], labels[:max_seq_length], mask[:max_seq_length]
    return ids, labels, mask, n_full, n_trained_full


def encode_chat(
    record_or_messages,
    tokenizer,
    *,
    assistant_only: bool = True,
    max_seq_length: int | None = None,
    end_of_turn: str | None = "auto",
    chat_template: str | None = None,
    messages_field: str | None = None,
    **template_kwargs: Any,
) -> dict:
    """Format and tokenise one record (or a message list): `{"input_ids", "labels", "assistant_masks", "text"}`.

    Same rules as `tokenize_chat_dataset` (no truncation counting: lists are cut to `max_seq_length`).
    """
    if isinstance(record_or_messages, Mapping):
        messages = record_messages(record_or_messages, messages_field=messages_field)
        name = _record_name(None, record_or_messages)
    else:
        messages = record_messages({"messages": record_or_messages})
        name = "conversation"
    if assistant_only and not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError(f"{name} has no assistant message, so assistant-only training has nothing to learn")
    text, spans = render_with_spans(
        messages, tokenizer, end_of_turn=end_of_turn, chat_template=chat_template, record_name=name, **template_kwargs
    )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, mask, _, _ = _encode_one(
        enc["input_ids"], enc["offset_mapping"], spans, assistant_only, max_seq_length
    )
    return {"input_ids": ids.tolist(), "labels": labels.tolist(), "assistant_masks": mask.astype(np.int8).tolist(),
            "text": text}


def _render_batch(batch, indices, *, tokenizer, messages_field, assistant_only, end_of_turn, chat_template,
                  on_error, template_kwargs):
    keys = list(batch.keys())
    texts, spans_out, errors = [], [], []
    for i, idx in enumerate(indices):
        record = {k: batch[k][i] for k in keys}
        name = record.pop("_name", None) or _record_name(idx, record)
        try:
            try:
                messages = record_messages(record, idx, messages_field=messages_field)
            except ChatFormatError as exc:  # restate with the caller's record name (list input is re-indexed)
                raise ChatFormatError(str(exc).replace(_record_name(idx, record), name, 1)) from None
            if assistant_only and not any(m["role"] == "assistant" for m in messages):
                raise ChatFormatError(
                    f"{name} has no assistant message, so assistant-only training has nothing to learn"
                )
            text, spans = render_with_spans(
                messages, tokenizer, end_of_turn=end_of_turn, chat_template=chat_template, record_name=name,
                **template_kwargs,
            )
            error = ""
        except ChatFormatError as exc:
            if on_error == "raise":
                raise
            text, spans, error = "", [], str(exc)
        texts.append(text)
        spans_out.append([list(s) for s in spans])
        errors.append(error)
    return {"text": texts, "_spans": spans_out, "_error": errors}


def _tokenize_batch(batch, *, tokenizer, assistant_only, max_seq_length, return_assistant_masks):
    need_offsets = assistant_only or return_assistant_masks
    enc = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=need_offsets)
    out = {"input_ids": [], "labels": [], "_n_full": [], "_n_trained_full": [], "_n_kept": [], "_n_trained_kept": []}
    if return_assistant_masks:
        out["assistant_masks"] = []
    offsets = enc["offset_mapping"] if need_offsets else [None] * len(enc["input_ids"])
    for ids, offs, spans in zip(enc["input_ids"], offsets, batch["_spans"], strict=True):
        ids, labels, mask, n_full, n_trained_full = _encode_one(ids, offs, spans, assistant_only, max_seq_length)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["_n_full"].append(n_full)
        out["_n_trained_full"].append(n_trained_full)
        out["_n_kept"].append(len(ids))
        out["_n_trained_kept"].append(int((labels != IGNORE_INDEX).sum()))
        if return_assistant_masks:
            out["assistant_masks"].append(mask.astype(np.int8))
    return out


def _column_numpy(ds, name: str) -> np.ndarray:
    return np.asarray(ds.data.column(name).to_numpy(zero_copy_only=False))


def tokenize_chat_dataset(
    dataset,
    tokenizer,
    *,
    max_seq_length: int | None = None,
    assistant_only: bool = True,
    num_proc: int | None = None,
    batch_size: int = 256,
    messages_field: str | None = None,
    end_of_turn: str | None = "auto",
    chat_template: str | None = None,
    overflow: str = "truncate",
    on_error: str = "raise",
    return_assistant_masks: bool = False,
    keep_text: bool = False,
    return_stats: bool = False,
    desc: str = "chat",
    **template_kwargs: Any,
):
    """Render, tokenise and label a chat dataset; returns a `datasets.Dataset` with `input_ids` and `labels`.

    Args:
        dataset: a `datasets.Dataset` or a list of dict records (see `record_messages` for the schemas).
        tokenizer: a fast tokenizer with a chat template (offsets are needed for assistant-only labels).
        max_seq_length: longer records are truncated to this many tokens (`overflow="truncate"`, keeping the
            start) or removed (`overflow="drop"`); both are counted and logged. None: no limit.
        assistant_only: labels are -100 outside assistant turns (see the module docstring for the exact tokens);
            False trains every token.
        num_proc: worker processes for both `map` passes (None: in this process).
        end_of_turn: the string that closes an assistant turn and is trained with it; "auto" detects it.
        on_error: "raise" a ChatFormatError naming the first bad record, or "skip" bad records (counted, logged).
        return_assistant_masks: also emit `assistant_masks` (1 on assistant tokens) whatever `assistant_only` is.
        keep_text: keep the rendered `text` column.
        return_stats: return `(dataset, ChatTokenizeStats)` instead of the dataset.
        template_kwargs: passed to `apply_chat_template` (e.g. `enable_thinking=False`).
    """
    from datasets import Dataset

    _check_options(max_seq_length, overflow, on_error)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if (assistant_only or return_assistant_masks) and not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; assistant-only labels need character offsets "
            f"(load it with use_fast=True, or pass assistant_only=False)"
        )
    if getattr(tokenizer, "chat_template", None) is None and chat_template is None:
        raise ValueError("the tokenizer has no chat_template; pass chat_template=... (a Jinja template string)")
    if end_of_turn == "auto":
        end_of_turn = detect_end_of_turn(tokenizer, chat_template)
        if end_of_turn is None:
            logger.warning("no end-of-turn token found after assistant content; only the content itself is trained")

    stats = ChatTokenizeStats(max_seq_length=max_seq_length)
    if not isinstance(dataset, Dataset):
        records = list(dataset)
        stats.records_in = len(records)
        messages, keep = [], []
        reasons: Counter = Counter()
        for i, rec in enumerate(records):
            try:
                messages.append(record_messages(rec, i, messages_field=messages_field))
                keep.append(i)
            except ChatFormatError as exc:
                if on_error == "raise":
                    raise
                reasons[str(exc)] += 1
        if not messages:
            raise ValueError(f"no usable records among {len(records)}")
        # Normalised message dicts (all strings) give Arrow a uniform schema.
        names = [_record_name(i, records[i]) for i in keep]
        dataset = Dataset.from_dict({"messages": messages, "_name": names})
        messages_field = "messages"
        stats.skipped += len(records) - len(keep)
        stats.skip_reasons.update(reasons)
    else:
        stats.records_in = len(dataset)
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")

    common = {"batched": True, "batch_size": batch_size, "num_proc": num_proc}
    rendered = dataset.map(
        _render_batch,
        with_indices=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "messages_field": messages_field, "assistant_only": assistant_only,
                   "end_of_turn": end_of_turn, "chat_template": chat_template, "on_error": on_error,
                   "template_kwargs": template_kwargs},
        desc=f"{desc}: render chat template",
        **common,
    )
    errors = rendered["_error"]
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        for i in bad:
            stats.skip_reasons[errors[i]] = stats.skip_reasons.get(errors[i], 0) + 1
        stats.skipped += len(bad)
        bad_set = set(bad)
        rendered = rendered.select([i for i in range(len(rendered)) if i not in bad_set])
        if len(rendered) == 0:
            raise ValueError(f"every one of the {stats.records_in} records was skipped; first reason: {errors[bad[0]]}")

    remove = ["_spans", "_error"] + ([] if keep_text else ["text"])
    tokenized = rendered.map(
        _tokenize_batch,
        remove_columns=remove,
        fn_kwargs={"tokenizer": tokenizer, "assistant_only": assistant_only, "max_seq_length": max_seq_length,
                   "return_assistant_masks": return_assistant_masks},
        desc=f"{desc}: tokenize",
        **common,
    )

    n_full = _column_numpy(tokenized, "_n_full")
    n_trained_full = _column_numpy(tokenized, "_n_trained_full")
    n_kept = _column_numpy(tokenized, "_n_kept")
    n_trained_kept = _column_numpy(tokenized, "_n_trained_kept")
    too_long = n_full > n_kept
    keep_mask = np.ones(len(n_full), dtype=bool)
    if overflow == "drop" and too_long.any():
        stats.dropped_too_long = int(too_long.sum())
        keep_mask = ~too_long
        tokenized = tokenized.select(np.flatnonzero(keep_mask))
    else:
        stats.truncated = int(too_long.sum())
        stats.tokens_cut = int((n_full - n_kept).sum())
        stats.trained_tokens_cut = int((n_trained_full - n_trained_kept).sum())
    tokenized = tokenized.remove_columns(["_n_full", "_n_trained_full", "_n_kept", "_n_trained_kept"])
    stats.records_out = len(tokenized)
    stats.tokens = int(n_kept[keep_mask].sum())
    stats.trained_tokens = int(n_trained_kept[keep_mask].sum())
    stats.no_trained_tokens = int((n_trained_kept[keep_mask] == 0).sum())
    stats.log()
    return (tokenized, stats) if return_stats else tokenized


__all__ = [
    "IGNORE_INDEX",
    "ChatFormatError",
    "ChatTokenizeStats",
    "detect_end_of_turn",
    "encode_chat",
    "record_messages",
    "render_with_spans",
    "token_mask_from_spans",
    "tokenize_chat_dataset",
]
