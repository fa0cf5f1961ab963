"""Train a prefix with PEFT on the same frozen model the server runs (`prefix-server train`).

Data: JSON lines, each `{"prompt": ..., "completion": ...}` (the loss covers the completion
only) or `{"text": ...}` (the loss covers all of it). Output: PEFT's own `save_pretrained`
format, which `POST /v1/prefixes` accepts as is.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

from prefixes import PrefixKind, RawPrefix
from server.models import LoadedModel


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "prefix"  # "prefix" (prefix tuning) or "prompt" (prompt tuning)
    virtual_tokens: int = 16
    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 3e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("prefix", "prompt"):
            raise ValueError(f"kind: expected prefix or prompt, found {self.kind!r}")
        if self.virtual_tokens < 1 or self.steps < 0 or self.batch_size < 1:
            raise ValueError("virtual_tokens and batch_size must be >= 1, steps >= 0")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken


def read_examples(path: Path, tokenizer: object) -> list[Example]:
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
        encode = tokenizer.encode  # type: ignore[attr-defined]
        if isinstance(record, dict) and "prompt" in record and "completion" in record:
            prompt, completion = encode(record["prompt"]), encode(record["completion"])
            examples.append(Example(prompt + completion, [-100] * len(prompt) + completion))
        elif isinstance(record, dict) and "text" in record:
            ids = encode(record["text"])
            examples.append(Example(ids, ids))
        else:
            expected = '{"prompt", "completion"} or {"text"}'
            raise ValueError(f"{path}:{number}: expected {expected}, found {line[:80]}")
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def train_prefix(
    loaded: LoadedModel,
    examples: list[Example],
    out_dir: Path,
    config: TrainConfig,
    *,
    init_from: RawPrefix | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train, save with `save_pretrained` into out_dir, and return the loss of every step."""
    torch.manual_seed(config.seed)
    peft_config = (
        PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.virtual_tokens)
        if config.kind == "prefix"
        else PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.virtual_tokens
        )
    )
    model = get_peft_model(loaded.model, peft_config)
    try:
        if init_from is not None:
            initialise(model, init_from, config)
        losses = optimise(model, examples, config, progress)
        model.save_pretrained(str(out_dir))
    finally:
        # The served model object is shared: unwrap it so it stays the frozen base model.
        model.base_model.requires_grad_(False)
        model.base_model.eval()
    return losses


def initialise(model: PeftModel, source: RawPrefix, config: TrainConfig) -> None:
    """Prompt transfer: start from an existing prefix of the same kind and length."""
    weight: torch.Tensor = model.prompt_encoder["default"].embedding.weight  # type: ignore[union-attr,assignment]
    wanted = PrefixKind.PREFIX_TUNING if config.kind == "prefix" else PrefixKind.PROMPT_TUNING
    if source.kind.is_soft_prompt != wanted.is_soft_prompt:
        raise ValueError(f"init-from: expected a {config.kind} prefix, found {source.kind.value}")
    tensor = source.tensor
    if not source.kind.is_soft_prompt:  # canonical [L, 2, H, T, D] -> PEFT's [T, L*2*H*D]
        tensor = tensor.permute(3, 0, 1, 2, 4).reshape(tensor.shape[3], -1)
    if tuple(tensor.shape) != tuple(weight.shape):
        raise ValueError(
            f"init-from: expected shape {tuple(weight.shape)}, found {tuple(tensor.shape)}"
        )
    with torch.no_grad():
        weight.copy_(tensor.to(weight.dtype))


def optimise(
    model: PeftModel,
    examples: list[Example],
    config: TrainConfig,
    progress: Callable[[int, float], None] | None,
) -> list[float]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=config.learning_rate)
    rng = random.Random(config.seed)
    losses = []
    model.train()
    for step in range(config.steps):
        batch = rng.sample(examples, min(config.batch_size, len(examples)))
        input_ids, labels, mask = pad(batch)
        with torch.enable_grad():
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(float(loss.detach()))
        if progress:
            progress(step, losses[-1])
    model.eval()
    return losses


def pad(batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch; padded positions take no loss and no attention."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in batch])
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
    return ids, labels, mask
