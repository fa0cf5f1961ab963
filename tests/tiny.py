"""Tiny random-weight models and PEFT adapters written by PEFT itself, for tests."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from server.models import LoadedModel, freeze, wrap_model

ARCHITECTURES = ("llama", "qwen2", "gpt2")
# Where the tiny models run: set PREFIX_SERVER_TEST_DEVICE=cuda to run the suite on a GPU.
DEVICE = os.environ.get("PREFIX_SERVER_TEST_DEVICE", "cpu")
ADAPTER_KINDS = ("prefix", "prefix_projection", "prompt", "p_tuning")

# No special token ids: generation then never stops early on a random EOS, in PEFT or here.
_NO_SPECIAL = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
# Larger than the default 0.02 so random logits are peaked and greedy choices are not near-ties.
_INIT = 0.2


def tiny_config(arch: str):
    if arch == "llama":  # GQA, and head_dim (24) != hidden / heads (16)
        return LlamaConfig(
            vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            max_position_embeddings=512, initializer_range=_INIT, **_NO_SPECIAL,
        )  # fmt: skip
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=_INIT, tie_word_embeddings=False, **_NO_SPECIAL,
        )  # fmt: skip
    if arch == "qwen3":  # q/k norms, head_dim (32) != hidden / heads (16)
        return Qwen3Config(
            vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=512, initializer_range=_INIT, tie_word_embeddings=False,
            **_NO_SPECIAL,
        )  # fmt: skip
    if arch == "mistral":
        return MistralConfig(
            vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
            sliding_window=None, initializer_range=_INIT, **_NO_SPECIAL,
        )  # fmt: skip
    if arch == "gpt2":  # untied: a tied random GPT-2 just repeats its last token
        return GPT2Config(
            vocab_size=384, n_embd=64, n_layer=3, n_head=4, n_positions=128,
            initializer_range=_INIT, tie_word_embeddings=False, **_NO_SPECIAL,
        )  # fmt: skip
    raise ValueError(arch)


def tiny_model(
    arch: str, attn: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attn)
    return freeze(model.to(dtype), DEVICE)


def tiny_loaded(
    arch: str, attn: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    model = tiny_model(arch, attn, seed, dtype)
    return wrap_model(model, tokenizer=None, model_id=f"tiny-{arch}")


def peft_config(kind: str, num_virtual_tokens: int):
    common = {"task_type": TaskType.CAUSAL_LM, "num_virtual_tokens": num_virtual_tokens}
    if kind == "prefix":
        return PrefixTuningConfig(**common)
    if kind == "prefix_projection":
        return PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=32)
    if kind == "prompt":
        return PromptTuningConfig(**common)
    if kind == "p_tuning":
        return PromptEncoderConfig(**common, encoder_hidden_size=32)
    raise ValueError(kind)


def make_adapter(
    base: PreTrainedModel, kind: str, num_virtual_tokens: int, out_dir: Path, seed: int
) -> PeftModel:
    """A PEFT model with parameters ~ normal(0, 1) (scaled for encoder layers), saved to out_dir."""
    peft_model = get_peft_model(copy.deepcopy(base), peft_config(kind, num_virtual_tokens))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.prompt_encoder.named_parameters():
            scale = 1.0 if "embedding" in name or param.ndim < 2 else param.shape[-1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * scale)
    peft_model.eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


def peft_greedy(peft_model: PeftModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """PEFT's own generate for one unpadded request: the oracle."""
    ids = torch.tensor([prompt], device=peft_model.device)
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def log_probs_of(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """The model's (a PEFT model's, or the base model's) log-softmax at every position of
    `tokens`, `[len, V]`: position i is the distribution of token i + 1. Prompt tuning and
    P-tuning put their virtual tokens' logits first: they are cut off."""
    ids = torch.tensor([tokens], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return logits[-len(tokens) :].float().log_softmax(dim=-1)


def base_greedy(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def word_tokenizer(vocab_size: int = 384):
    """A real fast tokenizer for the tiny models: token i is the word `w{i}`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


def save_tiny_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny model and its word tokenizer as a folder `prefix-server serve --model` can load."""
    tiny_model(arch, seed=seed).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder
