"""A personal prefix trained by the server through its fine-tuning API, and what it costs serving.

    python bench/finetune.py [--clients 8] [--requests 3] [--new-tokens 32]
                             [--write docs/benchmarks.md]

On the embedded SmolLM2, against the real app served over HTTP by uvicorn in this process:
1. upload 16 question/answer pairs in a pirate's voice (examples/personal_prefix.py) with the
   official `openai` client and create a job with the default settings; time from the job's
   creation to `succeeded` (the prefix registered and servable), nothing else running;
2. concurrent generation without a job: `--clients` clients, each streaming `--requests`
   requests of `--new-tokens` tokens one after another (greedy, EOS ignored); the gaps between
   a stream's tokens after its first are the inter-token latency;
3. the same load while a job trains (started first, checked still running at the end); and the
   device's time split between the engine and training over that phase (from /metrics).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import load_named
from bench.load import percentile
from bench.report import command, machine, write_section
from examples.personal_prefix import PAIRS_FILE, QUESTION, prompt
from server.api.app import create_app
from server.config import Settings

ADMIN = "bench-admin"
LOAD_PROMPT = "Write a long story about a lighthouse keeper and the sea."


class LiveApp:
    """The app on a free port of 127.0.0.1, served by uvicorn on a thread."""

    def __init__(self, settings: Settings, loaded: Any) -> None:
        app = create_app(settings, loaded=loaded, background_start=False)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def training_file() -> bytes:
    return PAIRS_FILE.read_bytes()  # {"prompt", "completion"} a line


def wait(client: openai.OpenAI, job_id: str, statuses: set[str]) -> Any:
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.2)


def stream_gaps(url: str, key: str, args: argparse.Namespace) -> list[float]:
    """One client: its requests one after another; the gaps between tokens after the first."""
    gaps: list[float] = []
    body = {
        "prompt": LOAD_PROMPT, "max_new_tokens": args.new_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=600) as http:
        for _ in range(args.requests):
            last = None
            with http.stream("POST", f"{url}/v1/generate", json=body, headers=headers) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    tokens = len(json.loads(line[6:]).get("token_ids", []))
                    if last is not None and tokens:
                        gaps.extend([(now - last) / tokens] * tokens)
                    if tokens:
                        last = now
    return gaps


def load_phase(url: str, key: str, args: argparse.Namespace) -> tuple[list[float], float]:
    results: list[list[float]] = [[] for _ in range(args.clients)]

    def client(i: int) -> None:
        results[i] = stream_gaps(url, key, args)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [g for gaps in results for g in gaps], time.perf_counter() - start


def device_seconds(url: str) -> dict[str, float]:
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("prefix_server_device_seconds_total{"):
            user = line.split('user="')[1].split('"')[0]
            found[user] = float(line.split()[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="per client, one after another")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    loaded = load_named("smollm2")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    settings = Settings(data_dir=data_dir, admin_key=ADMIN, max_len=512)
    with LiveApp(settings, loaded) as url:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        created = httpx.post(f"{url}/v1/tenants", json={"name": "alice"}, headers=admin)
        key = created.json()["api_key"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        uploaded = client.files.create(
            file=("pirate.jsonl", io.BytesIO(training_file())), purpose="fine-tune"
        )

        # 1. Training alone.
        start = time.perf_counter()
        job = client.fine_tuning.jobs.create(
            model=loaded.model_id, training_file=uploaded.id, suffix="pirate"
        )
        job = wait(client, job.id, {"succeeded", "failed"})
        alone = time.perf_counter() - start
        assert job.status == "succeeded", job.error
        metrics = [
            e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)
            if e.type == "metrics" and e.data
        ]  # fmt: skip
        first_loss, last_loss = metrics[-1]["train_loss"], metrics[0]["train_loss"]
        steps, hyper = metrics[0]["total_steps"], job.hyperparameters
        answers = {
            model: client.completions.create(
                model=model, prompt=prompt(QUESTION), max_tokens=24, temperature=0, stop=["\n"]
            ).choices[0].text.strip()
            for model in (loaded.model_id, job.fine_tuned_model or "")
        }  # fmt: skip

        # 2. Serving alone; 3. serving while a job trains.
        load_phase(url, key, argparse.Namespace(**{**vars(args), "requests": 1}))  # warm-up
        without, wall_without = load_phase(url, key, args)
        busy = client.fine_tuning.jobs.create(
            model=loaded.model_id, training_file=uploaded.id, suffix="pirate-2"
        )
        wait(client, busy.id, {"running"})
        while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(busy.id)):
            time.sleep(0.2)
        before = device_seconds(url)
        with_job, wall_with = load_phase(url, key, args)
        after = device_seconds(url)
        still = client.fine_tuning.jobs.retrieve(busy.id).status
        done = wait(client, busy.id, {"succeeded", "failed"})
        assert still == "running" and done.status == "succeeded", (still, done.error)

    beside = after["training_beside_serving"] - before["training_beside_serving"]
    idle = after["training"] - before["training"] - beside
    serve = after["engine"] - before["engine"]
    tokens = args.clients * args.requests * args.new_tokens

    def row(name: str, gaps: list[float], wall: float) -> str:
        return (
            f"| {name} | {percentile(gaps, 0.5) * 1000:.0f} ms | {percentile(gaps, 0.9) * 1000:.0f}"
            f" ms | {percentile(gaps, 0.99) * 1000:.0f} ms | {max(gaps) * 1000:.0f} ms | "
            f"{tokens / wall:.1f} |"
        )

    body = "\n".join(
        [
            "## Fine-tuning through the API, beside serving (SmolLM2-135M-Instruct)",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            "The app served over HTTP by uvicorn in the benchmark's process; float32 on the CPU; "
            f"`--train-share {settings.train_share}` (the default). The machine was shared with "
            "other work while this ran: read the figures as indicative.",
            "",
            "Training a personal prefix on 16 question/answer pairs (examples/personal_prefix.py) "
            f"with the default settings: prefix tuning, 16 virtual tokens, {hyper.n_epochs} "
            f"epochs of batches of {hyper.batch_size}, {steps} steps. From `jobs.create` to "
            f"`succeeded` (registered and servable), nothing else running: **{alone:.1f} s**; "
            f"training loss {first_loss:.2f} -> {last_loss:.2f}.",
            "",
            f"Asked {QUESTION!r} (unseen):",
            "",
            *[f"- `{model}`: {text}" for model, text in answers.items()],
            "",
            f"Inter-token latency of {args.clients} concurrent streams, each {args.requests} "
            f"requests of {args.new_tokens} tokens (greedy, EOS ignored) one after another:",
            "",
            "| | p50 | p90 | p99 | max | tokens/s |",
            "|---|---|---|---|---|---|",
            row("no job", without, wall_without),
            row("a job training", with_job, wall_with),
            "",
            f"During the load with the job, the device spent {serve:.1f} s on engine steps and "
            f"{beside:.1f} s on training turns taken while the engine had work: "
            f"{beside / (beside + serve):.0%} of that time (bound: {settings.train_share:.0%}); "
            f"and {idle:.1f} s more training in the moments the engine was idle. The job "
            "started before the load and was still running when it ended; it then finished "
            f"{(done.finished_at or 0) - (done.created_at or 0):.0f} s after its creation.",
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "finetune_smollm2", body)


if __name__ == "__main__":
    main()
