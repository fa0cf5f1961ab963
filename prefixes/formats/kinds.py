"""The two shapes a prefix takes: raw (as uploaded) and compiled (what the runner serves)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch


class PrefixKind(enum.StrEnum):
    PREFIX_TUNING = "prefix_tuning"  # learned K/V per layer (P-tuning v2 is the same thing)
    PROMPT_TUNING = "prompt_tuning"  # learned input embeddings
    P_TUNING = "p_tuning"  # learned input embeddings, produced by an encoder at training time

    @property
    def is_soft_prompt(self) -> bool:
        return self is not PrefixKind.PREFIX_TUNING


@dataclass(slots=True)
class RawPrefix:
    """A prefix as read from files, before it is checked against a model.

    `tensor` is float32 and is either a soft prompt `[T, hidden]` or prefix KV in the canonical
    layout `[layers, 2, kv_heads, T, head_dim]` (index 0 of dim 1 is K, index 1 is V).
    """

    kind: PrefixKind
    tensor: torch.Tensor
    task_type: str = "CAUSAL_LM"
    metadata: dict[str, str] = field(default_factory=dict)
    # The adapter_config.json settings an export writes back (an encoder's or a projection's
    # settings, the attention heads PEFT recorded): read from a PEFT upload, else empty.
    peft_config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_virtual_tokens(self) -> int:
        return self.tensor.shape[0] if self.kind.is_soft_prompt else self.tensor.shape[3]


@dataclass(slots=True)
class CompiledPrefix:
    """Per-layer K/V for positions 0..T-1, `[layers, 2, kv_heads, T, head_dim]`, model dtype.

    Every kind compiles to this, so the runner serves one thing: copy into the slot, then
    the request's own tokens start at position T.
    """

    kind: PrefixKind
    kv: torch.Tensor
    # Names the content: two handles on equal KV share one copy on the device (the registry
    # passes the stored file's sha256; compiling computes a digest of the KV).
    digest: str

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
