"""Chat records -> rendered text -> token ids with assistant-only labels, truncation counted.

Pipeline (both steps are `Dataset.map(batched=True, num_proc=..., remove_columns=...)`):

1. Render: each record's conversation (`messages` in the OpenAI / Hugging Face schema, with `tool_calls` and `tool`
   turns and a per-record `tools` list; Capybara's `conversation` of input/output pairs; ShareGPT's `conversations`
   of from/value turns; TRL's `prompt` + `completion`, whose prompt is not trained) is validated and rendered with
   `tokenizer.apply_chat_template(messages, tools=...)` into a `text` column, together with the character spans of
   the assistant turns *in that rendered text*.
2. Tokenise: `text` is encoded with offsets (no special tokens added: the template already wrote them) and
   the character spans are mapped to tokens, giving `input_ids` and `labels` (and optionally `assistant_masks`).

Records reach the template exactly as written, with one exception: `"content": null` (or no content) next to an
assistant's `tool_calls` is passed as written, and only when the template fails on the record (it concatenates the
content) is the record rendered again with "" there. A list of records (e.g. from `read_chat_records`) is handed to
`datasets` as one JSON string per record and decoded again before rendering, so no columnar schema is imposed across
records: tool-call `arguments` with different keys, or the same key with different JSON types, stay as each record
wrote them. (A `datasets.Dataset` given as input already has such a schema: free-form payloads stored as Arrow
structs carry every other row's keys as null; a warning says so. Store them as JSON strings instead.)

Which tokens of an assistant turn are trained (labels == input_ids; every other token gets -100): everything the
assistant produces in that turn as the template renders it (its text, the template's whole rendering of its tool
calls) through the end-of-turn token that closes the turn (`<|im_end|>` for Qwen/ChatML). The role header
(`<|im_start|>assistant\\n`, i.e. the generation prompt), text the template writes at the start of every final
assistant turn whatever it says (Qwen3's empty `<think>\\n\\n</think>\\n\\n` block), the newline after the
end-of-turn token, and all system/user/tool turns and tool definitions are masked. Reasoning written in the content
(`<think>...</think>answer`) is trained where the template renders it (Qwen3: the turns after the last user query);
where the template drops it from the history only the answer is there to train. A token whose characters straddle a
span edge is trained (it is needed to produce the assistant's text).

Each assistant turn j is located from the template's own renderings, never by searching for its text: rendering
the conversation up to turn j with the generation prompt gives where the turn starts, and what rendering it through
turn j adds to that is the turn as the template writes it when it is the final one. Templates that render a turn
differently inside the conversation (Qwen3 drops the empty think block and the reasoning of earlier turns) write
there a suffix of that text; the longest suffix that the whole conversation has at that position is the turn.

Bad records (no conversation field, an empty conversation, an unknown role, non-string content, malformed
`tool_calls` or `tools`, no assistant turn when training assistant-only, a template that fails on the record or
whose renderings cannot be aligned) raise `ChatFormatError` naming the record (`file:line` for records read by
`opensloth.data.records.read_chat_records`, else `record N` numbered from 1), or with `on_error="skip"` are dropped
and counted in the log. So does a record whose tool calls or tools the template drops (many templates ignore
`tool_calls` and `tools`, and would train an empty turn): each call's function name and each key and string/number
value of its arguments (in any of the forms templates write them: JSON, pretty JSON, Python repr, escaped twice)
must be in the text of its assistant turn, and each tool's name in the text outside the assistant turns. When no
record's tool calls/tools render, the template drops them all: that stops the run even with `on_error="skip"`.
Records longer than `max_seq_length` are truncated (or dropped with `overflow="drop"`); either way they are counted
and logged. A record left with no trained token (truncation cut every answer) is dropped and counted; when none is
left, `NothingToTrainError` says why and what to change.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from opensloth.distributed import logger

IGNORE_INDEX = -100
# Bump when the rendered text or the labels of some record change: it is part of the training scripts' cache keys.
CHAT_FORMAT_VERSION = 3  # 3: tool calls a template drops stop the run; null content next to calls renders
KNOWN_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}
# Fields tried, in order, when `messages_field` is not given.
CONVERSATION_FIELDS = ("messages", "conversation", "conversations")
# Two probe answers that differ at their first character (see probe_chat_template).
_PROBE_QUESTION = "OPENSLOTH_PROBE_QUESTION"
_PROBE_ANSWERS = ("OPENSLOTH_PROBE_ANSWER_7f3a", "xopensloth probe answer 2")


class ChatFormatError(ValueError):
    """A record cannot be turned into a correctly labelled conversation; the message names the record."""


class NothingToTrainError(ValueError):
    """No record trains any token (every answer truncated away, ...); `stats` holds the counts behind the message."""

    def __init__(self, message: str, stats: ChatTokenizeStats):
        super().__init__(message)
        self.stats = stats


def _record_name(index: int | None, record: Mapping | None) -> str:
    source = getattr(record, "source", None)  # opensloth.data.records.ChatRecord: "file:line"
    if source:
        name = str(source)
    else:
        name = f"record {index + 1}" if index is not None else "record"  # numbered from 1, like file lines
    if isinstance(record, Mapping):
        rid = record.get("id")
        if rid is not None:
            name += f" (id={rid!r})"
    return name


def _json_field(value: Any, what: str, name: str) -> Any:
    """A field that may hold its value as a JSON string (how Arrow datasets keep free-form payloads)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise ChatFormatError(f"{name}: {what} is a string that is not valid JSON ({value!r:.60})") from None


def _check_tool_calls(calls: Any, name: str, j: int) -> None:
    where = f"{name}: message {j} (role 'assistant')"
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise ChatFormatError(f"{where} has 'tool_calls' of type {type(calls).__name__}, expected a list of calls")
    for k, call in enumerate(calls):
        fn = (call.get("function") or call) if isinstance(call, Mapping) else None  # OpenAI nests it in "function"
        if not isinstance(fn, Mapping):
            raise ChatFormatError(f"{where}: tool call {k} is a {type(call).__name__} {call!r:.60}, expected "
                                  f'{{"type": "function", "function": {{"name": ..., "arguments": {{...}}}}}}')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError(f"{where}: tool call {k} has no function name (keys: {sorted(fn)})")
        args = fn.get("arguments")
        if not isinstance(args, (Mapping, str)):
            raise ChatFormatError(
                f"{where}: tool call {k} ({fn['name']!r}) has arguments of type {type(args).__name__} {args!r:.60}; "
                f"expected a JSON object or a JSON string (use {{}} for a call without arguments)"
            )


def _sharegpt_call(value: Any, name: str, j: int) -> list[dict]:
    """ShareGPT's `function_call` turn (LLaMA-Factory style): a JSON call `{"name", "arguments"}` or a list of them."""
    calls = _json_field(value, f"turn {j} (from 'function_call') value", name)
    if isinstance(calls, Mapping):
        calls = [calls]
    if not isinstance(calls, list):
        raise ChatFormatError(f"{name}: turn {j} (from 'function_call') is {calls!r:.60}, expected a JSON call "
                              f'{{"name": ..., "arguments": {{...}}}} or a list of them')
    return [{"type": "function", "function": c} for c in calls]


PROMPT_COMPLETION_FIELDS = ("prompt", "completion")


def _prompt_completion(record: Mapping, name: str) -> tuple[list, int]:
    """TRL's prompt-completion records as turns: `{"prompt": str, "completion": str}` (a user and an assistant turn)
    or `{"prompt": [messages], "completion": [messages]}`. Returns (turns, number of prompt turns)."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], 1
    prompt = _json_field(prompt, "'prompt'", name) if isinstance(prompt, str) and prompt.lstrip().startswith("[") \
        else prompt
    completion = _json_field(completion, "'completion'", name) \
        if isinstance(completion, str) and completion.lstrip().startswith("[") else completion
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise ChatFormatError(
            f"{name}: 'prompt' is {type(prompt).__name__} and 'completion' is {type(completion).__name__}; expected "
            f"two strings, or two lists of messages (role/content)")
    if not completion:
        raise ChatFormatError(f"{name}: 'completion' is an empty list of messages")
    return list(prompt) + list(completion), len(prompt)


def _record_conversation(record: Mapping, index: int | None, messages_field: str | None) -> tuple[list[dict], int]:
    """(validated messages, index of the first message whose assistant turns are trained): 0, except for a
    prompt-completion record, whose prompt is never trained."""
    name = _record_name(index, record)
    if (messages_field is None and isinstance(record, Mapping)
            and not any(record.get(f) is not None for f in CONVERSATION_FIELDS)
            and all(record.get(f) is not None for f in PROMPT_COMPLETION_FIELDS)):
        turns, n_prompt = _prompt_completion(record, name)
        return record_messages({"messages": turns}, index, _name=name), n_prompt
    return record_messages(record, index, messages_field=messages_field), 0


def record_messages(record: Mapping, index: int | None = None, *, messages_field: str | None = None,
                    _name: str | None = None) -> list[dict]:
    """Return a record's conversation as validated messages `[{"role", "content", ...}, ...]`.

    Accepts `messages` (role/content, OpenAI / Hugging Face schema: assistant `tool_calls`, `tool` turns, any extra
    per-message keys such as `reasoning_content` or `tool_call_id` are kept), Capybara's `conversation` (list of
    `{"input", "output"}` pairs: input is the user's turn, output the assistant's) and ShareGPT's `conversations`
    (`{"from", "value"}` with human/gpt/system, and `function_call`/`observation` turns for tool calls and their
    results); `tokenize_chat_dataset` and `encode_chat` also take TRL's prompt-completion records (`prompt` and
    `completion`: two strings, or two message lists; the prompt is not trained). The conversation field may also
    hold the list as a JSON string. Values are kept as written; keys whose
    value is None are dropped (an Arrow dataset fills missing keys with None), except an assistant's `content` next
    to its `tool_calls`.

    Raises ChatFormatError naming the record for a missing field, an empty conversation, an unknown role, a
    non-string content, or malformed tool calls.
    """
    name = _name or _record_name(index, record)
    if not isinstance(record, Mapping):
        raise ChatFormatError(f"{name} is a {type(record).__name__}, expected a dict with a 'messages' list")
    if messages_field is not None:
        fields = (messages_field,)
    else:
        fields = tuple(f for f in CONVERSATION_FIELDS if record.get(f) is not None)
    if not fields or record.get(fields[0]) is None:
        if messages_field is None:
            expected = (f"one of the fields {list(CONVERSATION_FIELDS)} (a list of turns), or 'prompt' and "
                        f"'completion' (TRL's prompt-completion records; see TRAINING_README.md, Record schemas)")
            if any(record.get(f) is not None for f in PROMPT_COMPLETION_FIELDS):
                expected += "; this record has only one of 'prompt' and 'completion'"
        else:
            expected = f"the field {messages_field!r} (messages_field)"
        raise ChatFormatError(f"{name} has no conversation: expected {expected}, found {sorted(record.keys())}")
    field_name = fields[0]
    turns = record[field_name]
    if isinstance(turns, str) and turns.lstrip().startswith("["):
        turns = _json_field(turns, f"field {field_name!r}", name)
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
            if raw_role == "function_call":
                msg["tool_calls"], content = _sharegpt_call(content, name, j), ""
        else:
            raise ChatFormatError(
                f"{name}: turn {j} has neither 'role'/'content', 'from'/'value' nor 'input'/'output' keys "
                f"(keys: {sorted(turn.keys())})"
            )
        calls = msg.get("tool_calls")
        if isinstance(calls, (list, tuple)) and len(calls) == 0:  # `"tool_calls": []` on every turn: no call
            del msg["tool_calls"]
            calls = None
        if calls is not None and role != "assistant":
            raise ChatFormatError(f"{name}: message {j} (role {role!r}) has 'tool_calls'; only assistant turns call "
                                  f"tools")
        if calls is not None:
            _check_tool_calls(calls, name, j)
        if calls and content is None:  # OpenAI writes content null next to tool calls: keep it as written
            if "content" in turn:
                msg["content"] = None
            messages.append(msg)
            continue
        if not isinstance(content, str):
            raise ChatFormatError(
                f"{name}: message {j} (role {role!r}) content is {type(content).__name__} {content!r:.60}, expected "
                f"a string (multimodal content lists are not supported)"
            )
        msg["content"] = content
        messages.append(msg)
    return messages


def record_tools(record: Mapping, index: int | None = None, *, default: list | None = None) -> list | None:
    """A record's `tools` (a list of tool definitions, or that list as a JSON string), else `default`.

    Raises ChatFormatError naming the record when `tools` is neither.
    """
    tools = record.get("tools") if isinstance(record, Mapping) else None
    if tools is None or (isinstance(tools, str) and not tools.strip()):
        return default
    name = _record_name(index, record)
    tools = _json_field(tools, "'tools'", name)
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not all(
            isinstance(t, Mapping) for t in tools):
        raise ChatFormatError(f"{name}: 'tools' is {tools!r:.80}, expected a list of tool definitions (JSON schemas "
                              f'such as {{"type": "function", "function": {{"name": ..., "parameters": ...}}}})')
    return list(tools)


def _render(tokenizer, messages: list, *, tools, chat_template, template_kwargs, generation_prompt: bool = False,
            record_name: str = "record") -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt,
            chat_template=chat_template, **template_kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - a template's raise_exception or a Jinja error: name the record
        raise ChatFormatError(f"{record_name}: the chat template failed on it ({type(exc).__name__}: {exc})") from exc
    if not isinstance(text, str):
        raise ChatFormatError(f"{record_name}: apply_chat_template returned {type(text).__name__}, not text")
    return text


def detect_end_of_turn(tokenizer, chat_template: str | None = None) -> str | None:
    """The special-token string the chat template writes right after an assistant's content, or None.

    Found by rendering a probe conversation and taking the longest added/special token that the text after the
    assistant content starts with (`<|im_end|>` for Qwen/ChatML, `<|eot_id|>` for Llama 3); falls back to
    `tokenizer.eos_token` when it appears after the content.
    """
    probe = _PROBE_ANSWERS[0]
    convo = [{"role": "user", "content": _PROBE_QUESTION}, {"role": "assistant", "content": probe}]
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


@dataclass(frozen=True)
class TemplateProbe:
    """What a chat template writes around every assistant turn, found once from probe conversations.

    - ``generation_prompt``: what `add_generation_prompt=True` appends after a user turn (`<|im_start|>assistant\\n`;
      Qwen3 with `enable_thinking=False` adds an empty think block).
    - ``role_header``: the part of it that opens every assistant turn, final or inside the conversation
      (`<|im_start|>assistant\\n`); masked.
    - ``turn_prefix``: text after the role header of a final assistant turn that does not depend on the message
      (Qwen3's empty `<think>\\n\\n</think>\\n\\n`; `assistant: ` for a template without a generation prompt);
      masked.
    """

    generation_prompt: str = ""
    role_header: str = ""
    turn_prefix: str = ""


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def probe_chat_template(tokenizer, chat_template: str | None = None, *, tools: list | None = None,
                       **template_kwargs: Any) -> TemplateProbe:
    """Probe a chat template (with these `tools` and `template_kwargs`) for its generation prompt, the role header
    of its assistant turns and the message-independent text it opens a final assistant turn with (`TemplateProbe`).
    """
    user = {"role": "user", "content": _PROBE_QUESTION}
    kw = {"tools": tools, "chat_template": chat_template, "template_kwargs": template_kwargs}
    try:
        plain = _render(tokenizer, [user], **kw)
        prompt = _render(tokenizer, [user], generation_prompt=True, **kw)
        finals = [_render(tokenizer, [user, {"role": "assistant", "content": a}], **kw) for a in _PROBE_ANSWERS]
        inside = _render(tokenizer, [user, {"role": "assistant", "content": _PROBE_ANSWERS[0]}, user], **kw)
    except ChatFormatError as exc:
        logger.warning("could not render probe conversations to find the template's assistant header (%s); only "
                       "the generation prompt is masked", exc)
        return TemplateProbe()
    base = min(_common_prefix_len(plain, x) for x in (prompt, *finals, inside))
    generation_prompt = prompt[base:]
    role_header = generation_prompt[:min(_common_prefix_len(generation_prompt, x[base:]) for x in (*finals, inside))]
    at = base + len(role_header)
    turn_prefix = finals[0][at:at + _common_prefix_len(finals[0][at:], finals[1][at:])]
    return TemplateProbe(generation_prompt=generation_prompt, role_header=role_header, turn_prefix=turn_prefix)


def _longest_suffix_at(d: str, text: str, pos: int, k_max: int, first_try: int = -1) -> int | None:
    """Smallest k <= k_max with `text[pos:]` starting with `d[k:]` (the longest such suffix of d), or None."""
    if pos >= len(text) or k_max < 0:
        return None
    found = None
    if 0 <= first_try <= k_max and text.startswith(d[first_try:], pos):
        # Usual case (a Qwen3 turn inside the conversation: the turn without its prefix); confirm nothing longer fits.
        found, k_max = first_try, first_try - 1
    c = text[pos]
    k = d.find(c, 0, k_max + 1)
    while k >= 0:
        if text.startswith(d[k:], pos):
            return k
        k = d.find(c, k + 1, k_max + 1)
    return found


_RESYNC_CHARS = 16  # characters two renderings must share again after a difference to count as realigned


def _resync(context: str, i: int, text: str, k: int) -> tuple[int, int] | None:
    """After `context[i] != text[k]`, the nearest `(i', k')` where the two agree again for `_RESYNC_CHARS`
    characters (or up to the end of `context`), skipping characters of one side only: the fewest skipped wins."""
    best = None
    t = context.find(text[k], i + 1)  # context shows text here that `text` lacks
    while t >= 0:
        n = min(_RESYNC_CHARS, len(context) - t)
        if context[t:t + n] == text[k:k + n]:
            best = (t, k)
            break
        t = context.find(text[k], t + 1)
    limit = len(text) if best is None else k + (best[0] - i)
    u = text.find(context[i], k + 1, limit)  # `text` shows text here that context lacks
    n = min(_RESYNC_CHARS, len(context) - i)
    while u >= 0:
        if text[u:u + n] == context[i:i + n]:
            return i, u
        u = text.find(context[i], u + 1, limit)
    return best


def _end_of(context: str, text: str) -> int | None:
    """Where the rendering `context` of the conversation's first turns ends in `text`: its length when `text` starts
    with it, else found by walking both and resynchronising after each difference (a template that renders history
    differently once later turns exist, e.g. Qwen3 dropping the think block of a turn that is no longer the last).
    None when they do not align."""
    if text.startswith(context):
        return len(context)
    i = k = 0
    while True:
        m = _common_prefix_len(context[i:], text[k:])
        i, k = i + m, k + m
        if i == len(context):
            return k
        if k == len(text):
            return None
        found = _resync(context, i, text, k)
        if found is None:
            return None
        i, k = found


def _plain_turn_end(msg: dict, text: str, pos: int, end_of_turn: str | None) -> int | None:
    """End of a plain assistant turn (text only) inside the conversation: its first end-of-turn token after `pos`,
    when the message cannot contain that token itself and the end of its text is rendered before it. None: use the
    rendering through the turn instead. Saves one render per earlier turn of a multi-turn chat."""
    content = msg.get("content")
    if not end_of_turn or msg.get("tool_calls") or not isinstance(content, str) or end_of_turn in content or any(
            isinstance(v, str) and end_of_turn in v for v in msg.values()):
        return None
    close = text.find(end_of_turn, pos)
    if close < 0:
        return None
    tail = content.split("</think>")[-1].strip()[-16:]  # templates may drop earlier reasoning and strip the text
    if tail and text.find(tail, pos, close) < 0:
        return None
    return close + len(end_of_turn)


def _assistant_span(
    messages: list[dict], j: int, text: str, prev_end: int, *, tokenizer, tools, end_of_turn: str | None,
    probe: TemplateProbe, chat_template, template_kwargs, record_name: str,
) -> tuple[int, int]:
    """The trained character span `[start, end)` of assistant message j in `text` (the whole conversation)."""
    kw = {"tools": tools, "chat_template": chat_template, "template_kwargs": template_kwargs,
          "record_name": record_name}
    gp, header, prefix = probe.generation_prompt, probe.role_header, probe.turn_prefix
    final = j == len(messages) - 1
    if j > 0:
        head = _render(tokenizer, messages[:j], generation_prompt=True, **kw)
        if head.endswith(gp):
            context = head[:len(head) - len(gp)]
        else:  # a prompt that depends on the conversation: all of it is context
            context, header = head, ""
    else:  # an opening assistant turn has no conversation before it: its context ends at its role header
        first = text if final else _render(tokenizer, messages[:1], **kw)
        at = first.find(header) if header else -1
        context = first[:at] if at >= 0 else ""
    c_text = _end_of(context, text)
    if c_text is None or c_text < prev_end:
        raise ChatFormatError(
            f"{record_name}: the chat template renders the conversation before assistant message {j} differently "
            f"on its own than inside the whole conversation, and the two could not be aligned; its labels cannot be "
            f"placed (pass on_error='skip' to drop such records)"
        )
    end = None if final else _plain_turn_end(messages[j], text, c_text + len(header), end_of_turn)
    if end is not None and text.startswith(header, c_text):
        pos = c_text + len(header)
        turn = text[pos:end]
    else:
        through = text if final else _render(tokenizer, messages[:j + 1], **kw)
        c_through = _end_of(context, through)
        if c_through is None:
            raise ChatFormatError(
                f"{record_name}: the chat template renders the conversation before assistant message {j} "
                f"differently when it is followed by that message; its labels cannot be placed (pass "
                f"on_error='skip' to drop such records)"
            )
        if not (through.startswith(header, c_through) and text.startswith(header, c_text)):
            header = ""
        d = through[c_through + len(header):]  # turn j as the template writes it when it is the final turn
        pos = c_text + len(header)
        last_eot = d.rfind(end_of_turn) if end_of_turn else -1
        k_max = last_eot if last_eot >= 0 else len(d) - 1  # the turn keeps its end-of-turn token
        k = _longest_suffix_at(d, text, pos, k_max, len(prefix) if prefix and d.startswith(prefix) else -1)
        if k is not None:
            turn = d[k:]
        elif end_of_turn and text.find(end_of_turn, pos) >= 0:
            # Inside the conversation the turn is no suffix of its final-turn form: it runs to its end-of-turn token.
            turn = text[pos:text.find(end_of_turn, pos) + len(end_of_turn)]
        else:
            raise ChatFormatError(
                f"{record_name}: assistant message {j} is rendered inside the conversation in a form that does not "
                f"match its rendering as the final turn ({d!r:.80}); its labels cannot be placed "
                f"(pass on_error='skip' to drop such records)"
            )
    start = pos + (len(prefix) if prefix and turn.startswith(prefix) else 0)
    close = turn.rfind(end_of_turn) if end_of_turn else -1
    end = pos + (close + len(end_of_turn) if close >= 0 else len(turn.rstrip()))
    if start < prev_end or end <= start:
        raise ChatFormatError(
            f"{record_name}: assistant message {j} got an empty or overlapping span [{start}, {end}) in the rendered "
            f"text (the previous turn ends at {prev_end}); the chat template renders nothing trainable for it"
        )
    return start, end


def render_with_spans(
    messages: list[dict],
    tokenizer,
    *,
    end_of_turn: str | None = "auto",
    chat_template: str | None = None,
    record_name: str = "record",
    tools: list | None = None,
    probe: TemplateProbe | None = None,
    trained_from: int = 0,
    **template_kwargs: Any,
) -> tuple[str, list[tuple[int, int]]]:
    """Render a validated conversation (with its `tools`) and find each assistant turn's trained span in it.

    Returns `(text, spans)`: `text` is exactly `apply_chat_template(messages, tools=tools, tokenize=False)`;
    spans are `(start, end)` character offsets into `text`, one per assistant message, from the first character the
    assistant produces through the end-of-turn string that closes the turn (see the module docstring). `probe`
    (from `probe_chat_template`) is computed when not given. Assistant messages before index `trained_from` (the
    prompt of a prompt-completion record) get no span.
    """
    if end_of_turn == "auto":
        end_of_turn = detect_end_of_turn(tokenizer, chat_template)
    if probe is None:
        probe = probe_chat_template(tokenizer, chat_template, tools=tools, **template_kwargs)
    kw = {"tokenizer": tokenizer, "end_of_turn": end_of_turn, "chat_template": chat_template,
          "record_name": record_name, "tools": tools, "probe": probe, "trained_from": trained_from,
          "template_kwargs": template_kwargs}
    try:
        text, spans = _render_spans(messages, **kw)
    except ChatFormatError as exc:
        # OpenAI writes `"content": null` (or no content) next to tool calls; a template that concatenates the
        # content fails on it. Only then is the record rendered with "" there, which means the same.
        if exc.__cause__ is None or not any(_empty_call_content(m) for m in messages):
            raise
        messages = [{**m, "content": ""} if _empty_call_content(m) else m for m in messages]
        text, spans = _render_spans(messages, **kw)
    _check_tools_rendered(messages, tools, text, spans, trained_from, record_name)
    return text, spans


def _empty_call_content(msg: dict) -> bool:
    return msg["role"] == "assistant" and bool(msg.get("tool_calls")) and msg.get("content") is None


def _render_spans(messages, *, tokenizer, end_of_turn, chat_template, record_name, tools, probe, trained_from,
                  template_kwargs) -> tuple[str, list[tuple[int, int]]]:
    text = _render(tokenizer, messages, tools=tools, chat_template=chat_template, template_kwargs=template_kwargs,
                   record_name=record_name)
    spans: list[tuple[int, int]] = []
    prev_end = 0
    for j, msg in enumerate(messages):
        if msg["role"] != "assistant" or j < trained_from:
            continue
        span = _assistant_span(messages, j, text, prev_end, tokenizer=tokenizer, tools=tools,
                               end_of_turn=end_of_turn, probe=probe, chat_template=chat_template,
                               template_kwargs=template_kwargs, record_name=record_name)
        spans.append(span)
        prev_end = span[1]
    return text, spans


class TemplateDropsToolsError(ChatFormatError):
    """The chat template left a record's tool calls or tool definitions out of its text (a template property far
    more often than a record's: see `tokenize_chat_dataset`'s handling under on_error='skip')."""


_TOOLS_FIX = ("Use a tokenizer whose chat template renders `tool_calls` and `tools` (e.g. the model's own template, "
              "set in the tokenizer folder's chat_template.jinja or tokenizer_config.json), or pass such a template "
              "as chat_template=...; or remove the tool calls and tools from the records")
_MAX_ARGUMENT_ATOMS = 64  # keys and values checked per call: enough to see a template drop or garble arguments


def _text_forms(value: Any) -> tuple[str, ...]:
    """How a template may write an argument key or value: as is, JSON-escaped (ASCII or not, HTML-safe as Jinja's
    own tojson; twice, for arguments encoded as a JSON string inside JSON), Python-repr-escaped, or stripped;
    numbers as JSON/Python write them."""
    if isinstance(value, str):
        as_json, ascii_json = json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1]
        html_safe = ascii_json.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") \
            .replace("'", "\\u0027")
        return (value, value.strip(), as_json, ascii_json, html_safe, repr(value)[1:-1],
                json.dumps(as_json, ensure_ascii=False)[1:-1], json.dumps(ascii_json)[1:-1])
    forms = (json.dumps(value), repr(value), str(value))
    if isinstance(value, float) and value.is_integer():
        forms += (str(int(value)),)
    return forms


def _argument_atoms(value: Any, out: list, limit: int) -> None:
    """The keys and the string/number leaves of a call's arguments (booleans and nulls are written too variously
    to look for), at most `limit`."""
    if len(out) >= limit:
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if len(out) < limit:
                out.append(str(k))
            _argument_atoms(v, out, limit)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _argument_atoms(v, out, limit)
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        out.append(value)


def _missing_argument(arguments: Any, region: str) -> Any:
    """An argument key or value of a call that `region` does not contain in any form, else None."""
    if isinstance(arguments, str):
        if not arguments.strip() or any(f and f in region for f in _text_forms(arguments)):
            return None
        try:
            arguments = json.loads(arguments)  # a JSON string rendered otherwise: look for its parts
        except ValueError:
            return arguments
    atoms: list = []
    _argument_atoms(arguments, atoms, _MAX_ARGUMENT_ATOMS)
    for atom in atoms:
        forms = [f for f in _text_forms(atom) if f]
        if forms and not any(f in region for f in forms):
            return atom
    return None


def _check_tools_rendered(messages: list[dict], tools: list | None, text: str, spans: list[tuple[int, int]],
                          trained_from: int, record_name: str) -> None:
    """Raise `TemplateDropsToolsError` when a tool call's function name or an argument's key or value is not in the text
    of its assistant turn (its trained span; the whole text for an untrained prompt turn), or when a tool
    definition's name is not in the text outside the trained spans. String searches only: no extra render."""
    at = iter(spans)
    for j, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        span = next(at) if j >= trained_from else None
        calls = msg.get("tool_calls")
        if not calls:
            continue
        region = text[span[0]:span[1]] if span is not None else text
        for k, call in enumerate(calls):
            fn = call.get("function") or call
            if fn["name"] not in region:
                what = "function name"
            else:
                missing = _missing_argument(fn.get("arguments"), region)
                what = None if missing is None else f"argument text {missing!r:.60}"
            if what is not None:
                raise TemplateDropsToolsError(
                    f"{record_name}: the chat template drops tool calls: assistant message {j}, tool call {k} "
                    f"({fn['name']!r}): its {what} is not in the text the template renders for that turn "
                    f"({region!r:.100}), so the call would not be trained. {_TOOLS_FIX}")
    if not tools:
        return
    masked, at = [], 0  # the text outside the assistant turns: where the definitions belong (the calls name them too)
    for start, end in spans:
        masked.append(text[at:start])
        at = end
    masked = "".join(masked) + text[at:]
    for tool in tools:
        fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
        tool_name = fn.get("name")
        if isinstance(tool_name, str) and tool_name and tool_name not in masked:
            raise TemplateDropsToolsError(
                f"{record_name}: the chat template drops the tool definitions: tool {tool_name!r} of the record's "
                f"`tools` is not in the rendered text outside the assistant turns, so the model would learn to call "
                f"tools it is never shown. "
                f"{_TOOLS_FIX}")


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
    dropped_no_trained: int = 0
    no_trained_by_truncation: int = 0
    first_answer_min: int | None = None
    first_answer_median: int | None = None
    max_seq_length: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def untrained_reason(self) -> str:
        """Why `dropped_no_trained` records train nothing, in parameter terms (for a log line or an error)."""
        parts = []
        if self.no_trained_by_truncation:
            parts.append(
                f"{self.no_trained_by_truncation} lost every answer to truncation at max_seq_length="
                f"{self.max_seq_length} (their first answer token is at position {self.first_answer_min} at the "
                f"earliest, {self.first_answer_median} at the median)")
        other = self.dropped_no_trained - self.no_trained_by_truncation
        if other:
            parts.append(f"{other} have no trained token even untruncated (an empty or one-token answer, or a chat "
                         f"template whose assistant turns render no text)")
        return "; ".join(parts)

    def nothing_to_train_message(self) -> str:
        fix = []
        if self.no_trained_by_truncation:
            fix.append(f"raise max_seq_length above {self.first_answer_min} (the median record needs "
                       f"{self.first_answer_median + 1})")
        if self.dropped_no_trained > self.no_trained_by_truncation:
            fix.append("check the records' assistant turns and the chat template")
        fix.append("or train on every token (assistant_only=False)")
        return (f"none of the {self.records_in} records has a trained token left: {self.untrained_reason()}. "
                f"To train on them, {', '.join(fix)}")

    def log(self) -> None:
        logger.info(
            "chat formatting: %d records in, %d out; %d skipped; %d truncated to max_seq_length=%s (%d tokens cut, "
            "%d of them trained); %d dropped as too long; %d dropped for training no token; %d tokens kept, %d "
            "trained",
            self.records_in, self.records_out, self.skipped, self.truncated, self.max_seq_length, self.tokens_cut,
            self.trained_tokens_cut, self.dropped_too_long, self.dropped_no_trained, self.tokens, self.trained_tokens,
        )
        if self.no_trained_tokens:
            logger.warning("%d kept records train no token (drop_untrained=False)", self.no_trained_tokens)
        if self.skipped:
            for reason, count in sorted(self.skip_reasons.items(), key=lambda kv: -kv[1])[:5]:
                logger.warning("skipped %d record(s): %s", count, reason)
        if self.dropped_no_trained:
            logger.warning("dropped %d of %d records that train no token: %s", self.dropped_no_trained,
                           self.records_in, self.untrained_reason())


def _check_options(max_seq_length, overflow, on_error) -> None:
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length < 1):
        raise ValueError(f"max_seq_length={max_seq_length!r} must be a positive integer or None (no limit)")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow={overflow!r} must be 'truncate' (keep the first max_seq_length tokens) or 'drop'")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r} must be 'raise' or 'skip'")


def _encode_one(ids, offsets, spans, assistant_only: bool, max_seq_length: int | None):
    """Labels for one rendered text; returns (ids, labels, mask, n_full, n_trained_full, first_trained).

    `first_trained`: the position of the first label that a causal LM learns from (a position >= 1: the label at
    position 0 has no token before it to predict it), -1 when there is none, counted before truncation."""
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
    learnt = np.flatnonzero(trained[1:])
    first_trained = int(learnt[0]) + 1 if len(learnt) else -1
    if max_seq_length is not None and len(ids) > max_seq_length:
        ids, labels, mask = ids[:max_seq_length], labels[:max_seq_length], mask[:max_seq_length]
    return ids, labels, mask, n_full, n_trained_full, first_trained


def _check_tools(tools) -> list | None:
    """The `tools` argument validated like a record's `tools` (a list of definitions, or that list as JSON)."""
    if tools is None:
        return None
    try:
        return record_tools({"tools": tools})
    except ChatFormatError as exc:
        raise ValueError(str(exc).replace("record: ", "the tools argument: ", 1)) from None


def encode_chat(
    record_or_messages,
    tokenizer,
    *,
    assistant_only: bool = True,
    max_seq_length: int | None = None,
    end_of_turn: str | None = "auto",
    chat_template: str | None = None,
    messages_field: str | None = None,
    tools: list | None = None,
    **template_kwargs: Any,
) -> dict:
    """Format and tokenise one record (or a message list): `{"input_ids", "labels", "assistant_masks", "text"}`.

    Same rules as `tokenize_chat_dataset` (no truncation counting: lists are cut to `max_seq_length`). A record's
    own `tools` win over the `tools` argument.
    """
    tools = _check_tools(tools)
    if isinstance(record_or_messages, Mapping):
        messages, trained_from = _record_conversation(record_or_messages, None, messages_field)
        tools = record_tools(record_or_messages, default=tools)
        name = _record_name(None, record_or_messages)
    else:
        messages, trained_from = record_messages({"messages": record_or_messages}), 0
        name = "conversation"
    _check_has_answer(messages, trained_from, assistant_only, name)
    text, spans = render_with_spans(
        messages, tokenizer, end_of_turn=end_of_turn, chat_template=chat_template, record_name=name, tools=tools,
        trained_from=trained_from, **template_kwargs,
    )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, labels, mask, *_ = _encode_one(
        enc["input_ids"], enc["offset_mapping"], spans, assistant_only, max_seq_length
    )
    return {"input_ids": ids.tolist(), "labels": labels.tolist(), "assistant_masks": mask.astype(np.int8).tolist(),
            "text": text}


def _check_has_answer(messages: list[dict], trained_from: int, assistant_only: bool, name: str) -> None:
    if assistant_only and not any(m["role"] == "assistant" for m in messages[trained_from:]):
        where = "in its completion" if trained_from else ""
        raise ChatFormatError(f"{name} has no assistant message{' ' + where if where else ''}, so assistant-only "
                              f"training has nothing to learn")


def _render_batch(batch, indices, *, tokenizer, messages_field, assistant_only, end_of_turn, probe, chat_template,
                  on_error, tools, template_kwargs):
    keys = list(batch.keys())
    serialised = "_messages_json" in batch  # records given as a list: one JSON string per record
    texts, spans_out, errors, tool_states = [], [], [], []
    for i, idx in enumerate(indices):
        tool_state = 0  # 0: no tool calls or tools; 1: rendered; 2: the template dropped them
        try:
            if serialised:
                name = batch["_name"][i]
                messages = json.loads(batch["_messages_json"][i])
                rec_tools = json.loads(batch["_tools_json"][i])
                trained_from = batch["_trained_from"][i]
            else:
                record = {k: batch[k][i] for k in keys}
                name = _record_name(idx, record)
                messages, trained_from = _record_conversation(record, idx, messages_field)
                rec_tools = record_tools(record, idx, default=tools)
            _check_has_answer(messages, trained_from, assistant_only, name)
            if rec_tools or any(m.get("tool_calls") for m in messages):
                tool_state = 1
            text, spans = render_with_spans(
                messages, tokenizer, end_of_turn=end_of_turn, chat_template=chat_template, record_name=name,
                tools=rec_tools, probe=probe, trained_from=trained_from, **template_kwargs,
            )
            error = ""
        except ChatFormatError as exc:
            if on_error == "raise":
                raise
            text, spans, error = "", [], str(exc)
            tool_state = 2 if isinstance(exc, TemplateDropsToolsError) else 0
        texts.append(text)
        spans_out.append([list(s) for s in spans])
        errors.append(error)
        tool_states.append(tool_state)
    return {"text": texts, "_spans": spans_out, "_error": errors, "_tools": tool_states}


def _tokenize_batch(batch, *, tokenizer, assistant_only, max_seq_length, return_assistant_masks):
    need_offsets = assistant_only or return_assistant_masks
    # verbose=False: no "Token indices sequence length is longer than ..." warning; max_seq_length truncates below
    enc = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=need_offsets, verbose=False)
    out = {"input_ids": [], "labels": [], "_n_full": [], "_n_trained_full": [], "_n_kept": [], "_n_trained_kept": [],
           "_first_trained": [], "_n_learnt_kept": []}
    if return_assistant_masks:
        out["assistant_masks"] = []
    offsets = enc["offset_mapping"] if need_offsets else [None] * len(enc["input_ids"])
    for ids, offs, spans in zip(enc["input_ids"], offsets, batch["_spans"], strict=True):
        ids, labels, mask, n_full, n_trained_full, first = _encode_one(ids, offs, spans, assistant_only,
                                                                       max_seq_length)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["_n_full"].append(n_full)
        out["_n_trained_full"].append(n_trained_full)
        out["_n_kept"].append(len(ids))
        out["_n_trained_kept"].append(int((labels != IGNORE_INDEX).sum()))
        out["_first_trained"].append(first)
        out["_n_learnt_kept"].append(int((labels[1:] != IGNORE_INDEX).sum()))
        if return_assistant_masks:
            out["assistant_masks"].append(mask.astype(np.int8))
    return out


def _column_numpy(ds, name: str) -> np.ndarray:
    return np.asarray(ds.data.column(name).to_numpy(zero_copy_only=False))


# Keys whose values are free-form JSON (tool-call arguments, JSON-schema parameters): stored as Arrow structs they
# take on every other row's keys as null.
_FREE_FORM_KEYS = ("arguments", "parameters", "properties")


def unified_free_form_fields(features) -> list[str]:
    """Paths of a `datasets.Features` where a free-form JSON payload (tool-call `arguments`, tool `parameters`) is
    stored as an Arrow struct, so every row reads back the union of all rows' keys (missing ones as null)."""
    found: list[str] = []

    def walk(feat, path: str) -> None:
        if isinstance(feat, Mapping):
            for key, sub in feat.items():
                sub_path = f"{path}.{key}" if path else str(key)
                if key in _FREE_FORM_KEYS and isinstance(sub, Mapping):
                    found.append(sub_path)
                else:
                    walk(sub, sub_path)
        elif isinstance(feat, (list, tuple)) and feat:
            walk(feat[0], path + "[]")
        elif getattr(feat, "feature", None) is not None:  # datasets.List / Sequence / LargeList
            walk(feat.feature, path + "[]")

    walk(features, "")
    return found


def _serialise(obj: Any, name: str, what: str) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ChatFormatError(f"{name}: its {what} cannot be written as JSON ({exc})") from None


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
    tools: list | None = None,
    overflow: str = "truncate",
    on_error: str = "raise",
    drop_untrained: bool = True,
    return_assistant_masks: bool = False,
    keep_text: bool = False,
    return_stats: bool = False,
    desc: str = "chat",
    **template_kwargs: Any,
):
    """Render, tokenise and label a chat dataset; returns a `datasets.Dataset` with `input_ids` and `labels`.

    Args:
        dataset: a list of dict records (see `record_messages` for the schemas; each record's nested values reach
            the template exactly as written) or a `datasets.Dataset` (free-form payloads there should be JSON
            strings: a warning names the columns Arrow stores as structs).
        tokenizer: a fast tokenizer with a chat template (offsets are needed for assistant-only labels).
        max_seq_length: longer records are truncated to this many tokens (`overflow="truncate"`, keeping the
            start) or removed (`overflow="drop"`); both are counted and logged. None: no limit.
        assistant_only: labels are -100 outside assistant turns (see the module docstring for the exact tokens);
            False trains every token.
        num_proc: worker processes for both `map` passes (None: in this process).
        end_of_turn: the string that closes an assistant turn and is trained with it; "auto" detects it.
        tools: tool definitions passed to `apply_chat_template(tools=...)` for records without their own `tools`.
        on_error: "raise" a ChatFormatError naming the first bad record, or "skip" bad records (counted, logged).
        drop_untrained: remove the records that train no token once truncated (every answer cut off by
            `max_seq_length`; a label only at position 0, which no token predicts), counted and logged; when no
            record is left, raise `NothingToTrainError` saying why and what to change. False keeps them (they add
            nothing to the loss).
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
    tools = _check_tools(tools)
    if end_of_turn == "auto":
        end_of_turn = detect_end_of_turn(tokenizer, chat_template)
        if end_of_turn is None:
            logger.warning("no end-of-turn token found after assistant content; only the content itself is trained")
    probe = probe_chat_template(tokenizer, chat_template, tools=tools, **template_kwargs)

    stats = ChatTokenizeStats(max_seq_length=max_seq_length)
    if not isinstance(dataset, Dataset):
        records = list(dataset)
        stats.records_in = len(records)
        columns: dict[str, list] = {"_messages_json": [], "_tools_json": [], "_name": [], "_trained_from": []}
        reasons: Counter = Counter()
        for i, rec in enumerate(records):
            name = _record_name(i, rec)
            try:
                conversation, trained_from = _record_conversation(rec, i, messages_field)
                messages = _serialise(conversation, name, "messages")
                rec_tools = _serialise(record_tools(rec, i, default=tools), name, "tools")
            except ChatFormatError as exc:
                if on_error == "raise":
                    raise
                reasons[str(exc)] += 1
                continue
            columns["_messages_json"].append(messages)
            columns["_tools_json"].append(rec_tools)
            columns["_name"].append(name)
            columns["_trained_from"].append(trained_from)
        if not columns["_name"]:
            first = next(iter(reasons), "")
            raise ValueError(f"no usable records among {len(records)}; first reason: {first}")
        # One JSON string per record: no Arrow schema is unified across records' nested values.
        dataset = Dataset.from_dict(columns)
        stats.skipped += len(records) - len(columns["_name"])
        stats.skip_reasons.update(reasons)
    else:
        stats.records_in = len(dataset)
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        unified = unified_free_form_fields(dataset.features)
        if unified:
            logger.warning(
                "the dataset stores %s as Arrow structs: every row reads back the union of all rows' keys, missing "
                "ones as null, and the chat template renders those nulls. Store such payloads as JSON strings "
                "(json.dumps) or pass the records as a list (e.g. read_chat_records) to keep each record as written",
                ", ".join(unified),
            )

    common = {"batched": True, "batch_size": batch_size, "num_proc": num_proc}
    rendered = dataset.map(
        _render_batch,
        with_indices=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "messages_field": messages_field, "assistant_only": assistant_only,
                   "end_of_turn": end_of_turn, "probe": probe, "chat_template": chat_template,
                   "on_error": on_error, "tools": tools, "template_kwargs": template_kwargs},
        desc=f"{desc}: render chat template",
        **common,
    )
    errors = rendered["_error"]
    tool_states = _column_numpy(rendered, "_tools")
    dropped = np.flatnonzero(tool_states == 2)
    if len(dropped) and not (tool_states == 1).any():
        # Not one record's tool calls/tools reached the text: the template drops them, a configuration error that
        # skipping every such record (on_error="skip") would hide.
        raise TemplateDropsToolsError(
            f"the chat template drops tool calls or tools: it renders those of none of the {len(dropped)} records "
            f"that carry them, so on_error='skip' would drop every one (a configuration error, not bad records). "
            f"First: {errors[dropped[0]]}")
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        for i in bad:
            stats.skip_reasons[errors[i]] = stats.skip_reasons.get(errors[i], 0) + 1
        stats.skipped += len(bad)
        bad_set = set(bad)
        rendered = rendered.select([i for i in range(len(rendered)) if i not in bad_set])
        if len(rendered) == 0:
            raise ValueError(f"every one of the {stats.records_in} records was skipped; first reason: {errors[bad[0]]}")

    remove = ["_spans", "_error", "_tools"] + ([] if keep_text else ["text"])
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
    first_trained = _column_numpy(tokenized, "_first_trained")
    learnt = _column_numpy(tokenized, "_n_learnt_kept") > 0
    too_long = n_full > n_kept
    keep_mask = np.ones(len(n_full), dtype=bool)
    if overflow == "drop":
        stats.dropped_too_long = int(too_long.sum())
        keep_mask &= ~too_long
    else:
        stats.truncated = int(too_long.sum())
        stats.tokens_cut = int((n_full - n_kept).sum())
        stats.trained_tokens_cut = int((n_trained_full - n_trained_kept).sum())
    untrained = keep_mask & ~learnt
    if drop_untrained and untrained.any():
        cut = untrained & (first_trained >= 0)  # it had an answer, which truncation removed
        stats.dropped_no_trained = int(untrained.sum())
        stats.no_trained_by_truncation = int(cut.sum())
        if cut.any():
            stats.first_answer_min = int(first_trained[cut].min())
            stats.first_answer_median = int(np.median(first_trained[cut]))
        keep_mask &= learnt
    if not keep_mask.all():
        tokenized = tokenized.select(np.flatnonzero(keep_mask))
    tokenized = tokenized.remove_columns(["_n_full", "_n_trained_full", "_n_kept", "_n_trained_kept",
                                          "_first_trained", "_n_learnt_kept"])
    stats.records_out = len(tokenized)
    stats.tokens = int(n_kept[keep_mask].sum())
    stats.trained_tokens = int(n_trained_kept[keep_mask].sum())
    stats.no_trained_tokens = int((keep_mask & ~learnt).sum())
    stats.log()
    if drop_untrained and stats.records_out == 0 and stats.dropped_no_trained:
        raise NothingToTrainError(stats.nothing_to_train_message(), stats)
    return (tokenized, stats) if return_stats else tokenized


__all__ = [
    "CHAT_FORMAT_VERSION",
    "IGNORE_INDEX",
    "ChatFormatError",
    "ChatTokenizeStats",
    "NothingToTrainError",
    "TemplateDropsToolsError",
    "TemplateProbe",
    "detect_end_of_turn",
    "encode_chat",
    "probe_chat_template",
    "record_messages",
    "record_tools",
    "render_with_spans",
    "token_mask_from_spans",
    "tokenize_chat_dataset",
    "unified_free_form_fields",
]
