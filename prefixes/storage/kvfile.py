"""The stored form of a compiled prefix: a native prefix-KV safetensors file with stable bytes.

What is stored is the compiled KV, not the upload: a cold load is then a file read and a copy to
the device, never a forward pass. The file is an ordinary native `prefix_kv` file (see
docs/native-format.md): uploaded again on the same model it serves the same outputs.
"""

from __future__ import annotations

import json
import struct

import torch

from prefixes.formats.adapters import read_native, write_native
from prefixes.formats.kinds import CompiledPrefix, PrefixKind, RawPrefix

COMPILED_FROM = "compiled_from"
MODEL_FINGERPRINT = "model_fingerprint"


def encode_compiled(prefix: CompiledPrefix, model_fingerprint: str) -> bytes:
    """Serialise compiled KV (in its own dtype) with the same bytes for the same tensor."""
    metadata = {COMPILED_FROM: prefix.kind.value, MODEL_FINGERPRINT: model_fingerprint}
    raw = RawPrefix(PrefixKind.PREFIX_TUNING, prefix.kv.detach().cpu(), metadata=metadata)
    return canonical_safetensors(write_native(raw))


def decode_compiled(data: bytes) -> torch.Tensor:
    """The KV `[layers, 2, kv_heads, T, head_dim]` of a file written by `encode_compiled`."""
    return read_native(data).tensor


def canonical_safetensors(data: bytes) -> bytes:
    """Rewrite the header with sorted keys: content addresses must not depend on dict order.

    safetensors writes `__metadata__` in hash-map order, which changes from process to process,
    so two uploads of the same prefix would otherwise hash differently and never share a file.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # tensor data stays 8-byte aligned, as safetensors has it
    return struct.pack("<Q", len(text)) + text + data[8 + header_len :]
