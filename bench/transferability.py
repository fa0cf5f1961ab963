"""Transferability: 32 candidate prefixes scored on 64 examples against one candidate.

    python bench/transferability.py [--candidates 32] [--examples 64] [--cache-dir data/models]
                                    [--write docs/benchmarks.md]

On the embedded SmolLM2, through the app's own route (`POST /v1/fine_tuning/transferability`,
in this process, the server's default settings: 16 slots, a tenant running at most 8 rows and
queueing 64), nothing else running: `--candidates` random prefix-tuning prefixes of 16 virtual
tokens uploaded as PEFT folders, and a training file of `--examples` question/answer pairs
(examples/pirate.jsonl's 16, repeated with numbered questions). Timed: the request naming one
candidate (2 x examples rows: it and the base model) against the request naming all of them
((candidates + 1) x examples rows), after a warm-up request; the median of `--repeats` runs of
each, taking turns.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient
from peft import PrefixTuningConfig, TaskType, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command, machine, write_section
from server.api.app import create_app
from server.config import Settings
from server.models import load_model

ADMIN = "bench-admin"
ROUTE = "/v1/fine_tuning/transferability"
PREFIX_TOKENS = 16


def training_file(count: int) -> bytes:
    pairs = [json.loads(line) for line in Path("examples/pirate.jsonl").read_text().splitlines()]
    records = []
    for i in range(count):
        pair = pairs[i % len(pairs)]
        records.append({"prompt": f"{i + 1}. {pair['prompt']}", "completion": pair["completion"]})
    return "\n".join(json.dumps(r) for r in records).encode()


def write_prefixes(model: torch.nn.Module, count: int, root: Path) -> list[Path]:
    """`count` PEFT prefix-tuning folders with normal(0, 1) keys and values, one per seed."""
    peft = get_peft_model(
        copy.deepcopy(model),
        PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=PREFIX_TOKENS),
    )
    folders = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in peft.prompt_encoder.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
        peft.save_pretrained(root / f"p{seed}")
        folders.append(root / f"p{seed}")
    return folders


def timed(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = client.post(ROUTE, json=body, headers=headers)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return elapsed


def mean_tokens(tokenizer: Any, content: bytes) -> float:
    records = [json.loads(line) for line in content.decode().splitlines()]
    return statistics.mean(len(tokenizer.encode(r["prompt"] + r["completion"])) for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=Path("data/models"))
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    loaded = load_model(None, cache_dir=args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        root = Path(tmp)
        folders = write_prefixes(loaded.model, args.candidates, root / "adapters")
        settings = Settings(data_dir=root / "data", admin_key=ADMIN)
        app = create_app(settings, loaded=loaded, background_start=False)
        with TestClient(app) as client:
            tenant = client.post(
                "/v1/tenants", json={"name": "alice"}, headers={"Authorization": f"Bearer {ADMIN}"}
            ).json()
            headers = {"Authorization": f"Bearer {tenant['api_key']}"}
            refs = []
            for i, folder in enumerate(folders):
                files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
                response = client.post(
                    "/v1/prefixes", data={"name": f"c{i}"}, files=files, headers=headers
                )
                assert response.status_code == 201, response.text
                refs.append(response.json()["id"])
            uploaded = client.post(
                "/v1/files",
                files={"file": ("train.jsonl", training_file(args.examples))},
                data={"purpose": "fine-tune"},
                headers=headers,
            )
            file_id = uploaded.json()["id"]
            one = {"training_file": file_id, "candidates": refs[:1], "sample_size": args.examples}
            every = {**one, "candidates": refs}
            timed(client, headers, {**one, "sample_size": 4})  # warm-up
            times: dict[str, list[float]] = {"one": [], "every": []}
            for _ in range(args.repeats):
                times["one"].append(timed(client, headers, one))
                times["every"].append(timed(client, headers, every))
            answer = client.post(ROUTE, json=one, headers=headers).json()
    tokens = mean_tokens(loaded.tokenizer, training_file(args.examples))
    one_s, every_s = statistics.median(times["one"]), statistics.median(times["every"])
    rows_one, rows_every = 2 * args.examples, (args.candidates + 1) * args.examples
    table = [
        "| request | rows | seconds | ms per row | vs one candidate |",
        "|---|---|---|---|---|",
        f"| 1 candidate | {rows_one} | {one_s:.2f} | {1000 * one_s / rows_one:.1f} | 1.00x |",
        f"| {args.candidates} candidates | {rows_every} | {every_s:.2f} | "
        f"{1000 * every_s / rows_every:.1f} | {every_s / one_s:.2f}x |",
    ]
    body = "\n".join(
        [
            f"## Transferability: {args.candidates} candidates against one "
            f"({loaded.model_id}, cpu)",
            "",
            f"Machine: {machine()}",
            "",
            f"Command: `{command()}`",
            "",
            f"{args.examples} examples of {tokens:.0f} tokens on average "
            f"({answer['target_tokens']} target tokens), candidates of {PREFIX_TOKENS} virtual "
            "tokens, the server's default settings; each row is one example under one "
            f"candidate (or none: the base model's row); median of {args.repeats}.",
            "",
            *table,
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "transferability", body)


if __name__ == "__main__":
    main()
