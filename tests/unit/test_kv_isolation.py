"""No row reads another's values: positions past a row's end contribute exactly nothing, whatever
an earlier request left in a reused block (huge, Inf, NaN); a row whose own values overflow fails
alone; compiled prefixes that overflow the serving dtype are refused."""

from __future__ import annotations

import pytest
import torch

from prefixes import CompiledPrefix, InvalidPrefix, PrefixKind, RawPrefix, compile_prefix
from server.engine.blocks import ZERO_BLOCK
from server.engine.config import EngineConfig
from server.engine.kv_cache import PagedKVCache
from server.engine.llm import LLM
from server.engine.request import NonFiniteOutput, Request, SamplingParams
from server.models import LoadedModel
from tests.tiny import tiny_loaded

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
POISONS = [3e38, float("inf"), float("nan")]
KERNELS = ["gather", "paged"]  # attention on gathered rows, or on the pool in place


def engine(model: LoadedModel, num_slots: int, kernel: str) -> LLM:
    config = EngineConfig(max_running_per_tenant=0, attention_kernel=kernel)  # type: ignore[arg-type]
    return LLM(model, config, num_slots=num_slots, max_len=64)


def test_positions_past_a_rows_end_read_as_exact_zeros(loaded: LoadedModel) -> None:
    cache = PagedKVCache(loaded.spec, num_blocks=6, block_size=4, dtype=torch.float32)
    # A dirty pool: every block but the zero block (which no request owns and nothing writes)
    # as hostile earlier requests could leave it.
    cache.keys[:, :, ZERO_BLOCK + 1 :].fill_(float("nan"))
    cache.values[:, :, ZERO_BLOCK + 1 :].fill_(3e38)
    cache.zero([2, 3])  # what the engine does to every block it hands out
    heads, dim = loaded.spec.num_kv_heads, loaded.spec.head_dim
    # Row 0 holds block 2 and ends at position 3; row 1 holds blocks 3 and 4 and ends at 7.
    cache.bind(
        write_slots=torch.tensor([2 * 4 + 2, 4 * 4 + 2]),
        read_blocks=torch.tensor([[2, ZERO_BLOCK], [3, 4]]),
    )
    new = torch.ones(2, heads, 1, dim)
    keys, values = cache.update(new, new * 2, layer_idx=0)  # [B, H, kv_len, D]
    assert keys.shape == (2, heads, 8, dim)
    assert torch.equal(keys[0, :, 3:], torch.zeros(heads, 5, dim))  # past row 0's end: zeros
    assert torch.equal(values[0, :, 3:], torch.zeros(heads, 5, dim))
    assert torch.equal(keys[0, :, 2], torch.ones(heads, dim))  # its own new token is kept
    assert torch.equal(values[1, :, 6], torch.full((heads, dim), 2.0))
    assert keys[1, :, 4:6].isnan().all()  # its own earlier positions are whatever they hold
    assert not cache.keys[:, :, ZERO_BLOCK].any() and not cache.values[:, :, ZERO_BLOCK].any()


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def half_loaded() -> LoadedModel:
    return tiny_loaded("llama", dtype=torch.bfloat16)


def prefix_tuning(loaded: LoadedModel, tokens: int, seed: int, value: float | None = None):
    spec = loaded.spec
    shape = (spec.num_layers, 2, spec.num_kv_heads, tokens, spec.head_dim)
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if value is not None:
        tensor = tensor.sign() * value
    return RawPrefix(PrefixKind.PREFIX_TUNING, tensor)


def alone(loaded: LoadedModel, prompt: list[int], prefix: CompiledPrefix) -> list[int]:
    (request,) = LLM(loaded, num_slots=1, max_len=64).generate([Request(prompt, GREEDY, prefix)])
    return request.output_token_ids


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("poison", POISONS, ids=["3e38", "inf", "nan"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_in_dirty_blocks_beside_longer_rows_get_their_solo_tokens(
    loaded: LoadedModel, half_loaded: LoadedModel, dtype: str, poison: float, kernel: str
) -> None:
    model = loaded if dtype == "float32" else half_loaded
    own = [model.compile(prefix_tuning(model, 3 + i, seed=i), 64) for i in range(3)]
    prompts = [[5, 6, 7], [9], [11, 12]]
    expected = [alone(model, p, x) for p, x in zip(prompts, own, strict=True)]
    llm = engine(model, 4, kernel)
    cache = llm.runner.cache  # every block as a hostile earlier request could leave it
    cache.keys[:, :, ZERO_BLOCK + 1 :].fill_(poison)
    cache.values[:, :, ZERO_BLOCK + 1 :].fill_(poison)
    longer = Request(list(range(1, 40)), GREEDY, own[0])  # reads 42 positions of every row
    rows = [Request(p, GREEDY, x) for p, x in zip(prompts, own, strict=True)]
    llm.generate([longer, *rows])
    assert [r.output_token_ids for r in rows] == expected
    assert not cache.keys[:, :, ZERO_BLOCK].any()  # nothing ever writes the zero block
    assert not cache.values[:, :, ZERO_BLOCK].any()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_row_whose_own_values_overflow_fails_alone(
    loaded: LoadedModel, half_loaded: LoadedModel, dtype: str, kernel: str
) -> None:
    model = loaded if dtype == "float32" else half_loaded
    huge = model.compile(prefix_tuning(model, 12, seed=9, value=3e38), 64)  # finite: accepted
    own = model.compile(prefix_tuning(model, 3, seed=1), 64)
    llm = engine(model, 3, kernel)
    victims = [Request([5, 6, 7], GREEDY, own), Request([8, 9], GREEDY, own)]
    attacker = Request(list(range(1, 30)), GREEDY, huge)
    llm.generate([attacker, *victims])
    assert attacker.finish_reason == "error"
    assert isinstance(attacker.error, NonFiniteOutput) and "NaN or infinite" in str(attacker.error)
    assert attacker.output_token_ids == []
    assert [v.output_token_ids for v in victims] == [
        alone(model, [5, 6, 7], own),
        alone(model, [8, 9], own),
    ]
    assert llm.core.metrics.non_finite_rows == 1
    # Its blocks are reused at once, dirty, by a shorter row beside a longer one.
    again = [Request([8, 9], GREEDY, own), Request(list(range(1, 20)), GREEDY, own)]
    llm.generate(again)
    assert again[0].output_token_ids == alone(model, [8, 9], own)


def test_compiled_values_that_overflow_the_serving_dtype_are_refused() -> None:
    def no_soft_prompts(_: torch.Tensor) -> torch.Tensor:
        raise AssertionError("prefix tuning needs no forward")

    shape = (2, 2, 1, 3, 4)
    cases = [
        (torch.float16, 7e4),  # float16's largest finite is 65504
        (torch.bfloat16, 3.4e38),  # past bfloat16's 3.39e38
    ]
    for dtype, value in cases:
        raw = RawPrefix(PrefixKind.PREFIX_TUNING, torch.full(shape, value))
        with pytest.raises(InvalidPrefix) as caught:
            compile_prefix(raw, no_soft_prompts, dtype=dtype)
        message = str(caught.value)
        assert caught.value.field == "values"
        assert str(dtype).removeprefix("torch.") in message and "NaN or Inf" in message
    # Just inside each bound: accepted, values kept.
    for dtype, value in [(torch.float16, 6e4), (torch.bfloat16, 3e38), (torch.float32, 3e38)]:
        raw = RawPrefix(PrefixKind.PREFIX_TUNING, torch.full(shape, value))
        compiled = compile_prefix(raw, no_soft_prompts, dtype=dtype)
        assert torch.isfinite(compiled.kv).all()


def test_a_soft_prompt_whose_forward_overflows_is_refused() -> None:
    """The check is on the compiled KV: finite embeddings can still overflow in the forward."""

    def overflowing_forward(embeddings: torch.Tensor) -> torch.Tensor:
        kv = torch.zeros(2, 2, 1, embeddings.shape[0], 4, dtype=embeddings.dtype)
        kv[1, 0, 0, -1] = float("inf")
        return kv

    raw = RawPrefix(PrefixKind.PROMPT_TUNING, torch.full((3, 8), 1e4))
    with pytest.raises(InvalidPrefix, match=r"values: .* 4 of 48 compiled values NaN or Inf"):
        compile_prefix(raw, overflowing_forward, dtype=torch.float32)
