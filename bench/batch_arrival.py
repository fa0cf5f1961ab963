"""N requests of a long prompt arriving together: the serving engine against transformers.

    python bench/batch_arrival.py [--model smollm2-geometry] [--rows 1,8,16] [--prompt 512]
                                  [--new-tokens 32] [--device cpu] [--write docs/benchmarks.md]

Both sides do the same work in the same process, one after the other for each N:
  engine        the server's engine (`Engine`: its own thread, async streams, the default
                settings: 16 slots, 2,048 positions, the step budget measured at start-up); N
                requests submitted at once from the event loop, each with its own prefix-tuning
                prefix (16 virtual tokens) and tenant, greedy, EOS ignored
  transformers  one batched `generate` of the same N prompts (no prefix), greedy, exactly
                `--new-tokens` new tokens
Each N runs `--repeats` times, the two sides taking turns; the better run of each side counts
(the machine's own noise only slows a run). Reported: the time until the last answer
completes, prefill included (and its ratio to transformers'), time to first token p50 / p99,
and steady decode in tokens/s: for the engine,
tokens streamed while every row decodes (from the last first token to the first finish); for
transformers, its decode after the first token (N x (new tokens - 1) over that time).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import load_named, random_prefix
from bench.load import FirstTokenClock, percentile
from bench.report import command, machine, write_section
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.models import LoadedModel

PREFIX_TOKENS = 16


@dataclass
class Run:
    wall: float  # first submission to last answer
    ttfts: list[float]
    decode_rate: float | None  # tokens/s while all rows decode together
    token_times: list[list[float]] = field(default_factory=list)


def prompts(rows: int, length: int, vocab: int) -> list[list[int]]:
    return [[(row * 7919 + i * 13) % (vocab - 1) + 1 for i in range(length)] for row in range(rows)]


def run_engine(engine: Engine, loaded: LoadedModel, rows: int, args: argparse.Namespace) -> Run:
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    batch = prompts(rows, args.prompt, loaded.spec.vocab_size)
    prefixes = [random_prefix(loaded, PREFIX_TOKENS, seed) for seed in range(rows)]
    times: list[list[float]] = [[] for _ in range(rows)]

    async def one(row: int, start: float) -> None:
        stream = engine.submit(batch[row], sampling, prefix=prefixes[row], tenant=f"t{row}",
                               stream_text=False)  # fmt: skip
        async for chunk in stream:
            now = time.perf_counter() - start
            times[row] += [now] * len(chunk.token_ids)

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(one(row, start) for row in range(rows)))
        return time.perf_counter() - start

    wall = asyncio.run(main())
    ttfts = [t[0] for t in times]
    together_from, together_to = max(ttfts), min(t[-1] for t in times)
    in_window = sum(1 for t in times for s in t if together_from < s <= together_to)
    span = together_to - together_from
    rate = in_window / span if span > 0 and in_window >= 2 * rows else None
    return Run(wall, ttfts, rate, times)


def run_transformers(loaded: LoadedModel, rows: int, args: argparse.Namespace) -> Run:
    model = loaded.model
    ids = torch.tensor(prompts(rows, args.prompt, loaded.spec.vocab_size), device=loaded.device)
    clock = FirstTokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
        )
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    assert clock.first is not None
    first = clock.first - start
    rate = rows * (args.new_tokens - 1) / (wall - first)
    return Run(wall, [first] * rows, rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-geometry")
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    loaded = load_named(args.model, args.device, args.dtype)
    counts = [int(n) for n in args.rows.split(",")]
    config = EngineConfig(num_slots=max(16, *counts), max_running_per_tenant=0)
    engine = Engine(loaded, config).start()
    cost = engine.core.step_cost
    lines = [
        "| N | engine: last answer | transformers: last answer | ratio | engine TTFT p50 / p99 "
        "| transformers TTFT | engine steady decode | transformers decode | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    try:
        run_engine(engine, loaded, 2, argparse.Namespace(**{**vars(args), "prompt": 32}))
        run_transformers(loaded, 2, argparse.Namespace(**{**vars(args), "prompt": 32}))
        for rows in counts:
            runs = [(run_engine(engine, loaded, rows, args), run_transformers(loaded, rows, args))
                    for _ in range(args.repeats)]  # fmt: skip
            ours = min((ours for ours, _ in runs), key=lambda run: run.wall)
            theirs = min((theirs for _, theirs in runs), key=lambda run: run.wall)
            decode = "n/a (rows never all decoded together)"
            ratio = "n/a"
            if ours.decode_rate is not None and theirs.decode_rate is not None:
                decode = f"{ours.decode_rate:.1f} tok/s"
                ratio = f"{ours.decode_rate / theirs.decode_rate:.2f}x"
            lines.append(
                f"| {rows} | {ours.wall:.1f} s | {theirs.wall:.1f} s | "
                f"{ours.wall / theirs.wall:.2f}x | {percentile(ours.ttfts, 0.5):.1f} s / "
                f"{percentile(ours.ttfts, 0.99):.1f} s | {theirs.ttfts[0]:.1f} s | {decode} | "
                f"{theirs.decode_rate:.1f} tok/s | {ratio} |"
            )
            print(lines[-1], flush=True)
    finally:
        engine.stop()
    body = "\n".join(
        [
            f"## Batch arrival: N prompts of {args.prompt} tokens at once ({loaded.model_id})",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            f"Each request its own prefix ({PREFIX_TOKENS} virtual tokens) and tenant, "
            f"{args.new_tokens} new tokens, greedy, {args.dtype}; best of {args.repeats} runs "
            "each, the sides taking turns; the engine's default settings "
            "(gap target "
            f"{config.gap_target}); transformers' batched `generate` of the same prompts in the "
            "same process right after. Step cost measured at the engine's start: "
            f"{cost.describe() if cost else 'none'}.",
            "",
            *lines,
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "batch_arrival", body)


if __name__ == "__main__":
    main()
