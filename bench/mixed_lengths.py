"""Short rows decoding beside one long row: does every row pay for the longest?

    python bench/mixed_lengths.py [--model smollm2-geometry] [--short 8] [--short-context 64]
                                  [--long-context 1500] [--steps 20] [--write FILE]

Three engines decode, taking turns step by step (median ms per step, after 3 warm-up steps):
  short          `--short` rows of `--short-context` tokens each
  short + long   the same rows beside one row of `--long-context` tokens
  all long       `--short` + 1 rows, all of `--long-context` tokens: what a step costs when
                 every row reads up to the longest, as a gather padded to the longest did
Every row has its own prefix-tuning prefix (16 of its tokens); greedy, EOS ignored; float32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import load_named, random_prefix, time_interleaved
from bench.report import command, machine, write_section
from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.models import LoadedModel

PREFIX_TOKENS = 16


def decoding(loaded: LoadedModel, contexts: list[int], max_len: int) -> LLM:
    """An engine whose rows (one per context, prefix included) all decode: its next step is a
    pure decode step."""
    greedy = SamplingParams(max_new_tokens=10_000, temperature=0, ignore_eos=True)
    llm = LLM(loaded, EngineConfig(num_slots=len(contexts), max_len=max_len,
                                   max_running_per_tenant=0))  # fmt: skip
    for row, context in enumerate(contexts):
        prompt = [
            (row * 7 + i) % min(1000, loaded.spec.vocab_size - 1) + 1
            for i in range(context - PREFIX_TOKENS)
        ]
        llm.add(Request(prompt, greedy, random_prefix(loaded, PREFIX_TOKENS, row)))
    while any(not r.output_token_ids for r in llm.running) or len(llm.running) < len(contexts):
        llm.step()
    return llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-geometry")
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--short-context", type=int, default=64)
    parser.add_argument("--long-context", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    loaded = load_named(args.model, args.device)
    max_len = args.long_context + 3 * args.steps + 32
    short = [args.short_context] * args.short
    engines = {
        "short": decoding(loaded, short, max_len),
        "short + long": decoding(loaded, [*short, args.long_context], max_len),
        "all long": decoding(loaded, [args.long_context] * (args.short + 1), max_len),
    }
    times = time_interleaved({name: llm.step for name, llm in engines.items()}, args.steps)
    base = times["short"]
    lines = [
        "| rows | step | / short rows alone |",
        "|---|---|---|",
        f"| {args.short} at {args.short_context} | {base:.1f} ms | 1.00x |",
        f"| {args.short} at {args.short_context} + 1 at {args.long_context} | "
        f"{times['short + long']:.1f} ms | {times['short + long'] / base:.2f}x |",
        f"| {args.short + 1} at {args.long_context} | {times['all long']:.1f} ms | "
        f"{times['all long'] / base:.2f}x |",
    ]
    print("\n".join(lines), flush=True)
    body = "\n".join(
        [
            f"## Mixed lengths: short rows decoding beside a long one ({loaded.model_id})",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            f"Median of {args.steps} decode steps after 3 warm-up steps, the engines taking "
            f"turns; each row its own prefix ({PREFIX_TOKENS} of its tokens); float32.",
            "",
            *lines,
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, f"mixed_lengths_{args.device}", body)


if __name__ == "__main__":
    main()
