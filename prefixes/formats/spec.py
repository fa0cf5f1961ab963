"""The geometry of the loaded model: the one source of truth a prefix is checked against."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class ModelSpec:
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    dtype: str
    # Learned absolute position embeddings (GPT-2): every position, prefix slots included,
    # must stay below max_positions. Rotary models can run past it, but we never do.
    absolute_positions: bool = False
    # Identifies the weights, not just the shapes: a soft prompt compiled to KV on one model
    # is wrong on another model of the same geometry.
    weights_digest: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelSpec.{name} must be positive, got {getattr(self, name)}")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of compiled K and V for one virtual token across all layers."""
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(self.dtype, 4)
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    def fingerprint(self) -> str:
        """A short stable id of geometry and weights; prefixes are bound to it."""
        fields = asdict(self)
        fields.pop("dtype")  # a prefix compiled in fp32 serves a bf16 copy of the same weights
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
