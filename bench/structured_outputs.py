"""What structured outputs cost: a decode step with constrained rows, and compiling constraints.

    python bench/structured_outputs.py [--device cpu] [--write FILE]

1. Two engines on the embedded SmolLM2, 16 rows each (each row its own prefix, 64 tokens of
   prompt), prefilled: one with no constraint, one where 8 of the 16 rows decode under a JSON
   schema whose answers are long by construction (4 rows: an array of at least 400 integers; 4:
   an object whose string is at least 4,000 characters: the costly case, where most of the
   vocabulary stays allowed and every token's bytes are checked). Steps alternate between the
   two engines; the median of each.
2. Compile time of constraints (engine/grammar.py: llguidance's grammar, checked, its first mask
   computed), with no cache: median of 5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import load_named, random_prefix
from bench.report import command, machine, write_section
from server.engine.config import EngineConfig
from server.engine.grammar import GrammarCompiler
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams

ROWS = 16
STEPS = 20
PROMPT_LEN = 64
INTEGERS = {"type": "array", "items": {"type": "integer"}, "minItems": 400}
TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 4000}},
    "required": ["text"],
}
TYPICAL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "status": {"enum": ["active", "inactive", "banned"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "status", "tags", "address"],
    "additionalProperties": False,
}


def large_schema(seed: int) -> dict[str, Any]:
    """60 properties, some enums and arrays, objects nested 4 deep."""

    def level(depth: int) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for i in range(15):
            name = f"f{seed}_{depth}_{i}"
            if i % 5 == 0:
                properties[name] = {"enum": [f"v{j}" for j in range(6)]}
            elif i % 5 == 1:
                properties[name] = {"type": "array", "items": {"type": "number"}}
            else:
                properties[name] = {"type": ["string", "integer", "boolean"][i % 3]}
        if depth < 3:
            properties[f"child{depth}"] = level(depth + 1)
        return {"type": "object", "properties": properties, "required": list(properties)}

    return level(0)


def prefilled(llm: LLM, requests: list[Request]) -> LLM:
    for request in requests:
        llm.add(request)
    while any(not r.output_token_ids for r in llm.running) or len(llm.running) < len(requests):
        llm.step()
    return llm


def step_costs(device: str) -> tuple[float, float]:
    loaded = load_named("smollm2", device)
    grammars = loaded.grammars
    integers = grammars.compile("json_schema", INTEGERS)
    text = grammars.compile("json_schema", TEXT)
    prefixes = [random_prefix(loaded, 16, seed) for seed in range(ROWS)]
    free = SamplingParams(max_new_tokens=10_000, temperature=0, ignore_eos=True)
    config = EngineConfig(num_slots=ROWS, max_len=2048, max_running_per_tenant=0)
    engines = {}
    for name, constrained in (("none", 0), ("half", ROWS // 2)):
        requests = []
        for row, prefix in enumerate(prefixes):
            prompt = [(row * 7 + i) % 1000 + 1 for i in range(PROMPT_LEN)]
            sampling = free
            if row < constrained:
                grammar = integers if row % 2 else text
                sampling = SamplingParams(max_new_tokens=10_000, temperature=0, grammar=grammar)
            requests.append(Request(prompt, sampling, prefix))
        engines[name] = prefilled(LLM(loaded, config), requests)
    times: dict[str, list[float]] = {"none": [], "half": []}
    for llm in engines.values():
        llm.step()  # warm-up
    for _ in range(STEPS):
        for name, llm in engines.items():
            start = time.perf_counter()
            llm.step()
            times[name].append(time.perf_counter() - start)
    assert all(len(llm.running) == ROWS for llm in engines.values()), "a row finished early"
    return statistics.median(times["none"]), statistics.median(times["half"])


def compile_times(device: str) -> dict[str, float]:
    loaded = load_named("smollm2", device)
    started = time.perf_counter()
    compiler = GrammarCompiler(loaded.tokenizer, loaded.spec.vocab_size, cache_size=0)
    compiler.tokenizer  # noqa: B018 (built on first use: timed on its own)
    result = {"tokenizer (once per model)": time.perf_counter() - started}
    cases: dict[str, tuple[str, Any]] = {
        "typical schema (5 fields, one nested object)": ("json_schema", TYPICAL),
        "large schema (60 properties, 4 levels)": ("json_schema", large_schema(0)),
        "any JSON object": ("json_object", None),
        "regex `[a-z]{2,5}-[0-9]{2}`": ("regex", "[a-z]{2,5}-[0-9]{2}"),
        "choice of 5 labels": ("choice", [f"label-{i}" for i in range(5)]),
    }
    for label, (kind, value) in cases.items():
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            compiler.compile(kind, value)  # no cache: compiled anew every time
            runs.append(time.perf_counter() - start)
        result[label] = statistics.median(runs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    none, half = step_costs(args.device)
    compiled = compile_times(args.device)
    lines = [
        f"## What structured outputs cost (SmolLM2-135M-Instruct, {args.device})",
        "",
        f"Machine: {machine()}.",
        f"Command: `{command()}`.",
        "",
        "| decode step, 16 rows (own prefixes, 64-token prompts), median of "
        f"{STEPS} | no constraint | 8 rows constrained | ratio |",
        "|---|---|---|---|",
        f"| 4 rows: >= 400 integers; 4 rows: a string of >= 4,000 characters | "
        f"{none * 1000:.1f} ms | {half * 1000:.1f} ms | {half / none:.2f}x |",
        "",
        "| compiling a constraint (median of 5, no cache) | time |",
        "|---|---|",
        *[f"| {label} | {seconds * 1000:.2f} ms |" for label, seconds in compiled.items()],
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, "structured_outputs", body)


if __name__ == "__main__":
    main()
