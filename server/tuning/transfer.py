"""Prompt transfer: which prefix a job may start from, and the values it starts with.

A job's `model` may be any prefix the tenant may use (its own, or a public one). What training
starts from depends on the source's kind and the job's method:

| source | method prefix_tuning | method prompt_tuning |
|---|---|---|
| prefix_tuning | its keys and values | refused: no embeddings give those keys and values |
| prompt_tuning | its compiled keys and values | its embeddings |
| p_tuning | its compiled keys and values | its encoder's output embeddings |

Starting prefix tuning from a soft prompt's compiled KV is exact: before the first step, the
new prefix answers as its source does (serving a soft prompt is serving that KV). A soft prompt
stored before prefixes kept their own parameters has no embeddings left: prompt tuning cannot
start from it.
"""

from __future__ import annotations

from prefixes import PrefixKind, RawPrefix
from prefixes.catalog.records import PrefixInfo
from prefixes.registry import Registry
from server.tuning.errors import SourceChanged, TuningError


def check_source(source: PrefixInfo, method: PrefixKind, wanted_tokens: int | None) -> int:
    """The job's length (the source's), or a TuningError naming the source and the method."""
    if method is PrefixKind.PROMPT_TUNING and not source.kind.is_soft_prompt:
        raise TuningError(
            "model",
            f"model: {source.id} is {source.kind.value} (keys and values at every layer) and "
            f"the method {method.value} trains input embeddings, which cannot start from "
            f"keys and values: use the prefix_tuning method, or a prompt_tuning or p_tuning "
            f"source",
        )
    if method is PrefixKind.PROMPT_TUNING and source.parameters_sha256 is None:
        raise TuningError(
            "model",
            f"model: {source.id} ({source.kind.value}) was stored before prefixes kept their "
            f"own parameters, so its embeddings are gone and the method {method.value} cannot "
            f"start from it; the prefix_tuning method can (from its compiled keys and values)",
        )
    if wanted_tokens is not None and wanted_tokens != source.num_virtual_tokens:
        raise TuningError(
            "method.num_virtual_tokens",
            f"method.num_virtual_tokens: expected {source.num_virtual_tokens} (the length of "
            f"{source.id}, {source.kind.value}, which {method.value} training starts from), "
            f"found {wanted_tokens}",
        )
    return source.num_virtual_tokens


def initial_values(
    source: PrefixInfo,
    method: PrefixKind,
    registry: Registry,
    tenant: str,
    tokens: int | None = None,
) -> RawPrefix:
    """The trainable values a job of `method` (and of `tokens` virtual tokens, when given)
    starts with, from `source`. The version checked is the version read: SourceChanged if the
    job cannot start from it (the source was replaced since the job was planned)."""
    still_fits(source, method, tokens)
    if method is PrefixKind.PREFIX_TUNING and source.kind.is_soft_prompt:
        with registry.acquire(source.id, tenant=tenant) as handle:  # the newest version
            still_fits(handle.info, method, tokens)  # any kind's compiled KV will do
            return RawPrefix(PrefixKind.PREFIX_TUNING, handle.prefix.kv.float().cpu())
    own = registry.parameters(source)
    if method is PrefixKind.PROMPT_TUNING:  # P-tuning's encoder output is a soft prompt
        return RawPrefix(PrefixKind.PROMPT_TUNING, own.tensor)
    return own  # prefix tuning's keys and values (as kept, or compiled for an old version)


def still_fits(source: PrefixInfo, method: PrefixKind, tokens: int | None) -> None:
    try:
        check_source(source, method, tokens)
    except TuningError:
        raise SourceChanged(
            f"model: {source.id} changed after this job was created: its version "
            f"{source.version} is {source.kind.value} of {source.num_virtual_tokens} virtual "
            f"tokens, which this {method.value} job"
            + ("" if tokens is None else f" of {tokens} virtual tokens")
            + " cannot start from; create the job again to start from it"
        ) from None
