"""Check a raw prefix against the loaded model's geometry and the configured limits."""

from __future__ import annotations

import torch

from prefixes.errors import InvalidPrefix
from prefixes.formats.kinds import RawPrefix
from prefixes.formats.spec import ModelSpec

SUPPORTED_TASK_TYPE = "CAUSAL_LM"


def validate(prefix: RawPrefix, spec: ModelSpec, max_virtual_tokens: int) -> None:
    """Raise InvalidPrefix naming the first field that does not fit; return None if it all fits."""
    if prefix.task_type != SUPPORTED_TASK_TYPE:
        raise InvalidPrefix("task_type", SUPPORTED_TASK_TYPE, prefix.task_type)
    tokens = prefix.num_virtual_tokens
    limit = min(max_virtual_tokens, spec.max_positions - 1)  # leave room for one real token
    if not 1 <= tokens <= limit:
        raise InvalidPrefix("num_virtual_tokens", f"between 1 and {limit}", tokens)
    if prefix.kind.is_soft_prompt:
        _check_dim("hidden_size", spec.hidden_size, prefix.tensor.shape[1])
    else:
        layers, _, heads, _, head_dim = prefix.tensor.shape
        _check_dim("num_layers", spec.num_layers, layers)
        _check_dim("num_kv_heads", spec.num_kv_heads, heads)
        _check_dim("head_dim", spec.head_dim, head_dim)
    bad = int((~torch.isfinite(prefix.tensor)).sum())
    if bad:
        raise InvalidPrefix("values", "finite numbers", f"{bad} NaN or Inf values")


def _check_dim(field: str, expected: int, found: int) -> None:
    if expected != found:
        raise InvalidPrefix(field, expected, found, "the prefix was trained for another model")
