"""What a fine-tuning job's checkpoint costs, beside what a training step costs.

    python bench/checkpoint_cost.py [--repeats 5] [--write docs/benchmarks.md]

On a model of SmolLM2-135M's geometry (random weights), for prefix tuning of 16 virtual tokens
(the default) and 256 (the largest --max-virtual-tokens allows) and prompt tuning of 16: one
optimiser step of a batch of 4 examples of 64 tokens (the whole batch in one turn, as on an
idle engine), then a checkpoint of the trainer after it: its state to safetensors bytes
(`encode`), those bytes made durable in the store (`write`: temp file, fsync, rename, fsync of
the folder), and reading it back into a new trainer (`restore`, what a resumed job pays once).
Medians of `--repeats`. A checkpoint runs between steps, outside any turn on the device: it
delays the job by encode + write and serving by nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_step import smollm2_geometry
from bench.report import command, machine, write_section
from prefixes.storage.checkpoint_files import CheckpointFiles
from server.models import LoadedModel
from server.train import Example, PrefixTrainer, TrainConfig
from server.tuning import checkpoint

JOB = "ftjob-" + "0" * 24
CASES = [("prefix", 16), ("prefix", 256), ("prompt", 16)]


def median_ms(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


BATCH = [Example(list(range(1 + i, 65 + i)), [-100] * 32 + list(range(33 + i, 65 + i)))
         for i in range(4)]  # fmt: skip


def measure(
    loaded: LoadedModel, files: CheckpointFiles, kind: str, tokens: int, repeats: int
) -> str:
    """One table row: the checkpoint's size, a step, encode, write, restore."""
    config = TrainConfig(kind=kind, virtual_tokens=tokens, batch_size=4)
    trainer = PrefixTrainer(loaded, config)
    try:
        step_ms = median_ms(lambda: trainer.step(BATCH, whole_batch=True), repeats)
        data = checkpoint.encode(trainer)
        encode_ms = median_ms(lambda: checkpoint.encode(trainer), repeats)
        write_ms = median_ms(lambda: files.write(JOB, data), repeats)
    finally:
        trainer.close()
    resumed = PrefixTrainer(loaded, config)
    try:
        restore_ms = median_ms(lambda: checkpoint.restore(resumed, data), repeats)
    finally:
        resumed.close()
    row = (
        f"| {kind}_tuning, {tokens} | {len(data) / 2**20:.2f} MiB | {step_ms:.0f} | "
        f"{encode_ms:.1f} | {write_ms:.1f} | {restore_ms:.1f} |"
    )
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    loaded = smollm2_geometry()
    with tempfile.TemporaryDirectory(prefix="checkpoint-bench-") as folder:
        files = CheckpointFiles(Path(folder))
        rows = [measure(loaded, files, kind, tokens, args.repeats) for kind, tokens in CASES]
    body = "\n".join(
        [
            "## A fine-tuning checkpoint's cost (SmolLM2-135M geometry (random weights))",
            "",
            f"Machine: {machine()}. Command: `{command()}`. Medians of {args.repeats}; ms.",
            "",
            "| method, virtual tokens | checkpoint | training step (4 x 64 tokens) | encode | "
            "write (fsync'd) | restore |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "A checkpoint holds the trainable parameters and AdamW's two moments (three times "
            "the prefix's parameters, float32). It is taken between steps, outside any turn on "
            "the device, so serving never waits for it; the job waits encode + write.",
        ]
    )
    if args.write:
        write_section(args.write, "checkpoint-cost", body)


if __name__ == "__main__":
    main()
