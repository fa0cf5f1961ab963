"""What a step costs the rows already decoding when newcomers prefill in it.

    python bench/prefill_budget.py [--models tiny,smollm2] [--write docs/benchmarks.md]

15 rows decode; newcomers with 64-token prompts join the same step, for a total of N prefill
tokens. The step's time is every decoding row's latency for that token, so it shows what the
scheduler's cap on prefill tokens per step (`max_prefill_tokens`) buys.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import prefilled_rows, random_prefix, tiny_llama
from bench.report import command, machine, write_section
from server.engine.request import Request, SamplingParams
from server.engine.runner import ModelRunner
from server.models import LoadedModel, load_model

DECODING = 15
PROMPT = 64


def step_ms(loaded: LoadedModel, prefill_tokens: int, repeats: int) -> float:
    newcomers = prefill_tokens // PROMPT
    prefixes = [random_prefix(loaded, 16, seed) for seed in range(DECODING + newcomers)]
    times = []
    for _ in range(repeats):
        runner = ModelRunner(loaded.model, loaded.spec, DECODING + newcomers, 256)
        rows = prefilled_rows(runner, prefixes[:DECODING], 32)
        greedy = SamplingParams(max_new_tokens=8, temperature=0)
        for i in range(newcomers):
            request = Request([(i * 13 + t) % 500 + 1 for t in range(PROMPT)], greedy, prefixes[i])
            request.slot = DECODING + i
            runner.load_prefix(request.slot, request.prefix)
            rows.append(request)
        start = time.perf_counter()
        runner.step(rows)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    budgets = [0, 64, 256, 512, 1024, 2048]
    lines = [
        "| model | " + " | ".join(f"{n} prefill tokens" for n in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for name in args.models.split(","):
        loaded = tiny_llama() if name == "tiny" else load_model(None, cache_dir=Path("data/models"))
        step_ms(loaded, 0, 1)  # warm-up
        cells = [f"{step_ms(loaded, n, args.repeats):.0f} ms" for n in budgets]
        lines.append(f"| {loaded.model_id} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    body = "\n".join(
        [
            "## Prefill in a decode step: the cost to running rows",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            f"One step: {DECODING} rows decoding (16-token prefixes, 32-token prompts) while "
            f"newcomers with {PROMPT}-token prompts prefill in the same step; median of "
            f"{args.repeats}; float32.",
            "",
            *lines,
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "prefill_budget", body)


if __name__ == "__main__":
    main()
