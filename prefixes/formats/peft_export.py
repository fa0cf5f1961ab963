"""Write a prefix's parameters back in PEFT's layout: the `adapter_config.json` and
`adapter_model.safetensors` that `save_pretrained` writes and `PeftModel.from_pretrained` loads,
packed in one zip archive.

The tensor is what PEFT saves for a prompt-learning adapter: a soft prompt's (or P-tuning
encoder's output) embeddings `[T, hidden]`, or prefix tuning's keys and values `[T, L*2*H*D]`
(with a projection, its output: PEFT keeps only that once it serves, `inference_mode`).
`read_peft` of these files gives back the same raw prefix.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

from safetensors.torch import save as save_safetensors

from prefixes.formats.adapters import KEPT_PEFT_FIELDS, PEFT_CONFIG, PEFT_TENSOR, PEFT_WEIGHTS
from prefixes.formats.kinds import PrefixKind, RawPrefix

_PEFT_TYPES = {
    PrefixKind.PREFIX_TUNING: "PREFIX_TUNING",
    PrefixKind.PROMPT_TUNING: "PROMPT_TUNING",
    PrefixKind.P_TUNING: "P_TUNING",
}
# Which kept settings each of PEFT's config classes takes (another would refuse the config).
_SETTINGS_OF = {
    PrefixKind.PREFIX_TUNING: {"prefix_projection", "encoder_hidden_size"},
    PrefixKind.PROMPT_TUNING: {"num_attention_heads"},
    PrefixKind.P_TUNING: {
        "num_attention_heads",
        "encoder_hidden_size",
        "encoder_reparameterization_type",
        "encoder_num_layers",
        "encoder_dropout",
    },
}
# Every entry's timestamp: the same prefix always makes the same archive bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def peft_files(prefix: RawPrefix, *, num_layers: int, base_model: str | None) -> dict[str, bytes]:
    """PEFT's two files for `prefix`. `num_layers` is the model's (a soft prompt's tensor does
    not say it); `base_model` names the model where the upload did not."""
    config = _config(prefix, num_layers, base_model)
    tensor = prefix.tensor
    if not prefix.kind.is_soft_prompt:  # canonical [L, 2, H, T, D] -> PEFT's [T, L*2*H*D]
        tensor = tensor.permute(3, 0, 1, 2, 4).reshape(tensor.shape[3], -1)
    weights = save_safetensors(
        {PEFT_TENSOR: tensor.float().contiguous()}, metadata={"format": "pt"}
    )
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return {PEFT_CONFIG: text.encode(), PEFT_WEIGHTS: weights}


def zip_archive(files: dict[str, bytes]) -> bytes:
    """The files at the archive's root, stored uncompressed (safetensors does not compress)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(files):
            archive.writestr(zipfile.ZipInfo(name, date_time=_ZIP_TIME), files[name])
    return buffer.getvalue()


def _config(prefix: RawPrefix, num_layers: int, base_model: str | None) -> dict[str, Any]:
    kind = prefix.kind
    config: dict[str, Any] = {
        "peft_type": _PEFT_TYPES[kind],
        "task_type": prefix.task_type,
        "num_virtual_tokens": prefix.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "num_layers": num_layers,
        "inference_mode": True,
        "base_model_name_or_path": prefix.metadata.get("base_model_name_or_path", base_model),
        "revision": None,
    }
    if "peft_version" in prefix.metadata:
        config["peft_version"] = prefix.metadata["peft_version"]
    if kind.is_soft_prompt:
        config["token_dim"] = prefix.tensor.shape[1]
        if kind is PrefixKind.PROMPT_TUNING:
            config["prompt_tuning_init"] = "RANDOM"  # how it began; serving never reads it
    else:
        layers, _, heads, _, head_dim = prefix.tensor.shape
        # PEFT's own layout for the model: one row holds every layer's keys and values, with
        # the KV heads as `num_attention_heads` (read_peft reads it back the same way).
        config.update(num_layers=layers, num_attention_heads=heads, token_dim=heads * head_dim)
        config.update(prefix_projection=False, encoder_hidden_size=heads * head_dim)
    allowed = _SETTINGS_OF[kind] & set(KEPT_PEFT_FIELDS)
    config.update(
        {
            key: value
            for key, value in prefix.peft_config.items()
            if key in allowed and isinstance(value, str | int | float)
        }
    )
    return config
