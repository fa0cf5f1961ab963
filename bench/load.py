"""Open-loop load: Poisson arrivals from N tenants, each tenant with its own prefix.

    python bench/load.py [--model smollm2|smollm2-geometry|llama-1b-geometry|tiny|micro]
                         [--tenants 16] [--requests 48] [--rate 4] [--slots 16]
                         [--new-tokens 32] [--write docs/benchmarks.md]

Variants, all on the same arrivals, prompts and adapters (prefix tuning, T virtual tokens):
  (a) prefix-server's engine, every request with its tenant's own prefix
  (b) the same engine and workload, every request with one shared prefix
  (c) what a user writes without us: PEFT `generate`, one request at a time
  (d) PEFT `generate` batched per tenant (PEFT cannot mix prefixes in one batch):
      whenever the model is free, the tenant with the oldest waiting request runs all its
      waiting requests as one left-padded batch
Reports throughput (generated tokens / wall time from first arrival to last finish), TTFT
(arrival to first token, queueing included) and per-token latency (after the first), p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import GEOMETRIES, load_named
from bench.report import command, machine, write_section
from prefixes import CompiledPrefix, read_upload
from server.engine.config import MAX_STEP_TOKENS, EngineConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.models import LoadedModel


@dataclass
class Job:
    tenant: int
    arrival: float  # seconds after the start
    prompt: list[int]
    first_token: float = 0.0
    finished: float = 0.0
    tokens: int = 0


@dataclass
class Outcome:
    name: str
    jobs: list[Job] = field(default_factory=list)
    wall: float = 0.0

    @property
    def throughput(self) -> float:
        return sum(j.tokens for j in self.jobs) / self.wall

    def ttft(self, q: float) -> float:
        return percentile([j.first_token - j.arrival for j in self.jobs], q)

    def per_token(self, q: float) -> float:
        gaps = [(j.finished - j.first_token) / (j.tokens - 1) for j in self.jobs if j.tokens > 1]
        return percentile(gaps, q)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def workload(args: argparse.Namespace, vocab: int) -> list[Job]:
    rng = random.Random(0)
    jobs, clock = [], 0.0
    for _ in range(args.requests):
        clock += rng.expovariate(args.rate)
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(16, 48))]
        jobs.append(Job(rng.randrange(args.tenants), clock, prompt))
    return jobs


def fresh(jobs: list[Job]) -> list[Job]:
    return [Job(j.tenant, j.arrival, j.prompt) for j in jobs]


def run_engine(
    name: str,
    loaded: LoadedModel,
    jobs: list[Job],
    prefixes: list[CompiledPrefix],
    new_tokens: int,
    step_tokens: int,
    slots: int,
) -> Outcome:
    config = EngineConfig(
        num_slots=slots, max_len=256, max_step_tokens=step_tokens, max_waiting=4096,
        max_running_per_tenant=0,
    )  # fmt: skip
    engine = Engine(loaded, config).start()
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)

    async def one(job: Job, start: float) -> None:
        await asyncio.sleep(max(0.0, start + job.arrival - time.perf_counter()))
        stream = engine.submit(
            job.prompt, sampling, prefix=prefixes[job.tenant], tenant=f"t{job.tenant}",
            stream_text=False,
        )  # fmt: skip
        async for chunk in stream:
            if not job.tokens:
                job.first_token = time.perf_counter() - start
            job.tokens += len(chunk.token_ids)
        job.finished = time.perf_counter() - start

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(one(job, start) for job in jobs))
        return time.perf_counter() - start

    try:
        wall = asyncio.run(main())
    finally:
        engine.stop()
    return Outcome(name, jobs, wall - jobs[0].arrival)


class FirstTokenClock(LogitsProcessor):
    """Notes when generate has the logits of its first new token."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def peft_generate(
    peft: PeftModel, tenant: int, prompts: list[list[int]], new_tokens: int, pad: int
):
    peft.set_adapter(f"t{tenant}")
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=peft.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    mask = mask.to(peft.device)
    clock = FirstTokenClock()
    with torch.inference_mode():
        peft.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
            logits_processor=LogitsProcessorList([clock]),
        )  # fmt: skip
    return clock.first, time.perf_counter()


def run_peft(
    name: str, peft: PeftModel, jobs: list[Job], new_tokens: int, per_tenant: bool
) -> Outcome:
    pad = 0
    start = time.perf_counter()
    pending = list(jobs)
    while pending:
        now = time.perf_counter() - start
        ready = [j for j in pending if j.arrival <= now]
        if not ready:
            time.sleep(pending[0].arrival - now)
            continue
        tenant = ready[0].tenant
        batch = [j for j in ready if j.tenant == tenant][:16] if per_tenant else ready[:1]
        first, done = peft_generate(peft, tenant, [j.prompt for j in batch], new_tokens, pad)
        for job in batch:
            job.first_token, job.finished, job.tokens = first - start, done - start, new_tokens
            pending.remove(job)
    return Outcome(name, jobs, time.perf_counter() - start - jobs[0].arrival)


def main(argv: list[str] | None = None) -> list[Outcome]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", *GEOMETRIES], default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=16, help="rows the engine decodes together")
    parser.add_argument("--virtual-tokens", type=int, default=16)
    parser.add_argument(
        "--step-tokens",
        type=int,
        help="tokens per engine step at most; default: the server's (steps sized by the "
        "measured step cost)",
    )
    parser.add_argument("--skip-baselines", action="store_true", help="only (a) and (b)")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)

    loaded = load_named(args.model, args.device, args.dtype)
    jobs = workload(args, loaded.spec.vocab_size)
    adapters = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    peft: PeftModel | None = None
    prefixes = []
    torch.manual_seed(0)
    for tenant in range(args.tenants):
        config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.virtual_tokens
        )
        if peft is None:
            peft = get_peft_model(loaded.model, config, adapter_name="t0")
        else:
            peft.add_adapter(f"t{tenant}", config)
        peft.save_pretrained(adapters, selected_adapters=[f"t{tenant}"])
        folder = adapters / f"t{tenant}"  # PEFT saves a named adapter in its own folder
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        prefixes.append(loaded.compile(read_upload(files), max_virtual_tokens=args.virtual_tokens))
    assert peft is not None
    peft.eval()

    new = args.new_tokens
    step_tokens = args.step_tokens or MAX_STEP_TOKENS
    shared = [prefixes[0]] * args.tenants
    outcomes = [
        run_engine(
            "(a) prefix-server, own prefix per tenant", loaded, fresh(jobs), prefixes, new,
            step_tokens, args.slots,
        ),
        run_engine(
            "(b) prefix-server, one shared prefix", loaded, fresh(jobs), shared, new,
            step_tokens, args.slots,
        ),
    ]  # fmt: skip
    if not args.skip_baselines:
        outcomes += [
            run_peft("(c) PEFT generate, one at a time", peft, fresh(jobs), new, per_tenant=False),
            run_peft(
                "(d) PEFT generate, batched per tenant", peft, fresh(jobs), new, per_tenant=True
            ),
        ]

    lines = [
        "| variant | tokens/s | TTFT p50 | TTFT p99 | per-token p50 | per-token p99 |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.name} | {o.throughput:.1f} | {o.ttft(0.5) * 1000:.0f} ms | "
            f"{o.ttft(0.99) * 1000:.0f} ms | {o.per_token(0.5) * 1000:.0f} ms | "
            f"{o.per_token(0.99) * 1000:.0f} ms |"
        )
    ratios = [f"(a)/(b) throughput: {outcomes[0].throughput / outcomes[1].throughput:.3f}"]
    if len(outcomes) > 2:
        ratios.append(f"(a)/(c): {outcomes[0].throughput / outcomes[2].throughput:.1f}x")
        ratios.append(f"(a)/(d): {outcomes[0].throughput / outcomes[3].throughput:.1f}x")
    body = "\n".join(
        [
            f"## Load: {args.tenants} tenants, Poisson arrivals ({loaded.model_id})",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            f"{args.requests} requests at {args.rate}/s, prompts of 16-48 tokens, "
            f"{args.new_tokens} new tokens each (greedy, EOS ignored), prefix tuning with "
            f"{args.virtual_tokens} virtual tokens per tenant; engine with {args.slots} slots and "
            f"at most {step_tokens} tokens per step, the server's gap target; "
            f"{args.dtype} on {args.device}. "
            "TTFT counts from arrival, time spent queued included; per-token latency is the "
            "mean gap between a request's tokens after its first.",
            "",
            *lines,
            "",
            "; ".join(ratios) + ".",
        ]
    )
    print(body)
    if args.write:
        suffix = "" if args.device == "cpu" else f"_{args.device}_{args.dtype}"
        suffix += "" if args.slots == 16 else f"_{args.slots}_slots"
        write_section(args.write, f"load_{args.model}{suffix}", body)
    return outcomes


if __name__ == "__main__":
    main()
