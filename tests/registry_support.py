"""Helpers for registry tests: real upload files and registries on tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prefixes import ModelSpec, PrefixKind, RawPrefix, write_native
from prefixes.catalog.records import PrefixInfo
from prefixes.registry import Registry

if TYPE_CHECKING:  # the crash test's child processes must start without transformers
    from server.models import LoadedModel

MAX_VIRTUAL_TOKENS = 32
# The database `open_registry` opens unless told: None is SQLite in the data directory; the
# `registry_backend` fixture (tests/conftest.py) sets a PostgreSQL URL for its second run.
DATABASE_URL: str | None = None


def native_files(spec: ModelSpec, tokens: int, seed: int) -> dict[str, bytes]:
    """A native prefix-tuning upload with random KV: distinct bytes for each seed."""
    shape = (spec.num_layers, 2, spec.num_kv_heads, tokens, spec.head_dim)
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return {"prefix.safetensors": write_native(RawPrefix(PrefixKind.PREFIX_TUNING, kv))}


def peft_files(adapter_dir: Path) -> dict[str, bytes]:
    """Every file PEFT's save_pretrained wrote, as an HTTP upload would carry them."""
    return {path.name: path.read_bytes() for path in adapter_dir.iterdir()}


def open_registry(data_dir: Path, loaded: LoadedModel, **options: Any) -> Registry:
    """A registry serving `loaded`, wired the way the server wires it."""
    options.setdefault("database_url", DATABASE_URL)
    return Registry(data_dir, compiler=loaded.prefix_compiler(MAX_VIRTUAL_TOKENS), **options)


def files_of(info: PrefixInfo) -> set[str]:
    """The files a version names: its compiled KV and its own parameters."""
    return {info.sha256} | ({info.parameters_sha256} if info.parameters_sha256 else set())


def blob_files(data_dir: Path) -> set[str]:
    """The content addresses of every tensor file on disk."""
    return {path.name.removesuffix(".safetensors") for path in (data_dir / "blobs").glob("*/*")}
