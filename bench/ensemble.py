"""A prompt ensemble against one request and against its members asked one after another.

    python bench/ensemble.py [--model smollm2] [--members 8] [--prompt 32] [--new 32] [--write FILE]

Every case runs the same prompt, greedy, `--new` tokens (end of sequence ignored), through the
engine (`LLM`, one process, nothing else running), each member a different prefix-tuning prefix
of 16 virtual tokens:
  single        one request with one prefix
  vote          the ensemble's rows admitted together, each decoding on its own (+ log-probs)
  mean          the rows in lockstep, one token per step from the mean of their log-softmax
  sequential    the members' requests one after another, each alone
Median wall time of `--repeats` runs of each, taking turns so drift hits all alike.
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
from prefixes import CompiledPrefix
from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.request import Request, RequestGroup, SamplingParams

PREFIX_TOKENS = 16


def run(llm: LLM, prompt: list[int], prefixes: list[CompiledPrefix], new: int, how: str) -> float:
    sampling = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    if how == "sequential":
        for prefix in prefixes:
            llm.generate([Request(prompt, sampling, prefix)])
        return time.perf_counter() - started
    rows = [Request(prompt, sampling, prefix) for prefix in prefixes]
    if len(rows) > 1:
        RequestGroup(rows, lockstep=how == "mean")
        for row in rows:
            row.logprobs = how == "vote"
    llm.generate(rows[:1])  # a group is queued through its leader, and runs to its end
    assert all(len(r.output_token_ids) == new for r in rows)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    loaded = load_named(args.model, args.device)
    prefixes = [random_prefix(loaded, PREFIX_TOKENS, seed) for seed in range(args.members)]
    prompt = [(i * 37) % 400 + 1 for i in range(args.prompt)]
    config = EngineConfig(
        num_slots=max(16, args.members),
        max_len=args.prompt + args.new + PREFIX_TOKENS + 16,
        max_step_tokens=max(64, args.members * args.prompt + 1),
        max_running_per_tenant=0,
    )
    llm = LLM(loaded, config)
    cases = {
        "single": prefixes[:1],
        "vote": prefixes,
        "mean": prefixes,
        "sequential": prefixes,
    }
    run(llm, prompt, prefixes, 4, "vote")  # warm-up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, members in cases.items():
            times[name].append(run(llm, prompt, members, args.new, name))
    median = {name: statistics.median(t) for name, t in times.items()}
    lines = [
        f"{loaded.model_id}, {args.members} members of {PREFIX_TOKENS} virtual tokens, prompt "
        f"{args.prompt} tokens, {args.new} new tokens, greedy; median of {args.repeats}.",
        "",
        "| case | seconds | vs single |",
        "|---|---|---|",
    ]
    for name, seconds in median.items():
        lines.append(f"| {name} | {seconds:.3f} | {seconds / median['single']:.2f}x |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        title = f"## Prompt ensembles: {args.members} members against one request"
        section = f"{title}\n\nMachine: {machine()}\n\nCommand: `{command()}`\n\n{body}\n"
        write_section(args.write, "ensemble", section)


if __name__ == "__main__":
    main()
