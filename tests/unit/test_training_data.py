"""Training records to token ids: what the loss covers, as the server will serve it."""

from __future__ import annotations

import pytest

from server.tuning.data import parse_records, to_examples
from server.tuning.errors import TuningError
from tests.api.tuning import CHAT_TEMPLATE, jsonl
from tests.tiny import word_tokenizer


@pytest.fixture
def tokenizer():
    made = word_tokenizer()
    made.chat_template = CHAT_TEMPLATE
    made.eos_token = "w383"
    return made


def test_a_completion_is_learned_with_the_end_of_sequence_after_it(tokenizer) -> None:
    records = parse_records(jsonl([{"prompt": "w1 w2", "completion": "w7 w8"}]))
    (example,) = to_examples(records, tokenizer, max_tokens=100)
    assert example.input_ids == [1, 2, 7, 8, 383]
    assert example.labels == [-100, -100, 7, 8, 383]


def test_a_conversation_is_learned_on_its_last_reply_only(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "w10"},
        {"role": "assistant", "content": "w11"},
        {"role": "user", "content": "w12"},
        {"role": "assistant", "content": "w13 w14"},
    ]
    (example,) = to_examples(
        parse_records(jsonl([{"messages": messages}])), tokenizer, max_tokens=100
    )
    # the prompt is what /v1/chat/completions sends for the conversation before the reply
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert example.input_ids[: len(prompt)] == prompt
    targets = [t for t in example.labels if t != -100]
    assert targets == [13, 14, 3]  # the reply and the turn's end (w3)
    assert example.labels[: len(prompt)] == [-100] * len(prompt)


def test_an_example_longer_than_the_context_names_its_line(tokenizer) -> None:
    records = parse_records(jsonl([{"prompt": "w1", "completion": "w2"}] * 2 + [
        {"prompt": "w1 " * 10, "completion": "w2"}
    ]))  # fmt: skip
    with pytest.raises(TuningError, match="line 3: 12 tokens, expected at most 8") as caught:
        to_examples(records, tokenizer, max_tokens=8, field="training_file")
    assert (caught.value.field, caught.value.line) == ("training_file", 3)
