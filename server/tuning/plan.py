"""A fine-tuning request made concrete: every default resolved, every refusal made before the job
exists; and the order in which a job sees its examples.

Defaults (docs/fine-tuning.md):
- method: prefix tuning with 16 virtual tokens; starting from a prefix, its own length
  (server/tuning/transfer.py says what each kind starts from).
- batch_size "auto": 4 (fewer if the file has fewer examples).
- n_epochs "auto": enough epochs to see about 160 examples, 1 to 10 (16 examples: 10 epochs,
  40 steps; 1,600 or more examples: 1 epoch).
- learning_rate_multiplier "auto": 1, times a base rate of 3e-2 (PEFT prompt learning trains a
  few thousand parameters, which take much larger steps than full fine-tuning).
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from prefixes import PrefixKind
from prefixes.catalog.names import check_name
from prefixes.errors import AlreadyExists, InvalidName
from prefixes.registry import Registry
from prefixes.tuning.records import Hyperparameters, JobSpec
from prefixes.tuning.tuning import Tuning
from server.train import Example, TrainConfig
from server.tuning import transfer
from server.tuning.errors import TuningError

DEFAULT_VIRTUAL_TOKENS = 16
DEFAULT_BATCH_SIZE = 4
AUTO_EXAMPLES_SEEN = 160
MAX_AUTO_EPOCHS = 10
BASE_LEARNING_RATE = 3e-2
MICRO_BATCH_SIZE = 1  # examples per turn on the device shared with serving
METHODS = {
    "prefix_tuning": PrefixKind.PREFIX_TUNING,
    "prompt_tuning": PrefixKind.PROMPT_TUNING,
    # OpenAI's own method; here it is the default, prefix tuning.
    "supervised": PrefixKind.PREFIX_TUNING,
}


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What a tenant asked for; None: the default."""

    model: str
    training_file: str
    validation_file: str | None = None
    method: str | None = None  # a key of METHODS
    num_virtual_tokens: int | None = None
    n_epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    suffix: str | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class PlanLimits:
    base_model: str  # the served model's id: `model` naming it trains from scratch
    max_virtual_tokens: int
    max_steps: int
    has_tokenizer: bool


def plan_job(
    request: JobRequest, tenant: str, limits: PlanLimits, registry: Registry, tuning: Tuning
) -> JobSpec:
    """The job to create, or the refusal (NotFound for files and prefixes the tenant cannot
    see, TuningError for settings, the registry's refusals for the prefix's name and quotas)."""
    if not limits.has_tokenizer:
        raise TuningError(
            "model", "model: this model has no tokenizer, and training files are text"
        )
    examples = tuning.get_file(tenant, request.training_file).num_examples
    if request.validation_file is not None:
        tuning.get_file(tenant, request.validation_file)
    kind = METHODS[request.method or "prefix_tuning"]
    tokens = request.num_virtual_tokens or DEFAULT_VIRTUAL_TOKENS
    if request.model != limits.base_model:
        source = registry.resolve(request.model, tenant=tenant)
        tokens = transfer.check_source(source, kind, request.num_virtual_tokens)
    if tokens > limits.max_virtual_tokens:
        raise TuningError(
            "method.num_virtual_tokens",
            f"method.num_virtual_tokens: expected at most {limits.max_virtual_tokens}, "
            f"found {tokens}",
        )
    hyper = resolve_hyperparameters(request, examples)
    steps = total_steps(examples, hyper)
    if steps > limits.max_steps:
        raise TuningError(
            "hyperparameters.n_epochs",
            f"hyperparameters: {hyper.n_epochs} epochs of {steps // hyper.n_epochs} steps make "
            f"{steps} steps, expected at most {limits.max_steps}",
        )
    suffix = request.suffix or f"ft-{secrets.token_hex(4)}"
    try:
        check_name(suffix, "suffix")
    except InvalidName as exc:
        raise TuningError("suffix", f"{exc.message} (the name of the prefix it makes)") from None
    try:
        upload = registry.check_upload(
            tenant, suffix, visibility=None, description="", overwrite=False
        )
    except AlreadyExists:
        raise suffix_taken(tenant, suffix) from None
    upload.check_virtual_tokens(tokens)
    return JobSpec(
        model=request.model,
        training_file=request.training_file,
        validation_file=request.validation_file,
        method=kind,
        num_virtual_tokens=tokens,
        hyperparameters=hyper,
        suffix=suffix,
        seed=request.seed if request.seed is not None else random.randrange(2**31),
    )


def resolve_hyperparameters(request: JobRequest, examples: int) -> Hyperparameters:
    batch = request.batch_size or min(DEFAULT_BATCH_SIZE, examples)
    epochs = request.n_epochs or max(
        1, min(MAX_AUTO_EPOCHS, math.ceil(AUTO_EXAMPLES_SEEN / examples))
    )
    return Hyperparameters(epochs, batch, request.learning_rate_multiplier or 1.0)


def total_steps(examples: int, hyper: Hyperparameters) -> int:
    return hyper.n_epochs * math.ceil(examples / hyper.batch_size)


def train_config(spec: JobSpec) -> TrainConfig:
    hyper = spec.hyperparameters
    return TrainConfig(
        kind="prefix" if spec.method is PrefixKind.PREFIX_TUNING else "prompt",
        virtual_tokens=spec.num_virtual_tokens,
        steps=0,  # a job walks epochs (`batches`), not TrainConfig's random batches
        batch_size=hyper.batch_size,
        learning_rate=BASE_LEARNING_RATE * hyper.learning_rate_multiplier,
        seed=spec.seed,
        micro_batch_size=MICRO_BATCH_SIZE,
    )


def batches(
    examples: list[Example], hyper: Hyperparameters, seed: int
) -> Iterator[tuple[int, list[Example]]]:
    """(epoch, batch) for every step: each epoch visits every example once, in a seeded order."""
    rng = random.Random(seed)
    for epoch in range(1, hyper.n_epochs + 1):
        order = list(examples)
        rng.shuffle(order)
        for start in range(0, len(order), hyper.batch_size):
            yield epoch, order[start : start + hyper.batch_size]


def suffix_taken(tenant: str, suffix: str) -> AlreadyExists:
    """A job registers a new prefix and cannot overwrite: say what the caller can do."""
    return AlreadyExists(
        f"suffix: {tenant}/{suffix} is taken (a prefix or an ensemble); a fine-tuning job "
        f"registers a new prefix: choose another suffix, or delete {tenant}/{suffix} first",
        field="suffix",
    )
