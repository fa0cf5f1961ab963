"""Train a prefix with PEFT on the same frozen model the server runs (`prefix-server train`,
and the server's fine-tuning jobs).

Data: JSON lines, each `{"prompt": ..., "completion": ...}` (the loss covers the completion
only) or `{"text": ...}` (the loss covers all of it). Output: PEFT's own `save_pretrained`
format, which `POST /v1/prefixes` accepts as is.

PEFT's prompt learning wraps the model without copying it: the trainer's PEFT model holds the
served model's own parameters (frozen) and adds only the prompt encoder, so a job training
beside serving costs the prefix's parameters, their optimiser state and one micro-batch's
activations, never a second model.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
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
    # Examples per forward and backward (None: the whole batch). The gradient is the same
    # either way; smaller micro-batches make shorter turns on a device shared with serving.
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("prefix", "prompt"):
            raise ValueError(f"kind: expected prefix or prompt, found {self.kind!r}")
        if self.virtual_tokens < 1 or self.steps < 0 or self.batch_size < 1:
            raise ValueError("virtual_tokens and batch_size must be >= 1, steps >= 0")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")


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


# What AdamW keeps per parameter (torch.optim.AdamW without amsgrad).
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")
# A turn on the device for one micro-batch (server/device_share.py); outside the server, none.
Turn = Callable[[], AbstractContextManager[object]]
# PEFT initialises a new prompt encoder from torch's global generator: seeding and creating it
# under one lock keeps a job's start reproducible when another job starts at the same time.
_SEEDED_INIT = threading.Lock()


class PrefixTrainer:
    """A PEFT prompt-learning model around the served model, trained one step at a time.

    The served model stays frozen and in eval mode (dropout off), so the prefix learns exactly
    the function that will serve it, and requests served between two training steps see the
    model unchanged. `close()` unwraps it; until then no other code may change its mode.
    """

    def __init__(
        self, loaded: LoadedModel, config: TrainConfig, *, init_from: RawPrefix | None = None
    ) -> None:
        self.config = config
        self.device = loaded.device
        peft_config = (
            PrefixTuningConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.virtual_tokens
            )
            if config.kind == "prefix"
            else PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.virtual_tokens
            )
        )
        with _SEEDED_INIT, warnings.catch_warnings():
            # PEFT reads transformers' deprecated `is_gradient_checkpointing` while wrapping a
            # model: a warning about the two libraries, nothing a user can act on.
            warnings.filterwarnings(
                "ignore",
                message="`is_gradient_checkpointing` is deprecated",
                category=FutureWarning,
            )
            torch.manual_seed(config.seed)
            self.model = get_peft_model(loaded.model, peft_config)
        try:
            if init_from is not None:
                initialise(self.model, init_from, config)
        except BaseException:
            self.close()
            raise
        self.model.base_model.eval()
        self.model.prompt_encoder.train()
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimiser = torch.optim.AdamW(parameters, lr=config.learning_rate)

    def step(
        self, batch: list[Example], turn: Turn = nullcontext, *, whole_batch: bool = False
    ) -> float:
        """One optimiser step on `batch`, one micro-batch per `turn()` (with `whole_batch`, the
        batch in one turn); the batch's mean loss per target token, as PEFT computes it for
        the whole batch at once."""
        chunks = [batch] if whole_batch else self._chunks(batch)
        total = sum(self._targets(chunk) for chunk in chunks)
        loss_sum = 0.0
        for chunk in chunks:
            weight = self._targets(chunk) / max(total, 1)
            if weight == 0:
                continue  # nothing to predict: its mean loss would be NaN
            with turn(), torch.enable_grad():
                loss = self._loss(chunk) * weight
                loss.backward()
            loss_sum += float(loss.detach())
        self.optimiser.step()
        self.optimiser.zero_grad()
        return loss_sum

    @torch.no_grad()
    def evaluate(self, examples: list[Example], turn: Turn = nullcontext) -> float:
        """The mean loss per target token over `examples` (a validation set), no update."""
        chunks = self._chunks(examples)
        total = sum(self._targets(chunk) for chunk in chunks)
        loss_sum = 0.0
        for chunk in chunks:
            weight = self._targets(chunk) / max(total, 1)
            if weight:
                with turn():
                    loss_sum += float(self._loss(chunk)) * weight
        return loss_sum

    def training_state(self) -> dict[str, torch.Tensor]:
        """Everything a step changes, as CPU tensors: the trainable parameters and AdamW's
        state for each (its step count and both moments). With `load_training_state` on a
        trainer of the same config, the next steps are exactly those this one would take."""
        state = {}
        for name, parameter in self._trainable():
            state[f"parameter/{name}"] = parameter.detach().cpu().clone()
            for key, value in self.optimiser.state.get(parameter, {}).items():
                state[f"optimiser/{key}/{name}"] = value.detach().cpu().clone()
        return state

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Resume from the `training_state()` of a trainer of the same config that took at
        least one step (ValueError naming what differs otherwise)."""
        trainable = self._trainable()
        expected = {f"parameter/{name}" for name, _ in trainable} | {
            f"optimiser/{key}/{name}" for name, _ in trainable for key in ADAMW_STATE
        }
        if set(state) != expected:
            raise ValueError(f"training state: expected {sorted(expected)}, found {sorted(state)}")
        with torch.no_grad():
            for name, parameter in trainable:
                saved = state[f"parameter/{name}"]
                if saved.shape != parameter.shape:
                    raise ValueError(
                        f"training state: {name}: expected shape {tuple(parameter.shape)}, "
                        f"found {tuple(saved.shape)}"
                    )
                parameter.copy_(saved.to(parameter.device, parameter.dtype))
                # AdamW keeps its step count on the host and its moments beside the parameter,
                # as its own first step creates them.
                self.optimiser.state[parameter] = {
                    "step": state[f"optimiser/step/{name}"].clone(),
                    "exp_avg": state[f"optimiser/exp_avg/{name}"].to(parameter.device),
                    "exp_avg_sq": state[f"optimiser/exp_avg_sq/{name}"].to(parameter.device),
                }

    def save(self, out_dir: Path) -> None:
        self.model.save_pretrained(str(out_dir))

    def adapter_files(self) -> dict[str, bytes]:
        """What `save` writes, as the files `Registry.upload` takes."""
        with tempfile.TemporaryDirectory(prefix="prefix-trainer-") as folder:
            self.save(Path(folder))
            return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}

    def close(self) -> None:
        # The served model object is shared: leave it as the frozen base model it was.
        self.model.base_model.requires_grad_(False)
        self.model.base_model.eval()

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _chunks(self, examples: list[Example]) -> list[list[Example]]:
        size = self.config.micro_batch_size or len(examples) or 1
        return [examples[i : i + size] for i in range(0, len(examples), size)]

    def _targets(self, chunk: list[Example]) -> int:
        """How many tokens the loss covers. The model predicts token i + 1 from position i, so
        an example's first label is never a target, except after a soft prompt, whose last
        virtual token predicts it."""
        skip = 0 if self.config.kind == "prompt" else 1
        return sum(sum(label != -100 for label in e.labels[skip:]) for e in chunk)

    def _loss(self, chunk: list[Example]) -> torch.Tensor:
        input_ids, labels, mask = (t.to(self.device) for t in pad(chunk))
        return self.model(input_ids=input_ids, attention_mask=mask, labels=labels).loss


def train_prefix(
    loaded: LoadedModel,
    examples: list[Example],
    out_dir: Path,
    config: TrainConfig,
    *,
    init_from: RawPrefix | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `config.steps` steps on random batches, save with `save_pretrained` into out_dir,
    and return the loss of every step."""
    trainer = PrefixTrainer(loaded, config, init_from=init_from)
    try:
        rng = random.Random(config.seed)
        losses = []
        for step in range(config.steps):
            batch = rng.sample(examples, min(config.batch_size, len(examples)))
            losses.append(trainer.step(batch))
            if progress:
                progress(step, losses[-1])
        trainer.save(out_dir)
    finally:
        trainer.close()
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


def pad(batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch; padded positions take no loss and no attention."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in batch])
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
    return ids, labels, mask
