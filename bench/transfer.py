"""Prompt transfer through the fine-tuning API: a target task trained from a related task's
prefix against from scratch, same seed, same steps (Su et al., NAACL 2022).

    python bench/transfer.py [--source-epochs 6] [--target-epochs 3] [--write docs/benchmarks.md]

On the embedded SmolLM2, against the real app served over HTTP by uvicorn in this process:
1. the source task: the first 8 of examples/pirate.jsonl's question/answer pairs in a pirate's
   voice, trained as a prefix-tuning job (`alice/pirate-source`);
2. the related target task: the other 8 pairs (new questions, the same voice), 6 to train on and
   2 to validate; the transferability route scores the source on it beside the base model;
3. two target jobs with the same seed and hyperparameters: one from scratch (`model` = the base
   model), one from the source (`model` = `alice/pirate-source`); their per-step training loss
   and per-epoch validation loss from the jobs' metrics events.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import load_named
from bench.finetune import ADMIN, LiveApp, wait
from bench.report import command, machine, write_section
from server.config import Settings

PAIRS = [json.loads(line) for line in Path("examples/pirate.jsonl").read_text().splitlines()]
SOURCE, TARGET, VALIDATION = PAIRS[:8], PAIRS[8:14], PAIRS[14:]


def jsonl(records: list[dict[str, str]]) -> io.BytesIO:
    return io.BytesIO("\n".join(json.dumps(r) for r in records).encode())


def metrics_of(client: openai.OpenAI, job_id: str) -> list[dict[str, Any]]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data
    found = [e.data for e in events if e.type == "metrics" and e.data]
    unique = {int(m["step"]): m for m in found}  # a resumed job repeats its redone steps
    return [unique[step] for step in sorted(unique)]


def train(client: openai.OpenAI, **job: Any) -> tuple[list[dict[str, Any]], float, str]:
    start = time.perf_counter()
    created = client.fine_tuning.jobs.create(**job)
    done = wait(client, created.id, {"succeeded", "failed", "cancelled"})
    seconds = time.perf_counter() - start
    assert done.status == "succeeded", done.error
    return metrics_of(client, created.id), seconds, done.fine_tuned_model or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-epochs", type=int, default=6)
    parser.add_argument("--target-epochs", type=int, default=3)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    loaded = load_named("smollm2")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    settings = Settings(data_dir=data_dir, admin_key=ADMIN, max_len=512, checkpoint_interval=3600)
    with LiveApp(settings, loaded) as url:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        key = httpx.post(f"{url}/v1/tenants", json={"name": "alice"}, headers=admin).json()[
            "api_key"
        ]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        upload = client.files.create
        source_file = upload(file=("source.jsonl", jsonl(SOURCE)), purpose="fine-tune").id
        target_file = upload(file=("target.jsonl", jsonl(TARGET)), purpose="fine-tune").id
        valid_file = upload(file=("valid.jsonl", jsonl(VALIDATION)), purpose="fine-tune").id
        hyper = {"batch_size": 2, "learning_rate_multiplier": 1.0}
        method = {"type": "prefix_tuning", "prefix_tuning": {"num_virtual_tokens": 16}}

        source_curve, source_s, source = train(
            client, model=loaded.model_id, training_file=source_file, suffix="pirate-source",
            hyperparameters={**hyper, "n_epochs": args.source_epochs}, method=method, seed=0,
        )  # fmt: skip
        ranked = httpx.post(
            f"{url}/v1/fine_tuning/transferability",
            json={"training_file": target_file, "candidates": [source]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=600,
        ).json()
        target = {
            "training_file": target_file, "validation_file": valid_file, "seed": 1,
            "hyperparameters": {**hyper, "n_epochs": args.target_epochs}, "method": method,
        }  # fmt: skip
        scratch, scratch_s, _ = train(client, model=loaded.model_id, suffix="scratch", **target)
        transfer, transfer_s, _ = train(client, model=source, suffix="transfer", **target)

    rows = [
        f"| {a['step']} | {a['train_loss']:.3f} | {b['train_loss']:.3f} | "
        + (f"{a['valid_loss']:.3f} | {b['valid_loss']:.3f} |" if "valid_loss" in a else "| |")
        for a, b in zip(scratch, transfer, strict=True)
    ]
    body = "\n".join(
        [
            "## Prompt transfer: a related task from a trained prefix (SmolLM2-135M-Instruct)",
            "",
            f"Machine: {machine()}. Command: `{command()}`.",
            "",
            f"Source: prefix tuning, 16 virtual tokens, {len(SOURCE)} pirate-voice pairs, "
            f"{len(source_curve)} steps (loss {source_curve[0]['train_loss']:.3f} -> "
            f"{source_curve[-1]['train_loss']:.3f}, {source_s:.0f} s). Target: {len(TARGET)} "
            f"new questions in the same voice, {len(VALIDATION)} held out for validation; both "
            f"target jobs seed 1, batch 2, {args.target_epochs} epochs, the same learning rate.",
            "",
            f"Before training, on the target file (POST /v1/fine_tuning/transferability): base "
            f"model {ranked['base_loss']:.3f}, the source {ranked['data'][0]['loss']:.3f} "
            "(mean loss per completion token).",
            "",
            "| step | train loss, scratch | train loss, from the source | validation, scratch "
            "| validation, from the source |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Wall time: scratch {scratch_s:.0f} s, from the source {transfer_s:.0f} s.",
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "transfer", body)


if __name__ == "__main__":
    main()
