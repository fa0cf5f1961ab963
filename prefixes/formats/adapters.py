"""Read PEFT prompt-learning adapters and the native format; write the native format.

Only safetensors and JSON are ever parsed. Pickle-based files (`.bin`, `.pt`, ...) are refused
outright: unpickling an upload runs the uploader's code.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from prefixes.errors import InvalidPrefix, UnsupportedFormat
from prefixes.formats.kinds import PrefixKind, RawPrefix

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_TENSOR = "prompt_embeddings"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

NATIVE_FORMAT = "prefix-server"
NATIVE_VERSION = "1"
NATIVE_SOFT_PROMPT = "soft_prompt"  # [T, hidden]
NATIVE_PREFIX_KV = "prefix_kv"  # [layers, 2, kv_heads, T, head_dim]

# A header larger than this is not a prefix; refuse before parsing it.
MAX_HEADER_BYTES = 1 << 20
# Geometry fields of adapter_config.json (tokens, layers, heads, widths): far above any model.
MAX_CONFIG_INT = 1 << 20

# adapter_config.json fields kept with a PEFT upload's parameters, so that its export says
# the same (scalars only, each at most MAX_KEPT_CHARS long when written as JSON); the rest of
# the config follows from the kind and the tensor.
KEPT_PEFT_FIELDS = (
    "num_attention_heads",
    "prefix_projection",
    "encoder_hidden_size",
    "encoder_reparameterization_type",
    "encoder_num_layers",
    "encoder_dropout",
)
MAX_KEPT_CHARS = 256

_PEFT_KINDS = {
    "PREFIX_TUNING": PrefixKind.PREFIX_TUNING,
    "PROMPT_TUNING": PrefixKind.PROMPT_TUNING,
    "P_TUNING": PrefixKind.P_TUNING,
}


def read_upload(files: Mapping[str, bytes]) -> RawPrefix:
    """Read an upload: PEFT's two files, or one native `.safetensors` file.

    Keys are file names as the client sent them; only the base name counts.
    """
    by_name: dict[str, bytes] = {}
    for path, data in files.items():
        name = PurePosixPath(path.replace("\\", "/")).name
        if name in by_name:
            raise UnsupportedFormat(f"files: {name} was sent twice", field="files")
        by_name[name] = data
    for name in by_name:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise UnsupportedFormat(
                f"{name}: pickle-based files are never loaded (they can run code); save the "
                "adapter with safetensors: model.save_pretrained(dir, safe_serialization=True)",
                field="files",
            )
    if PEFT_CONFIG in by_name:
        if PEFT_WEIGHTS not in by_name:
            raise UnsupportedFormat(
                f"files: expected {PEFT_WEIGHTS} beside {PEFT_CONFIG}, found {sorted(by_name)}",
                field="files",
            )
        return read_peft(by_name[PEFT_CONFIG], by_name[PEFT_WEIGHTS])
    tensor_files = [name for name in by_name if name.lower().endswith(".safetensors")]
    if len(by_name) == 1 and len(tensor_files) == 1:
        return read_native(by_name[tensor_files[0]])
    raise UnsupportedFormat(
        f"files: expected {PEFT_CONFIG} + {PEFT_WEIGHTS} (PEFT save_pretrained) or one native "
        f".safetensors file, found {sorted(by_name) or 'no files'}",
        field="files",
    )


def read_peft(config_json: bytes, weights: bytes) -> RawPrefix:
    """Read what PEFT's `save_pretrained` writes for a prompt-learning adapter."""
    config = _parse_config(config_json)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in _PEFT_KINDS:
        raise UnsupportedFormat(
            f"peft_type: expected one of {sorted(_PEFT_KINDS)}, found {peft_type!r}"
            + (" (LoRA adapters are not prompt learning)" if peft_type == "LORA" else ""),
            field="peft_type",
        )
    kind = _PEFT_KINDS[peft_type]
    tensors, _ = _read_safetensors(weights, PEFT_WEIGHTS)
    if list(tensors) != [PEFT_TENSOR]:
        raise UnsupportedFormat(
            f"{PEFT_WEIGHTS}: expected one tensor named {PEFT_TENSOR!r}, found {sorted(tensors)}",
            field=PEFT_TENSOR,
        )
    weight = _float_matrix(tensors[PEFT_TENSOR], PEFT_TENSOR)
    num_virtual_tokens = _positive_int(config, "num_virtual_tokens")
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise InvalidPrefix(
            "num_transformer_submodules", 1, submodules, "only decoder-only models are served"
        )
    if weight.shape[0] != num_virtual_tokens:
        raise InvalidPrefix(
            f"{PEFT_TENSOR} rows", f"num_virtual_tokens = {num_virtual_tokens}", weight.shape[0]
        )
    metadata = {
        key: str(config[key])
        for key in ("base_model_name_or_path", "peft_version")
        if config.get(key) is not None
    }
    task_type = str(config.get("task_type"))
    kept = _kept_settings(config)
    if kind.is_soft_prompt:
        return RawPrefix(kind, weight, task_type, metadata, kept)
    return RawPrefix(kind, _peft_prefix_to_kv(weight, config), task_type, metadata, kept)


def _kept_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {
        key: config[key]
        for key in KEPT_PEFT_FIELDS
        if isinstance(config.get(key), str | int | float)
        and not (isinstance(config[key], float) and not math.isfinite(config[key]))
        and len(json.dumps(config[key])) <= MAX_KEPT_CHARS
    }


def _peft_prefix_to_kv(weight: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """PEFT's `[T, L*2*H*D]` -> canonical `[L, 2, H, T, D]`.

    PEFT views the row as `(2L, H, D)` with index `2l` the keys and `2l+1` the values of layer l
    (peft_model.get_prompt); for GQA models H is the number of KV heads.
    """
    num_layers = _positive_int(config, "num_layers")
    num_heads = _positive_int(config, "num_attention_heads")
    token_dim = _positive_int(config, "token_dim")
    if token_dim % num_heads:
        raise InvalidPrefix(
            "token_dim", f"a multiple of num_attention_heads ({num_heads})", token_dim
        )
    head_dim = token_dim // num_heads
    width = num_layers * 2 * num_heads * head_dim
    if weight.shape[1] != width:
        raise InvalidPrefix(
            f"{PEFT_TENSOR} columns",
            f"num_layers*2*num_attention_heads*head_dim = {num_layers}*2*{num_heads}*{head_dim}"
            f" = {width}",
            weight.shape[1],
        )
    tokens = weight.shape[0]
    kv = weight.view(tokens, num_layers, 2, num_heads, head_dim).permute(1, 2, 3, 0, 4)
    return kv.contiguous()


def read_native(data: bytes) -> RawPrefix:
    """Read the native single-file format (see docs/native-format.md)."""
    tensors, metadata = _read_safetensors(data, "native prefix")
    if metadata.get("format") != NATIVE_FORMAT:
        raise UnsupportedFormat(
            f"format: expected safetensors metadata format={NATIVE_FORMAT!r} (or PEFT's "
            f"{PEFT_CONFIG} + {PEFT_WEIGHTS}), found {metadata.get('format')!r}",
            field="format",
        )
    version = metadata.get("format_version")
    if version != NATIVE_VERSION:
        raise UnsupportedFormat(
            f"format_version: expected {NATIVE_VERSION!r}, found {version!r}",
            field="format_version",
        )
    kind_name = metadata.get("kind", "")
    try:
        kind = PrefixKind(kind_name)
    except ValueError:
        raise UnsupportedFormat(
            f"kind: expected one of {[k.value for k in PrefixKind]}, found {kind_name!r}",
            field="kind",
        ) from None
    name, ndim = (NATIVE_SOFT_PROMPT, 2) if kind.is_soft_prompt else (NATIVE_PREFIX_KV, 5)
    if list(tensors) != [name]:
        raise UnsupportedFormat(
            f"tensors: expected one tensor named {name!r} for kind {kind.value}, "
            f"found {sorted(tensors)}",
            field=name,
        )
    tensor = tensors[name]
    if tensor.ndim != ndim or not tensor.is_floating_point():
        raise InvalidPrefix(
            name, f"a {ndim}-d floating-point tensor", f"{tensor.ndim}-d {tensor.dtype}"
        )
    if not kind.is_soft_prompt and tensor.shape[1] != 2:
        raise InvalidPrefix(f"{name} dim 1", "2 (keys, values)", tensor.shape[1])
    extra = {k: v for k, v in metadata.items() if k not in ("format", "format_version", "kind")}
    task_type = extra.pop("task_type", "CAUSAL_LM")
    return RawPrefix(kind, tensor.float().contiguous(), task_type=task_type, metadata=extra)


def write_native(prefix: RawPrefix) -> bytes:
    """Serialise a raw prefix as one native safetensors file."""
    name = NATIVE_SOFT_PROMPT if prefix.kind.is_soft_prompt else NATIVE_PREFIX_KV
    metadata = {
        **prefix.metadata,
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_VERSION,
        "kind": prefix.kind.value,
        "task_type": prefix.task_type,
    }
    return save_safetensors({name: prefix.tensor.contiguous()}, metadata=metadata)


def _parse_config(config_json: bytes) -> dict[str, Any]:
    try:
        config = json.loads(config_json)
    # ValueError covers bad UTF-8, bad JSON and integers too long to convert.
    except (ValueError, RecursionError) as exc:
        raise UnsupportedFormat(
            f"{PEFT_CONFIG}: not valid JSON ({exc})", field=PEFT_CONFIG
        ) from None
    if not isinstance(config, dict):
        raise UnsupportedFormat(
            f"{PEFT_CONFIG}: expected a JSON object, found {type(config).__name__}",
            field=PEFT_CONFIG,
        )
    return config


def _read_safetensors(data: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors blob, checking the header's declared length before trusting it."""
    if len(data) < 8:
        raise UnsupportedFormat(f"{what}: not a safetensors file ({len(data)} bytes)", field=what)
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise UnsupportedFormat(
            f"{what}: safetensors header claims {header_len} bytes, file has {len(data) - 8}",
            field=what,
        )
    if header_len > MAX_HEADER_BYTES:
        raise UnsupportedFormat(
            f"{what}: safetensors header: expected at most {MAX_HEADER_BYTES} bytes, "
            f"found {header_len}",
            field=what,
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        tensors = load_safetensors(data)
    except Exception as exc:  # the parser raises several types; all mean "malformed"
        raise UnsupportedFormat(f"{what}: malformed safetensors ({exc})", field=what) from None
    if not isinstance(metadata, dict):
        raise UnsupportedFormat(f"{what}: malformed safetensors metadata", field=what)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _float_matrix(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise InvalidPrefix(
            name,
            "a 2-d floating-point tensor",
            f"{tensor.ndim}-d {tensor.dtype} {list(tensor.shape)}",
        )
    return tensor.float().contiguous()


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_CONFIG_INT:
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:40]}..."
        raise InvalidPrefix(
            f"{PEFT_CONFIG} {key}", f"a positive integer at most {MAX_CONFIG_INT}", shown
        )
    return value
