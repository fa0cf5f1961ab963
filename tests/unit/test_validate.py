"""Validation: a readable prefix must fit the loaded model's geometry and the configured limits.

Adapters are written by PEFT itself on tiny models; "another model" is a tiny model whose config
differs from the served one in exactly one dimension.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM

from prefixes import InvalidPrefix, ModelSpec, PrefixKind, RawPrefix, read_upload, validate
from server.models import freeze, spec_from_model
from tests.tiny import ADAPTER_KINDS, make_adapter, tiny_config, tiny_model

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MAX_VIRTUAL_TOKENS = 64
TOKENS = 5


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch) for arch in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="module")
def llama_spec(models) -> ModelSpec:
    return spec_from_model(models["llama"])


@pytest.fixture(scope="module")
def gpt2_spec(models) -> ModelSpec:
    return spec_from_model(models["gpt2"])


def variant(arch: str = "llama", **changes):
    """A tiny model of `arch` with some config values changed: another model's geometry."""
    config = tiny_config(arch)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return freeze(AutoModelForCausalLM.from_config(config))


def peft_files(base, kind: str, out_dir: Path, tokens: int = TOKENS) -> dict[str, bytes]:
    make_adapter(base, kind, tokens, out_dir, seed=1)
    return {name: (out_dir / name).read_bytes() for name in (CONFIG, WEIGHTS)}


def read_adapter(base, kind: str, out_dir: Path, tokens: int = TOKENS) -> RawPrefix:
    return read_upload(peft_files(base, kind, out_dir, tokens))


def rejected(raw: RawPrefix, spec: ModelSpec, max_virtual_tokens: int = MAX_VIRTUAL_TOKENS):
    with pytest.raises(InvalidPrefix) as err:
        validate(raw, spec, max_virtual_tokens)
    return err.value


def test_specs_of_the_tiny_models(llama_spec, gpt2_spec):
    """The geometry every test below relies on."""
    assert (llama_spec.num_layers, llama_spec.hidden_size) == (3, 64)
    assert (llama_spec.num_kv_heads, llama_spec.head_dim) == (2, 24)
    assert (gpt2_spec.num_kv_heads, gpt2_spec.head_dim, gpt2_spec.max_positions) == (4, 16, 128)
    assert gpt2_spec.absolute_positions and not llama_spec.absolute_positions


# --- what fits passes -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_adapters_made_on_the_served_model_pass(models, tmp_path, arch, kind):
    raw = read_adapter(models[arch], kind, tmp_path)
    assert validate(raw, spec_from_model(models[arch]), MAX_VIRTUAL_TOKENS) is None


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_exactly_max_virtual_tokens_passes(models, llama_spec, tmp_path, kind):
    raw = read_adapter(models["llama"], kind, tmp_path, tokens=8)
    assert validate(raw, llama_spec, max_virtual_tokens=8) is None


# --- task type ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("task_type", ["SEQ_2_SEQ_LM", "SEQ_CLS", "causal_lm"])
def test_wrong_task_type(models, llama_spec, tmp_path, kind, task_type):
    files = peft_files(models["llama"], kind, tmp_path)
    config = json.loads(files[CONFIG])
    config["task_type"] = task_type
    raw = read_upload({**files, CONFIG: json.dumps(config).encode()})
    err = rejected(raw, llama_spec)
    assert err.field == "task_type"
    assert str(err) == f"task_type: expected CAUSAL_LM, found {task_type}"


def test_missing_task_type(models, llama_spec, tmp_path):
    files = peft_files(models["llama"], "prompt", tmp_path)
    config = json.loads(files[CONFIG])
    del config["task_type"]
    err = rejected(read_upload({**files, CONFIG: json.dumps(config).encode()}), llama_spec)
    assert "task_type" in str(err) and "expected CAUSAL_LM" in str(err) and "found None" in str(err)


def test_native_task_type_is_checked(llama_spec):
    raw = RawPrefix(PrefixKind.PROMPT_TUNING, torch.zeros(TOKENS, 64), task_type="TOKEN_CLS")
    err = rejected(raw, llama_spec)
    assert (
        "task_type" in str(err)
        and "expected CAUSAL_LM" in str(err)
        and "found TOKEN_CLS" in str(err)
    )


# --- geometry of another model --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prefix", "prefix_projection"])
@pytest.mark.parametrize(
    ("changes", "field", "expected", "found"),
    [
        ({"num_hidden_layers": 5}, "num_layers", 3, 5),
        ({"num_hidden_layers": 2}, "num_layers", 3, 2),
        ({"num_key_value_heads": 4}, "num_kv_heads", 2, 4),
        ({"num_key_value_heads": 1}, "num_kv_heads", 2, 1),
        ({"head_dim": 16}, "head_dim", 24, 16),
        ({"head_dim": 32}, "head_dim", 24, 32),
    ],
)
def test_prefix_from_another_geometry(llama_spec, tmp_path, kind, changes, field, expected, found):
    raw = read_adapter(variant("llama", **changes), kind, tmp_path)
    err = rejected(raw, llama_spec)
    msg = str(err)
    assert err.field == field
    assert msg.startswith(f"{field}:") and f"expected {expected}" in msg and f"found {found}" in msg
    assert "another model" in msg


@pytest.mark.parametrize(
    ("arch", "field", "expected", "found"),
    [("qwen2", "head_dim", 24, 16), ("gpt2", "num_kv_heads", 2, 4)],
)
def test_prefix_from_another_architecture(
    models, llama_spec, tmp_path, arch, field, expected, found
):
    raw = read_adapter(models[arch], "prefix", tmp_path)
    err = rejected(raw, llama_spec)
    assert err.field == field
    assert f"{field}: expected {expected}, found {found}" in str(err)


@pytest.mark.parametrize("kind", ["prompt", "p_tuning"])
@pytest.mark.parametrize("hidden", [96, 32])
def test_soft_prompt_from_another_hidden_size(llama_spec, tmp_path, kind, hidden):
    raw = read_adapter(variant("llama", hidden_size=hidden), kind, tmp_path)
    err = rejected(raw, llama_spec)
    msg = str(err)
    assert err.field == "hidden_size"
    assert msg.startswith("hidden_size:") and "expected 64" in msg and f"found {hidden}" in msg


def test_soft_prompt_ignores_kv_geometry(models, llama_spec, tmp_path):
    """A soft prompt only meets the model at its embeddings: other depths and heads are fine."""
    raw = read_adapter(
        variant("llama", num_hidden_layers=5, num_key_value_heads=4), "prompt", tmp_path
    )
    assert validate(raw, llama_spec, MAX_VIRTUAL_TOKENS) is None


# --- number of virtual tokens ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_more_tokens_than_configured(models, llama_spec, tmp_path, kind):
    raw = read_adapter(models["llama"], kind, tmp_path, tokens=9)
    err = rejected(raw, llama_spec, max_virtual_tokens=8)
    msg = str(err)
    assert err.field == "num_virtual_tokens"
    assert msg == "num_virtual_tokens: expected between 1 and 8, found 9"


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_gpt2_positions_leave_room_for_one_real_token(models, gpt2_spec, tmp_path, kind):
    n_positions = gpt2_spec.max_positions
    fits = read_adapter(models["gpt2"], kind, tmp_path / "fits", tokens=n_positions - 1)
    assert validate(fits, gpt2_spec, max_virtual_tokens=1000) is None

    for tokens in (n_positions, n_positions + 3):
        raw = read_adapter(models["gpt2"], kind, tmp_path / str(tokens), tokens=tokens)
        err = rejected(raw, gpt2_spec, max_virtual_tokens=1000)
        msg = str(err)
        assert err.field == "num_virtual_tokens"
        assert f"expected between 1 and {n_positions - 1}" in msg and f"found {tokens}" in msg


def test_rotary_model_positions_also_bound(models, llama_spec, tmp_path):
    tokens = llama_spec.max_positions  # 512: prompt tuning is cheap at this size
    raw = read_adapter(models["llama"], "prompt", tmp_path, tokens=tokens)
    err = rejected(raw, llama_spec, max_virtual_tokens=10_000)
    assert f"expected between 1 and {tokens - 1}" in str(err) and f"found {tokens}" in str(err)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [(PrefixKind.PROMPT_TUNING, (0, 64)), (PrefixKind.PREFIX_TUNING, (3, 2, 2, 0, 24))],
)
def test_zero_tokens(llama_spec, kind, shape):
    err = rejected(RawPrefix(kind, torch.zeros(shape)), llama_spec)
    assert str(err) == f"num_virtual_tokens: expected between 1 and {MAX_VIRTUAL_TOKENS}, found 0"


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
@pytest.mark.parametrize(
    ("bad", "count"),
    [([float("nan")], 1), ([float("inf")], 1), ([float("nan"), float("inf"), float("-inf")], 3)],
)
def test_nan_and_inf(models, llama_spec, tmp_path, kind, bad, count):
    files = peft_files(models["llama"], kind, tmp_path)
    weight = load_safetensors(files[WEIGHTS])["prompt_embeddings"].clone()
    for i, value in enumerate(bad):
        weight[i % weight.shape[0], 7 * i] = value
    broken = {**files, WEIGHTS: save_safetensors({"prompt_embeddings": weight})}
    err = rejected(read_upload(broken), llama_spec)
    msg = str(err)
    assert err.field == "values"
    assert msg == f"values: expected finite numbers, found {count} NaN or Inf values"


def test_nan_in_native_prefix_kv(llama_spec):
    kv = torch.randn(3, 2, 2, TOKENS, 24)
    kv[2, 1, 0, 4, 23] = float("nan")
    kv[0, 0, 1, 0, 0] = float("nan")
    err = rejected(RawPrefix(PrefixKind.PREFIX_TUNING, kv), llama_spec)
    assert "values" in str(err) and "expected finite numbers" in str(err)
    assert "found 2 NaN or Inf values" in str(err)


# --- errors as data -------------------------------------------------------------------------


def test_invalid_prefix_to_dict(llama_spec, tmp_path):
    raw = read_adapter(variant("llama", num_hidden_layers=5), "prefix", tmp_path)
    err = rejected(raw, llama_spec)
    data = err.to_dict()
    assert data["type"] == "InvalidPrefix"
    assert data["field"] == "num_layers"
    assert data["expected"] == "3" and data["found"] == "5"
    assert data["message"] == str(err)
    assert "num_layers" in data["message"] and "expected 3" in data["message"]
    json.dumps(data)  # goes straight into an HTTP error body


def test_to_dict_of_limit_and_values_errors(models, llama_spec, tmp_path):
    raw = read_adapter(models["llama"], "prompt", tmp_path, tokens=9)
    data = rejected(raw, llama_spec, max_virtual_tokens=8).to_dict()
    assert (data["field"], data["expected"], data["found"]) == (
        "num_virtual_tokens",
        "between 1 and 8",
        "9",
    )
    raw.tensor[0, 0] = float("inf")
    data = rejected(raw, llama_spec).to_dict()
    assert (data["field"], data["expected"], data["found"]) == (
        "values",
        "finite numbers",
        "1 NaN or Inf values",
    )
