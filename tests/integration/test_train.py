"""`prefix-server train`: PEFT training on the served model, output the server accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefixes import PrefixKind, read_upload
from prefixes.registry import Registry
from server.cli import main
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.models import LoadedModel, load_model
from server.train import TrainConfig, read_examples, train_prefix
from tests.tiny import save_tiny_model

PAIRS = [("w1 w2 w3", "w40 w41 w42"), ("w4 w5", "w40 w41 w42"), ("w9 w8 w7 w6", "w40 w41 w42")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in PAIRS))
    return path


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def greedy(loaded: LoadedModel, prompt: str, prefix_dir: Path | None) -> list[int]:
    llm = LLM(loaded, num_slots=1, max_len=128)
    prefix = llm.compile(read_upload(adapter_files(prefix_dir))) if prefix_dir else None
    ids = loaded.tokenizer.encode(prompt)  # type: ignore[union-attr]
    (request,) = llm.generate(
        [Request(ids, SamplingParams(max_new_tokens=3, temperature=0), prefix)]
    )
    return request.output_token_ids


def train(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return main(
        ["train", str(data), "--out", str(out), "--model", str(model_dir),
         "--data-dir", str(out.parent / "data"), "--virtual-tokens", "4", *extra]
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_trained_adapter_is_accepted_and_learns_the_examples(
    kind: str, model_dir: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    assert train(model_dir, data, out, "--kind", kind, "--steps", "60", "--lr", "0.1") == 0
    assert set(adapter_files(out)) >= {"adapter_config.json", "adapter_model.safetensors"}
    loaded = load_model(str(model_dir))
    raw = read_upload(adapter_files(out))
    assert raw.kind is (PrefixKind.PREFIX_TUNING if kind == "prefix" else PrefixKind.PROMPT_TUNING)
    target = loaded.tokenizer.encode("w40 w41 w42")  # type: ignore[union-attr]
    assert greedy(loaded, "w1 w2 w3", None) != target
    assert greedy(loaded, "w1 w2 w3", out) == target  # the prefix now says what it was taught


def test_init_from_an_adapter_folder_starts_from_its_values(
    model_dir: Path, data: Path, tmp_path: Path
) -> None:
    first, copy = tmp_path / "first", tmp_path / "copy"
    assert train(model_dir, data, first, "--steps", "5") == 0
    assert train(model_dir, data, copy, "--steps", "0", "--init-from", str(first)) == 0
    assert torch.equal(
        read_upload(adapter_files(copy)).tensor, read_upload(adapter_files(first)).tensor
    )


def test_init_from_takes_its_sources_length_unless_told(
    model_dir: Path, data: Path, tmp_path: Path
) -> None:
    first, copy = tmp_path / "first", tmp_path / "copy"
    assert train(model_dir, data, first, "--steps", "1") == 0  # 4 virtual tokens
    args = ["train", str(data), "--model", str(model_dir), "--data-dir", str(tmp_path / "data"),
            "--steps", "0", "--init-from", str(first)]  # fmt: skip
    assert main([*args, "--out", str(copy)]) == 0  # no --virtual-tokens: the source's 4
    assert read_upload(adapter_files(copy)).num_virtual_tokens == 4
    # told another length, it says why it cannot start there
    assert main([*args, "--out", str(tmp_path / "other"), "--virtual-tokens", "6"]) == 2


def test_init_from_a_registry_prefix(model_dir: Path, data: Path, tmp_path: Path) -> None:
    first, copy = tmp_path / "first", tmp_path / "copy"
    assert train(model_dir, data, first, "--steps", "5") == 0
    loaded = load_model(str(model_dir))
    with Registry(tmp_path / "data", compiler=loaded.prefix_compiler(64)) as registry:
        registry.create_tenant("alice")
        registry.upload("alice", "start", adapter_files(first))
    assert train(model_dir, data, copy, "--steps", "0", "--init-from", "alice/start") == 0
    assert torch.allclose(
        read_upload(adapter_files(copy)).tensor, read_upload(adapter_files(first)).tensor
    )
    assert (
        train(model_dir, data, tmp_path / "p", "--kind", "prompt", "--init-from", "alice/start")
        == 2
    )


def test_prompt_transfer_starts_closer_than_a_random_prefix(
    model_dir: Path, data: Path, tmp_path: Path
) -> None:
    loaded = load_model(str(model_dir))
    examples = read_examples(data, loaded.tokenizer)
    config = TrainConfig(kind="prefix", virtual_tokens=4, steps=40, learning_rate=0.1)
    trained = train_prefix(loaded, examples, tmp_path / "a", config)
    source = read_upload(adapter_files(tmp_path / "a"))
    fresh = train_prefix(
        loaded, examples, tmp_path / "b", TrainConfig(virtual_tokens=4, steps=5, seed=1)
    )
    transferred = train_prefix(
        loaded,
        examples,
        tmp_path / "c",
        TrainConfig(virtual_tokens=4, steps=5, seed=1),
        init_from=source,
    )
    assert transferred[0] < fresh[0]
    assert transferred[0] <= trained[-1] * 1.5


def test_bad_data_is_a_clear_error(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "no"}\n')
    assert train(model_dir, data, tmp_path / "x") == 2
    assert "bad.jsonl:1: expected" in capsys.readouterr().err
