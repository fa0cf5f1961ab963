"""The embedded model's sampling defaults, written into its converted folder once."""

from __future__ import annotations

import json
from pathlib import Path

from server.models import EMBEDDED_SAMPLING, write_sampling_defaults


def test_a_folder_without_sampling_defaults_gets_the_embedded_ones(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    write_sampling_defaults(tmp_path)
    written = json.loads((tmp_path / "generation_config.json").read_text())
    assert written == {**EMBEDDED_SAMPLING, "eos_token_id": 2}
    assert list(tmp_path.iterdir()) == [tmp_path / "generation_config.json"]  # no partial left


def test_values_already_there_are_kept(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    write_sampling_defaults(tmp_path)
    written = json.loads((tmp_path / "generation_config.json").read_text())
    assert written["temperature"] == 0.7 and written["top_p"] == EMBEDDED_SAMPLING["top_p"]
