"""Every command block of README.md and docs/*.md, run as written, in the order a reader meets
them, in one shell session against a live `prefix-server serve` on the embedded model, and each
block's documented outcome checked.

The reader's setup is reproduced in a scratch folder laid out like the repository's root after
`make serve`: `examples/` and the converted model (`data/models/`) are the repository's own,
`.venv` is the environment running the tests, and the server runs as `make serve` runs it
(`prefix-server serve --data-dir data`, which writes `data/admin_key`), on a free port instead
of 8000. The only fills are what a reader fills in: the key, file and job ids the previous
answers printed (`psk_...`, `file-...`, `ftjob-...`), the reader's own adapter folder
(`my-adapter/`, a PEFT prefix-tuning adapter on the served model) and, for the ensemble
example, the reader's prefixes `s1`..`s3`. A bash or python block the test neither runs nor
names in NOT_RUN (with the reason) fails the test, so a new example is run from the day it is
written.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.models import load_model
from tests.e2e.test_server_process import free_port
from tests.tiny import make_adapter

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODEL_CACHE = REPO / "data" / "models"  # shared with `make serve` and the other real-model tests
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BASE = "SmolLM2-135M-Instruct"
COMMAND_TIMEOUT = 600  # seconds for one block (the CLI's training runs in one)
JOB_DEADLINE = 600  # seconds for a fine-tuning job to finish on a loaded 2-core machine

# Blocks not run here, each with the reason (keyed by file name and a line of the block).
NOT_RUN = {
    ("README.md", "prefix-server serve --replicas 2"): (
        "needs Ray and PostgreSQL: tests/e2e/test_replicas.py serves two replicas"
    ),
    ("scale-out.md", "prefix-server serve --replicas 2"): (
        "needs Ray and PostgreSQL: tests/e2e/test_replicas.py serves two replicas"
    ),
    ("scale-out.md", "docker compose -f deploy/docker-compose.yml up -d"): (
        "needs a container engine: tests/e2e/test_replicas.py covers the replicas"
    ),
    ("registry.md", "registry = Registry("): "a reference of the Python API, not a program",
    ("native-format.md", "raw = read_upload("): (
        "a fragment: cfg_bytes and st_bytes are the reader's own files (tests/unit cover it)"
    ),
}

# The placeholders a reader replaces with what an earlier answer printed.
PLACEHOLDERS = {"psk_...": "api_key", "file-...": "file_id", "ftjob-...": "job_id"}


@dataclass
class Block:
    document: str
    line: int
    language: str
    text: str

    def where(self) -> str:
        return f"{self.document}:{self.line}"

    def matches(self, document: str, marker: str) -> bool:
        return self.document == document and marker in self.text


def runnable_blocks() -> list[Block]:
    """The bash and python blocks of every document, in reading order."""
    blocks = []
    for path in DOCUMENTS:
        lines = path.read_text().splitlines()
        start, language = None, ""
        for number, line in enumerate(lines, 1):
            if line.startswith("```") and start is None:
                start, language = number, line[3:].strip()
            elif line.startswith("```"):
                assert start is not None
                if language in ("bash", "python"):
                    text = "\n".join(lines[start : number - 1]) + "\n"
                    blocks.append(Block(path.name, start, language, text))
                start = None
    return blocks


class Shell:
    """One bash session, as the reader's terminal: variables, `source` and `export` persist."""

    SENTINEL = "__block_finished__"
    FAILED = "__command_failed__"

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        # Every failing command says so, even one in the middle of a block.
        self.run(f"trap 'printf \"\\n{self.FAILED} %s\\n\" $?' ERR")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def run(self, script: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        """Run `script` in the session; its exit status and everything it printed."""
        assert self.process.stdin is not None
        # A newline first: curl's answers end without one, and the sentinel must start a line.
        self.process.stdin.write(f"{script}\nprintf '\\n{self.SENTINEL} %s\\n' $?\n")
        self.process.stdin.flush()
        output: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                printed = "".join(output)[-3000:]
                raise AssertionError(f"no end after {timeout} s: {printed}") from None
            if line.startswith(self.SENTINEL):
                printed = "".join(output)
                failed = int(line.split()[1]) or (self.FAILED in printed)
                return int(failed), printed
            output.append(line)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def json_documents(output: str) -> list[Any]:
    """The JSON values printed one after another (curl answers end without a newline)."""
    decoder, found, index = json.JSONDecoder(), [], 0
    while (start := output.find("{", index)) >= 0:
        try:
            value, index = decoder.raw_decode(output, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        found.append(value)
    return found


def code(line: str) -> str:
    """A shell line without its comment (the block's comments show answers, with placeholders)."""
    return re.sub(r"(^|\s)#.*$", "", line)


def segments(script: str) -> list[str]:
    """The script cut before every command that holds a placeholder: the reader runs up to
    there, reads the id from the answer, and fills it in (a command is a line and its
    continuation lines, a line ending in a backslash)."""
    grouped: list[str] = []
    continued = False
    for line in script.splitlines(keepends=True):
        if continued:
            grouped[-1] += line
        else:
            grouped.append(line)
        continued = line.rstrip("\n").endswith("\\")
    cut = [""]
    for command in grouped:
        holds = any(p in code(line) for line in command.splitlines() for p in PLACEHOLDERS)
        if holds and any(code(line).strip() for line in cut[-1].splitlines()):
            cut.append("")
        cut[-1] += command
    return cut


@dataclass
class Reader:
    """The reader's state: their shell, and what earlier answers told them."""

    shell: Shell
    url: str
    workdir: Path
    fills: dict[str, str] = field(default_factory=dict)

    def fill(self, text: str) -> str:
        text = text.replace("localhost:8000", self.url).replace("127.0.0.1:8000", self.url)
        for placeholder, name in PLACEHOLDERS.items():
            if name in self.fills:
                text = text.replace(placeholder, self.fills[name])
            used = any(placeholder in code(line) for line in text.splitlines())
            assert not used, f"{placeholder} appears before any answer gave it"
        return text

    def learn(self, output: str) -> None:
        for document in json_documents(output):
            if "api_key" in document:
                self.fills["api_key"] = document["api_key"]
            if str(document.get("id", "")).startswith("file-"):
                self.fills["file_id"] = document["id"]
            if str(document.get("id", "")).startswith("ftjob-"):
                self.fills["job_id"] = document["id"]

    def run_bash(self, block: Block) -> list[str]:
        """The block's segments in the session, each one's output."""
        outputs = []
        for segment in segments(block.text):
            status, output = self.shell.run(self.fill(segment))
            assert status == 0, f"{block.where()}: {segment!r} failed ({status}): {output[-3000:]}"
            self.learn(output)
            outputs.append(output)
        return outputs

    def run_python(self, block: Block) -> str:
        """The block saved as a file and run by the session's `python`, as a reader would."""
        program = self.fill(block.text)
        script = self.workdir / f"block_{block.document}_{block.line}.py"
        script.write_text(program)
        status, output = self.shell.run(f"python {script.name}")
        assert status == 0, f"{block.where()} failed ({status}): {output[-3000:]}"
        return output


# --- the documented outcome of each block ------------------------------------------------------


def quick_start(reader: Reader, outputs: list[str]) -> None:
    tenant = json_documents("".join(outputs))[0]
    assert tenant["tenant"] == "alice" and tenant["api_key"].startswith("psk_")
    uploaded, generated = json_documents("".join(outputs))[1:]
    assert uploaded["id"] == "alice/pirate", uploaded
    assert generated["text"] and generated["finish_reason"] in ("length", "stop"), generated
    assert generated["usage"]["completion_tokens"] <= 32
    assert generated["usage"]["prefix_tokens"] == 6  # my-adapter's virtual tokens


def openai_client(reader: Reader, output: str) -> None:
    listed = ast.literal_eval(output.splitlines()[0])
    assert BASE in listed and "alice/pirate" in listed, listed
    assert len(output.splitlines()) >= 3, output  # the completion, then the streamed chat answer


def train_your_own(reader: Reader, outputs: list[str]) -> None:
    (printed,) = outputs
    assert "adapter written to my-prefix\n" in printed, printed[-3000:]
    assert "adapter written to my-prefix-2\n" in printed, printed[-3000:]
    uploaded = json_documents(printed)[0]
    assert uploaded["id"] == "alice/my-prefix" and uploaded["num_virtual_tokens"] == 16, uploaded
    transferred = json.loads((reader.workdir / "my-prefix-2" / "adapter_config.json").read_text())
    assert transferred["num_virtual_tokens"] == 6  # the source's length: alice/pirate's


def fine_tuning_curl(reader: Reader, outputs: list[str]) -> None:
    uploaded, created = json_documents(outputs[0])[0], json_documents(outputs[1])[0]
    assert uploaded["purpose"] == "fine-tune" and created["status"] in (
        "validating_files",
        "queued",
    )
    # The reader asks again until the job is done, as the block's comment shows.
    retrieve = reader.fill(segments(next(b for b in BLOCKS if b.matches(*FT_CURL)).text)[2])
    deadline = time.monotonic() + JOB_DEADLINE
    while (job := json_documents(reader.shell.run(retrieve)[1])[0])["status"] not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == "alice/pirate-ft", job


def fine_tuning_client(reader: Reader, output: str) -> None:
    assert "loss" in output, output  # the job's events, newest first
    headers = {"Authorization": f"Bearer {reader.fills['api_key']}"}
    served = httpx.get(f"http://{reader.url}/v1/models", headers=headers).json()
    assert "alice/pirate-ft2" in [model["id"] for model in served["data"]]


def ensemble_vote(reader: Reader, outputs: list[str]) -> None:
    (answer,) = json_documents(outputs[0])
    ensemble = answer["ensemble"]
    assert ensemble["method"] == "vote"
    assert ensemble["members"] == ["alice/s1", "alice/s2", "alice/s3"]
    assert sum(ensemble["votes"].values()) == 3 and answer["text"] in ensemble["votes"]


def lm_evaluation_harness(reader: Reader, outputs: list[str]) -> None:
    printed = "".join(outputs)
    for model in (BASE, "alice/pirate"):
        assert f"local-completions ({{'model': '{model}'" in printed, printed[-3000:]
    rows = re.findall(r"\|\s*(acc|acc_norm)\s*\|[^|]*\|\s*([0-9.]+)\s*\|", printed)
    assert len(rows) == 4, printed[-3000:]  # acc and acc_norm, for each model


def scoring_by_hand(reader: Reader, output: str) -> None:
    scores = re.findall(r"^\s*(\S+) (['\"].+['\"]): (-?\d+\.\d\d)$", output, re.MULTILINE)
    assert [model for model, _, _ in scores] == [BASE, "alice/pirate"] * 2, output
    assert all(float(score) < 0 for _, _, score in scores)


def fine_tuning_doc(reader: Reader, output: str) -> None:
    first, *answer = output.splitlines()
    assert first == "alice/pirate-voice", output
    assert answer, output


def transferability(reader: Reader, output: str) -> None:
    base, *ranked, job = [line for line in output.splitlines() if line]
    assert base.startswith("base model "), output
    best, loss = ranked[0].split()
    # every prefix alice has by then was trained on the pirate pairs (README, fine-tuning.md)
    assert best in PIRATE_TRAINED, output
    assert float(loss) < float(base.split()[-1]), output
    assert job == f"{best} -> alice/pirate-transferred", output


PIRATE_TRAINED = {"alice/my-prefix", "alice/pirate-ft", "alice/pirate-ft2", "alice/pirate-voice"}


def structured_outputs(reader: Reader, output: str) -> None:
    label, answer = output.splitlines()[:2]
    assert label in ("positive", "negative"), output
    assert answer.startswith("stop {") and "'name'" in answer and "'age'" in answer, output


FT_CURL = ("README.md", "/v1/fine_tuning/jobs/ftjob-...")
CHECKS: dict[tuple[str, str], Callable[[Reader, Any], None]] = {
    ("README.md", "ADMIN=$(cat data/admin_key)"): quick_start,
    ("README.md", 'prompt="Tell me about the sea."'): openai_client,
    ("README.md", "prefix-server train examples/pirate.jsonl"): train_your_own,
    FT_CURL: fine_tuning_curl,
    ("README.md", "client.fine_tuning.jobs.list_events"): fine_tuning_client,
    ("api.md", '"structured_outputs": {"choice"'): structured_outputs,
    ("ensembles.md", '"ensemble": "vote"'): ensemble_vote,
    ("evaluation.md", "lm_eval --model local-completions"): lm_evaluation_harness,
    ("evaluation.md", "def tokens(text: str)"): scoring_by_hand,
    ("fine-tuning.md", 'suffix="pirate-voice"'): fine_tuning_doc,
    ("fine-tuning.md", '"sample_size": 8'): transferability,
}
BLOCKS = runnable_blocks()


def test_every_runnable_block_is_run_or_says_why_not() -> None:
    for block in BLOCKS:
        keys = [key for key in [*CHECKS, *NOT_RUN] if block.matches(*key)]
        assert len(keys) == 1, f"{block.where()} ({block.language}): matched by {keys}"
    for key in [*CHECKS, *NOT_RUN]:
        assert any(block.matches(*key) for block in BLOCKS), f"no block matches {key}"


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    workdir = tmp_path_factory.mktemp("reader")
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir()
    (workdir / "data" / "models").symlink_to(MODEL_CACHE)
    (workdir / "examples").symlink_to(REPO / "examples")
    assert (Path(sys.prefix) / "bin" / "activate").exists(), "the tests run outside a venv"
    (workdir / ".venv").symlink_to(Path(sys.prefix))
    loaded = load_model(None, cache_dir=MODEL_CACHE)  # converts once if `make serve` has not
    make_adapter(loaded.model, "prefix", 6, workdir / "my-adapter", seed=0)
    for seed in (1, 2, 3):
        make_adapter(loaded.model, "prefix", 4, workdir / f"s{seed}", seed=seed)
    del loaded

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PREFIX_SERVER_URL"] = f"http://127.0.0.1:{port}"  # where the CLI finds the server
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not p.startswith(sys.prefix))
    log = (workdir / "server.log").open("ab")
    server = subprocess.Popen(  # what `make serve` runs, on a free port
        [".venv/bin/prefix-server", "serve", "--data-dir", "data", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while True:
        assert server.poll() is None, (workdir / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the server never became healthy"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    shell = Shell(workdir, env)
    try:
        yield Reader(shell, f"127.0.0.1:{port}", workdir)
    finally:
        shell.close()
        server.terminate()
        server.wait(timeout=60)


def test_the_documents_commands_run_as_written(reader: Reader) -> None:
    for block in BLOCKS:
        if any(block.matches(*key) for key in NOT_RUN):
            continue
        (check,) = [check for key, check in CHECKS.items() if block.matches(*key)]
        if block.document == "ensembles.md":  # the reader's prefixes s1..s3, uploaded first
            for name in ("s1", "s2", "s3"):
                upload = f"prefix-server upload {name} --name {name} --api-key $KEY"
                status, output = reader.shell.run(upload)
                assert status == 0, output
        started = time.monotonic()
        if block.language == "bash":
            check(reader, reader.run_bash(block))
        else:
            check(reader, reader.run_python(block))
        print(f"{block.where()}: {time.monotonic() - started:.0f} s")
