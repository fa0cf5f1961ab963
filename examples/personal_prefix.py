"""A personal prefix from start to finish, against a running server (`make serve`).

    .venv/bin/python examples/personal_prefix.py [--url http://127.0.0.1:8000] [--steps 80]

1. trains a small prefix-tuning adapter with PEFT on the same frozen SmolLM2 the server runs,
   from a few example pairs (a pirate who answers every question);
2. saves it with `save_pretrained`;
3. creates a tenant (admin key from PREFIX_SERVER_ADMIN_KEY or data/admin_key) and uploads it;
4. asks an unseen question through the official OpenAI client, without and with the prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from pathlib import Path

import httpx
from openai import OpenAI

from server.models import load_model
from server.train import Example, TrainConfig, train_prefix

# 16 question/answer pairs in a pirate's voice, {"prompt", "completion"} a line: the same file the
# README's `prefix-server train` and fine-tuning examples use.
PAIRS_FILE = Path(__file__).with_name("pirate.jsonl")
QUESTION = "What is the largest planet?"


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--kind", choices=["prefix", "prompt"], default="prefix")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--out", type=Path, default=Path("data/examples/pirate"))
    args = parser.parse_args()
    started = time.perf_counter()

    print("1. training a prefix on the frozen model ...")
    loaded = load_model(None, cache_dir=args.data_dir / "models")
    tokenizer = loaded.tokenizer
    examples = []
    for line in PAIRS_FILE.read_text().splitlines():
        pair = json.loads(line)
        ids = tokenizer.encode(pair["prompt"])  # type: ignore[union-attr]
        target = [*tokenizer.encode(pair["completion"]), tokenizer.eos_token_id]  # type: ignore[union-attr]
        examples.append(Example(ids + target, [-100] * len(ids) + target))
    config = TrainConfig(kind=args.kind, virtual_tokens=16, steps=args.steps, learning_rate=args.lr)
    losses = train_prefix(loaded, examples, args.out, config)
    print(f"   loss {losses[0]:.2f} -> {losses[-1]:.2f} in {args.steps} steps; saved to {args.out}")

    print("2. creating a tenant and uploading the adapter ...")
    admin = os.environ.get("PREFIX_SERVER_ADMIN_KEY") or (args.data_dir / "admin_key").read_text()
    tenant = f"demo-{secrets.token_hex(3)}"
    created = httpx.post(
        f"{args.url}/v1/tenants",
        json={"name": tenant},
        headers={"Authorization": f"Bearer {admin.strip()}"},
    )
    created.raise_for_status()
    key = created.json()["api_key"]
    files = [("files", (p.name, p.read_bytes())) for p in args.out.iterdir() if p.suffix != ".md"]
    uploaded = httpx.post(
        f"{args.url}/v1/prefixes",
        data={"name": "pirate"},
        files=files,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    uploaded.raise_for_status()
    print(f"   uploaded {uploaded.json()['id']} ({uploaded.json()['bytes']} bytes)")

    print(f"3. asking an unseen question: {QUESTION!r}")
    client = OpenAI(base_url=f"{args.url}/v1", api_key=key)
    for model in (loaded.model_id, f"{tenant}/pirate"):
        out = client.completions.create(
            model=model, prompt=prompt(QUESTION), max_tokens=24, temperature=0, stop=["\n"]
        )
        print(f"   {model:>24}: {out.choices[0].text.strip()}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
