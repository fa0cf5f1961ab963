"""Training files: JSON lines, read and checked on upload, turned into token ids when a job runs.

A line is one example, in either of OpenAI's two forms:
- `{"messages": [{"role", "content"}, ...]}`: a conversation ending with the assistant's reply.
  It is rendered with the model's chat template, exactly as /v1/chat/completions renders a
  request, and the loss covers the final reply only (earlier turns are context).
- `{"prompt": ..., "completion": ...}`: the prompt is tokenized as /v1/completions tokenizes
  one, and the loss covers the completion followed by the end-of-sequence token (so the prefix
  also learns where to stop).
Anything else is refused, naming the line: a field the server does not use is never ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.train import Example
from server.tuning.errors import TuningError

ROLES = ("system", "developer", "user", "assistant")
FORMS = '{"messages": [...]} or {"prompt": ..., "completion": ...}'


@dataclass(frozen=True, slots=True)
class ChatRecord:
    line: int
    messages: tuple[tuple[str, str], ...]  # (role, content)


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    line: int
    prompt: str
    completion: str


Record = ChatRecord | CompletionRecord


def parse_records(content: bytes, field: str = "file") -> list[Record]:
    """Every example of a training file; TuningError naming the first line that is not one."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TuningError(field, f"{field}: expected UTF-8 text, found byte {exc.start}") from None
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _line(field, number, f"not JSON ({exc.msg}, column {exc.colno})") from None
        except RecursionError:
            raise _line(field, number, "not JSON (nested too deeply)") from None
        records.append(parse_record(value, number, field))
    if not records:
        raise TuningError(field, f"{field}: expected at least one example ({FORMS}), found none")
    return records


def parse_record(value: Any, line: int, field: str = "file") -> Record:
    if not isinstance(value, dict):
        raise _line(field, line, f"expected an object {FORMS}, found {type(value).__name__}")
    keys = set(value)
    if "messages" in keys:
        _only(keys, {"messages"}, field, line)
        return ChatRecord(line, _messages(value["messages"], field, line))
    if keys & {"prompt", "completion"}:
        _only(keys, {"prompt", "completion"}, field, line)
        for key in ("prompt", "completion"):
            if key not in value:
                raise _line(field, line, f"{key}: required beside the other")
            if not isinstance(value[key], str) or not value[key]:
                raise _line(
                    field, line, f"{key}: expected a non-empty string, found {value[key]!r:.40}"
                )
            _check_text(value[key], field, line, key)
        return CompletionRecord(line, value["prompt"], value["completion"])
    raise _line(field, line, f"expected {FORMS}, found the fields {sorted(keys)}")


def _messages(value: Any, field: str, line: int) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or len(value) < 2:
        raise _line(
            field, line, "messages: expected a list of at least two messages, the last the "
            "assistant's reply",
        )  # fmt: skip
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _line(field, line, f"{where}: expected an object with role and content")
        _only(set(message), {"role", "content"}, field, line, where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _line(
                field, line, f"{where}.role: expected one of {', '.join(ROLES)}, found {role!r:.40}"
            )
        if not isinstance(content, str):
            raise _line(field, line, f"{where}.content: expected a string, found {content!r:.40}")
        _check_text(content, field, line, f"{where}.content")
        messages.append((role, content))
    if messages[-1][0] != "assistant" or not messages[-1][1]:
        raise _line(
            field, line, "messages: expected the last message to be a non-empty assistant reply"
        )
    return tuple(messages)


def _check_text(text: str, field: str, line: int, where: str) -> None:
    """JSON can carry lone surrogates (\\ud800), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _line(field, line, f"{where}: not valid Unicode text (a lone surrogate)") from None


def _only(keys: set[str], allowed: set[str], field: str, line: int, where: str = "") -> None:
    extra = sorted(keys - allowed)
    if extra:
        place = f"{where}." if where else ""
        raise _line(field, line, f"{place}{extra[0]}: not a field this server trains on")


def _line(field: str, line: int, problem: str) -> TuningError:
    return TuningError(field, f"{field}: line {line}: {problem}", line=line)


# Token ids ------------------------------------------------------------------------------------


def to_examples(
    records: list[Record], tokenizer: Any, *, max_tokens: int, field: str = "training_file"
) -> list[Example]:
    """Token ids and loss labels of every record; each example at most `max_tokens` long."""
    examples = []
    for record in records:
        if isinstance(record, ChatRecord):
            prompt, target = _chat_ids(record, tokenizer, field)
        else:
            try:
                prompt = list(tokenizer.encode(record.prompt))
                target = list(tokenizer.encode(record.completion, add_special_tokens=False))
            except Exception as exc:  # text this tokenizer cannot take
                raise _line(field, record.line, f"cannot be tokenized ({exc})") from None
            if tokenizer.eos_token_id is not None:
                target.append(tokenizer.eos_token_id)
        if len(prompt) + len(target) > max_tokens:
            raise _line(
                field,
                record.line,
                f"{len(prompt) + len(target)} tokens, expected at most {max_tokens} (the "
                "server's context length less the prefix's virtual tokens)",
            )
        examples.append(Example(prompt + target, [-100] * len(prompt) + target))
    return examples


def _chat_ids(record: ChatRecord, tokenizer: Any, field: str) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise _line(
            field, record.line, "a chat example needs the model's chat template and this model "
            "has none: send prompt/completion examples",
        )  # fmt: skip
    messages = [{"role": role, "content": content} for role, content in record.messages]
    try:
        prompt = _ids(
            tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
        )
        whole = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    except Exception as exc:  # a template can refuse a conversation (roles, order)
        raise _line(field, record.line, f"the chat template refused it ({exc})") from None
    if whole[: len(prompt)] != prompt or len(whole) == len(prompt):
        raise _line(
            field, record.line, "the chat template does not render the reply after the "
            "conversation before it: send prompt/completion examples",
        )  # fmt: skip
    return prompt, whole[len(prompt) :]


def _ids(rendered: Any) -> list[int]:
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    return list(rendered)
