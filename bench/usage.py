"""What usage counting and rate limits cost: the engine's decode step, and a request's path.

    python bench/usage.py [--model smollm2-geometry] [--device cpu] [--write FILE]

1. The decode step, with usage counting on and off (the same prefixes and prompts, each its own
   engine, steps taken in turns, the median of each):
   - steady: 16 rows decoding, none finishing (the hook that counts a row runs only when it
     leaves the engine, so this is what every ordinary step pays);
   - turnover: 16 rows of 4 new tokens each, every finished row replaced by a new one at once,
     so most steps finish and count rows; with counting on, the time spent inside the hooks
     (row_counts, the meter's dict update, the rate limiter's settlement) is summed apart.
2. The request path:
   - admission alone, called directly: one request counted (`admit_request`), one token
     reservation and its settlement, the six headers formatted; median of 20,000 rounds;
   - through the ASGI app (Starlette's TestClient, tiny model, one tenant): GET /v1/prefixes and
     POST /v1/generate (4 prompt tokens, 1 new token), with admission and the x-ratelimit-*
     headers on against admission skipped (the middleware stays, finding nothing to add;
     usage is counted in both), batches of each taken in turns, the median per request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient

from bench.decode_step import load_named, random_prefix
from bench.report import command, machine, write_section
from prefixes.catalog.records import RateLimits
from prefixes.usage.meter import UsageMeter
from server.api import auth, generation
from server.api.app import create_app
from server.api.rate_limits import RateLimiter
from server.api.usage import CallUsage
from server.config import Settings
from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams

ROWS = 16
PROMPT_LEN = 64
STEPS = 30
TURNOVER_TOKENS = 4
ADMISSIONS = 20_000
HTTP_ROUNDS = 8
HTTP_BATCH = 25


class Hooks:
    """Usage counting for an engine's rows, as the API attaches it, with its time summed."""

    def __init__(self) -> None:
        self.meter = UsageMeter()
        self.limiter = RateLimiter(RateLimits(10**9, 10**12))
        self.seconds = 0.0
        self.rows = 0

    def hook(self, reserved: int) -> Callable[[Request], None]:
        usage = CallUsage(self.meter, self.limiter, "bench", ("bench/prefix",), reserved)
        usage.started(1)

        def on_finish(request: Request) -> None:
            start = time.perf_counter()
            usage.on_finish(request)
            self.seconds += time.perf_counter() - start
            self.rows += 1

        return on_finish


def request_for(
    row: int, prefix: Any, max_new_tokens: int, hooks: Hooks | None, serial: int = 0
) -> Request:
    prompt = [(row * 7 + serial * 3 + i) % 1000 + 1 for i in range(PROMPT_LEN)]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    request = Request(prompt, sampling, prefix)
    if hooks is not None:
        request.on_finish = hooks.hook(PROMPT_LEN + max_new_tokens)
    return request


def steady_steps(loaded: Any, prefixes: list[Any]) -> dict[str, float]:
    config = EngineConfig(num_slots=ROWS, max_len=1024, max_running_per_tenant=0)
    engines: dict[str, LLM] = {}
    for name, hooks in (("off", None), ("on", Hooks())):
        llm = LLM(loaded, config)
        for row, prefix in enumerate(prefixes):
            llm.add(request_for(row, prefix, 10_000, hooks))
        while any(not r.output_token_ids for r in llm.running) or len(llm.running) < ROWS:
            llm.step()
        engines[name] = llm
    return timed_turns({name: llm.step for name, llm in engines.items()}, STEPS)


def turnover_steps(loaded: Any, prefixes: list[Any]) -> tuple[dict[str, float], Hooks, int]:
    config = EngineConfig(
        num_slots=ROWS,
        max_len=1024,
        max_step_tokens=ROWS * (PROMPT_LEN + 1),
        max_running_per_tenant=0,
    )
    hooks = Hooks()
    serial = {"off": 0, "on": 0}
    engines: dict[str, LLM] = {}
    variants: dict[str, Hooks | None] = {"off": None, "on": hooks}
    for name, counting in variants.items():
        llm = LLM(loaded, config)
        for row, prefix in enumerate(prefixes):
            llm.add(request_for(row, prefix, TURNOVER_TOKENS, counting))
        engines[name] = llm

    def stepper(name: str) -> Callable[[], None]:
        llm, counting = engines[name], variants[name]

        def step() -> None:
            for _ in llm.step():  # refilled at once: the batch stays full
                serial[name] += 1
                row = serial[name] % ROWS
                llm.add(request_for(row, prefixes[row], TURNOVER_TOKENS, counting, serial[name]))

        return step

    times = timed_turns({name: stepper(name) for name in engines}, STEPS)
    return times, hooks, serial["on"]


def timed_turns(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each variant's call, the variants taking turns (warm-up 3 each)."""
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def admission_alone() -> float:
    """Median seconds of one admission round, called directly."""
    limiter = RateLimiter(RateLimits(10**9, 10**12))
    runs = []
    for _ in range(ADMISSIONS):
        start = time.perf_counter()
        limiter.admit_request("bench")
        snapshot = limiter.reserve_tokens("bench", 68)
        snapshot.headers()
        limiter.settle("bench", 68, 5)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


@contextmanager
def admission_skipped() -> Iterator[None]:
    """The request path without admission: no limiter call, nothing for the headers."""
    admit_request, admit_tokens = auth.admit_request, generation.admit_tokens

    def no_request_admission(*_: Any) -> None:
        return None

    def tokens_unreserved(server: Any, tenant: str, job: Any, _: Any) -> CallUsage:
        models = generation.usage_models(server, tenant, job)
        return CallUsage(server.usage_meter, server.rate_limiter, tenant, models, 0)

    auth.admit_request = no_request_admission  # type: ignore[assignment]
    generation.admit_tokens = tokens_unreserved  # type: ignore[assignment]
    try:
        yield
    finally:
        auth.admit_request, generation.admit_tokens = admit_request, admit_tokens


def request_path(device: str) -> dict[str, dict[str, float]]:
    loaded = load_named("tiny", device)
    body = {"prompt": [1, 2, 3, 4], "max_new_tokens": 1, "temperature": 0}
    calls: dict[str, tuple[str, str, dict[str, Any] | None]] = {
        "GET /v1/prefixes": ("GET", "/v1/prefixes", None),
        "POST /v1/generate (1 token)": ("POST", "/v1/generate", body),
    }
    with tempfile.TemporaryDirectory() as data_dir:
        options: dict[str, Any] = {"data_dir": Path(data_dir), "admin_key": "bench-admin"}
        options |= {"num_slots": 4, "max_len": 128, "log_level": "warning"}
        settings = Settings(**options)
        app = create_app(settings, loaded=loaded, background_start=False)
        with TestClient(app) as client:
            created = client.post("/v1/tenants", json={"name": "bench"},
                                  headers={"Authorization": "Bearer bench-admin"})  # fmt: skip
            assert created.status_code == 201, created.text
            headers = {"Authorization": f"Bearer {created.json()['api_key']}"}

            def batch(method: str, path: str, json: Any, on: bool) -> list[float]:
                times = []
                for _ in range(HTTP_BATCH):
                    start = time.perf_counter()
                    response = client.request(method, path, json=json, headers=headers)
                    times.append(time.perf_counter() - start)
                    assert response.status_code == 200, response.text
                    assert ("x-ratelimit-limit-requests" in response.headers) is on
                return times

            result: dict[str, dict[str, float]] = {}
            for label, (method, path, json) in calls.items():
                times: dict[str, list[float]] = {"on": [], "off": []}
                batch(method, path, json, True)  # warm-up
                for round_ in range(HTTP_ROUNDS):
                    for on in (True, False) if round_ % 2 else (False, True):  # in turns
                        with nullcontext() if on else admission_skipped():
                            times["on" if on else "off"] += batch(method, path, json, on)
                result[label] = {name: statistics.median(t) for name, t in times.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-geometry")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    loaded = load_named(args.model, args.device)
    prefixes = [random_prefix(loaded, 16, seed) for seed in range(ROWS)]
    started = time.perf_counter()
    steady = steady_steps(loaded, prefixes)
    print(f"steady steps done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
    turnover, hooks, finished = turnover_steps(loaded, prefixes)
    print(f"turnover steps done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
    alone = admission_alone()
    http = request_path(args.device)
    print(f"request path done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
    ms = 1000
    lines = [
        f"## What usage counting and rate limits cost ({args.model}, {args.device})",
        "",
        f"Machine: {machine()}.",
        f"Command: `{command()}`.",
        "",
        f"| decode step, {ROWS} rows (own prefixes, {PROMPT_LEN}-token prompts), median of "
        f"{STEPS} | counting off | counting on | ratio |",
        "|---|---|---|---|",
        f"| steady: no row finishes | {steady['off'] * ms:.1f} ms | {steady['on'] * ms:.1f} ms "
        f"| {steady['on'] / steady['off']:.2f}x |",
        f"| turnover: rows of {TURNOVER_TOKENS} new tokens, replaced as they finish "
        f"| {turnover['off'] * ms:.1f} ms | {turnover['on'] * ms:.1f} ms "
        f"| {turnover['on'] / turnover['off']:.2f}x |",
        "",
        f"With counting on, the turnover run counted {hooks.rows} rows leaving the engine "
        f"({finished} replaced in the timed and warm-up steps); the hooks took "
        f"{hooks.seconds / max(hooks.rows, 1) * 1e6:.1f} µs a row "
        f"({hooks.seconds * ms:.2f} ms in all).",
        "",
        "| request path | admission off | admission on | added |",
        "|---|---|---|---|",
        f"| admission alone, called directly (median of {ADMISSIONS:,}) | | "
        f"{alone * 1e6:.1f} µs | {alone * 1e6:.1f} µs |",
        *[
            f"| {label}, through the ASGI app (median of {HTTP_ROUNDS * HTTP_BATCH}) | "
            f"{t['off'] * ms:.2f} ms | {t['on'] * ms:.2f} ms | "
            f"{(t['on'] - t['off']) * ms:+.2f} ms |"
            for label, t in http.items()
        ],
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, f"usage_{args.device}", body)


if __name__ == "__main__":
    main()
