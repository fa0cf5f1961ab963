"""Where a step's time goes: torch.profiler over the engine's own steps, by operator.

    python bench/step_profile.py [--model smollm2-geometry] [--device cpu] [--write FILE]

Three steps of the engine at the server's default size, each run through its runner on blocks
of the pool (as the start-up calibration runs them, calibrate.py), warmed up, then profiled over
three runs: a decode step of 8 rows at 528 tokens of context, a 64-token prompt chunk at 464
tokens of context (the stall probe's kind of chunk), and 8 prompts of 528 tokens in one step.
For each: its time, and the operators that took the most of it (self time, per step).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import load_named
from bench.report import command, machine, write_section
from server.engine.calibrate import synthetic_step
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.step_cost import RowShape

RUNS = 3
TOP = 6
STEPS = {  # (tokens fed, positions attended: the fed ones included)
    "decode, 8 rows at 528 tokens": [RowShape(1, 529)] * 8,
    "a 64-token chunk at 464 tokens": [RowShape(64, 528)],
    "8 prompts of 528 tokens": [RowShape(528, 528)] * 8,
}


def profile_step(core: EngineCore, shape: list[RowShape]) -> tuple[float, list[str]]:
    with synthetic_step(core.runner, core.scheduler.pool, shape) as run:
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(RUNS):
                run()
            seconds = (time.perf_counter() - start) / RUNS
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [
        f"{e.key} {e.self_cpu_time_total / RUNS / 1000:.1f} ms "
        f"({e.self_cpu_time_total / total:.0%})"
        for e in events[:TOP]
    ]
    return seconds, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-geometry")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    loaded = load_named(args.model, args.device)
    core = EngineCore(loaded, EngineConfig(gap_target=None))
    lines = [
        "| step | time under the profiler | operators, self time per step (share) |",
        "|---|---|---|",
    ]
    for name, shape in STEPS.items():
        seconds, top = profile_step(core, shape)
        lines.append(f"| {name} | {seconds * 1000:.0f} ms | {'; '.join(top)} |")
        print(lines[-1], flush=True)
    body = "\n".join(
        [
            f"## Where a step's time goes ({loaded.model_id}, {args.device})",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            f"torch.profiler over {RUNS} runs of each step after one warm-up, the engine's runner "
            "on blocks of its pool (packed forwards, the allocator tuned); float32.",
            "",
            *lines,
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, f"step_profile_{args.device}", body)


if __name__ == "__main__":
    main()
