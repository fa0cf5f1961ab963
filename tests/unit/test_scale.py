"""The pieces of the Ray Serve application that need no Ray: which prefix a request uses, the
in-process call of the app, the merged metrics, the replicas' options and their settings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from server.cli import main
from server.config import Settings
from server.scale.affinity import affinity_key
from server.scale.asgi import HttpCall, ResponseStart, call_app
from server.scale.deployments import replica_options
from server.scale.metrics_board import Board, merge

URL = "postgresql+psycopg://db/registry"


@pytest.mark.parametrize(
    ("method", "path", "body", "key"),
    [
        ("POST", "/v1/generate", {"prompt": "x", "prefix": "alice/pirate"}, "alice/pirate"),
        ("POST", "/v1/generate", {"prompt": "x", "prefix": None}, ""),
        ("POST", "/v1/generate", {"prompt": "x", "prefixes": ["a", "bob/b"]}, "a,bob/b"),
        ("POST", "/v1/generate", {"prompt": "x", "prefixes": ["a", 3]}, ""),
        ("POST", "/v1/completions", {"model": "bob/poet", "prompt": "x"}, "bob/poet"),
        ("POST", "/v1/chat/completions", {"model": "pirate", "messages": []}, "pirate"),
        ("POST", "/v1/prefixes", {"name": "pirate"}, ""),  # uploads balance by load
        ("GET", "/v1/generate", {"prefix": "alice/pirate"}, ""),
        ("POST", "/v1/generate", ["not", "an", "object"], ""),
        ("POST", "/v1/generate", {"prefix": 7}, ""),
        ("POST", "/v1/generate", {"prefix": "x" * 500}, ""),
    ],
)
def test_the_affinity_key_is_the_prefix_a_request_generates_with(method, path, body, key):
    assert affinity_key(method, path, json.dumps(body).encode()) == key


def test_an_unreadable_body_has_no_affinity():
    assert affinity_key("POST", "/v1/generate", b"{not json") == ""


def small_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict) -> JSONResponse:
        return JSONResponse({"got": body}, status_code=201)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts():
            for i in range(3):
                yield f"data: {i}\n\n"

        return StreamingResponse(parts(), media_type="text/event-stream")

    return app


async def collect(call: HttpCall) -> list[ResponseStart | bytes]:
    return [part async for part in call_app(small_app(), call)]


def test_a_call_gives_the_response_start_then_the_body():
    headers = [(b"content-type", b"application/json")]
    parts = asyncio.run(collect(HttpCall("POST", "/echo", b"", headers, b'{"a": 1}')))
    start, *body = parts
    assert isinstance(start, ResponseStart) and start.status == 201
    assert json.loads(b"".join(body)) == {"got": {"a": 1}}  # type: ignore[arg-type]
    assert start.with_header("x-replica", "r1").header("X-Replica") == "r1"

    start, *chunks = asyncio.run(collect(HttpCall("GET", "/stream")))
    assert start.header("content-type").startswith("text/event-stream")  # type: ignore[union-attr]
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"  # type: ignore[arg-type]
    missing = asyncio.run(collect(HttpCall("GET", "/nowhere")))
    assert missing[0].status == 404  # type: ignore[union-attr]


def test_a_client_leaving_tells_the_app_it_disconnected():
    seen: list[str] = []
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> StreamingResponse:
        async def parts():
            try:
                for i in range(1000):
                    yield f"{i}\n"
                    await asyncio.sleep(0.01)
            finally:
                seen.append("stopped")

        return StreamingResponse(parts())

    async def leave_early() -> None:
        parts = call_app(app, HttpCall("GET", "/slow"))
        await anext(parts)  # the start
        await anext(parts)  # one chunk
        await parts.aclose()

    asyncio.run(leave_early())
    assert seen == ["stopped"]


def exposition(value: float) -> str:
    registry = CollectorRegistry()
    Counter("prefix_server_generated_tokens", "tokens generated", registry=registry).inc(value)
    return generate_latest(registry).decode()


def test_merged_metrics_label_each_sample_with_its_replica():
    text = merge({"r1": exposition(3), "r2": exposition(5)}).decode()
    families = text_string_to_metric_families(text)
    (family,) = [f for f in families if f.name == "prefix_server_generated_tokens"]
    totals = {s.labels["replica"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert totals == {"r1": 3.0, "r2": 5.0}
    assert text.count("# TYPE prefix_server_generated_tokens_total counter") == 1


def test_a_replica_that_stops_reporting_drops_off_the_board():
    board = Board(stale_after=0)
    board.report("gone", exposition(1))
    assert 'replica="gone"' not in board.render().decode()
    board = Board(stale_after=3600)
    board.report("here", exposition(1))
    assert 'replica="here"' in board.render().decode()


def test_replicas_need_a_database_server_and_a_consistent_range(tmp_path: Path):
    with pytest.raises(ValidationError, match="database-url"):
        Settings(replicas=2)
    with pytest.raises(ValidationError, match="max_replicas"):
        Settings(replicas=3, max_replicas=2, database_url=URL)
    settings = Settings(replicas=2, database_url=URL, data_dir=tmp_path)
    assert settings.prefix_store == tmp_path and settings.file_grace_seconds == 60
    assert Settings(data_dir=tmp_path).file_grace_seconds == 0  # one process: at once


def test_serve_with_replicas_and_no_database_is_refused(tmp_path: Path, capsys):
    assert main(["serve", "--replicas", "2", "--data-dir", str(tmp_path)]) == 2
    assert "database-url" in capsys.readouterr().err


def test_fixed_replicas_or_autoscaling_on_ongoing_requests():
    fixed = replica_options(Settings(replicas=2, database_url=URL, num_slots=8))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 16
    scaling = replica_options(Settings(replicas=1, max_replicas=4, database_url=URL))
    assert "num_replicas" not in scaling
    config = scaling["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"]) == (1, 4)
    assert config["target_ongoing_requests"] == Settings.model_fields["num_slots"].default
