"""deploy/serve.yaml and deploy/docker-compose.yml refer to settings, flags and code that exist,
and the Serve config is one Serve accepts. No Ray cluster or Docker engine runs here."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_serve_config_is_valid_and_builds_the_application(monkeypatch) -> None:
    config = yaml.safe_load((ROOT / "deploy/serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks first
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert set(app["args"]) <= set(Settings.model_fields)
    for variable, value in app["runtime_env"]["env_vars"].items():
        assert variable.removeprefix("PREFIX_SERVER_").lower() in Settings.model_fields
        monkeypatch.setenv(variable, value)
    # Built on a machine without a GPU, as Serve may: CUDA is the replicas' to check.
    built = builder(app["args"])
    assert type(built).__name__ == "Application"


def test_the_serve_config_refuses_to_build_without_an_admin_key(monkeypatch) -> None:
    monkeypatch.delenv("PREFIX_SERVER_ADMIN_KEY", raising=False)
    from server.scale.deployments import app_builder

    with pytest.raises(ValueError, match="admin_key"):
        app_builder({"database_url": "postgresql+psycopg://db/x", "replicas": 2})


def test_the_compose_file_passes_real_flags_and_settings() -> None:
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    server = compose["services"]["server"]
    assert server["command"][0] == "serve"
    for flag in server["command"][1:]:
        name = re.match(r"--([a-z-]+)=", flag).group(1)  # type: ignore[union-attr]
        assert name.replace("-", "_") in Settings.model_fields, flag
    for variable in server["environment"]:
        assert variable.removeprefix("PREFIX_SERVER_").lower() in Settings.model_fields
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = server["build"]["args"]["EXTRAS"].split(",")
    assert set(wanted) <= set(extras["optional-dependencies"])
    assert "ARG EXTRAS" in (ROOT / "Dockerfile").read_text()
