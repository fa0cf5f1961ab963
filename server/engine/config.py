"""EngineConfig: every knob of the engine, frozen, built from the settings in one place
(`Settings.engine_config()`); `LLM` and the tests build it directly."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from prefixes import ModelSpec

# Tokens per KV block. 16 is what paged engines settle on: small enough that a row wastes at most
# 15 positions, large enough that a block is one contiguous copy (16 x heads x dim) on a read.
DEFAULT_BLOCK_SIZE = 16

# Tokens fed in one forward at most: a bound on activation memory, not on time (the step cost
# model sizes each step in time, step_cost.py). 8,192 tokens of SmolLM2 take about 50 MB of
# activations at their widest (the MLP's), of Llama-3.2-1B in bf16 about 130 MB: sixteen
# prompts of 512 tokens arriving together are prefilled in one forward.
MAX_STEP_TOKENS = 8192

# A streaming row's gap between tokens may grow to this multiple of what the step's decoding
# alone costs while prompts are prefilled beside it (docs/scheduling.md, "The step budget").
GAP_TARGET = 2.8

# On GPUs, without a budget, the KV pool takes this share of the memory free after the model
# loaded, leaving room for activations and the prefix pool's own tensors.
GPU_KV_MEMORY_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class EngineConfig:
    num_slots: int = 16  # rows decoded together
    max_len: int = 2048  # positions per request: prefix + prompt + output
    # Tokens fed per step at most, decode and prefill chunks together: a memory bound.
    max_step_tokens: int = MAX_STEP_TOKENS
    # While rows decode, a step takes as many prompt tokens as the measured step cost says fit
    # in gap_target x the decode-only step; with no row decoding, prompts take the whole step.
    # None: no time limit, only max_step_tokens (and no calibration at start-up).
    gap_target: float | None = GAP_TARGET
    block_size: int = DEFAULT_BLOCK_SIZE
    # Bytes of KV blocks (keys and values, every layer). None: on CPUs room for every row at
    # max_len plus one prefix per row (untouched pages cost nothing), on GPUs a share of what
    # is free. Smaller budgets work: rows are preempted when it runs dry.
    kv_cache_bytes: int | None = None
    max_waiting: int = 256
    max_waiting_per_tenant: int = 1 << 30
    max_running_per_tenant: int = 8  # 0: no cap
    # Decode steps on static shapes (rows padded to a batch-size bucket, block tables to a width
    # bucket; static_decode.py). None: on CUDA devices, where it is what makes CUDA graphs
    # possible; off on CPUs, where a padding row costs as much compute as a real one.
    static_decode: bool | None = None
    # On CUDA, capture each static decode bucket in a CUDA graph and replay it (cuda_graphs.py).
    cuda_graphs: bool = True
    # How attention reads the KV pool: "gather" copies each row's blocks into contiguous rows
    # for sdpa in every layer; "paged" reads the pool in place through the block tables
    # (FlexAttention, compiled on CUDA; paged_attention.py). None: "gather" on every device.
    # On CPUs FlexAttention compiled over the pool costs what gather + sdpa does (6.7 vs 6.8 ms
    # for one layer, 8 rows at 1,500 tokens, bench/attention_kernels.py) but compiles anew for
    # every batch shape and not at all with dynamic shapes (torch 2.13); the paged path there
    # runs a slow reference, for tests. On GPUs it has not been measured yet: `bash bench/gpu.sh
    # kernels` compares the two.
    attention_kernel: Literal["gather", "paged"] | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool | str | float):
                continue
            floor = 0 if item.name == "max_running_per_tenant" else 1
            if value is not None and value < floor:
                raise ValueError(f"{item.name}: expected >= {floor}, found {value}")
        if self.gap_target is not None and not self.gap_target >= 1:
            raise ValueError(f"gap_target: expected >= 1, found {self.gap_target}")
        if self.max_step_tokens <= self.num_slots:
            # Every running row may need one decode token; prefill must still get some.
            raise ValueError(
                f"max_step_tokens: expected > num_slots ({self.num_slots}), "
                f"found {self.max_step_tokens}"
            )

    def uses_static_decode(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.static_decode is None else self.static_decode

    @property
    def uses_paged_attention(self) -> bool:
        return self.attention_kernel == "paged"

    def uses_cuda_graphs(self, device: torch.device) -> bool:
        return self.cuda_graphs and device.type == "cuda" and self.uses_static_decode(device)

    def num_blocks(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> int:
        """Blocks in the KV pool, the two reserved ones (zero and scratch) included."""
        per_block = kv_bytes_per_token(spec, dtype) * self.block_size
        if self.kv_cache_bytes is not None:
            budget = self.kv_cache_bytes
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * GPU_KV_MEMORY_SHARE)
        else:
            per_row = -(-self.max_len // self.block_size) + 1  # + a prefix's own blocks
            return self.num_slots * per_row + 2
        blocks = budget // per_block
        needed = -(-self.max_len // self.block_size) + 3
        if blocks < needed:
            raise ValueError(
                f"kv_cache_bytes: expected room for one request of max_len {self.max_len} "
                f"({needed * per_block} bytes), found {budget}"
            )
        return blocks


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * dtype.itemsize
