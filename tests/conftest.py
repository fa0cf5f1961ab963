import os

# Tests never reach a model hub: everything is built from configs or read from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Nor does the local Ray of the replica tests report usage anywhere.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from collections.abc import Iterator
from typing import Any

import pytest

from tests import registry_support
from tests.postgres import MISSING, Cluster, find_bin_dir, start_cluster

# A throwaway PostgreSQL server for the tests that need one (tests/postgres.py) --------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """Started on first use, stopped after the session."""
    if find_bin_dir() is None:  # CI installs it: a missing server fails the run, never skips
        pytest.fail(MISSING, pytrace=False)
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def database_url(postgres: Cluster) -> Iterator[str]:
    """A fresh database of its own for each test."""
    name = postgres.create_database()
    yield postgres.url(name)
    postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a registry test on each backend: `open_registry` opens the test's PostgreSQL
    database for the second run (SQLite in the data directory for the first)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("database_url")
        monkeypatch.setattr(registry_support, "DATABASE_URL", url)
    return str(request.param)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A test on PostgreSQL that is skipped fails instead: CI must run every one of them."""
    report = yield
    on_postgres = "postgres" in getattr(item, "fixturenames", ()) or (
        getattr(getattr(item, "callspec", None), "params", {}).get("registry_backend")
        == "postgresql"
    )
    if report.skipped and on_postgres:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: skipped, but PostgreSQL tests must run ({call.when})"
    return report
