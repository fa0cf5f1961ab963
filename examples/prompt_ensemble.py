"""A prompt ensemble from start to finish, against a running server (`make serve`).

    .venv/bin/python examples/prompt_ensemble.py [--url http://127.0.0.1:8000] [--members 3]

1. creates a tenant (admin key from PREFIX_SERVER_ADMIN_KEY or data/admin_key) and uploads a
   small sentiment task (16 labelled reviews) as a training file;
2. trains one prompt-tuning prefix per seed through the fine-tuning API, on the served model;
3. stores them as one ensemble, `sentiment`;
4. asks unseen reviews through the ensemble and prints each member's answer next to the vote.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from pathlib import Path

import httpx

TRAIN = [
    ("A warm, funny film with a big heart.", "positive"),
    ("Two hours I will never get back.", "negative"),
    ("The cast is superb and the script sparkles.", "positive"),
    ("Dull, slow and badly acted.", "negative"),
    ("I laughed from start to finish.", "positive"),
    ("The plot makes no sense at all.", "negative"),
    ("A beautiful story, beautifully told.", "positive"),
    ("The worst sequel of the year.", "negative"),
    ("Gripping from the first scene.", "positive"),
    ("I walked out halfway through.", "negative"),
    ("Clever, moving and wonderfully shot.", "positive"),
    ("Loud, empty and far too long.", "negative"),
    ("My whole family loved it.", "positive"),
    ("A lazy script and a wasted cast.", "negative"),
    ("One of the best films I have seen.", "positive"),
    ("Boring. Just boring.", "negative"),
]
UNSEEN = [
    "An instant classic.",
    "The jokes fall flat and the ending drags.",
    "Charming, if a little slow in the middle.",
    "I want my money back.",
    "The music alone is worth the ticket.",
    "Neither good nor bad, just forgettable.",
]


def prompt(review: str) -> str:
    return f"Review: {review}\nSentiment:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    started = time.perf_counter()
    admin = os.environ.get("PREFIX_SERVER_ADMIN_KEY") or (args.data_dir / "admin_key").read_text()

    print("1. creating a tenant and uploading the task ...")
    tenant = f"demo-{secrets.token_hex(3)}"
    created = httpx.post(
        f"{args.url}/v1/tenants",
        json={"name": tenant},
        headers={"Authorization": f"Bearer {admin.strip()}"},
    )
    created.raise_for_status()
    http = httpx.Client(
        base_url=args.url,
        headers={"Authorization": f"Bearer {created.json()['api_key']}"},
        timeout=120,
    )
    lines = [json.dumps({"prompt": prompt(r), "completion": f" {label}"}) for r, label in TRAIN]
    uploaded = http.post(
        "/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("sentiment.jsonl", "\n".join(lines).encode())},
    )
    uploaded.raise_for_status()
    model = http.get("/v1/models").json()["data"][0]["id"]

    print(f"2. training {args.members} prefixes, one per seed ...")
    jobs = []
    for seed in range(1, args.members + 1):
        job = http.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": model,
                "training_file": uploaded.json()["id"],
                "suffix": f"sentiment-seed{seed}",
                "seed": seed,
                "method": {
                    "type": "prompt_tuning",
                    "prompt_tuning": {
                        "num_virtual_tokens": 8,
                        "hyperparameters": {"n_epochs": args.epochs},
                    },
                },
            },
        )
        job.raise_for_status()
        jobs.append(job.json()["id"])
    members = []
    for job_id in jobs:
        while (job := http.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            time.sleep(2)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job_id} {job['status']}: {job.get('error')}")
        members.append(job["fine_tuned_model"])
        print(f"   {job['fine_tuned_model']} trained")

    print("3. storing them as one ensemble ...")
    ensemble = http.post("/v1/ensembles", json={"name": "sentiment", "prefixes": members})
    ensemble.raise_for_status()
    print(f"   {ensemble.json()['id']}: {', '.join(members)}")

    print("4. unseen reviews: each member's answer, then the vote")
    for review in UNSEEN:
        body = {"prompt": prompt(review), "prefix": "sentiment", "max_new_tokens": 2,
                "temperature": 0, "stop": ["\n"]}  # fmt: skip
        answer = http.post("/v1/generate", json=body)
        answer.raise_for_status()
        result = answer.json()
        votes = " ".join(c["text"].strip() or "-" for c in result["ensemble"]["candidates"])
        print(f"   {review[:44]:<44} members: {votes:<28} vote: {result['text'].strip()}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
