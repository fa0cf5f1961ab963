"""Settings become engine knobs in one place, with defaults that depend on the device."""

from __future__ import annotations

import pytest
import torch

from server.config import Settings
from server.engine.config import GAP_TARGET, MAX_STEP_TOKENS, EngineConfig, kv_bytes_per_token
from server.engine.llm import LLM
from tests.tiny import tiny_loaded


def test_settings_build_the_engine_config() -> None:
    settings = Settings(num_slots=3, max_len=96, max_waiting=7, max_waiting_per_tenant=2,
                        max_running_per_tenant=1, kv_cache_bytes=1 << 20)  # fmt: skip
    config = settings.engine_config()
    assert (config.num_slots, config.max_len, config.max_waiting) == (3, 96, 7)
    assert (config.max_waiting_per_tenant, config.max_running_per_tenant) == (2, 1)
    assert config.kv_cache_bytes == 1 << 20
    assert (config.max_step_tokens, config.gap_target) == (MAX_STEP_TOKENS, GAP_TARGET)
    assert Settings(gap_target=2).engine_config().gap_target == 2


def test_a_gap_target_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"gap_target: expected >= 1, found 0\.5"):
        EngineConfig(gap_target=0.5)


def test_a_step_budget_below_the_rows_is_raised_so_prefill_always_progresses() -> None:
    assert Settings(num_slots=32, max_step_tokens=8).engine_config().max_step_tokens == 33
    with pytest.raises(ValueError, match="max_step_tokens"):
        EngineConfig(num_slots=32, max_step_tokens=32)


def test_the_pool_holds_every_row_at_max_len_by_default_on_cpus() -> None:
    loaded = tiny_loaded("llama")
    config = EngineConfig(num_slots=4, max_len=100, block_size=16)
    # 7 blocks cover 100 positions, one more for a prefix's own, per row; plus zero and scratch.
    assert config.num_blocks(loaded.spec, torch.float32, torch.device("cpu")) == 4 * 8 + 2


def test_a_budget_sizes_the_pool_and_too_small_a_one_is_refused() -> None:
    loaded = tiny_loaded("llama")
    per_block = kv_bytes_per_token(loaded.spec, torch.float32) * 16
    config = EngineConfig(max_len=64, kv_cache_bytes=per_block * 40)
    assert config.num_blocks(loaded.spec, torch.float32, torch.device("cpu")) == 40
    with pytest.raises(ValueError, match="kv_cache_bytes: expected room for one request"):
        EngineConfig(max_len=64, kv_cache_bytes=per_block * 6).num_blocks(
            loaded.spec, torch.float32, torch.device("cpu")
        )


def test_attention_reads_gathered_rows_unless_the_paged_kernel_is_chosen() -> None:
    assert not Settings().engine_config().uses_paged_attention
    assert Settings(attention_kernel="paged").engine_config().uses_paged_attention
    assert not Settings(attention_kernel="gather").engine_config().uses_paged_attention


def test_the_paged_kernel_is_refused_for_a_model_without_sdpa_attention() -> None:
    config = EngineConfig(attention_kernel="paged")
    with pytest.raises(ValueError, match="paged attention: expected a model loaded with sdpa"):
        LLM(tiny_loaded("llama", attn="eager"), config)
