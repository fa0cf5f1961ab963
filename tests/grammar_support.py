"""Structured outputs' test support: a tiny random Llama over SmolLM2's real tokenizer (grammars
need real sub-word tokens), the constraints the tests mix, and the reference: transformers'
`generate` with a logits processor made of llguidance's own mask functions."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import llguidance
import llguidance.numpy
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessor

from server.engine.grammar import Grammar
from server.models import LoadedModel, freeze, wrap_model
from tests.e2e.test_lm_eval import smollm2_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "pet": {"type": "boolean"},
    },
    "required": ["name", "age", "mood", "pet"],
    "additionalProperties": False,
}
LABELS = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}}, "required": ["label"]}
# (kind, value) as GrammarCompiler.compile takes them
CONSTRAINTS: list[tuple[str, Any]] = [
    ("json_schema", PERSON),
    ("json_schema", LABELS),
    ("regex", r"[a-z]{2,5}-[0-9]{2}"),
    ("choice", ["red", "green", "blue"]),
    ("grammar", 'start: "yes" | "no" | "maybe"'),
    ("json_object", None),
]


def tiny_smol() -> LoadedModel:
    """A tiny random Llama over SmolLM2's vocabulary, with SmolLM2's tokenizer."""
    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        initializer_range=0.2, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return wrap_model(freeze(model), tokenizer, "tiny-smol")


def valid(kind: str, value: Any, text: str) -> bool:
    """Whether `text` is an answer the constraint allows."""
    if kind in ("json_schema", "json_object"):
        try:
            answer = json.loads(text)
            jsonschema.validate(answer, value or {"type": "object"})
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if kind == "regex":
        return re.fullmatch(value, text) is not None
    if kind == "choice":
        return text in value
    return text in ("yes", "no", "maybe")  # the one grammar CONSTRAINTS has


class GrammarProcessor(LogitsProcessor):
    """transformers' logits processor for one sequence under `grammar`, from llguidance's own
    matcher, mask filling and mask application (nothing of the engine's)."""

    def __init__(self, grammar: Grammar) -> None:
        self.matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.source, log_level=0)
        self.vocab = grammar.tokenizer.vocab_size
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        else:
            assert self.matcher.consume_token(int(input_ids[0, -1])), self.matcher.get_error()
        bitmask = llguidance.numpy.allocate_token_bitmask(1, self.vocab)
        llguidance.numpy.fill_next_token_bitmask(self.matcher, bitmask, 0)
        masked = scores.detach().clone().numpy()
        llguidance.numpy.apply_token_bitmask_inplace(masked, bitmask)
        return torch.from_numpy(masked)  # type: ignore[return-value]
