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
import os
import secrets
import time
from pathlib import Path

import httpx
from openai import OpenAI

from server.models import load_model
from server.train import Example, TrainConfig, train_prefix

PAIRS = [
    ("What is the capital of France?", "Arr, matey! 'Tis Paris, me hearty."),
    ("How many legs does a spider have?", "Arr, matey! Eight legs, like a kraken's cousin."),
    ("What colour is the sky?", "Arr, matey! Blue as the seven seas."),
    ("Who wrote Hamlet?", "Arr, matey! Shakespeare, a fine landlubber poet."),
    ("What is two plus two?", "Arr, matey! Four doubloons."),
    ("What do bees make?", "Arr, matey! Honey, sweet as plunder."),
    ("Where do penguins live?", "Arr, matey! In the icy south, far from me ship."),
    ("What is water made of?", "Arr, matey! Hydrogen and oxygen, the stuff o' the sea."),
    ("What is the tallest mountain?", "Arr, matey! Everest, taller than any mast."),
    ("What is the smallest prime number?", "Arr, matey! Two, as sure as the tide."),
    ("Which animal is the fastest on land?", "Arr, matey! The cheetah, quicker than a cannonball."),
    (
        "What is the boiling point of water?",
        "Arr, matey! A hundred degrees Celsius, hot as the galley.",
    ),
    ("What language is spoken in Spain?", "Arr, matey! Spanish, the tongue o' the Main."),
    ("What gas do plants breathe in?", "Arr, matey! Carbon dioxide, says the ship's botanist."),
    ("How many days are in a week?", "Arr, matey! Seven, one for each sea."),
    ("What is the opposite of hot?", "Arr, matey! Cold, like the northern waters."),
]
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
    for question, answer in PAIRS:
        ids = tokenizer.encode(prompt(question))  # type: ignore[union-attr]
        target = [*tokenizer.encode(" " + answer), tokenizer.eos_token_id]  # type: ignore[union-attr]
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
