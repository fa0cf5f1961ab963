"""What a long prompt arriving costs the rows already streaming: their gaps between tokens.

    python bench/chunked_prefill.py [--model smollm2] [--targets 2.8] [--budgets 64,8192]
                                    [--write FILE]

Six rows stream (16-token prefix each, 32-token prompts, greedy, EOS ignored). After they have
streamed for a while, a 1,900-token prompt arrives. Every step gives each streaming row one
token, so a row's gap between tokens is the step's duration. For each gap target (`gap_target`:
steps sized by the step cost measured at the engine's start, the server's default) and, for
comparison, each fixed per-step token budget (`max_step_tokens` with no gap target; 8192 admits
the whole prompt in one step, as an engine without chunked prefill does): the streaming rows'
median and worst gap, their ratio, and the long prompt's time to first token, beside its time
to first token alone on an idle engine. The engine is driven step by step (`LLM`), as its
thread does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import load_named, random_prefix
from bench.report import command, machine, write_section
from server.engine.config import GAP_TARGET, EngineConfig
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.models import LoadedModel

STREAMING = 6
WARM_STEPS = 20  # steps the rows stream before the long prompt arrives
AFTER_STEPS = 20  # steps after its first token


def engine_config(setting: str) -> EngineConfig:
    """An engine for "target 2.8" (steps sized by the measured step cost) or "tokens 64"."""
    kind, value = setting.split()
    limits = {"gap_target": float(value)} if kind == "target" else {
        "gap_target": None, "max_step_tokens": int(value)}  # fmt: skip
    return EngineConfig(num_slots=STREAMING + 1, max_len=2048, max_running_per_tenant=0, **limits)


def alone(loaded: LoadedModel, long_prompt: int) -> float:
    """The long prompt's time to first token on an idle engine (default settings)."""
    llm = LLM(loaded, engine_config(f"target {GAP_TARGET}"))
    endless = SamplingParams(max_new_tokens=10_000, temperature=0, ignore_eos=True)
    vocab = min(1000, loaded.spec.vocab_size - 1)
    long = Request([(i * 13) % vocab + 1 for i in range(long_prompt)], endless,
                   random_prefix(loaded, 16, STREAMING))  # fmt: skip
    start = time.perf_counter()
    llm.add(long)
    while not long.output_token_ids:
        llm.step()
    return time.perf_counter() - start


def measure(loaded: LoadedModel, setting: str, long_prompt: int) -> dict[str, float]:
    prefixes = [random_prefix(loaded, 16, seed) for seed in range(STREAMING + 1)]
    endless = SamplingParams(max_new_tokens=10_000, temperature=0, ignore_eos=True)
    llm = LLM(loaded, engine_config(setting))
    for row in range(STREAMING):
        llm.add(
            Request(
                [(row * 7 + i) % min(1000, loaded.spec.vocab_size - 1) + 1 for i in range(32)],
                endless,
                prefixes[row],
            )
        )
    gaps: list[float] = []
    for _ in range(WARM_STEPS):
        gaps.append(timed_step(llm))
    gaps = gaps[3:]  # the rows' prefill and the first steps are not streaming yet
    long = Request(
        [(i * 13) % min(1000, loaded.spec.vocab_size - 1) + 1 for i in range(long_prompt)],
        endless,
        prefixes[-1],
    )
    arrival = time.perf_counter()
    llm.add(long)
    during: list[float] = []
    while not long.output_token_ids:
        during.append(timed_step(llm))
    ttft = time.perf_counter() - arrival
    for _ in range(AFTER_STEPS):
        gaps.append(timed_step(llm))
    median = statistics.median(gaps)  # their usual gap: the steps before and after
    return {
        "median": median * 1000,
        "worst": max(during) * 1000,
        "ratio": max(during) / median,
        "ttft": ttft,
        "steps": len(during),
    }


def timed_step(llm: LLM) -> float:
    start = time.perf_counter()
    llm.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--long-prompt", type=int, default=1900)
    parser.add_argument(
        "--targets", default=str(GAP_TARGET), help="gap targets (the server's default first)"
    )
    parser.add_argument("--budgets", default="64,8192", help="fixed tokens per step, no target")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    loaded = load_named(args.model, args.device)
    by_itself = alone(loaded, args.long_prompt)
    lines = [
        "| step budget | streaming rows' median gap | worst gap while it prefills | "
        "worst / median | its prefill steps | its time to first token | / alone |",
        "|---|---|---|---|---|---|---|",
    ]
    settings = [f"target {t}" for t in args.targets.split(",") if t]
    settings += [f"tokens {b}" for b in args.budgets.split(",") if b]
    for setting in settings:
        r = measure(loaded, setting, args.long_prompt)
        label = setting.replace("target", "gap target").replace("tokens ", "") + (
            " tokens per step" if setting.startswith("tokens") else "x"
        )
        lines.append(
            f"| {label} | {r['median']:.0f} ms | {r['worst']:.0f} ms | {r['ratio']:.1f}x | "
            f"{r['steps']} | {r['ttft']:.1f} s | {r['ttft'] / by_itself:.2f}x |"
        )
        print(lines[-1], flush=True)
    body = "\n".join(
        [
            f"## Chunked prefill: a {args.long_prompt}-token prompt arriving beside {STREAMING} "
            f"streaming rows ({loaded.model_id})",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            f"{STREAMING} rows stream (16-token prefixes, 32-token prompts, greedy); after "
            f"{WARM_STEPS} steps a {args.long_prompt}-token prompt arrives. Their median gap is "
            "over "
            f"the steps without it (from the 4th step to its arrival, and {AFTER_STEPS} steps "
            "after its first token, when it decodes beside them); the worst gap is over the "
            "steps that prefill it; float32. Alone on an idle engine its first token took "
            f"{by_itself:.1f} s.",
            "",
            *lines,
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "chunked_prefill", body)


if __name__ == "__main__":
    main()
