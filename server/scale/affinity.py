"""Which prefix a request uses, read from its body: Ray Serve's multiplexed model id, so that
requests for one prefix prefer the replica that already holds it on its device.

Only the routes that generate have one; everything else (and a request for the base model)
has none and goes to the least loaded replica. A body that cannot be read has none either: the
replica that gets it answers the 4xx.
"""

from __future__ import annotations

import json

# route -> the body field naming the prefix
PREFIX_FIELDS = {
    "/v1/generate": "prefix",
    "/v1/completions": "model",
    "/v1/chat/completions": "model",
}
MAX_KEY_LENGTH = 200  # a reference is at most 129 characters; anything longer is no prefix


def affinity_key(method: str, path: str, body: bytes) -> str:
    """The prefix reference (or the base model's id: the caller knows it) this request
    generates with, or "" for none."""
    field = PREFIX_FIELDS.get(path.rstrip("/"))
    if method != "POST" or field is None:
        return ""
    try:
        parsed = json.loads(body)
        value = parsed.get(field)
        members = parsed.get("prefixes")
    except (ValueError, AttributeError):
        return ""
    if value is None and isinstance(members, list) and all(isinstance(m, str) for m in members):
        value = ",".join(members)  # a prompt ensemble: requests with these members go together
    if not isinstance(value, str) or len(value) > MAX_KEY_LENGTH:
        return ""
    return value
