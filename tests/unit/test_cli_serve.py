"""`prefix-server serve` settings: flags, environment, and the development admin key."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from server.cli import add_settings_flags, dev_admin_key, settings_from
from server.config import Settings


def parse(argv: list[str]) -> Settings:
    import argparse

    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    return settings_from(parser.parse_args(argv))


def test_flags_override_environment_and_environment_overrides_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFIX_SERVER_PORT", "9001")
    monkeypatch.setenv("PREFIX_SERVER_NUM_SLOTS", "3")
    settings = parse(["--port", "9002", "--dtype", "bfloat16"])
    assert (settings.port, settings.num_slots, settings.dtype) == (9002, 3, "bfloat16")
    assert settings.max_len == Settings.model_fields["max_len"].default


def test_every_setting_has_a_flag() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    flags = {a.dest for a in parser._actions}
    assert set(Settings.model_fields) <= flags


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        parse(["--dtype", "float64"])
    with pytest.raises(ValueError, match="num_slots"):
        parse(["--num-slots", "0"])


def test_development_admin_key_is_created_once_with_mode_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    key = dev_admin_key(settings)
    path = tmp_path / "data" / "admin_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key in capsys.readouterr().err  # printed once
    assert dev_admin_key(settings) == key
    assert key not in capsys.readouterr().err  # not printed again


def test_upload_starts_without_the_engine() -> None:
    """`prefix-server upload` only reads files and posts them: it never imports torch (about
    3 s of the command's start on this machine)."""
    import subprocess
    import sys

    script = (
        "import sys; from server.cli import main; "
        "code = main(['upload', 'no-such-folder', '--name', 'x', '--api-key', 'k']); "
        "print(code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.split() == ["2", "False"], out.stderr
