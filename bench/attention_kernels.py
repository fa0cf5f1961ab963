"""One layer's attention at long context on the CPU: the kernels the engine could run.

    python bench/attention_kernels.py [--rows 8] [--context 1500] [--write FILE]

SmolLM2-135M's attention geometry (9 query heads over 3 KV heads of 64), float32, every row
holding `context` tokens of KV in 16-token blocks scattered over the pool, one query per row
(a decode step). Median ms per call over `--calls` calls, each variant in turn:
  gather + sdpa      what the engine runs: PagedKVCache.update (write the new K/V, gather each
                     row's blocks) and sdpa under the additive mask
  flex compiled      FlexAttention compiled by inductor for the CPU, reading the pool in place
                     through the engine's block mask (its CPU kernel needs the mask's block
                     lists as wide as the pool); its compile time is reported apart
  listed blocks      the paged path's plain-torch reference (paged_attention.py), what
                     `--attention-kernel paged` runs on a CPU
It also tries the compiled kernel with dynamic shapes, which the engine's changing batch shapes
would need, and reports whether that compiles.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command, machine, write_section
from prefixes import ModelSpec
from server.engine.kv_cache import PagedKVCache
from server.engine.paged_attention import PagedBlockMask, listed_blocks_attention

BLOCK = 16
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def pool_wide(mask: BlockMask, num_blocks: int) -> BlockMask:
    """The same mask with its block lists padded to the pool's width (the CPU kernel's need)."""
    assert mask.full_kv_num_blocks is not None and mask.full_kv_indices is not None
    pad = (0, num_blocks - mask.kv_indices.shape[-1])
    return type(mask).from_kv_blocks(
        mask.kv_num_blocks,
        F.pad(mask.kv_indices, pad),
        mask.full_kv_num_blocks,
        F.pad(mask.full_kv_indices, pad),
        BLOCK_SIZE=mask.BLOCK_SIZE,
        mask_mod=mask.mask_mod,
        seq_lengths=mask.seq_lengths,
        compute_q_blocks=False,
    )


def median_ms(call: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--context", type=int, default=1500)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)

    width = -(-(args.context + 1) // BLOCK)
    num_blocks = args.rows * width + 2
    spec = ModelSpec(
        num_layers=1, hidden_size=HEADS * HEAD_DIM, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
        vocab_size=1, max_positions=args.context + 1, dtype="float32",
    )  # fmt: skip
    cache = PagedKVCache(spec, num_blocks, BLOCK, dtype=torch.float32)
    cache.keys.normal_()
    cache.values.normal_()
    tables = (torch.randperm(num_blocks - 2)[: args.rows * width] + 2).view(args.rows, width)
    positions = torch.full((args.rows, 1), args.context)
    write_slots = tables[:, -1] * BLOCK + args.context % BLOCK
    query = torch.randn(args.rows, HEADS, 1, HEAD_DIM)
    new_kv = torch.randn(args.rows, KV_HEADS, 1, HEAD_DIM)
    keys = torch.arange(width * BLOCK)
    visible = (keys[None, None, :] <= positions[:, :, None])[:, None]
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    mask = PagedBlockMask(num_blocks, BLOCK, torch.device("cpu")).build(tables, positions)
    pool_k, pool_v = (t[0].view(1, KV_HEADS, -1, HEAD_DIM) for t in (cache.keys, cache.values))

    def gather_sdpa() -> torch.Tensor:
        cache.bind(write_slots, tables)
        k, v = cache.update(new_kv, new_kv, 0)
        return F.scaled_dot_product_attention(query, k, v, attn_mask=additive, enable_gqa=True)

    expected = gather_sdpa()  # after its write: every variant reads the same pool
    compiled = torch.compile(flex_attention, dynamic=False)
    wide = pool_wide(mask, num_blocks)
    start = time.perf_counter()
    flex_out = compiled(query, pool_k, pool_v, block_mask=wide, enable_gqa=True)
    compile_s = time.perf_counter() - start
    assert isinstance(flex_out, torch.Tensor)
    torch.testing.assert_close(flex_out, expected)
    reference = listed_blocks_attention(query, pool_k, pool_v, mask, None).transpose(1, 2)
    torch.testing.assert_close(reference, expected)

    with torch.inference_mode():
        times = {
            "gather + sdpa": median_ms(gather_sdpa, args.calls),
            "flex compiled": median_ms(
                lambda: compiled(query, pool_k, pool_v, block_mask=wide, enable_gqa=True),
                args.calls,
            ),
            "listed blocks": median_ms(
                lambda: listed_blocks_attention(query, pool_k, pool_v, mask, None), args.calls
            ),
        }
    try:
        torch.compile(flex_attention, dynamic=True)(
            query, pool_k, pool_v, block_mask=wide, enable_gqa=True
        )
        dynamic = "compiles"
    except Exception as error:  # what inductor raises is the finding
        dynamic = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:100]}"

    lines = [f"| {name} | {ms:.2f} ms |" for name, ms in times.items()]
    body = "\n".join(
        [
            "## One layer's attention at long context on the CPU: gather + sdpa against the "
            "paged kernels",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            f"{args.rows} rows, each decoding one token over {args.context} tokens of KV in "
            f"16-token blocks; SmolLM2-135M's heads (9 query, 3 KV, dim 64), float32; median "
            f"of {args.calls} calls.",
            "",
            "| kernel | per call |",
            "|---|---|",
            *lines,
            "",
            f"Compiling the FlexAttention CPU kernel for this one shape took {compile_s:.1f} s; "
            f"with dynamic shapes it {dynamic}.",
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "attention_kernels_cpu", body)


if __name__ == "__main__":
    main()
