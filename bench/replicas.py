"""Throughput of one server process, one replica on Ray Serve and two replicas, on this machine.

    python bench/replicas.py [--model PATH] [--tenants 8] [--clients 16] [--requests 96]
                             [--new-tokens 32] [--write docs/benchmarks.md]

Each variant is a real `prefix-server serve` (with `--replicas N --database-url --store-dir`
for the Ray ones) on a throwaway PostgreSQL (tests/postgres.py: Debian's server binaries).
The same workload runs against each: `--tenants` tenants with a prefix-tuning prefix each
(random KV, 16 virtual tokens), `--clients` closed-loop clients sending greedy requests
(`ignore_eos`, `--new-tokens` tokens, a 16-token prompt) for a tenant's prefix in turn, after
one request per tenant has placed each prefix (not timed).
Reports generated tokens per second of wall time, request latency p50/p99, and how the
requests and the prefixes spread over the replicas (X-Replica). The CPUs are split evenly
between the replicas (`--replica-cpus`, so Ray gives each replica's torch that many threads).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command, machine, write_section
from prefixes import PrefixKind, RawPrefix, write_native
from server.models import ensure_embedded_model
from tests.postgres import Cluster, start_cluster

ADMIN = "bench-admin-key"
VIRTUAL_TOKENS = 16


@dataclass
class Variant:
    name: str
    replicas: int | None  # None: the single process, no Ray


@dataclass
class Outcome:
    variant: Variant
    wall: float = 0.0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    requests_per_replica: Counter[str] = field(default_factory=Counter)
    prefixes_per_replica: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(variant: Variant, args: argparse.Namespace, cluster: Cluster, root: Path) -> tuple:
    port = free_port()
    data = root / variant.name.replace(" ", "-")
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(args.model),
           "--port", str(port), "--admin-key", ADMIN, "--data-dir", str(data / "data"),
           "--num-slots", str(args.clients), "--log-level", "warning"]  # fmt: skip
    if variant.replicas is not None:
        cores = os.cpu_count() or 1
        cmd += ["--replicas", str(variant.replicas),
                "--database-url", cluster.url(cluster.create_database()),
                "--store-dir", str(data / "store"),
                "--replica-cpus", str(max(1, cores // variant.replicas))]  # fmt: skip
    log = (root / f"{data.name}.log").open("wb")
    # Ray starts a local cluster of its own in the child; nothing else is reached.
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{variant.name} exited; see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{variant.name} never became healthy")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # the server stops Serve and its local Ray
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def prefix_file(hidden: tuple[int, int, int], seed: int) -> bytes:
    layers, heads, head_dim = hidden
    shape = (layers, 2, heads, VIRTUAL_TOKENS, head_dim)
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5
    return write_native(RawPrefix(PrefixKind.PREFIX_TUNING, kv))


def geometry(model: Path) -> tuple[int, int, int]:
    import json

    config = json.loads((model / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"], config.get("num_key_value_heads", heads), head_dim


async def run_load(url: str, args: argparse.Namespace, outcome: Outcome) -> None:
    shape = geometry(args.model)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        keys = []
        for t in range(args.tenants):
            made = await client.post(
                "/v1/tenants", json={"name": f"t{t}"}, headers={"Authorization": f"Bearer {ADMIN}"}
            )
            made.raise_for_status()
            keys.append({"Authorization": f"Bearer {made.json()['api_key']}"})
            files = [("files", ("p.safetensors", prefix_file(shape, seed=t)))]
            up = await client.post("/v1/prefixes", data={"name": "p"}, files=files, headers=keys[t])
            up.raise_for_status()
        # Place each prefix with one request of its own, then let Serve learn where it went
        # (a burst of first requests for a prefix could place it on several replicas).
        for t in range(args.tenants):
            body = {"prompt": [1, 2, 3], "prefix": f"t{t}/p", "max_new_tokens": 1}
            (await client.post("/v1/generate", json=body, headers=keys[t])).raise_for_status()
        await asyncio.sleep(3)
        rng = random.Random(0)
        jobs = [
            (i % args.tenants, [rng.randrange(1000, 20000) for _ in range(16)])
            for i in range(args.requests)
        ]
        queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)

        async def worker() -> None:
            while not queue.empty():
                tenant, prompt = queue.get_nowait()
                body = {"prompt": prompt, "prefix": f"t{tenant}/p", "temperature": 0,
                        "max_new_tokens": args.new_tokens, "ignore_eos": True}  # fmt: skip
                began = time.perf_counter()
                response = await client.post("/v1/generate", json=body, headers=keys[tenant])
                response.raise_for_status()
                outcome.latencies.append(time.perf_counter() - began)
                outcome.tokens += response.json()["usage"]["completion_tokens"]
                replica = response.headers.get("x-replica", "one process")
                outcome.requests_per_replica[replica] += 1
                outcome.prefixes_per_replica[replica].add(f"t{tenant}")

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        outcome.wall = time.perf_counter() - began


def report(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    rows = [
        "| server | tokens/s | latency p50 | latency p99 | requests per replica "
        "| prefixes per replica |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        spread = " / ".join(str(n) for n in sorted(o.requests_per_replica.values(), reverse=True))
        held = " / ".join(str(len(p)) for p in o.prefixes_per_replica.values())
        rows.append(
            f"| {o.variant.name} | {o.tokens / o.wall:.1f} | {o.percentile(0.5):.2f} s "
            f"| {o.percentile(0.99):.2f} s | {spread} | {held} |"
        )
    return "\n".join(
        [
            f"## Replicas on Ray Serve: one process vs 1 vs 2 replicas ({args.model.name})",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            f"{args.tenants} tenants with a {VIRTUAL_TOKENS}-token prefix each; {args.clients} "
            f"closed-loop clients; {args.requests} greedy requests of {args.new_tokens} tokens "
            "(16-token prompts, ignore_eos), after one untimed request per tenant placed its "
            "prefix; PostgreSQL registry for the Ray variants. "
            "The CPUs are split evenly between the replicas.",
            "",
            *rows,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    if args.model is None:
        args.model = ensure_embedded_model(Path("data/models"))
    variants = [Variant("one process", None), Variant("1 replica", 1), Variant("2 replicas", 2)]
    cluster = start_cluster()
    outcomes = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
            for variant in variants:
                process, url = start(variant, args, cluster, Path(tmp))
                try:
                    outcome = Outcome(variant)
                    asyncio.run(run_load(url, args, outcome))
                    outcomes.append(outcome)
                    print(report(outcomes, args).splitlines()[-1], flush=True)
                finally:
                    stop(process)
    finally:
        cluster.stop()
    text = report(outcomes, args)
    print(text)
    if args.write:
        write_section(args.write, "replicas", text)


if __name__ == "__main__":
    main()
