"""`prefix-server usage` against a running server (uvicorn on a thread, over real HTTP): the
table a tenant or the admin reads, its totals, CSV identical to the API's, and clear errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.api.app import create_app
from server.cli import main
from server.models import LoadedModel
from tests.api.conftest import ADMIN_KEY, app_settings, bearer, wait_for


@pytest.fixture
def url(loaded: LoadedModel, tmp_path: Path) -> Iterator[str]:
    settings = app_settings(tmp_path / "data", usage_flush_interval=0.05)
    app = create_app(settings, loaded=loaded, background_start=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def tenant(url: str, name: str) -> str:
    response = httpx.post(f"{url}/v1/tenants", json={"name": name}, headers=bearer(ADMIN_KEY))
    assert response.status_code == 201, response.text
    return str(response.json()["api_key"])


def generate(url: str, key: str, max_new_tokens: int) -> int:
    body = {"prompt": [1, 2, 3], "max_new_tokens": max_new_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    response = httpx.post(f"{url}/v1/generate", json=body, headers=bearer(key), timeout=60)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["completion_tokens"])


def requests_counted(url: str) -> int:
    response = httpx.get(f"{url}/v1/usage", headers=bearer(ADMIN_KEY))
    assert response.status_code == 200, response.text
    return sum(row["requests"] for row in response.json()["data"])


def usage(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["usage", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_usage_prints_the_table_totals_and_the_apis_csv(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, bob = tenant(url, "alice"), tenant(url, "bob")
    completion = generate(url, alice, 3) + generate(url, alice, 2) + generate(url, bob, 4)
    assert completion == 9
    wait_for(lambda: requests_counted(url) == 3, "the usage to be flushed")

    code, out, err = usage(capsys, "--url", url, "--api-key", ADMIN_KEY)
    assert code == 0, err
    heading, *lines, total = [line.split() for line in out.splitlines()]
    assert heading[:6] == ["tenant", "model", "requests", "rows", "prompt", "completion"]
    assert sorted((line[0], line[2], line[3], line[4], line[5]) for line in lines) == [
        ("alice", "2", "2", "6", "5"),
        ("bob", "1", "1", "3", "4"),
    ]
    assert total[:5] == ["total", "3", "3", "9", "9"]

    # A tenant's key shows only its own; by day, each line starts with its day (UTC).
    code, out, err = usage(capsys, "--url", url, "--api-key", bob, "--group-by", "day")
    assert code == 0, err
    heading, line, total = [line.split() for line in out.splitlines()]
    assert heading[:4] == ["start", "(UTC)", "tenant", "model"]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert (line[0], line[1], line[3]) == (today, "bob", "1")  # day, tenant, requests
    assert total[:2] == ["total", "1"]

    # --csv is the API's own CSV, byte for byte.
    code, out, err = usage(capsys, "--url", url, "--api-key", ADMIN_KEY, "--csv")
    assert code == 0, err
    api = httpx.get(f"{url}/v1/usage", params={"format": "csv"}, headers=bearer(ADMIN_KEY))
    assert api.status_code == 200 and out == api.text

    # A span with nothing in it says so.
    code, out, err = usage(capsys, "--url", url, "--api-key", ADMIN_KEY, "--end", "1970-01-02")
    assert (code, out) == (0, "no usage in this span\n"), err


def test_usage_errors_name_what_is_wrong(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    alice = tenant(url, "alice")
    tenant(url, "bob")
    code, _, err = usage(capsys, "--url", url, "--api-key", "psk_wrong")
    assert code == 1 and "401" in err and "invalid API key" in err
    code, _, err = usage(capsys, "--url", url, "--api-key", alice, "--tenant", "bob")
    assert code == 1 and "403" in err
    with pytest.raises(SystemExit):  # argparse: exit 2, the flag named
        usage(capsys, "--url", url, "--api-key", alice, "--start", "last tuesday")
    assert "--start" in capsys.readouterr().err
    code, _, err = usage(capsys, "--url", url, "--api-key", "")
    assert code == 2 and "--api-key" in err
