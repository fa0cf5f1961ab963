"""Resident memory of the engine at the server's default size, under churn, for --minutes.

    python bench/pool_memory.py [--minutes 10] [--model smollm2-geometry] [--fifo]
                                [--write docs/reliability.md]

The engine of `prefix-server serve` at its defaults (16 slots of 2,048 positions: on the CPU a KV
pool of 1.4 GiB for SmolLM2, allocated but untouched until used) runs waves of 1 to 4 requests
at a time, prompts of 16 to 400 tokens, 8 to 32 new tokens, each with a prefix-tuning prefix of
16 virtual tokens drawn from a pool of 64 (new ones keep arriving, old ones are evicted), for
`--minutes`. VmRSS is sampled every 5 s. A pool that hands out its blocks in turn would slowly
touch all of its pages with a handful of rows in use; the engine hands out the last freed block
first, so memory follows the most ever in use at once. `--fifo` runs the other order, for
comparison. Exits 1 if the last minute's VmRSS is more than 15% above the first minute's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import load_named, random_prefix
from bench.report import command, machine, write_section
from server.engine.blocks import BlockPool
from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams

SAMPLE_SECONDS = 5.0


def vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def release_in_turn(pool: BlockPool, blocks: list[int]) -> None:
    """The order blocks were handed out in before: the first freed is the next handed out."""
    for block in blocks:
        pool._refs[block] -= 1
        if pool._refs[block] == 0:
            pool._free.append(block)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default="smollm2-geometry")
    parser.add_argument("--fifo", action="store_true", help="hand out blocks in turn instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    if args.fifo:
        BlockPool.release = release_in_turn  # type: ignore[method-assign]
    loaded = load_named(args.model)
    llm = LLM(loaded, EngineConfig(max_running_per_tenant=0))
    vocab = min(1000, loaded.spec.vocab_size)
    rng = random.Random(args.seed)
    prefixes: deque = deque(maxlen=64)
    samples: list[tuple[float, float]] = []
    start = next_sample = time.monotonic()
    deadline = start + args.minutes * 60
    requests = 0
    while time.monotonic() < deadline:
        for _ in range(rng.randint(1, 4)):
            if len(prefixes) < 64 or rng.random() < 0.2:
                prefixes.append(random_prefix(loaded, 16, rng.randrange(1 << 30)))
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(16, 400))]
            sampling = SamplingParams(max_new_tokens=rng.randint(8, 32), temperature=0,
                                      ignore_eos=True)  # fmt: skip
            llm.add(Request(prompt, sampling, rng.choice(prefixes)))
            requests += 1
        while llm.has_work:
            llm.step()
            if time.monotonic() >= next_sample:
                samples.append((time.monotonic() - start, vm_rss_mib()))
                next_sample += SAMPLE_SECONDS
    first = statistics.median(rss for t, rss in samples if t < 60)
    last = statistics.median(rss for t, rss in samples if t >= samples[-1][0] - 60)
    growth = last / first - 1
    order = "in turn (first freed, first handed out)" if args.fifo else "last freed first"
    every_minute = ", ".join(
        f"{t / 60:.0f} min {rss:.0f}" for t, rss in samples[:: int(60 / SAMPLE_SECONDS)]
    )
    body = "\n".join(
        [
            f"`{command()}`: {args.minutes:g} min on {machine()}; {loaded.model_id}, the "
            f"server's default engine (16 slots x 2,048 positions), blocks handed out {order}.",
            "",
            f"{requests} requests in waves of 1 to 4. VmRSS (MiB), median of the first minute "
            f"{first:.0f}, of the last minute {last:.0f}: **{growth:+.1%}**; peak "
            f"{max(rss for _, rss in samples):.0f}.",
            f"Each minute: {every_minute}.",
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "pool_memory" + ("_fifo" if args.fifo else ""), body)
    return 0 if growth <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
