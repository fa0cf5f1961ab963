"""Time one decode step for 16 rows: 16 different prefixes vs one shared prefix vs 16 one-row steps.

    python bench/decode_step.py [--models tiny,smollm2] [--steps 30] [--write docs/benchmarks.md]

Every row carries a prefix-tuning prefix (T virtual tokens) and a prompt of P tokens, prefilled
before timing. A timed step is `EngineCore.step` (schedule, forward, sampling, bookkeeping),
exactly what the engine runs per iteration. "Sequential" is the same 16 rows stepped one at a
time, what a server that cannot mix prefixes in a batch would do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command, machine, write_section
from prefixes import CompiledPrefix, PrefixKind, RawPrefix
from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.models import LoadedModel, freeze, load_model, wrap_model

ROWS = 16


def tiny_llama(device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """hidden 256, 4 layers, 8 query / 2 KV heads: small enough that overheads dominate."""
    config = LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    return random_model(config, "tiny-llama", device, dtype)


def smollm2_geometry(device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """SmolLM2-135M's exact architecture with random weights: the same cost per step, for
    machines that do not have the embedded model's weights."""
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=100000.0,
    )  # fmt: skip
    return random_model(config, "SmolLM2-135M geometry (random weights)", device, dtype)


def llama_1b_geometry(device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Llama-3.2-1B's architecture (tied embeddings, 2.47 GB in bf16) with random weights and
    plain RoPE (its llama3 frequency scaling costs nothing per step)."""
    config = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
    )  # fmt: skip
    return random_model(config, "Llama-3.2-1B geometry (random weights)", device, dtype)


def micro_llama(device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Small enough for a benchmark's dry run to finish in seconds on a CPU."""
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    )  # fmt: skip
    return random_model(config, "micro-llama", device, dtype)


def random_model(config: LlamaConfig, name: str, device: str, dtype: str) -> LoadedModel:
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model in seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return wrap_model(freeze(model, device), None, name)


GEOMETRIES = {
    "tiny": tiny_llama,
    "micro": micro_llama,
    "smollm2-geometry": smollm2_geometry,
    "llama-1b-geometry": llama_1b_geometry,
}


def load_named(name: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    if name in GEOMETRIES:
        return GEOMETRIES[name](device, dtype)
    return load_model(None, cache_dir=Path("data/models"), device=device, dtype=dtype)


def random_prefix(loaded: LoadedModel, tokens: int, seed: int) -> CompiledPrefix:
    spec = loaded.spec
    shape = (spec.num_layers, 2, spec.num_kv_heads, tokens, spec.head_dim)
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return loaded.compile(RawPrefix(PrefixKind.PREFIX_TUNING, kv), max_virtual_tokens=tokens)


def prefilled_llm(
    loaded: LoadedModel,
    prefixes: list[CompiledPrefix],
    prompt_len: int,
    max_len: int,
    attention_kernel: Literal["gather", "paged"] | None = None,
) -> LLM:
    """An engine whose rows (one per prefix) have all prefilled and sampled their first token:
    its next step is a pure decode step."""
    greedy = SamplingParams(max_new_tokens=10_000, temperature=0, ignore_eos=True)
    llm = LLM(loaded, EngineConfig(num_slots=len(prefixes), max_len=max_len,
                                   max_step_tokens=len(prefixes) * (prompt_len + 1),
                                   max_running_per_tenant=0,
                                   attention_kernel=attention_kernel))  # fmt: skip
    for row, prefix in enumerate(prefixes):
        llm.add(Request([(row * 7 + i) % 1000 + 1 for i in range(prompt_len)], greedy, prefix))
    while any(not r.output_token_ids for r in llm.running) or len(llm.running) < len(prefixes):
        llm.step()
    return llm


def time_interleaved(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median ms per step of each variant, the variants taking turns so drift hits all alike."""
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def measure(loaded: LoadedModel, *, prefix_len: int, prompt_len: int, steps: int) -> dict:
    distinct = [random_prefix(loaded, prefix_len, seed) for seed in range(ROWS)]
    shared = [distinct[0]] * ROWS
    max_len = prefix_len + prompt_len + 2 * steps + 16
    different = prefilled_llm(loaded, distinct, prompt_len, max_len)
    same = prefilled_llm(loaded, shared, prompt_len, max_len)
    # What a server that cannot mix prefixes does: the same 16 rows, one engine step each.
    alone = [prefilled_llm(loaded, [prefix], prompt_len, max_len) for prefix in distinct]

    def sequential() -> None:
        for llm in alone:
            llm.step()

    variants = {"different": different.step, "same": same.step, "sequential": sequential}
    return time_interleaved(variants, steps)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--section", default="decode_step")
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args()

    lines = [
        "| model | 16 rows, 16 different prefixes | 16 rows, one prefix | 16 one-row steps |"
        " different / same | sequential / batched |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.models.split(","):
        loaded = load_named(name, args.device, args.dtype)
        r = measure(
            loaded, prefix_len=args.prefix_len, prompt_len=args.prompt_len, steps=args.steps
        )
        row = (
            f"| {loaded.model_id} | {r['different']:.2f} ms | {r['same']:.2f} ms | "
            f"{r['sequential']:.2f} ms | {r['different'] / r['same']:.3f} | "
            f"{r['sequential'] / r['different']:.1f}x |"
        )
        print(row, flush=True)
        lines.append(row)

    body = "\n".join(
        [
            "## Decode step: mixed prefixes in one batch",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            f"Each row: a prefix-tuning prefix of {args.prefix_len} virtual tokens and a "
            f"{args.prompt_len}-token prompt, prefilled before timing; median of {args.steps} "
            "steps after 3 warm-up steps, the three variants taking turns step by step; "
            f"{args.dtype} on {args.device}.",
            "",
            *lines,
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, args.section, body)


if __name__ == "__main__":
    main()
