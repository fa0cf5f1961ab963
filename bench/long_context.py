"""A decode step at long context: the engine against plain transformers on the same batch.

    python bench/long_context.py [--model smollm2] [--rows 8] [--context 1500]
                                 [--kernels gather,paged] [--write FILE]

All decode the same rows, each holding `context` tokens of KV, one token per row per step:
  engine        `EngineCore.step`: paged KV read through block tables, per-row prefixes
                (16 virtual tokens of the context are a prefix-tuning prefix, different per row),
                sampling and bookkeeping included; once per attention kernel of `--kernels`
                (gather: rows copied out for sdpa; paged: the block-mask path, which on a CPU
                runs its plain-torch reference, paged_attention.py)
  transformers  `model(input_ids, past_key_values=DynamicCache)` on the same batch with no
                prefix and no padding (every row the same length: its fastest case), then argmax
Median ms per step over `--steps` steps, all taking turns so drift hits them alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import load_named, prefilled_llm, random_prefix, time_interleaved
from bench.report import command, machine, write_section
from server.models import LoadedModel

PREFIX_TOKENS = 16


def transformers_decoder(loaded: LoadedModel, rows: int, context: int):
    """A step function decoding `rows` rows of `context` tokens with a DynamicCache."""
    model = loaded.model
    ids = torch.tensor([[(r * 7 + i) % 1000 + 1 for i in range(context)] for r in range(rows)])
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
    state = {"next": logits.argmax(-1, keepdim=True)}

    @torch.inference_mode()
    def step() -> None:
        out = model(input_ids=state["next"], past_key_values=cache, use_cache=True)
        state["next"] = out.logits[:, -1].argmax(-1, keepdim=True)
        state["next"].tolist()  # the host reads the tokens, as a server must

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--context", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", default="gather", help="engine attention kernels, by comma")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    loaded = load_named(args.model, args.device)
    prefixes = [random_prefix(loaded, PREFIX_TOKENS, seed) for seed in range(args.rows)]
    prompt_len = args.context - PREFIX_TOKENS
    max_len = args.context + 2 * args.steps + 16
    kernels = args.kernels.split(",")
    steps = {
        kernel: prefilled_llm(loaded, prefixes, prompt_len, max_len, kernel).step
        for kernel in kernels
    }
    steps["transformers"] = transformers_decoder(loaded, args.rows, args.context)
    times = time_interleaved(steps, args.steps)
    plain = times["transformers"]
    rows = [
        f"| {loaded.model_id} | {args.rows} | {args.context} | {kernel} | "
        f"{times[kernel]:.1f} ms | {plain:.1f} ms | {times[kernel] / plain:.3f} |"
        for kernel in kernels
    ]
    print("\n".join(rows), flush=True)
    body = "\n".join(
        [
            "## Decode step at long context: engine vs plain transformers",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            f"Each of {args.rows} rows holds {args.context} tokens of KV ({PREFIX_TOKENS} of them "
            "a different prefix-tuning prefix per row in the engine; none in transformers, "
            "whose rows are all the same length, so no padding); median of "
            f"{args.steps} steps after 3 warm-up steps, all taking turns; float32.",
            "",
            "| model | rows | context | attention | engine step | transformers step "
            "| engine / transformers |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, f"long_context_{args.device}", body)


if __name__ == "__main__":
    main()
