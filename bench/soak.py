"""Soak: tenants upload, overwrite and delete prefixes while generating, for --minutes.

    python bench/soak.py [--minutes 10] [--tenants 4] [--workers 2] [--write docs/reliability.md]

A real `prefix-server serve` process (the reliability tests' own: 4 slots, max_len 128) on the
tests' tiny random Llama, whose word tokenizer is given a chat template here so that chat runs
too. Each tenant runs `--workers` generation loops (generate, streamed or not, streams dropped
after their first event, completions of one to three prompts, streamed or not, chat, streamed
or not, with its own, a public and another tenant's private prefix) and one prefix loop (upload,
overwrite, delete, list, get, a refused duplicate and a refused corrupt file). Every loop sends
its next request when the last is answered.

Counted as errors: a 5xx, any status that action does not expect, a transport failure, a stream
that does not end with `data: [DONE]`, a greedy probe whose tokens differ from the same probe on
the idle server at the start, and tracebacks in the server's log. The server's resident memory
(VmRSS) is sampled every 5 s and fitted with a line (MiB/min). Exits 1 on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command, machine, write_section
from tests.e2e.test_server_process import create_tenant
from tests.reliability.common import (
    Live,
    MiB,
    World,
    bearer,
    build_world,
    live_server,
    metric,
    resident_bytes,
)
from tests.tiny import make_adapter

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
MODEL_ID = "model"  # the served folder's name
ADAPTER_KINDS = [("prefix", 6), ("prompt", 4), ("prefix_projection", 5), ("p_tuning", 3)]
PROBE = {"prompt": [9, 8, 7], "prefix": None, "max_new_tokens": 16, "temperature": 0}
SAMPLE_EVERY = 5.0


@dataclass
class Tally:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def record(self, action: str, status: int, expected: set[int], detail: str = "") -> None:
        self.statuses[action, status] += 1
        if status >= 500:
            self.error("5xx", f"{action}: {status} {detail}")
        elif status not in expected:
            self.error("unexpected status", f"{action}: {status} {detail}")

    def error(self, kind: str, example: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {example[:300]}")


@dataclass
class Soak:
    live: Live
    tenants: list[str]
    adapters: list[Path]
    deadline: float
    chat: bool
    probe_tokens: list[int]
    tally: Tally = field(default_factory=Tally)


def prepare(root: Path) -> tuple[World, list[Path]]:
    world = build_world(root)
    tokenizer = AutoTokenizer.from_pretrained(world.model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(world.model_dir)
    adapters = []
    for i, (kind, tokens) in enumerate(ADAPTER_KINDS):
        folder = root / f"adapter-{kind}"
        make_adapter(world.loaded.model, kind, tokens, folder, seed=10 + i)
        adapters.append(folder)
    return world, adapters


def files_of(folder: Path, corrupt: bool = False) -> list[tuple[str, tuple[str, bytes]]]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".md":
            continue
        data = path.read_bytes()
        if corrupt and path.suffix == ".safetensors":
            data = data[: len(data) // 2]
        files.append(("files", (path.name, data)))
    return files


async def upload(
    soak: Soak, client: httpx.AsyncClient, tenant: str, name: str, folder: Path,
    *, corrupt: bool = False, **fields: str,
) -> httpx.Response:  # fmt: skip
    return await client.post(
        "/v1/prefixes",
        data={"name": name, **fields},
        files=files_of(folder, corrupt=corrupt),
        headers=bearer(soak.live.keys[tenant]),
    )


async def prefix_loop(soak: Soak, tenant: str, rng: random.Random) -> None:
    """Upload, overwrite, delete, list and get this tenant's churning prefixes, two or three
    times a second."""
    names: set[str] = set()
    headers = bearer(soak.live.keys[tenant])
    async with httpx.AsyncClient(base_url=soak.live.url, timeout=120) as client:
        while time.monotonic() < soak.deadline:
            action = rng.choice(["upload", "overwrite", "delete", "list", "get", "refused"])
            folder = rng.choice(soak.adapters)
            visibility = rng.choice(["private", "public"])
            try:
                if action == "upload" and len(names) < 5:
                    name = f"churn-{rng.randrange(10)}"
                    fields = {"visibility": visibility, "overwrite": "true"}
                    response = await upload(soak, client, tenant, name, folder, **fields)
                    soak.tally.record("upload", response.status_code, {201}, response.text)
                    names.add(name)
                elif action == "overwrite" and names:
                    name = rng.choice(sorted(names))
                    fields = {"visibility": visibility, "overwrite": "true"}
                    response = await upload(soak, client, tenant, name, folder, **fields)
                    soak.tally.record("overwrite", response.status_code, {201}, response.text)
                elif action == "delete" and names:
                    name = rng.choice(sorted(names))
                    response = await client.delete(f"/v1/prefixes/{tenant}/{name}", headers=headers)
                    soak.tally.record("delete", response.status_code, {204}, response.text)
                    names.discard(name)
                elif action == "list":
                    scope = rng.choice(["own", "public", "all"])
                    response = await client.get(f"/v1/prefixes?scope={scope}", headers=headers)
                    soak.tally.record("list", response.status_code, {200}, response.text)
                elif action == "get":
                    name = rng.choice(sorted(names | {"stable", "never-uploaded"}))
                    expected = {200} if name in names | {"stable"} else {404}
                    response = await client.get(f"/v1/prefixes/{tenant}/{name}", headers=headers)
                    soak.tally.record("get", response.status_code, expected, response.text)
                elif action == "refused":
                    if rng.random() < 0.5:  # the name is taken and overwrite is not set
                        response = await upload(soak, client, tenant, "stable", folder)
                        soak.tally.record("duplicate", response.status_code, {409}, response.text)
                    else:
                        response = await upload(soak, client, tenant, "bad", folder, corrupt=True)
                        soak.tally.record("corrupt", response.status_code, {422}, response.text)
            except httpx.HTTPError as exc:
                soak.tally.error("transport", f"{action}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(rng.uniform(0.1, 0.5))  # a tenant's pace, not a flood


def prefix_choice(soak: Soak, tenant: str, rng: random.Random) -> tuple[str | None, set[int]]:
    """A prefix reference for a request of `tenant` and the statuses that request may get."""
    other = rng.choice(soak.tenants)
    choice = rng.randrange(5)
    if choice == 0:
        return None, {200}
    if choice == 1:
        return f"{tenant}/stable", {200}
    if choice == 2:
        return f"{other}/stable", {200}  # public
    if choice == 3:  # being uploaded, overwritten and deleted meanwhile
        return f"{tenant}/churn-{rng.randrange(10)}", {200, 404}
    private = soak.live.prefixes.get(other)
    if private is None or other == tenant:
        return None, {200}
    return private, {404}  # another tenant's private prefix


def sampling(rng: random.Random) -> dict[str, Any]:
    fields: dict[str, Any] = {"temperature": rng.choice([0, 0.7, 1.3])}
    if rng.random() < 0.5:
        fields["seed"] = rng.randrange(2**31)
    if rng.random() < 0.3:
        fields["top_k"] = rng.randrange(1, 50)
    if rng.random() < 0.3:
        fields["top_p"] = rng.choice([0.5, 0.9])
    if rng.random() < 0.2:
        fields["stop"] = [f"w{rng.randrange(384)}"]
    return fields


def words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(384)}" for _ in range(count))


async def read_stream(
    soak: Soak, client: httpx.AsyncClient, action: str, path: str, body: dict[str, Any],
    headers: dict[str, str], expected: set[int], drop: bool,
) -> None:  # fmt: skip
    async with client.stream("POST", path, json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            soak.tally.record(action, response.status_code, expected, response.text)
            return
        soak.tally.record(action, 200, expected)
        events = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if drop:
                    return  # leaving the block closes the connection mid-stream
    if not events or events[-1] != "[DONE]":
        soak.tally.error("malformed stream", f"{action}: {events[-3:]}")
        return
    for event in events[:-1]:
        if "error" in json.loads(event):
            soak.tally.error("stream error event", f"{action}: {event}")


async def generation_loop(soak: Soak, tenant: str, rng: random.Random) -> None:
    headers = bearer(soak.live.keys[tenant])
    actions = ["generate", "stream", "dropped", "completions", "probe"]
    actions += ["chat"] if soak.chat else []
    async with httpx.AsyncClient(base_url=soak.live.url, timeout=120) as client:
        while time.monotonic() < soak.deadline:
            action = rng.choice(actions)
            prefix, expected = prefix_choice(soak, tenant, rng)
            new_tokens = rng.randrange(1, 48)
            try:
                if action == "probe":
                    response = await client.post("/v1/generate", json=PROBE, headers=headers)
                    soak.tally.record(action, response.status_code, {200}, response.text)
                    if response.status_code == 200:
                        tokens = response.json()["token_ids"]
                        if tokens != soak.probe_tokens:
                            soak.tally.error("wrong answer", f"{tokens} != {soak.probe_tokens}")
                elif action in ("generate", "stream", "dropped"):
                    prompt: Any = (
                        words(rng, rng.randrange(1, 10))
                        if rng.random() < 0.5
                        else [rng.randrange(384) for _ in range(rng.randrange(1, 10))]
                    )
                    body = {
                        "prompt": prompt,
                        "prefix": prefix,
                        "max_new_tokens": new_tokens,
                        **sampling(rng),
                    }
                    if action == "generate":
                        response = await client.post("/v1/generate", json=body, headers=headers)
                        soak.tally.record(action, response.status_code, expected, response.text)
                    else:
                        body["stream"] = True
                        await read_stream(
                            soak, client, action, "/v1/generate", body, headers, expected,
                            drop=action == "dropped",
                        )  # fmt: skip
                elif action == "completions":
                    stream = rng.random() < 0.3
                    count = 1 if stream else rng.randrange(1, 4)
                    prompts = [words(rng, rng.randrange(1, 8)) for _ in range(count)]
                    body = {
                        "model": prefix or MODEL_ID,
                        "prompt": prompts[0] if count == 1 else prompts,
                        "max_tokens": new_tokens,
                        "stream": stream,
                        **sampling(rng),
                    }
                    await post_or_stream(
                        soak, client, action, "/v1/completions", body, headers, expected
                    )
                else:  # chat
                    stream = rng.random() < 0.3
                    messages = [{"role": "user", "content": words(rng, rng.randrange(1, 8))}]
                    body = {
                        "model": prefix or MODEL_ID,
                        "messages": messages,
                        "max_tokens": new_tokens,
                        "stream": stream,
                        **sampling(rng),
                    }
                    await post_or_stream(
                        soak, client, action, "/v1/chat/completions", body, headers, expected
                    )
            except httpx.HTTPError as exc:
                soak.tally.error("transport", f"{action}: {type(exc).__name__}: {exc}")


async def post_or_stream(
    soak: Soak, client: httpx.AsyncClient, action: str, path: str, body: dict[str, Any],
    headers: dict[str, str], expected: set[int],
) -> None:  # fmt: skip
    if body["stream"]:
        await read_stream(soak, client, action, path, body, headers, expected, drop=False)
    else:
        response = await client.post(path, json=body, headers=headers)
        soak.tally.record(action, response.status_code, expected, response.text)


async def sample_memory(soak: Soak, started: float) -> list[tuple[float, int]]:
    samples = []
    while time.monotonic() < soak.deadline:
        samples.append((time.monotonic() - started, resident_bytes(soak.live.pid)))
        await asyncio.sleep(SAMPLE_EVERY)
    return samples


async def run(soak: Soak, workers: int, seed: int) -> list[tuple[float, int]]:
    started = time.monotonic()
    loops = []
    for t, tenant in enumerate(soak.tenants):
        loops.append(prefix_loop(soak, tenant, random.Random(seed * 1000 + t)))
        for w in range(workers):
            rng = random.Random(seed * 1000 + 100 * (w + 1) + t)
            loops.append(generation_loop(soak, tenant, rng))
    memory, *_ = await asyncio.gather(sample_memory(soak, started), *loops)
    memory.append((time.monotonic() - started, resident_bytes(soak.live.pid)))
    return memory


def disk_usage(folder: Path) -> dict[str, tuple[int, int]]:
    """Files and bytes under each top-level entry of the data directory (the SQLite database
    with its WAL, blobs/, tmp/)."""
    usage: dict[str, tuple[int, int]] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            top = path.relative_to(folder).parts[0]
            top = "registry.sqlite3*" if top.startswith("registry.sqlite3") else top
            files, size = usage.get(top, (0, 0))
            usage[top] = (files + 1, size + path.stat().st_size)
    return usage


def describe_usage(usage: dict[str, tuple[int, int]]) -> str:
    return ", ".join(
        f"{top} {size / MiB:.2f} MiB in {files} files"
        for top, (files, size) in sorted(usage.items())
    )


def slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y)."""
    n = len(samples)
    mean_x = sum(x for x, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    var = sum((x - mean_x) ** 2 for x, _ in samples)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in samples)
    return cov / var if var else 0.0


def report(
    args: argparse.Namespace, soak: Soak, memory: list[tuple[float, int]], held: dict[str, float],
    tracebacks: int, elapsed: float, disk: tuple[dict[str, tuple[int, int]], ...],
) -> str:  # fmt: skip
    mib = [(t / 60, b / MiB) for t, b in memory]
    half = [s for s in mib if s[0] >= mib[-1][0] / 2]
    requests = sum(soak.tally.statuses.values())
    errors = sum(soak.tally.errors.values()) + tracebacks
    by_action: dict[str, Counter[int]] = {}
    for (action, status), count in soak.tally.statuses.items():
        by_action.setdefault(action, Counter())[status] += count
    rows = "\n".join(
        f"| {action} | {sum(c.values())} | "
        + ", ".join(f"{status}: {n}" for status, n in sorted(c.items()))
        + " |"
        for action, c in sorted(by_action.items())
    )
    every = max(1, round(30 / SAMPLE_EVERY))
    timeline = ", ".join(f"{t:.1f} min {m:.1f}" for t, m in mib[::every])
    kinds = ", ".join(f"{k}: {n}" for k, n in soak.tally.errors.items()) or "none"
    return f"""`{command()}`, {elapsed / 60:.1f} min on {machine()}.

{len(soak.tenants)} tenants, each with {args.workers} generation loops and one prefix loop;
chat {"on (the tiny tokenizer is given a chat template)" if soak.chat else "off"}.
{requests} requests ({requests / elapsed:.1f}/s).

| action | requests | statuses |
|---|---|---|
{rows}

Errors: **{errors}** ({kinds}; tracebacks in the server log: {tracebacks}).
After the soak the server held: {", ".join(f"{k} {v:.0f}" for k, v in held.items())}.
Data directory before: {describe_usage(disk[0])}; after: {describe_usage(disk[1])}.

Resident memory (VmRSS, MiB): {mib[0][1]:.1f} at the start, {mib[-1][1]:.1f} at the end,
{min(m for _, m in mib):.1f} to {max(m for _, m in mib):.1f}; fitted slope
**{slope(mib):+.2f} MiB/min** over the run, {slope(half):+.2f} MiB/min over its second half.
Every 30 s: {timeline}.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="generation loops per tenant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, help="write the report into this markdown file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(tmp)
        world, adapters = prepare(root)
        log = root / "server.log"
        with live_server(world, log) as live:
            tenants = ["alice", "bob"] + [f"tenant{i}" for i in range(2, args.tenants)]
            for tenant in tenants[2:]:
                live.keys[tenant] = create_tenant(live.server, tenant)
            for i, tenant in enumerate(tenants):
                response = httpx.post(
                    f"{live.url}/v1/prefixes",
                    data={"name": "stable", "visibility": "public"},
                    files=files_of(adapters[i % len(adapters)]),
                    headers=bearer(live.keys[tenant]),
                    timeout=120,
                )
                response.raise_for_status()
            chat = httpx.post(
                f"{live.url}/v1/chat/completions",
                json={"model": MODEL_ID, "messages": [{"role": "user", "content": "w1"}]},
                headers=bearer(live.keys["alice"]),
                timeout=120,
            )
            probe = httpx.post(
                f"{live.url}/v1/generate", json=PROBE, headers=bearer(live.keys["alice"])
            )
            probe.raise_for_status()
            soak = Soak(
                live=live,
                tenants=tenants,
                adapters=adapters,
                deadline=time.monotonic() + args.minutes * 60,
                chat=chat.status_code == 200,
                probe_tokens=probe.json()["token_ids"],
            )
            print(f"soaking for {args.minutes} min: {len(tenants)} tenants", file=sys.stderr)
            disk_before = disk_usage(world.data_dir)
            started = time.monotonic()
            memory = asyncio.run(run(soak, args.workers, args.seed))
            elapsed = time.monotonic() - started
            held = settle(live)
            disk = (disk_before, disk_usage(world.data_dir))
            if any(held.values()):
                soak.tally.error("held after the soak", str(held))
        tracebacks = log.read_text().count("Traceback")
    text = report(args, soak, memory, held, tracebacks, elapsed, disk)
    print(text)
    for example in soak.tally.examples:
        print("  ", example)
    if args.write:
        write_section(args.write, "soak", text)
    return 1 if sum(soak.tally.errors.values()) + tracebacks else 0


def settle(live: Live) -> dict[str, float]:
    """What the server holds once the last request is answered (waits up to 60 s for zero)."""
    names = {
        "running rows": "prefix_server_running_rows",
        "waiting": "prefix_server_queue_depth",
        "pinned bytes": "prefix_server_pool_pinned_bytes",
    }
    deadline = time.monotonic() + 60
    while True:
        held = {label: metric(live.url, name) for label, name in names.items()}
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
