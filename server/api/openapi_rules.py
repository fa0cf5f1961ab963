"""Rules a request must follow that its JSON schema does not state: they depend on what the
request refers to (a prefix's length, a file's contents, the model's chat template), on how a
text tokenizes, on the engine's room, or on several fields at once. Each operation's
description in the OpenAPI document lists its rules by the field its error names, so a client
(or a fuzzer) knows which refusals of a schema-valid body to expect: 400, or 422 where a
combination of fields is checked as the body is read."""

from __future__ import annotations

from typing import Any

FITS = "the prompt's tokens and the prefix's virtual tokens fit the context (--max-len)"
PROMPT = f"{FITS}; a text the tokenizer can encode; one prompt when streaming"
CHAT_TEMPLATE = "the served model has a chat template, and the messages render with it"
CONSTRAINT = "a constraint that compiles for this model (schema, regex, grammar); one at a time"
ROOM = "the rows asked for (choices or an ensemble's members) fit the engine and the tenant's share"
SAMPLING = {
    "prompt": PROMPT,
    "min_tokens": "at most the tokens asked for; not with a constraint",
    "ignore_eos": "not with a constraint",
    "logit_bias": "keys are token ids in the model's vocabulary",
    "structured_outputs": CONSTRAINT,
    "prefix": "the prefix's KV matches the served model",
    "prompt_logprobs": "not with an ensemble",
    "n": f"1 with an ensemble; {ROOM}",
    "stream": "not with a `vote` ensemble (its answer exists only at the end)",
}
OPENAI = {
    **SAMPLING,
    "response_format": f"`json_schema` exactly with type `json_schema`; {CONSTRAINT}",
    "stream_options": "only with `stream` set to true",
    "model": "the prefix's KV matches the served model",
}

RULES: dict[tuple[str, str], dict[str, str]] = {
    ("post", "/v1/generate"): {
        **SAMPLING,
        "prefix": "either `prefix` or `prefixes` (an ensemble), not both; "
        "the prefix's KV matches the served model",
        "prefixes": f"distinct prefixes (`name` and `owner/name` are one); {ROOM}",
        "ensemble": "only with `prefixes`",
        "max_new_tokens": "0 only with `prompt_logprobs` (scoring the prompt)",
    },
    ("post", "/v1/completions"): {
        **OPENAI,
        "max_tokens": "0 only with `echo` (scoring the prompt)",
    },
    ("post", "/v1/chat/completions"): {
        **OPENAI,
        "messages": f"{CHAT_TEMPLATE}; {FITS}",
        "top_logprobs": "only with `logprobs` set to true",
    },
    ("post", "/v1/prefixes"): {
        "files": "a PEFT adapter's adapter_config.json and adapter_model.safetensors, or one "
        "native .safetensors file, of a prompt-learning kind and shape the served model takes",
    },
    ("post", "/v1/ensembles"): {
        "prefixes": "distinct prefixes (`name` and `owner/name` are one)",
    },
    ("post", "/v1/files"): {
        "file": "UTF-8 JSON Lines, one training example per line (prompt and completion, or "
        "chat messages), within the file limits; the error names the line",
    },
    ("post", "/v1/fine_tuning/jobs"): {
        "method": "settings only for the method its `type` names",
        "hyperparameters": "at the top level or in `method`, not both",
        "method.num_virtual_tokens": "the length of the prefix in `model` when training "
        "starts from one",
        "model": "a prefix of a kind training can start from",
        "max_active_jobs": "the tenant's quota of jobs queued or running (a 422)",
        "training_file": "examples that fit the context",
        "validation_file": "examples that fit the context",
    },
    ("post", "/v1/fine_tuning/transferability"): {
        "candidates": "distinct prefixes (`name` and `owner/name` are one)",
        "training_file": "examples that fit the context beside the longest candidate",
    },
    ("get", "/v1/fine_tuning/jobs/{job_id}/events"): {
        "after": "an event id from this job's listing",
    },
    ("get", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): {
        "after": "a checkpoint id from this job's listing",
    },
    ("get", "/v1/usage"): {
        "end": "not before `start`",
        "cursor": "the `next` of the previous page",
    },
    ("post", "/tokenize"): {
        "body": "exactly one of `prompt` and `messages`; `add_generation_prompt` only with "
        "messages",
        "prompt": "a text the tokenizer can encode",
        "messages": CHAT_TEMPLATE,
    },
    ("post", "/detokenize"): {
        "tokens": "ids the tokenizer can decode",
    },
}


def state_rules(document: dict[str, Any]) -> None:
    """Write each operation's rules into its description (in place)."""
    for (method, path), rules in RULES.items():
        operation = document.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        listed = "\n".join(f"- `{field}`: {rule}" for field, rule in rules.items())
        summary = operation.get("description", "").partition(RULES_HEADING)[0].rstrip()
        operation["description"] = f"{summary}\n\n{RULES_HEADING}\n{listed}".lstrip()


RULES_HEADING = "Rules the schema does not state (a 400 or 422 names the field):"
