"""The stored form of a prefix's own parameters: the raw prefix as uploaded or trained (a soft
prompt's embeddings, P-tuning's encoder output, prefix tuning's keys and values), kept beside
its compiled KV so that it can be exported in PEFT's layout and trained further (transfer).

It is an ordinary native file (docs/native-format.md) of the upload's kind, in float32 as read,
with the adapter_config.json settings an export writes back in its metadata; its header is
canonical, so equal parameters make equal bytes and share one content-addressed file.
"""

from __future__ import annotations

import json

from prefixes.formats.adapters import read_native, write_native
from prefixes.formats.kinds import RawPrefix
from prefixes.storage.kvfile import canonical_safetensors

PEFT_CONFIG = "peft_config"


def encode_parameters(prefix: RawPrefix) -> bytes:
    metadata = dict(prefix.metadata)
    if prefix.peft_config:
        metadata[PEFT_CONFIG] = json.dumps(prefix.peft_config, sort_keys=True)
    kept = RawPrefix(prefix.kind, prefix.tensor.detach().cpu(), prefix.task_type, metadata)
    return canonical_safetensors(write_native(kept))


def decode_parameters(data: bytes) -> RawPrefix:
    prefix = read_native(data)
    settings = prefix.metadata.pop(PEFT_CONFIG, None)
    try:
        parsed = json.loads(settings) if settings is not None else {}
    except ValueError:  # a native upload's own metadata of that name: not ours, not settings
        parsed = {}
    prefix.peft_config = parsed if isinstance(parsed, dict) else {}
    return prefix
