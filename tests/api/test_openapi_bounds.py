"""/openapi.json states the limits the server runs with (--max-new-tokens-limit, what one
tenant may run, prompts per call), and the server accepts what the document allows at those
limits and refuses what is past them."""

from __future__ import annotations

import re
from typing import Any

from server.models import LoadedModel
from tests.api.conftest import MakeClient, assert_error, create_tenant

MAX_LEN = 96
LIMITS = {
    "max_len": MAX_LEN,
    "max_new_tokens_limit": 40,
    "num_slots": 6,
    "max_running_per_tenant": 3,
    "max_choices": 5,
    "max_prompts_per_call": 4,
    "max_ensemble_members": 8,
}


def branch(schema: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(b for b in [schema, *schema.get("anyOf", [])] if b.get("type") == kind)


def test_the_document_states_the_servers_limits_and_the_server_keeps_to_them(
    make_client: MakeClient, loaded: LoadedModel
) -> None:
    with make_client(**LIMITS) as client:
        document = client.get("/openapi.json").json()
        schemas = document["components"]["schemas"]
        generate = schemas["GenerateRequest"]["properties"]
        completion = schemas["CompletionRequest"]["properties"]
        chat = schemas["ChatCompletionRequest"]["properties"]
        assert generate["max_new_tokens"]["maximum"] == 40
        assert generate["max_new_tokens"]["default"] == 40  # the field's 64, within the limit
        assert branch(completion["max_tokens"], "integer")["maximum"] == 40
        assert branch(chat["max_completion_tokens"], "integer")["maximum"] == 40
        # n: the choices limit, the slots and one tenant's rows: the least of them
        assert completion["n"]["maximum"] == chat["n"]["maximum"] == 3
        assert branch(generate["prefixes"], "array")["maxItems"] == 3
        texts, ids, id_lists = (b for b in completion["prompt"]["anyOf"] if b["type"] == "array")
        assert texts["maxItems"] == id_lists["maxItems"] == 4  # prompts per call
        # a prompt of ids leaves a position to generate in; ids stop at the vocabulary
        assert ids["maxItems"] == id_lists["items"]["maxItems"] == MAX_LEN - 1
        vocab = loaded.spec.vocab_size
        assert ids["items"]["maximum"] == id_lists["items"]["items"]["maximum"] == vocab - 1
        detokenize = schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]
        assert detokenize == {"type": "integer", "minimum": 0, "maximum": vocab - 1}
        assert branch(completion["top_k"], "integer")["maximum"] == vocab
        # `model`: the served model's id or a prefix reference
        model = re.compile(completion["model"]["pattern"])
        assert model.search(loaded.model_id) and model.search("alice/pirate")
        assert not model.search("Alice/pirate") and not model.search("other-model/x/y")
        name = re.compile(schemas["TenantCreate"]["properties"]["name"]["pattern"])
        assert name.search("alice") and not name.search("") and not name.search("a/b")
        # rules no schema states, on the operation (server/api/openapi_rules.py)
        generate_op = document["paths"]["/v1/generate"]["post"]["description"]
        assert "- `prefix`: either `prefix` or `prefixes`" in generate_op

        alice = create_tenant(client, "alice")
        unset = client.post("/v1/generate", json={"prompt": [5, 6, 7]}, headers=alice.headers)
        assert unset.status_code == 200, unset.text
        assert unset.json()["usage"]["completion_tokens"] <= 40
        body = {"model": loaded.model_id, "prompt": [5, 6, 7], "temperature": 0}
        at_limit = client.post(
            "/v1/completions", json={**body, "max_tokens": 40, "n": 3}, headers=alice.headers
        )
        assert at_limit.status_code == 200, at_limit.text
        past = client.post(
            "/v1/completions", json={**body, "max_tokens": 41}, headers=alice.headers
        )
        assert_error(past, 400, "max_new_tokens", "40")
        too_many = client.post("/v1/completions", json={**body, "n": 4}, headers=alice.headers)
        assert_error(too_many, 400, "n", "3")
        last = {"prompt": [vocab - 1, 5.0], "max_new_tokens": 1}  # 5.0: a JSON Schema integer
        assert client.post("/v1/generate", json=last, headers=alice.headers).status_code == 200
        outside = {"prompt": [vocab], "max_new_tokens": 1}
        assert_error(
            client.post("/v1/generate", json=outside, headers=alice.headers), 400, "prompt"
        )
