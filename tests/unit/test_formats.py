"""Reading uploads: PEFT's own save_pretrained output, the native format, and every refusal.

Every adapter here is written by PEFT itself (tests/tiny.make_adapter) on a tiny random model;
broken cases are made by editing the files PEFT wrote.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shlex
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from prefixes import (
    InvalidPrefix,
    PrefixKind,
    RawPrefix,
    UnsupportedFormat,
    read_native,
    read_upload,
    write_native,
)
from prefixes.formats.adapters import MAX_HEADER_BYTES
from tests.tiny import ADAPTER_KINDS, make_adapter, tiny_model

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
TOKENS = 5

EXPECTED_KIND = {
    "prefix": PrefixKind.PREFIX_TUNING,
    "prefix_projection": PrefixKind.PREFIX_TUNING,
    "prompt": PrefixKind.PROMPT_TUNING,
    "p_tuning": PrefixKind.P_TUNING,
}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")  # GQA (2 KV heads of 4) and head_dim 24 != hidden / heads


def peft_files(base, kind: str, out_dir: Path, tokens: int = TOKENS) -> dict[str, bytes]:
    """Every file PEFT's save_pretrained wrote (README.md included), by name."""
    make_adapter(base, kind, tokens, out_dir, seed=1)
    return {path.name: path.read_bytes() for path in out_dir.iterdir()}


def edit_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(files[CONFIG])
    config.update(changes)
    return {**files, CONFIG: json.dumps(config).encode()}


def weight(files: dict[str, bytes]) -> torch.Tensor:
    return load_safetensors(files[WEIGHTS])["prompt_embeddings"]


def with_tensors(files: dict[str, bytes], tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {**files, WEIGHTS: save_safetensors(tensors, metadata={"format": "pt"})}


def native(tensors: dict[str, torch.Tensor], **metadata: str) -> bytes:
    meta = {"format": "prefix-server", "format_version": "1", "kind": "prompt_tuning"}
    meta.update(metadata)
    return save_safetensors(tensors, metadata={k: v for k, v in meta.items() if v is not None})


def bits(tensor: torch.Tensor) -> torch.Tensor:
    assert tensor.dtype == torch.float32
    return tensor.contiguous().view(torch.int32)


# --- PEFT round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_peft_pair_round_trip(llama, kind, tmp_path):
    peft_model = make_adapter(llama, kind, TOKENS, tmp_path, seed=1)
    files = {name: (tmp_path / name).read_bytes() for name in (CONFIG, WEIGHTS)}
    w = weight(files)

    raw = read_upload(files)

    assert raw.kind is EXPECTED_KIND[kind]
    assert raw.num_virtual_tokens == TOKENS
    assert raw.task_type == "CAUSAL_LM"
    assert raw.tensor.dtype == torch.float32
    config = json.loads(files[CONFIG])
    assert raw.metadata == {"peft_version": config["peft_version"]}  # base model: None, dropped
    if raw.kind.is_soft_prompt:
        assert raw.tensor.shape == (TOKENS, 64)
        assert torch.equal(raw.tensor, w)
        return
    layers, heads, head_dim = 3, 2, 24  # llama: KV heads, and its own head_dim
    assert raw.tensor.shape == (layers, 2, heads, TOKENS, head_dim)
    # The documented PEFT layout, index by index:
    # K_l[h, t, d] = W[t, (2l*H + h)*D + d], V_l[h, t, d] = W[t, ((2l+1)*H + h)*D + d].
    for layer in range(layers):
        for head in range(heads):
            for which, row in ((0, 2 * layer), (1, 2 * layer + 1)):
                start = (row * heads + head) * head_dim
                assert torch.equal(
                    raw.tensor[layer, which, head], w[:, start : start + head_dim]
                ), (layer, which, head)
    # And PEFT's own runtime prefix agrees with it.
    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1)
    for layer in range(layers):
        torch.testing.assert_close(raw.tensor[layer, 0], cache.layers[layer].keys[0])
        torch.testing.assert_close(raw.tensor[layer, 1], cache.layers[layer].values[0])


def test_peft_upload_with_readme_and_paths_is_read(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    assert "README.md" in files  # PEFT writes it; it is ignored
    uploaded = {
        "some/dir/adapter_config.json": files[CONFIG],
        "C:\\Users\\me\\adapter_model.safetensors": files[WEIGHTS],
        "../README.md": files["README.md"],
    }
    raw = read_upload(uploaded)
    assert raw.kind is PrefixKind.PROMPT_TUNING
    assert torch.equal(raw.tensor, weight(files))


# --- native format --------------------------------------------------------------------------


def special_values(*shape: int) -> torch.Tensor:
    tensor = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    flat = tensor.view(-1)
    flat[:4] = torch.tensor([-0.0, 1e-45, float("inf"), -3.4e38])  # sign, subnormal, inf, max
    return tensor


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        (PrefixKind.PROMPT_TUNING, (TOKENS, 64)),
        (PrefixKind.P_TUNING, (TOKENS, 64)),
        (PrefixKind.PREFIX_TUNING, (3, 2, 2, TOKENS, 24)),
    ],
)
def test_native_round_trip_is_bitwise(kind, shape):
    prefix = RawPrefix(
        kind, special_values(*shape), metadata={"name": "alice", "base_model_name_or_path": "m"}
    )
    data = write_native(prefix)

    for raw in (read_native(data), read_upload({"alice.safetensors": data})):
        assert raw.kind is kind
        assert raw.task_type == "CAUSAL_LM"
        assert raw.metadata == {"name": "alice", "base_model_name_or_path": "m"}
        assert raw.tensor.shape == shape
        assert torch.equal(bits(raw.tensor), bits(prefix.tensor))


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_peft_to_native_round_trip(llama, kind, tmp_path):
    first = read_upload(peft_files(llama, kind, tmp_path))
    again = read_upload({"dir/x.safetensors": write_native(first)})
    assert again.kind is first.kind
    assert again.task_type == first.task_type
    assert again.metadata == first.metadata
    assert torch.equal(bits(again.tensor), bits(first.tensor))


def test_native_non_float32_is_read_as_float32():
    tensor = torch.randn(TOKENS, 64).to(torch.bfloat16)
    raw = read_native(native({"soft_prompt": tensor}))
    assert raw.tensor.dtype == torch.float32
    assert torch.equal(raw.tensor, tensor.float())


def test_peft_weights_alone_are_not_native(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    with pytest.raises(UnsupportedFormat) as err:
        read_upload({WEIGHTS: files[WEIGHTS]})
    msg = str(err.value)
    assert err.value.field == "format"
    assert "format" in msg and "expected" in msg and "'prefix-server'" in msg
    assert "found 'pt'" in msg and CONFIG in msg  # says what else would have worked


@pytest.mark.parametrize(
    ("metadata", "field", "expected", "found"),
    [
        ({"format": "pt"}, "format", "'prefix-server'", "found 'pt'"),
        ({"format": None}, "format", "'prefix-server'", "found None"),
        ({"format_version": "2"}, "format_version", "expected '1'", "found '2'"),
        ({"format_version": None}, "format_version", "expected '1'", "found None"),
        ({"kind": "lora"}, "kind", "'prefix_tuning'", "found 'lora'"),
        ({"kind": None}, "kind", "'prompt_tuning'", "found ''"),
    ],
)
def test_native_bad_metadata(metadata, field, expected, found):
    data = native({"soft_prompt": torch.zeros(TOKENS, 64)}, **metadata)
    with pytest.raises(UnsupportedFormat) as err:
        read_upload({"p.safetensors": data})
    msg = str(err.value)
    assert err.value.field == field
    assert msg.startswith(f"{field}:") and "expected" in msg and expected in msg and found in msg


@pytest.mark.parametrize(
    ("kind", "tensors", "expected"),
    [
        ("prompt_tuning", {"prefix_kv": torch.zeros(3, 2, 2, TOKENS, 24)}, "'soft_prompt'"),
        ("prefix_tuning", {"soft_prompt": torch.zeros(TOKENS, 64)}, "'prefix_kv'"),
        ("p_tuning", {"embeddings": torch.zeros(TOKENS, 64)}, "'soft_prompt'"),
    ],
)
def test_native_wrong_tensor_name(kind, tensors, expected):
    with pytest.raises(UnsupportedFormat) as err:
        read_native(native(tensors, kind=kind))
    msg = str(err.value)
    assert "tensors: expected one tensor named" in msg and expected in msg
    assert f"for kind {kind}" in msg and f"found {sorted(tensors)}" in msg


def test_native_extra_tensor():
    tensors = {"soft_prompt": torch.zeros(TOKENS, 64), "extra": torch.zeros(1)}
    with pytest.raises(UnsupportedFormat) as err:
        read_native(native(tensors))
    assert "'soft_prompt'" in str(err.value) and "found ['extra', 'soft_prompt']" in str(err.value)


@pytest.mark.parametrize(
    ("kind", "tensor", "name", "expected", "found"),
    [
        ("prefix_tuning", torch.zeros(3, 2, TOKENS), "prefix_kv", "a 5-d", "found 3-d"),
        ("prefix_tuning", torch.zeros(3, 2, 2, 1, TOKENS, 24), "prefix_kv", "a 5-d", "found 6-d"),
        ("prompt_tuning", torch.zeros(1, TOKENS, 64), "soft_prompt", "a 2-d", "found 3-d"),
        ("p_tuning", torch.zeros(64), "soft_prompt", "a 2-d", "found 1-d"),
        ("prompt_tuning", torch.zeros(TOKENS, 64, dtype=torch.int32), "soft_prompt", "a 2-d",
         "found 2-d torch.int32"),
    ],
)  # fmt: skip
def test_native_wrong_ndim_or_dtype(kind, tensor, name, expected, found):
    with pytest.raises(InvalidPrefix) as err:
        read_native(native({name: tensor}, kind=kind))
    msg = str(err.value)
    assert err.value.field == name
    assert msg.startswith(f"{name}:") and f"expected {expected}" in msg and "floating" in msg
    assert found in msg


def test_native_prefix_kv_needs_keys_and_values():
    data = native({"prefix_kv": torch.zeros(3, 3, 2, TOKENS, 24)}, kind="prefix_tuning")
    with pytest.raises(InvalidPrefix) as err:
        read_native(data)
    msg = str(err.value)
    assert "prefix_kv dim 1" in msg and "expected 2" in msg and "found 3" in msg


# --- pickles are never loaded ---------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious `.bin` upload looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_the_malicious_pickle_is_live(tmp_path):
    """Control: the payload used below really runs code when unpickled."""
    marker = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # running it is the point
    assert marker.exists()


@pytest.mark.parametrize(
    "name", ["adapter_model.bin", "x.pt", "deep/dir/model.PTH", "a.ckpt", "b.pkl", "c.pickle"]
)
def test_pickle_files_are_refused_without_being_loaded(llama, tmp_path, name):
    files = peft_files(llama, "prompt", tmp_path / "adapter")
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(_RunsCode(marker))
    uploads = [
        {CONFIG: files[CONFIG], name: payload},
        {name: payload},
        {**files, name: payload},  # a pickle next to a perfectly good safetensors pair
    ]
    for upload in uploads:
        with pytest.raises(UnsupportedFormat) as err:
            read_upload(upload)
        msg = str(err.value)
        assert err.value.field == "files"
        assert msg.startswith(f"{Path(name).name}:") and "pickle" in msg and "safetensors" in msg
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_not_loaded(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path / "adapter")
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(_RunsCode(marker))
    for upload in ({**files, WEIGHTS: payload}, {"x.safetensors": payload}):
        with pytest.raises(UnsupportedFormat):
            read_upload(upload)
    torch_saved = tmp_path / "t.pt"
    torch.save(_RunsCode(marker), torch_saved)
    with pytest.raises(UnsupportedFormat):
        read_upload({**files, WEIGHTS: torch_saved.read_bytes()})
    assert not marker.exists()


# --- adapter_config.json --------------------------------------------------------------------


def test_lora_adapter_is_refused(llama, tmp_path):
    lora = get_peft_model(
        copy.deepcopy(llama), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])
    )
    lora.save_pretrained(tmp_path)
    files = {name: (tmp_path / name).read_bytes() for name in (CONFIG, WEIGHTS)}
    with pytest.raises(UnsupportedFormat) as err:
        read_upload(files)
    msg = str(err.value)
    assert err.value.field == "peft_type"
    assert "peft_type: expected one of" in msg and "PREFIX_TUNING" in msg and "P_TUNING" in msg
    assert "found 'LORA'" in msg and "LoRA" in msg


@pytest.mark.parametrize(
    ("value", "found"),
    [("ADAPTION_PROMPT", "found 'ADAPTION_PROMPT'"), ("prompt_tuning", "found 'prompt_tuning'"),
     (None, "found None"), (3, "found 3")],
)  # fmt: skip
def test_unknown_peft_type(llama, tmp_path, value, found):
    files = edit_config(peft_files(llama, "prompt", tmp_path), peft_type=value)
    with pytest.raises(UnsupportedFormat) as err:
        read_upload(files)
    msg = str(err.value)
    assert err.value.field == "peft_type"
    assert "peft_type: expected one of" in msg and "PROMPT_TUNING" in msg and found in msg
    assert "LoRA" not in msg


def test_missing_peft_type(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    config = json.loads(files[CONFIG])
    del config["peft_type"]
    with pytest.raises(UnsupportedFormat) as err:
        read_upload({**files, CONFIG: json.dumps(config).encode()})
    assert "peft_type" in str(err.value) and "found None" in str(err.value)


@pytest.mark.parametrize("value", [["PROMPT_TUNING"], {"type": "PROMPT_TUNING"}])
def test_unhashable_peft_type(llama, tmp_path, value):
    files = edit_config(peft_files(llama, "prompt", tmp_path), peft_type=value)
    with pytest.raises(UnsupportedFormat) as err:
        read_upload(files)
    assert "peft_type" in str(err.value) and "expected one of" in str(err.value)


@pytest.mark.parametrize(
    "config",
    [b"", b"{", b'{"peft_type": "PROMPT_TUNING",}', b"\x80\x81\x82", b"NaN-ish nonsense"],
)
def test_config_that_is_not_json(llama, tmp_path, config):
    files = peft_files(llama, "prompt", tmp_path)
    with pytest.raises(UnsupportedFormat) as err:
        read_upload({**files, CONFIG: config})
    assert err.value.field == CONFIG
    assert str(err.value).startswith(f"{CONFIG}: not valid JSON")


def test_truncated_config(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    with pytest.raises(UnsupportedFormat) as err:
        read_upload({**files, CONFIG: files[CONFIG][: len(files[CONFIG]) // 2]})
    assert err.value.field == CONFIG and "not valid JSON" in str(err.value)


def test_deeply_nested_config(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    with pytest.raises(UnsupportedFormat) as err:
        read_upload({**files, CONFIG: b"[" * 100_000})
    assert err.value.field == CONFIG


@pytest.mark.parametrize(
    ("config", "found"), [(b"[]", "found list"), (b'"PROMPT_TUNING"', "found str"),
                          (b"null", "found NoneType"), (b"7", "found int")],
)  # fmt: skip
def test_config_that_is_not_an_object(llama, tmp_path, config, found):
    files = peft_files(llama, "prompt", tmp_path)
    with pytest.raises(UnsupportedFormat) as err:
        read_upload({**files, CONFIG: config})
    msg = str(err.value)
    assert err.value.field == CONFIG
    assert msg.startswith(f"{CONFIG}:") and "expected a JSON object" in msg and found in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [("num_virtual_tokens", 0), ("num_virtual_tokens", -5), ("num_virtual_tokens", "5"),
     ("num_virtual_tokens", 5.0), ("num_virtual_tokens", True), ("num_virtual_tokens", None)],
)  # fmt: skip
def test_num_virtual_tokens_must_be_a_positive_int(llama, tmp_path, key, value):
    files = edit_config(peft_files(llama, "prompt", tmp_path), **{key: value})
    with pytest.raises(InvalidPrefix) as err:
        read_upload(files)
    msg = str(err.value)
    assert key in msg and "expected a positive integer" in msg and f"found {value!r}" in msg


@pytest.mark.parametrize("key", ["num_layers", "num_attention_heads", "token_dim"])
def test_prefix_tuning_needs_its_geometry(llama, tmp_path, key):
    files = peft_files(llama, "prefix", tmp_path)
    config = json.loads(files[CONFIG])
    del config[key]
    with pytest.raises(InvalidPrefix) as err:
        read_upload({**files, CONFIG: json.dumps(config).encode()})
    msg = str(err.value)
    assert key in msg and "expected a positive integer" in msg and "found None" in msg


def test_seq2seq_submodules_are_refused(llama, tmp_path):
    files = edit_config(peft_files(llama, "prompt", tmp_path), num_transformer_submodules=2)
    with pytest.raises(InvalidPrefix) as err:
        read_upload(files)
    msg = str(err.value)
    assert err.value.field == "num_transformer_submodules"
    assert "num_transformer_submodules: expected 1, found 2" in msg and "decoder-only" in msg


# --- which files ----------------------------------------------------------------------------


def test_missing_weights_beside_config(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    upload = {CONFIG: files[CONFIG], "README.md": files["README.md"], "w.safetensors": b"x"}
    with pytest.raises(UnsupportedFormat) as err:
        read_upload(upload)
    msg = str(err.value)
    assert err.value.field == "files"
    assert f"expected {WEIGHTS} beside {CONFIG}" in msg
    assert f"found {sorted(upload)}" in msg


def test_no_files():
    with pytest.raises(UnsupportedFormat) as err:
        read_upload({})
    msg = str(err.value)
    assert err.value.field == "files"
    assert msg.startswith("files: expected") and CONFIG in msg and "found no files" in msg


@pytest.mark.parametrize(
    "upload",
    [
        {"notes.txt": b"hi"},
        {"weights.npz": b"PK", "config.yaml": b"a: 1"},
        {"a.safetensors": b"x", "b.safetensors": b"y"},  # two native files: which one?
        {"a.safetensors": b"x", "README.md": b"y"},
        {"adapter_config.yaml": b"x", WEIGHTS: b"y"},
    ],
)
def test_unrelated_file_names(upload):
    with pytest.raises(UnsupportedFormat) as err:
        read_upload(upload)
    msg = str(err.value)
    assert err.value.field == "files"
    assert msg.startswith("files: expected") and CONFIG in msg and WEIGHTS in msg
    assert f"found {sorted(upload)}" in msg


def test_path_components_are_reduced_to_base_names():
    upload = {
        "some/dir/adapter_config.json": b"{}",
        "/abs/path/notes.txt": b"",
        "..\\..\\win\\readme.md": b"",
    }
    with pytest.raises(UnsupportedFormat) as err:
        read_upload(upload)
    msg = str(err.value)
    assert f"found {sorted([CONFIG, 'notes.txt', 'readme.md'])}" in msg
    assert "some/dir" not in msg and "/abs" not in msg and "win" not in msg


# --- the safetensors file -------------------------------------------------------------------


def test_wrong_tensor_name(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    broken = with_tensors(files, {"prompt_embeddings.weight": weight(files)})
    with pytest.raises(UnsupportedFormat) as err:
        read_upload(broken)
    msg = str(err.value)
    assert err.value.field == "prompt_embeddings"
    assert msg.startswith(f"{WEIGHTS}: expected one tensor named 'prompt_embeddings'")
    assert "found ['prompt_embeddings.weight']" in msg


def test_missing_tensor(llama, tmp_path):
    files = with_tensors(peft_files(llama, "prefix", tmp_path), {})
    with pytest.raises(UnsupportedFormat) as err:
        read_upload(files)
    assert "expected one tensor named 'prompt_embeddings'" in str(err.value)
    assert "found []" in str(err.value)


def test_extra_tensor(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    broken = with_tensors(files, {"prompt_embeddings": weight(files), "extra": torch.zeros(2)})
    with pytest.raises(UnsupportedFormat) as err:
        read_upload(broken)
    assert "expected one tensor named 'prompt_embeddings'" in str(err.value)
    assert "found ['extra', 'prompt_embeddings']" in str(err.value)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("<Q", 16) + b"not json at all!",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 2) + b"{}" + b"\x00" * 7,  # trailing bytes, no tensors declared
        struct.pack("<Q", 40) + b'{"t": {"dtype": "F32", "shape": [2], "x": 1}}'[:40],
    ],
)
def test_malformed_safetensors(llama, tmp_path, data):
    files = peft_files(llama, "prompt", tmp_path)
    with pytest.raises(UnsupportedFormat) as err:
        read_upload({**files, WEIGHTS: data})
    assert err.value.field == WEIGHTS and str(err.value).startswith(f"{WEIGHTS}:")


def test_random_garbage(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    garbage = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    for data in (bytes(garbage.to(torch.uint8).tolist()), b"\x00" * 4096, b"\xff" * 4096):
        with pytest.raises(UnsupportedFormat) as err:
            read_upload({**files, WEIGHTS: data})
        assert err.value.field == WEIGHTS and "safetensors" in str(err.value)
        with pytest.raises(UnsupportedFormat):
            read_upload({"garbage.safetensors": data})


def test_enormous_header_length_is_refused_without_allocating(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    data = struct.pack("<Q", 2**60) + b'{"prompt_embeddings": {}}'
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedFormat) as err:
            read_upload({**files, WEIGHTS: data})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(err.value)
    assert err.value.field == WEIGHTS
    assert msg.startswith(f"{WEIGHTS}:") and f"claims {2**60} bytes" in msg
    assert f"file has {len(data) - 8}" in msg
    assert peak < 1 << 20  # refused from the header alone: nothing near 2**60 was allocated


def test_header_over_the_limit_names_the_limit():
    data = native({"soft_prompt": torch.zeros(TOKENS, 64)}, pad="x" * (MAX_HEADER_BYTES + 10))
    with pytest.raises(UnsupportedFormat) as err:
        read_native(data)
    msg = str(err.value)
    assert "expected" in msg and (str(MAX_HEADER_BYTES) in msg or "1 MiB" in msg)


@pytest.mark.parametrize("keep", [0, 4, 7, 8, 20, "header", "half", -1])
def test_truncated_weights(llama, tmp_path, keep):
    files = peft_files(llama, "prefix", tmp_path)
    data = files[WEIGHTS]
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    cut = {"header": header_end, "half": (header_end + len(data)) // 2}.get(keep, keep)
    truncated = data[:cut]
    assert len(truncated) < len(data)
    with pytest.raises(UnsupportedFormat) as err:
        read_upload({**files, WEIGHTS: truncated})
    msg = str(err.value)
    assert err.value.field == WEIGHTS and msg.startswith(f"{WEIGHTS}:")
    if len(truncated) < 8:
        assert f"not a safetensors file ({len(truncated)} bytes)" in msg
    elif len(truncated) < header_end:
        assert f"file has {len(truncated) - 8}" in msg
    else:
        assert "malformed safetensors" in msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool])
def test_integer_dtype(llama, tmp_path, dtype):
    files = peft_files(llama, "prompt", tmp_path)
    broken = with_tensors(files, {"prompt_embeddings": weight(files).to(dtype)})
    with pytest.raises(InvalidPrefix) as err:
        read_upload(broken)
    msg = str(err.value)
    assert err.value.field == "prompt_embeddings"
    assert "expected a 2-d floating-point tensor" in msg and f"found 2-d {dtype}" in msg


def test_half_precision_weights_are_accepted(llama, tmp_path):
    files = peft_files(llama, "prompt", tmp_path)
    half = weight(files).to(torch.bfloat16)
    raw = read_upload(with_tensors(files, {"prompt_embeddings": half}))
    assert raw.tensor.dtype == torch.float32 and torch.equal(raw.tensor, half.float())


@pytest.mark.parametrize("shape", [(TOKENS * 64,), (1, TOKENS, 64)])
def test_wrong_tensor_rank(llama, tmp_path, shape):
    files = peft_files(llama, "prompt", tmp_path)
    broken = with_tensors(files, {"prompt_embeddings": weight(files).reshape(shape)})
    with pytest.raises(InvalidPrefix) as err:
        read_upload(broken)
    msg = str(err.value)
    assert "prompt_embeddings" in msg and "expected a 2-d" in msg
    assert f"found {len(shape)}-d torch.float32 {list(shape)}" in msg


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("claimed", [TOKENS + 2, TOKENS - 1])
def test_rows_differ_from_num_virtual_tokens(llama, tmp_path, kind, claimed):
    files = edit_config(peft_files(llama, kind, tmp_path), num_virtual_tokens=claimed)
    with pytest.raises(InvalidPrefix) as err:
        read_upload(files)
    msg = str(err.value)
    assert err.value.field == "prompt_embeddings rows"
    assert f"expected num_virtual_tokens = {claimed}" in msg and f"found {TOKENS}" in msg


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"num_layers": 5}, "5*2*2*24 = 480"),
        ({"num_layers": 2}, "2*2*2*24 = 192"),
        ({"num_attention_heads": 4, "token_dim": 64}, "3*2*4*16 = 384"),
        ({"token_dim": 32}, "3*2*2*16 = 192"),
    ],
)
def test_prefix_width_does_not_match_config(llama, tmp_path, changes, expected):
    files = edit_config(peft_files(llama, "prefix", tmp_path), **changes)
    with pytest.raises(InvalidPrefix) as err:
        read_upload(files)
    msg = str(err.value)
    assert err.value.field == "prompt_embeddings columns"
    assert "num_layers*2*num_attention_heads*head_dim" in msg
    assert f"expected num_layers*2*num_attention_heads*head_dim = {expected}" in msg
    assert "found 288" in msg  # 3 layers * 2 * 2 KV heads * 24


def test_token_dim_not_a_multiple_of_heads(llama, tmp_path):
    files = edit_config(peft_files(llama, "prefix", tmp_path), token_dim=49)
    with pytest.raises(InvalidPrefix) as err:
        read_upload(files)
    msg = str(err.value)
    assert err.value.field == "token_dim"
    assert "expected a multiple of num_attention_heads (2)" in msg and "found 49" in msg


def test_two_files_with_the_same_base_name_are_refused(llama, tmp_path):
    files = peft_files(llama, "prefix", tmp_path)
    config = files["adapter_config.json"]
    files = {**files, "a/adapter_config.json": config}
    with pytest.raises(UnsupportedFormat, match=r"adapter_config\.json was sent twice"):
        read_upload(files)


def test_native_file_name_is_case_insensitive():
    raw = RawPrefix(PrefixKind.PROMPT_TUNING, torch.randn(3, 64))
    assert read_upload({"MINE.SAFETENSORS": write_native(raw)}).kind is PrefixKind.PROMPT_TUNING
