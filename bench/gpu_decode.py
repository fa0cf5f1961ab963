"""The engine's decode step on a GPU, against the bandwidth floor and transformers' fastest path.

    python bench/gpu_decode.py [--part all|env|engine|transformers|peft|load|summary]
                               [--device cuda] [--out DIR] [--models A,B] [--batches 64,1]
                               [--dry-run]

bench/gpu.sh runs every part on a lent GPU, each in its own process under its own time limit.
A part writes its markdown section into DIR/gpu_bench.md (bench/report.py's markers, ready to
paste into docs/benchmarks.md) and its figures into DIR/results.json, after every measured row,
so a part stopped at its limit keeps what it measured; `summary` checks the figures against
issue 9's targets. `--device cpu --dry-run` runs every part on a micro model in seconds (no
torch.compile, no CUDA graphs); a test runs it, so the script keeps working without a GPU.

Measured on random-weight models in bf16 (Llama-3.2-1B's and SmolLM2-135M's geometries) at
batch 64, 1, 16 and 256 (in that order: the target's batch first), every row holding 1,000
tokens of KV when timing starts (a prefix of 32 virtual tokens and a 968-token prompt):
  engine        ms per decode step (EngineCore.step: schedule, forward, sampling, bookkeeping),
                tokens/s and the ratio to the bandwidth floor, with min(batch, 64) different
                prefixes against one shared prefix (the two engines taking turns step by step);
                at batch 64 of the first model also the dynamic and the static-eager paths, and
                a torch.profiler summary of one step (DIR/profile_decode_step.txt)
  transformers  the same batch without prefixes through StaticCache + torch.compile(
                mode="reduce-overhead", fullgraph=True): one decode forward, argmax, ids read
                by the host
  peft          PEFT `generate` with one prefix for the whole batch: ms per new token
  load          bench/load.py with 256 requests arriving at once into 256 slots
  kernels       the engine's decode step with each attention kernel: rows gathered for sdpa
                against FlexAttention reading the pool in place (`--attention-kernel paged`),
                on the device's default decode path, taking turns step by step; the first
                step of each (compiling, capturing) timed apart
floor = (weight bytes read + sum over rows of KV tokens x KV bytes per token) / bandwidth, the
bandwidth measured here: a device-to-device copy, (bytes read + bytes written) / time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import load as load_bench
from bench.decode_step import load_named, random_prefix, time_interleaved
from bench.report import machine, write_section
from prefixes import CompiledPrefix
from server.engine.config import EngineConfig, kv_bytes_per_token
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.models import LoadedModel

PARTS = ("env", "engine", "transformers", "peft", "load", "kernels", "summary")
KERNELS = ("gather", "paged")  # EngineConfig.attention_kernel
REPORT = "gpu_bench.md"
RESULTS = "results.json"
PROFILE = "profile_decode_step.txt"
WARMUP_STEPS = 3  # time_interleaved's


@dataclass(frozen=True)
class Plan:
    models: tuple[str, ...] = ("llama-1b-geometry", "smollm2-geometry")
    batches: tuple[int, ...] = (64, 1, 16, 256)
    dtype: str = "bfloat16"
    prefix_tokens: int = 32
    context: int = 1000  # KV tokens per row when timing starts, the prefix's included
    max_prefixes: int = 64
    steps: int = 15  # timed steps per variant (stays inside one block-table width bucket)
    prefill_tokens: int = 16384  # the engine's per-step budget while the rows prefill
    peft_new_tokens: int = 8
    copy_bytes: int = 1 << 30  # per buffer of the bandwidth copy: far past the L2 cache
    compile: bool = True  # transformers' path through torch.compile
    static_decode: bool | None = None  # the engine's default for the device
    load_args: tuple[str, ...] = (
        "--model", "llama-1b-geometry", "--dtype", "bfloat16", "--requests", "256",
        "--rate", "100000", "--slots", "256", "--tenants", "64", "--virtual-tokens", "32",
        "--new-tokens", "64", "--skip-baselines",
    )  # fmt: skip


DRY_RUN = Plan(
    models=("micro",), batches=(3,), dtype="float32", prefix_tokens=4, context=24,
    max_prefixes=2, steps=3, prefill_tokens=64, peft_new_tokens=2, copy_bytes=1 << 22,
    compile=False, static_decode=True,  # the GPU's path, run eagerly
    load_args=(
        "--model", "micro", "--requests", "6", "--rate", "1000", "--slots", "4",
        "--tenants", "2", "--virtual-tokens", "4", "--new-tokens", "3", "--skip-baselines",
    ),
)  # fmt: skip


@dataclass
class Report:
    """results.json and gpu_bench.md under the output folder, rewritten after every row."""

    out: Path
    results: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / RESULTS
        self.results = json.loads(path.read_text()) if path.exists() else {}

    def put(self, part: str, key: str, value: object) -> None:
        self.results.setdefault(part, {})[key] = value
        (self.out / RESULTS).write_text(json.dumps(self.results, indent=1, sort_keys=True))

    def section(self, name: str, lines: list[str]) -> None:
        write_section(self.out / REPORT, name, "\n".join(lines))


# --- measuring ---------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds `work` takes on the device (CUDA events there, the host clock on CPUs)."""
    if device.type != "cuda":
        start = time.perf_counter()
        work()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    work()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and bytes written."""
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()  # not zeros
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    sync(device)
    seconds = statistics.median(elapsed(device, lambda: target.copy_(source)) for _ in range(20))
    return 2 * source.numel() * source.element_size() / seconds


def weight_bytes(loaded: LoadedModel) -> int:
    """Bytes of weights a decode step reads: every parameter once (a tied embedding once), but
    not an untied input embedding, of which a step reads only its rows' entries."""
    model = loaded.model
    sizes = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != embedding.data_ptr():
        sizes.pop(embedding.data_ptr(), None)
    return sum(sizes.values())


def floor_ms(weights: int, kv_tokens: float, kv_per_token: int, bandwidth: float) -> float:
    return (weights + kv_tokens * kv_per_token) / bandwidth * 1000


def free(device: torch.device) -> None:
    """Give the memory of the engines just dropped back before the next ones take theirs."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# --- the engine --------------------------------------------------------------------------------


def prefilled_engine(
    loaded: LoadedModel, plan: Plan, prefixes: list[CompiledPrefix], **options: Any
) -> LLM:
    """An engine whose rows (one per prefix) hold `plan.context` tokens of KV and have sampled
    their first token: its next step is a pure decode step."""
    rows, block = len(prefixes), 16
    if plan.static_decode is not None:
        options = {"static_decode": plan.static_decode, **options}
    max_len = plan.context + 2 * (WARMUP_STEPS + plan.steps) + block
    spec, vocab = loaded.spec, loaded.spec.vocab_size
    per_block = kv_bytes_per_token(spec, loaded.dtype) * block
    blocks = rows * (-(-max_len // block) + 1) + plan.max_prefixes * 2 + 4
    config = EngineConfig(
        num_slots=rows, max_len=max_len, block_size=block, kv_cache_bytes=blocks * per_block,
        max_step_tokens=max(plan.prefill_tokens, rows + 1), max_running_per_tenant=0,
        **options,
    )  # fmt: skip
    llm = LLM(loaded, config)
    greedy = SamplingParams(max_new_tokens=10_000, temperature=0, ignore_eos=True)
    prompt_len = plan.context - plan.prefix_tokens
    for row, prefix in enumerate(prefixes):
        prompt = [(row * 7 + i) % (vocab - 1) + 1 for i in range(prompt_len)]
        llm.add(Request(prompt, greedy, prefix))
    while len(llm.running) < rows or any(not r.output_token_ids for r in llm.running):
        llm.step()
    return llm


def path_of(llm: LLM) -> str:
    static = llm.runner.static
    if static is None:
        return "dynamic"
    if static.graphs is None:
        return "static, eager"
    return f"static, CUDA graphs ({static.graphs.captures} captured)"


def engine_part(plan: Plan, device: torch.device, report: Report) -> None:
    bandwidth = copy_bandwidth(device, plan.copy_bytes)
    report.put("engine", "bandwidth", bandwidth)
    rows: list[str] = []
    mid_context = plan.context + WARMUP_STEPS + (plan.steps + 1) / 2  # KV per row, timed steps

    def write() -> None:
        report.section(
            "gpu_decode_engine",
            [
                "## GPU decode step: the engine against the bandwidth floor",
                "",
                f"Machine: {machine()}.",
                "Command: `bash bench/gpu.sh` (`python bench/gpu_decode.py --part engine`).",
                f"Random weights in {plan.dtype}. Each row holds {plan.context} tokens of KV when "
                f"timing starts: a prefix-tuning prefix of {plan.prefix_tokens} virtual tokens and "
                f"a {plan.context - plan.prefix_tokens}-token prompt. A step is `EngineCore.step` "
                "(schedule, forward, sampling, bookkeeping, the ids read by the host); median of "
                f"{plan.steps} steps after {WARMUP_STEPS} warm-up steps, the engine with "
                "min(batch, 64) different prefixes and the one with a single shared prefix "
                "taking turns step by step.",
                f"floor = (weight bytes + rows x {mid_context:.0f} KV tokens x KV bytes per token)"
                f" / bandwidth; bandwidth = {bandwidth / 1e12:.2f} TB/s, measured here: a "
                f"{plan.copy_bytes >> 20} MiB device-to-device copy, (bytes read + bytes "
                "written) / time, median of 20.",
                "",
                "| model | batch | prefixes | path | ms/step, different prefixes | ms/step, one "
                "prefix | different / one | tokens/s | floor | step / floor |",
                "|---|---|---|---|---|---|---|---|---|---|",
                *rows,
            ],
        )

    for name in plan.models:
        loaded = load_named(name, str(device), plan.dtype)
        weights = weight_bytes(loaded)
        kv_per_token = kv_bytes_per_token(loaded.spec, loaded.dtype)
        pool = [
            random_prefix(loaded, plan.prefix_tokens, seed) for seed in range(plan.max_prefixes)
        ]
        for batch in plan.batches:
            try:
                different = prefilled_engine(
                    loaded, plan, [pool[i % len(pool)] for i in range(batch)]
                )
                same = prefilled_engine(loaded, plan, [pool[0]] * batch)
                times = time_interleaved(
                    {"different": different.step, "same": same.step}, plan.steps
                )
                floor = floor_ms(weights, batch * mid_context, kv_per_token, bandwidth)
                result = {
                    "ms_different": times["different"], "ms_same": times["same"],
                    "tokens_per_s": batch / times["different"] * 1000, "floor_ms": floor,
                    "weight_bytes": weights, "kv_bytes": batch * mid_context * kv_per_token,
                    "path": path_of(different),
                }  # fmt: skip
                report.put("engine", f"{name}/{batch}", result)
                rows.append(
                    f"| {loaded.model_id} | {batch} | {min(batch, len(pool))} | {result['path']} | "
                    f"{times['different']:.2f} ms | {times['same']:.2f} ms | "
                    f"{times['different'] / times['same']:.3f} | {result['tokens_per_s']:.0f} | "
                    f"{floor:.3f} ms | {times['different'] / floor:.2f}x |"
                )
                print(rows[-1], flush=True)
                write()
                if name == plan.models[0] and batch == plan.batches[0]:
                    del same
                    free(device)
                    try:
                        paths_and_profile(loaded, plan, device, report, different, pool, batch)
                    except Exception:  # the table above stands without it
                        traceback.print_exc()
            except Exception as exc:  # one size failing (memory, say) must not cost the others
                traceback.print_exc()
                rows.append(f"| {loaded.model_id} | {batch} | failed: {type(exc).__name__}: "
                            f"{str(exc)[:120]} |||||||")  # fmt: skip
                write()
            finally:
                different = same = None  # type: ignore[assignment]
                free(device)
        del loaded, pool
        free(device)


def paths_and_profile(
    loaded: LoadedModel,
    plan: Plan,
    device: torch.device,
    report: Report,
    default: LLM,
    pool: list[CompiledPrefix],
    batch: int,
) -> None:
    """The same step on each decode path, then a profile of one step of the default path and
    of the dynamic one."""
    prefixes = [pool[i % len(pool)] for i in range(batch)]
    variants = {path_of(default): default}
    dynamic = prefilled_engine(loaded, plan, prefixes, static_decode=False)
    variants["dynamic"] = dynamic
    if device.type == "cuda":
        variants["static, eager"] = prefilled_engine(
            loaded, plan, prefixes, static_decode=True, cuda_graphs=False
        )
    times = time_interleaved({k: llm.step for k, llm in variants.items()}, plan.steps)
    report.put("paths", f"{loaded.model_id}/{batch}", times)
    lines = [
        f"## GPU decode step: the decode paths ({loaded.model_id}, batch {batch})",
        "",
        f"Machine: {machine()}.",
        "Command: `bash bench/gpu.sh` (`python bench/gpu_decode.py --part engine`).",
        f"The same {batch} rows ({min(batch, len(pool))} different prefixes, {plan.context} "
        f"tokens of KV each) on each path, taking turns; median of {plan.steps} steps. "
        "dynamic: per-step shapes and tensors built for each forward (the CPU's default); "
        "static: batch and block-table buckets on preallocated buffers.",
        "",
        "| path | ms/step |",
        "|---|---|",
        *(f"| {k} | {v:.2f} ms |" for k, v in times.items()),
    ]
    report.section("gpu_decode_paths", lines)
    print("\n".join(lines), flush=True)
    summaries = [profile_step(default, device, report.out / PROFILE, path_of(default), "w")]
    summaries.append(profile_step(dynamic, device, report.out / PROFILE, "dynamic", "a"))
    report.section(
        "gpu_decode_profile",
        [
            f"## GPU decode step: where the time goes ({loaded.model_id}, batch {batch})",
            "",
            f"Machine: {machine()}.",
            "torch.profiler over one `EngineCore.step` (profiling slows the host side); "
            f"the full tables are in {PROFILE}.",
            "",
            *[line for summary in summaries for line in summary],
        ],
    )


def profile_step(llm: LLM, device: torch.device, path: Path, label: str, mode: str) -> list[str]:
    """Profile one step; append its op table to `path`; return a markdown summary."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    llm.step()
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        llm.step()
        wall = (time.perf_counter() - start) * 1000
    averages = prof.key_averages()
    on_device = device.type == "cuda"
    sort = "self_device_time_total" if on_device else "self_cpu_time_total"
    with path.open(mode) as out:
        out.write(f"== one decode step, {label}: {wall:.2f} ms of wall time (profiled)\n")
        out.write(averages.table(sort_by=sort, row_limit=40) + "\n\n")

    def total(item: object, attribute: str) -> float:
        return float(getattr(item, attribute, 0.0) or 0.0)

    device_us = sum(total(item, "self_device_time_total") for item in averages)
    counts = {item.key: item.count for item in averages}
    launches = counts.get("cudaLaunchKernel", 0) + counts.get("cudaLaunchKernelExC", 0)
    ranked = sorted(averages, key=lambda item: -total(item, sort))[:8]
    unit = "device" if on_device else "CPU"
    return [
        f"**{label}**: {wall:.2f} ms wall, {device_us / 1000:.2f} ms of kernel time, "
        f"{launches} kernel launches from the host, {counts.get('cudaGraphLaunch', 0)} graph "
        "launches. Top operations by self " + unit + " time:",
        "",
        f"| operation | calls | self {unit} time |",
        "|---|---|---|",
        *(
            f"| `{item.key[:70]}` | {item.count} | {total(item, sort) / 1000:.3f} ms |"
            for item in ranked
        ),
        "",
    ]


# --- the peers ---------------------------------------------------------------------------------


def transformers_step(
    loaded: LoadedModel, plan: Plan, batch: int, device: torch.device
) -> Callable[[], None]:
    """One decode step of transformers' fastest path: `batch` rows, no prefix, every row the
    same length, `plan.context` tokens already in a StaticCache."""
    from transformers import StaticCache

    model = loaded.model
    torch._dynamo.reset()  # static shapes per batch, as a server would compile them
    forward = model.forward
    if plan.compile:
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    max_len = plan.context + 2 * (WARMUP_STEPS + plan.steps) + 8
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    ids = torch.randint(1, loaded.spec.vocab_size, (batch, plan.context), device=device)
    with torch.no_grad():
        for chunk in ids.split(256, dim=1):  # bounded activations at batch 256
            logits = model(
                input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1
            ).logits
    state = {"next": logits[:, -1].argmax(-1, keepdim=True)}

    @torch.no_grad()
    def step() -> None:
        out = forward(input_ids=state["next"], past_key_values=cache, use_cache=True)
        state["next"] = out.logits[:, -1].argmax(-1, keepdim=True)
        state["next"].tolist()  # the host reads the ids, as a server must

    return step


def transformers_part(plan: Plan, device: torch.device, report: Report) -> None:
    bandwidth = copy_bandwidth(device, plan.copy_bytes)
    mode = 'torch.compile(mode="reduce-overhead", fullgraph=True)' if plan.compile else "eager"
    rows: list[str] = []
    for name in plan.models:
        loaded = load_named(name, str(device), plan.dtype)
        weights = weight_bytes(loaded)
        kv_per_token = kv_bytes_per_token(loaded.spec, loaded.dtype)
        for batch in plan.batches:
            step: Callable[[], None] | None = None
            try:
                step = transformers_step(loaded, plan, batch, device)
                start = time.perf_counter()
                step()  # compiles
                first = time.perf_counter() - start
                ms = time_interleaved({"step": step}, plan.steps)["step"]
                kv_tokens = batch * (plan.context + WARMUP_STEPS + (plan.steps + 1) / 2)
                floor = floor_ms(weights, kv_tokens, kv_per_token, bandwidth)
                result = {"ms": ms, "tokens_per_s": batch / ms * 1000, "first_call_s": first,
                          "floor_ms": floor}  # fmt: skip
                report.put("transformers", f"{name}/{batch}", result)
                rows.append(
                    f"| {loaded.model_id} | {batch} | {ms:.2f} ms | {result['tokens_per_s']:.0f} | "
                    f"{ms / floor:.2f}x | {first:.1f} s |"
                )
            except Exception as exc:
                traceback.print_exc()
                rows.append(f"| {loaded.model_id} | {batch} | failed: {type(exc).__name__}: "
                            f"{str(exc)[:120]} ||||")  # fmt: skip
            finally:
                step = None  # its cache
                free(device)
            print(rows[-1], flush=True)
            report.section(
                "gpu_decode_transformers",
                [
                    "## GPU decode step: transformers' own fastest path, same batch",
                    "",
                    f"Machine: {machine()}.",
                    "Command: `bash bench/gpu.sh` (`python bench/gpu_decode.py --part "
                    "transformers`).",
                    f"No prefix, every row the same length (no padding), {plan.context} tokens of "
                    f"KV when timing starts: StaticCache + {mode}; a step is one decode forward, "
                    f"argmax and the ids read by the host; median of {plan.steps} steps after "
                    f"{WARMUP_STEPS} warm-up steps; the first call (compiling) timed apart. The "
                    f"floor as in the engine's table ({bandwidth / 1e12:.2f} TB/s measured in "
                    "this process).",
                    "",
                    "| model | batch | ms/step | tokens/s | step / floor | first call |",
                    "|---|---|---|---|---|---|",
                    *rows,
                ],
            )
        del loaded
        free(device)


def peft_ms_per_token(
    peft_model: torch.nn.Module, plan: Plan, batch: int, vocab: int, device: torch.device
) -> float:
    """PEFT `generate`'s ms per new token: (generate of 1 + N tokens - generate of 1) / N."""
    ids = torch.randint(1, vocab, (batch, plan.context - plan.prefix_tokens), device=device)

    def generate(new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            peft_model.generate(  # type: ignore[operator]
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        sync(device)
        return time.perf_counter() - start

    generate(2)  # warm-up
    one = min(generate(1) for _ in range(2))
    more = min(generate(1 + plan.peft_new_tokens) for _ in range(2))
    return (more - one) / plan.peft_new_tokens * 1000


def peft_part(plan: Plan, device: torch.device, report: Report) -> None:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    rows: list[str] = []
    for name in plan.models:
        loaded = load_named(name, str(device), plan.dtype)
        config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=plan.prefix_tokens
        )
        peft_model = get_peft_model(loaded.model, config).to(device).eval()
        for batch in plan.batches:
            try:
                ms = peft_ms_per_token(peft_model, plan, batch, loaded.spec.vocab_size, device)
                report.put("peft", f"{name}/{batch}", {"ms_per_token": ms})
                rows.append(
                    f"| {loaded.model_id} | {batch} | {ms:.2f} ms | {batch / ms * 1000:.0f} |"
                )
            except Exception as exc:
                traceback.print_exc()
                rows.append(f"| {loaded.model_id} | {batch} | failed: {type(exc).__name__}: "
                            f"{str(exc)[:120]} ||")  # fmt: skip
            finally:
                free(device)
            print(rows[-1], flush=True)
            report.section(
                "gpu_decode_peft",
                [
                    "## GPU decode: PEFT generate, same batch",
                    "",
                    f"Machine: {machine()}.",
                    "Command: `bash bench/gpu.sh` (`python bench/gpu_decode.py --part peft`).",
                    f"One prefix-tuning adapter ({plan.prefix_tokens} virtual tokens) for the "
                    f"whole batch, {plan.context - plan.prefix_tokens}-token prompts; ms per new "
                    f"token = (generate of {1 + plan.peft_new_tokens} tokens - generate of 1) / "
                    f"{plan.peft_new_tokens}, each the faster of two runs; greedy.",
                    "",
                    "| model | batch | ms per token | tokens/s |",
                    "|---|---|---|---|",
                    *rows,
                ],
            )
        del loaded, peft_model
        free(device)


def load_part(plan: Plan, device: torch.device, report: Report) -> None:
    argv = [*plan.load_args, "--device", str(device.type), "--write", str(report.out / REPORT)]
    outcomes = load_bench.main(argv)
    for outcome in outcomes:
        report.put(
            "load",
            outcome.name,
            {
                "tokens_per_s": outcome.throughput,
                "ttft_p50_ms": outcome.ttft(0.5) * 1000,
                "ttft_p99_ms": outcome.ttft(0.99) * 1000,
                "per_token_p50_ms": outcome.per_token(0.5) * 1000,
                "per_token_p99_ms": outcome.per_token(0.99) * 1000,
            },
        )


# --- environment and targets -------------------------------------------------------------------


def env_part(plan: Plan, device: torch.device, report: Report) -> None:
    import peft
    import transformers

    bandwidth = copy_bandwidth(device, plan.copy_bytes)
    info = {
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bandwidth": bandwidth,
    }
    report.put("env", "info", info)
    lines = [
        "## GPU run: environment",
        "",
        f"Machine: {info['machine']}.",
        f"transformers {info['transformers']}, peft {info['peft']}.",
        f"Device-to-device copy: {bandwidth / 1e12:.2f} TB/s ((bytes read + bytes written) / "
        f"time, {plan.copy_bytes >> 20} MiB, median of 20).",
    ]
    report.section("gpu_decode_env", lines)
    print("\n".join(lines), flush=True)


def kernels_part(plan: Plan, device: torch.device, report: Report) -> None:
    """The same decode step with attention on gathered rows and on the pool in place."""
    rows: list[str] = []
    for name in plan.models:
        loaded = load_named(name, str(device), plan.dtype)
        pool = [
            random_prefix(loaded, plan.prefix_tokens, seed) for seed in range(plan.max_prefixes)
        ]
        for batch in plan.batches:
            engines: dict[str, LLM] = {}
            try:
                prefixes = [pool[i % len(pool)] for i in range(batch)]
                first_ms = {}
                for kernel in KERNELS:
                    engines[kernel] = prefilled_engine(
                        loaded, plan, prefixes, attention_kernel=kernel
                    )
                    first_ms[kernel] = elapsed(device, engines[kernel].step) * 1000
                times = time_interleaved({k: llm.step for k, llm in engines.items()}, plan.steps)
                result = {"ms": times, "first_step_ms": first_ms,
                          "path": path_of(engines["paged"])}  # fmt: skip
                report.put("kernels", f"{name}/{batch}", result)
                rows.append(
                    f"| {loaded.model_id} | {batch} | {result['path']} | "
                    f"{times['gather']:.2f} ms | {times['paged']:.2f} ms | "
                    f"{times['paged'] / times['gather']:.3f} | {first_ms['paged']:.0f} ms |"
                )
            except Exception as exc:  # one size failing must not cost the others
                traceback.print_exc()
                rows.append(f"| {name} | {batch} | failed: {type(exc).__name__}: "
                            f"{str(exc)[:120]} |||||")  # fmt: skip
            finally:
                engines.clear()
                free(device)
            print(rows[-1], flush=True)
            report.section(
                "gpu_decode_kernels",
                [
                    "## GPU decode step: attention on gathered rows against the paged kernel",
                    "",
                    f"Machine: {machine()}.",
                    "Command: `bash bench/gpu.sh kernels` (`python bench/gpu_decode.py "
                    "--part kernels`).",
                    f"Random weights in {plan.dtype}; each row holds {plan.context} tokens of KV "
                    f"({plan.prefix_tokens} of them its prefix, min(batch, {plan.max_prefixes}) "
                    "different prefixes). gather: each layer copies every row's blocks out for "
                    "sdpa; paged: FlexAttention reads the pool through the block tables. Median "
                    f"of {plan.steps} steps, the two taking turns; the paged engine's first "
                    "step (compiling its kernel, capturing graphs) apart.",
                    "",
                    "| model | batch | path | gather | paged | paged / gather | paged first step |",
                    "|---|---|---|---|---|---|---|",
                    *rows,
                ],
            )
        del loaded, pool
        free(device)


def summary_part(plan: Plan, device: torch.device, report: Report) -> None:
    """Issue 9's GPU targets, from what the other parts measured."""
    results = report.results
    engine, peers = results.get("engine", {}), results.get("transformers", {})
    lines = [
        "## GPU decode: issue 9's targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]

    def verdict(ok: bool) -> str:
        return "yes" if ok else "**no**"

    for key, row in sorted(engine.items()):
        if not isinstance(row, dict) or "ms_same" not in row:
            continue
        ratio = row["ms_different"] / row["ms_same"]
        lines.append(f"| {key}: different prefixes <= 1.02x one prefix | {ratio:.3f} | "
                     f"{verdict(ratio <= 1.02)} |")  # fmt: skip
        if key.startswith(plan.models[0]) and key.endswith(f"/{plan.batches[0]}"):
            over = row["ms_different"] / row["floor_ms"]
            lines.append(f"| {key}: step <= 2x the floor (aim 1.5x) | {over:.2f}x | "
                         f"{verdict(over <= 2)} |")  # fmt: skip
        peer = peers.get(key)
        if isinstance(peer, dict):
            ours, theirs = row["tokens_per_s"], peer["tokens_per_s"]
            lines.append(f"| {key}: tokens/s with mixed prefixes >= transformers compiled | "
                         f"{ours:.0f} vs {theirs:.0f} | {verdict(ours >= theirs)} |")  # fmt: skip
    report.section("gpu_decode_targets", lines)
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", *PARTS], default="all")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu-bench"))
    parser.add_argument("--models", help="comma-separated; default: the plan's")
    parser.add_argument("--batches", help="comma-separated; default: the plan's")
    parser.add_argument("--dry-run", action="store_true", help="micro model, few steps")
    args = parser.parse_args(argv)
    plan = DRY_RUN if args.dry_run else Plan()
    if args.models:
        plan = replace(plan, models=tuple(args.models.split(",")))
    if args.batches:
        plan = replace(plan, batches=tuple(int(b) for b in args.batches.split(",")))
    device = torch.device(args.device)
    report = Report(args.out)
    parts = {"env": env_part, "engine": engine_part, "transformers": transformers_part,
             "peft": peft_part, "load": load_part, "kernels": kernels_part,
             "summary": summary_part}  # fmt: skip
    failed = []
    for name in PARTS if args.part == "all" else (args.part,):
        start = time.perf_counter()
        try:
            parts[name](plan, device, report)
        except Exception:  # a part failing must not cost the others their figures
            traceback.print_exc()
            failed.append(name)
        print(f"part {name}: {time.perf_counter() - start:.1f} s", flush=True)
    if failed:
        print(f"failed parts: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
