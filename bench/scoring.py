"""What scoring costs: top-20 log-probs in a decode step, and a long prompt scored with echo.

    python bench/scoring.py [--model smollm2-geometry] [--device cpu] [--write FILE]

1. A decode step of 16 rows (each with its own prefix, 128 tokens of prompt) where half the
   rows ask for their chosen token's log-prob and the top 20, against the same step with none
   asking: steps interleaved, the median of each.
2. A 1,500-token prompt scored (every prompt token's log-prob and top 1, nothing generated:
   `echo` with `max_tokens: 0`) against the same prompt prefilled plainly to one token, each in
   its own process after a short warm-up of its kind: the peak resident memory of its first
   run above what the process held before (sampled every millisecond), and the best time of
   two more runs; and the same prompt scored the plain transformers way in its own process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import load_named, prefilled_llm, random_prefix
from bench.report import command, machine, write_section
from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams

ROWS = 16
STEPS = 12
LONG_PROMPT = 1500


def decode_step_cost(model: str, device: str) -> tuple[float, float]:
    """Median seconds of a 16-row decode step without and with half the rows asking top-20."""
    loaded = load_named(model, device)
    prefixes = [random_prefix(loaded, 16, seed) for seed in range(ROWS)]
    llm = prefilled_llm(loaded, prefixes, prompt_len=128, max_len=1024)
    rows = llm.running
    plain = [r.sampling for r in rows]
    asking = [replace(s, logprobs=20) if i % 2 else s for i, s in enumerate(plain)]
    times: dict[str, list[float]] = {"none": [], "half": []}
    llm.step()  # warm-up
    for _ in range(STEPS):
        for name, settings in (("none", plain), ("half", asking)):
            for request, sampling in zip(rows, settings, strict=True):
                request.sampling = sampling
            start = time.perf_counter()
            llm.step()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["none"]), statistics.median(times["half"])


def rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


class PeakRss:
    """The process's resident memory, sampled every millisecond on a thread while the block
    runs: its peak above what it held when the block began. (ru_maxrss would report the
    peak of loading the model, far above either run.)"""

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.before


def transformers_scoring(model: str, device: str) -> dict[str, float]:
    """In its own process: the same prompt scored the plain transformers way (one forward with
    every position's logits, their log-softmax, each next token's gathered): what a user
    without the server would run."""
    loaded = load_named(model, device)
    prompt = torch.randint(0, loaded.spec.vocab_size, (LONG_PROMPT,),
                           generator=torch.Generator().manual_seed(0))  # fmt: skip

    def score(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = loaded.model(input_ids=ids[None]).logits[0, :-1].float()
            return logits.log_softmax(dim=-1).gather(1, ids[1:, None])[:, 0]

    score(prompt[:64])
    with PeakRss() as memory:
        score(prompt)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        score(prompt)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_growth": memory.growth}


def one_long_prompt(model: str, device: str, scored: bool) -> dict[str, float]:
    """In its own process: seconds and peak memory growth of one long prompt, after a warm-up
    of the same kind on a short one."""
    loaded = load_named(model, device)
    config = EngineConfig(num_slots=1, max_len=LONG_PROMPT + 64, gap_target=None,
                          max_running_per_tenant=0)  # fmt: skip
    llm = LLM(loaded, config)
    sampling = (
        SamplingParams(max_new_tokens=0, prompt_logprobs=1)
        if scored
        else SamplingParams(max_new_tokens=1, temperature=0)
    )
    prompt = torch.randint(0, loaded.spec.vocab_size, (LONG_PROMPT,),
                           generator=torch.Generator().manual_seed(0)).tolist()  # fmt: skip
    llm.generate([Request(prompt[:64], sampling)])
    with PeakRss() as memory:  # the first long prompt: what its memory takes
        (request,) = llm.generate([Request(prompt, sampling)])
    if scored:
        assert len(request.prompt_logprobs) == LONG_PROMPT - 1
    times = []
    for _ in range(2):  # then warm: the allocator keeps what the first one touched
        start = time.perf_counter()
        llm.generate([Request(prompt, sampling)])
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_growth": memory.growth}


def in_own_process(model: str, device: str, variant: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--model", model, "--device", device,
         "--long-prompt", variant],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-geometry")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", type=Path)
    parser.add_argument(
        "--long-prompt", choices=["scored", "plain", "transformers"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.long_prompt == "transformers":
        print(json.dumps(transformers_scoring(args.model, args.device)))
        return
    if args.long_prompt:
        print(json.dumps(one_long_prompt(args.model, args.device, args.long_prompt == "scored")))
        return
    none, half = decode_step_cost(args.model, args.device)
    plain = in_own_process(args.model, args.device, "plain")
    scored = in_own_process(args.model, args.device, "scored")
    reference = in_own_process(args.model, args.device, "transformers")
    mib = 1 << 20
    body = "\n".join(
        [
            f"## What scoring costs ({args.model}, {args.device})",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            "",
            "| | without | with | ratio |",
            "|---|---|---|---|",
            f"| decode step, {ROWS} rows at 128 + 16 tokens; half ask for top-20 log-probs "
            f"(median of {STEPS}) | {none * 1000:.1f} ms | {half * 1000:.1f} ms | "
            f"{half / none:.2f}x |",
            f"| a {LONG_PROMPT}-token prompt: prefilled to one token / scored (echo, "
            f"max_tokens 0, top 1), best of 2 warm runs | {plain['seconds']:.2f} s | "
            f"{scored['seconds']:.2f} s | {scored['seconds'] / plain['seconds']:.2f}x |",
            f"| its first run's peak resident memory growth | "
            f"{plain['peak_growth'] / mib:.0f} MiB | {scored['peak_growth'] / mib:.0f} MiB | |",
            f"| the same prompt scored by transformers (one forward, every position's "
            f"log-softmax), against the engine's scoring | {reference['seconds']:.2f} s, "
            f"{reference['peak_growth'] / mib:.0f} MiB | {scored['seconds']:.2f} s, "
            f"{scored['peak_growth'] / mib:.0f} MiB | "
            f"{scored['seconds'] / reference['seconds']:.2f}x |",
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, f"scoring_{args.device}", body)


if __name__ == "__main__":
    main()
