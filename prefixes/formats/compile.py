"""Compile any raw prefix to the one form the runner serves: K/V per layer at positions 0..T-1.

A soft prompt P occupies positions 0..T-1 in front of the request (PEFT numbers positions from
0 and discards any position_ids). In a causal decoder the K/V at those positions depend on P
alone, so running the frozen model over P once and keeping its cache is exact: serving that KV
is serving the soft prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefixes.errors import InvalidPrefix
from prefixes.formats.kinds import CompiledPrefix, RawPrefix
from prefixes.formats.spec import ModelSpec
from prefixes.formats.validate import validate

# Takes embeddings `[T, hidden]` (model dtype, model device), returns KV `[L, 2, H, T, D]`.
EmbeddingRunner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PrefixCompiler:
    """The model-facing step of an upload, handed to the registry as one object: check a raw
    prefix against the model's geometry and the length limit, then compile it to KV in the
    model's dtype on the model's device.

    The server builds it from its loaded model (`LoadedModel.prefix_compiler`); this package
    only ever sees the geometry and the one callable that needs the model's weights.
    """

    spec: ModelSpec
    run_embeddings: EmbeddingRunner
    max_virtual_tokens: int
    device: torch.device | str = "cpu"

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: compiled KV is stored and served in it."""
        dtype: torch.dtype = getattr(torch, self.spec.dtype)
        return dtype

    def compile(self, raw: RawPrefix) -> CompiledPrefix:
        validate(raw, self.spec, self.max_virtual_tokens)
        return compile_prefix(raw, self.run_embeddings, dtype=self.dtype, device=self.device)


def compile_prefix(
    prefix: RawPrefix,
    run_embeddings: EmbeddingRunner,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> CompiledPrefix:
    """Turn a validated raw prefix into compiled KV in the model's dtype and device."""
    if prefix.kind.is_soft_prompt:
        embeddings = prefix.tensor.to(device=device, dtype=dtype)
        kv = run_embeddings(embeddings)
    else:
        kv = prefix.tensor.to(device=device, dtype=dtype)
    check_finite(kv)
    kv = kv.contiguous()
    return CompiledPrefix(prefix.kind, kv, kv_digest(kv))


def kv_digest(kv: torch.Tensor) -> str:
    """sha256 of the compiled KV's bytes (and shape): what the engine shares device copies by."""
    digest = hashlib.sha256(str((tuple(kv.shape), kv.dtype)).encode())
    digest.update(kv.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_finite(kv: torch.Tensor) -> None:
    """Refuse compiled KV that overflowed the serving dtype (values beyond float16's 65504 on a
    float16 server, a soft prompt whose forward overflowed): it could only ever produce NaN."""
    bad = int((~torch.isfinite(kv)).sum())
    if bad:
        dtype = str(kv.dtype).removeprefix("torch.")
        limit = torch.finfo(kv.dtype).max
        raise InvalidPrefix(
            "values",
            f"values that stay finite once compiled to {dtype} (|value| <= {limit:.4g})",
            f"{bad} of {kv.numel()} compiled values NaN or Inf",
            "the prefix's values are too large for the precision this server runs in",
        )
