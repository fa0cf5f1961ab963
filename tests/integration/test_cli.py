"""`prefix-server generate`: offline generation on the embedded model, with and without a prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main
from tests.integration.test_smollm2 import MODEL_CACHE

pytestmark = pytest.mark.slow
DATA_DIR = MODEL_CACHE.parent


def test_generate_prints_the_greedy_continuation(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "The capital of France is", "--max-new-tokens", "3"]
    assert main([*argv, "--data-dir", str(DATA_DIR)]) == 0
    assert capsys.readouterr().out.strip().startswith("Paris")


def test_generate_refuses_a_pickled_prefix_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    argv = ["generate", "Hi", "--prefix", str(tmp_path), "--data-dir", str(DATA_DIR)]
    assert main(argv) == 2
    assert "safetensors" in capsys.readouterr().err
