"""The static decode path (rows padded to batch-size buckets, block tables to width buckets,
inputs in preallocated buffers; on CUDA replayed from CUDA graphs) gives, row for row, the
greedy tokens of the dynamic path and of PEFT's `generate` alone, whatever pads its buckets.

On the CPU the path runs eagerly; with PREFIX_SERVER_TEST_DEVICE=cuda the same tests run it
from CUDA graphs, and the last test checks the graphs themselves."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import ScheduledRow
from tests.integration.test_matches_peft import NEW_TOKENS, Case, build_cases, load
from tests.tiny import DEVICE, tiny_loaded

BLOCK = 4  # small blocks: contexts of 5 to 40 tokens cross several width buckets


def config(static: bool, **overrides) -> EngineConfig:
    # No gap target: both runs schedule by tokens alone, so they run the same steps (with a
    # measured step cost each engine's would differ by its own timings).
    return EngineConfig(
        **{"num_slots": 8, "max_len": 128, "block_size": BLOCK, "max_running_per_tenant": 0,
           "static_decode": static, "gap_target": None, **overrides}
    )  # fmt: skip


class ForwardLog:
    """Records each forward a runner runs: on which path, how many rows, in which bucket."""

    def __init__(self, runner: ModelRunner) -> None:
        self.static: list[tuple[int, tuple[int, int]]] = []  # (rows, (batch, width))
        self.dynamic_decode = 0  # forwards of decode rows only that took the dynamic path
        run_forward, static = runner.forward, runner.static

        def forward(rows: list[ScheduledRow]) -> torch.Tensor:
            self.dynamic_decode += all(row.num_tokens == 1 for row in rows)
            return run_forward(rows)

        runner.forward = forward  # type: ignore[method-assign]
        if static is not None:
            run_static = static.run

            def run(rows: list[ScheduledRow], key: tuple[int, int]) -> torch.Tensor:
                self.static.append((len(rows), key))
                return run_static(rows, key)

            static.run = run  # type: ignore[method-assign]


def staggered_run(llm: LLM, cases: list[Case]) -> tuple[list[list[int]], ForwardLog]:
    """Three rows start, the others join two steps later; rows stop after 3 to 8 tokens, so
    the batch shrinks through every bucket; then a second wave joins rows still decoding."""
    log = ForwardLog(llm.runner)
    wave = [*cases, *cases[:4]]
    requests = [
        Request(
            case.prompt,
            SamplingParams(max_new_tokens=3 + (5 * i) % 6, temperature=0),
            load(llm, case),
        )
        for i, case in enumerate(wave)
    ]
    for request in requests[:3]:
        llm.add(request)
    llm.step()
    llm.step()
    for request in requests[3 : len(cases)]:
        llm.add(request)
    while len(llm.running) > 2:
        llm.step()
    for request in requests[len(cases) :]:
        llm.add(request)
    while llm.has_work:
        llm.step()
    for case, request in zip(wave, requests, strict=True):
        count = request.sampling.max_new_tokens
        assert request.output_token_ids == case.expected[:count], case.kind
    return [r.output_token_ids for r in requests], log


@pytest.mark.parametrize("kernel", ["gather", "paged"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_decode_matches_the_dynamic_path_and_peft_as_rows_finish_and_join(
    arch: str, kernel: str, tmp_path: Path
) -> None:
    cases = build_cases(arch, "sdpa", tmp_path)
    assert max(len(case.expected) for case in cases) == NEW_TOKENS
    loaded = tiny_loaded(arch)
    dynamic, dynamic_log = staggered_run(LLM(loaded, config(static=False)), cases)
    static_llm = LLM(loaded, config(static=True, attention_kernel=kernel))
    static, static_log = staggered_run(static_llm, cases)

    assert static == dynamic
    assert dynamic_log.dynamic_decode > 0 and not dynamic_log.static
    # Every pure decode forward took the static path ...
    assert static_log.dynamic_decode == 0
    assert len(static_log.static) >= dynamic_log.dynamic_decode
    # ... across batch buckets, with padding rows present, and across width buckets.
    batches = {key[0] for _, key in static_log.static}
    widths = {key[1] for _, key in static_log.static}
    assert {1, 2, 4, 8} <= batches
    assert any(rows < key[0] for rows, key in static_log.static)
    if DEVICE == "cpu":  # GPUs read keys in widths of at least 64 positions: one bucket here
        assert len(widths) >= 3


def test_seeded_sampling_on_the_static_path_ignores_its_batch() -> None:
    loaded = tiny_loaded("llama")
    seeded = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    (dynamic,) = LLM(loaded, config(static=False)).generate([Request([4, 8, 15], seeded)])
    llm = LLM(loaded, config(static=True))
    (alone,) = llm.generate([Request([4, 8, 15], seeded)])
    others = [
        Request([16, 23, 42], SamplingParams(max_new_tokens=6, temperature=1.2)),  # unseeded
        Request([1, 2], SamplingParams(max_new_tokens=12, temperature=0)),
    ]
    mixed = Request([4, 8, 15], seeded)
    llm.generate([others[0], mixed, others[1]])
    assert llm.runner.static is not None and llm.runner.static.steps > 0
    assert mixed.output_token_ids == alone.output_token_ids == dynamic.output_token_ids


class HostReads(TorchDispatchMode):
    """Records the operations a CUDA graph cannot hold: reading a device value on the host (a
    sync, and a value frozen into the graph), selecting by a mask (a data-dependent shape),
    and making a tensor from host data (a copy frozen at its capture-time value)."""

    FORBIDDEN: ClassVar[set[str]] = {
        "aten.item",  # what inference mode dispatches for .item()
        "aten._local_scalar_dense",  # what .item() and .tolist() reach otherwise
        "aten.nonzero",
        "aten.masked_select",
        "aten.lift_fresh",
    }

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if name in self.FORBIDDEN or bool_index:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernel", ["gather", "paged"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_decode_forward_reads_nothing_back_from_the_device(arch: str, kernel: str) -> None:
    llm = LLM(tiny_loaded(arch), config(static=True, attention_kernel=kernel))
    llm.generate([Request([3, 1, 4], SamplingParams(max_new_tokens=3, temperature=0))])
    assert llm.runner.static is not None
    buffers = llm.runner.static.buffers((4, 3))  # zeros: every row a padding row
    guard = HostReads()
    # The guard sees real ops: a host read of the logits is found.
    with torch.inference_mode(), guard:
        logits = llm.runner.decode_forward(buffers)
        assert not guard.found
        logits.sum().item()
    assert logits.shape == (4, llm.loaded.spec.vocab_size)
    assert guard.found == ["aten.item.default"]


def test_a_failed_capture_falls_back_to_the_eager_forward() -> None:
    llm = LLM(tiny_loaded("llama"), config(static=True))
    (expected,) = llm.generate([Request([9, 9, 8], SamplingParams(8, temperature=0))])

    class Uncapturable:
        calls = 0

        def run(self, key, forward):
            self.calls += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    static = llm.runner.static
    assert static is not None
    graphs = Uncapturable()
    static.graphs = graphs  # type: ignore[assignment]
    (request,) = llm.generate([Request([9, 9, 8], SamplingParams(8, temperature=0))])
    assert request.output_token_ids == expected.output_token_ids
    assert graphs.calls == 1 and static.graphs is None


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kernel", ["gather", "paged"])
def test_cuda_graphs_are_captured_once_per_bucket_and_replayed(kernel: str, tmp_path: Path) -> None:
    cases = build_cases("llama", "sdpa", tmp_path)
    loaded = tiny_loaded("llama")
    eager, _ = staggered_run(LLM(loaded, config(static=True, cuda_graphs=False)), cases)
    llm = LLM(loaded, config(static=True, attention_kernel=kernel))
    graphed, log = staggered_run(llm, cases)
    assert graphed == eager
    graphs = llm.runner.static.graphs  # type: ignore[union-attr]
    assert graphs is not None
    assert graphs.captures == len({key for _, key in log.static})
    assert graphs.replays == len(log.static)
