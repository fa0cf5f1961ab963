"""Streamed text, decoded a few tokens at a time, against decoding the whole output every step.

Three kinds of decoder: byte-level BPE (the embedded SmolLM2's own tokenizer, and a small GPT-2
style one), and sentencepiece-style BPE with byte fallback, which drops the leading space of the
first token (Llama's decoder, and the Metaspace decoder). The small ones are built here from a
few sentences, so nothing is downloaded.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from server.engine.detokenizer import REPLACEMENT_CHAR
from server.engine.request import Request, SamplingParams
from server.engine.stopping import append_token, update_text
from server.models import EMBEDDED_MODEL_ID, embedded_model_source

MODEL_CACHE = Path(__file__).resolve().parents[2] / "data" / "models"  # shared with `make serve`
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "café naïve résumé über straße",
    "hello world, hello there! Don't stop.",
    "def f(x):\n    return x + 1",
] * 10
# Pieces of generated text: ASCII words, characters of two to four UTF-8 bytes, emojis made of
# several code points, newlines and runs of spaces.
PIECES = [
    "the", " the", " fox", "Hello", " world", ",", ".", "!", " ", "  ", "\n", "x", " 1", "é",
    " é", "ß", "€", " €", "日本語", " 日本", "😀", " 😀", "😀😀", "👍🏽", "🇫🇷", "a😀b", " naïve",
]  # fmt: skip
MAX_STEP_IDS = 24  # a few tokens' worth; decoding the whole output would pass them all


class CountingTokenizer:
    """Counts the token ids passed to decode: the decode work of a step."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ids = 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.ids += len(ids)
        return str(self.inner.decode(ids, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def train(pre_tokenizer: Any, trainer: Any) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style: every byte is a token, so a multi-byte character often spans tokens."""
    tokenizer = train(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def sentencepiece_bpe(decoder: Any, prepend_scheme: str) -> PreTrainedTokenizerFast:
    """Llama style: "▁" for spaces, and characters outside the vocabulary as <0xNN> tokens."""
    tokenizer = train(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme),
        trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoder
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def llama_style() -> PreTrainedTokenizerFast:
    strip_first_space = decoders.Strip(" ", 1, 0)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    return sentencepiece_bpe(decoders.Sequence([*steps, strip_first_space]), "first")


def metaspace_style() -> PreTrainedTokenizerFast:
    metaspace = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return sentencepiece_bpe(decoders.Sequence([decoders.ByteFallback(), metaspace]), "always")


def smollm2_tokenizer() -> Any:
    converted = MODEL_CACHE / EMBEDDED_MODEL_ID
    if (converted / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(converted, local_files_only=True)
    gguf = embedded_model_source()  # read from the GGUF file the installed package ships
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


BUILDERS = {
    "smollm2": smollm2_tokenizer,
    "byte_level": byte_level_bpe,
    "llama": llama_style,
    "metaspace": metaspace_style,
}


@functools.cache
def built(name: str) -> Any:
    return BUILDERS[name]()


@pytest.fixture(params=list(BUILDERS))
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return built(request.param)


@pytest.fixture(params=["smollm2", "byte_level"])
def byte_level(request: pytest.FixtureRequest) -> Any:
    """The byte-level ones, whose decode of any token sequence only grows at its end."""
    return built(request.param)


def decode(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def stop_start_length(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that some stop string begins with."""
    tails = [k for k in range(1, len(text) + 1) if any(s.startswith(text[-k:]) for s in stop)]
    return max(tails, default=0)


def reference_deltas(tokenizer: Any, tokens: list[int], stop: tuple[str, ...]) -> list[str]:
    """The text to release at each step, from the whole output decoded at every step."""
    released, deltas = "", []
    for n in range(1, len(tokens) + 1):
        text, stopped = cut_at_stop(decode(tokenizer, tokens[:n]), stop)
        finished = stopped or n == len(tokens)
        ready = len(text)
        if not finished:
            while ready > 0 and text[ready - 1] == REPLACEMENT_CHAR:  # half a character
                ready -= 1
            ready -= stop_start_length(text[:ready], stop)
        delta = text[len(released) : max(ready, len(released))]
        released += delta
        deltas.append(delta)
        if finished:
            break
    return deltas


def stream(
    tokenizer: Any, tokens: list[int], stop: tuple[str, ...] = ()
) -> tuple[Request, list[str], list[int]]:
    """Run tokens through the engine's per-token calls; return the deltas and each step's work."""
    counting = CountingTokenizer(tokenizer)
    params = SamplingParams(max_new_tokens=len(tokens), stop=stop)
    request = Request([0], params, stream_text=True)
    deltas, work = [], []
    for token in tokens:
        append_token(request, token, eos_token_ids=frozenset(), max_len=10**9)
        counting.ids = 0
        deltas.append(update_text(request, counting))
        work.append(counting.ids)
        if request.finished:
            break
    return request, deltas, work


def random_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(pieces))


def text_tokens(tokenizer: Any, rng: random.Random, pieces: int) -> list[int]:
    """A plausible output: encoded text, with special tokens here and there."""
    ids = list(tokenizer.encode(random_text(rng, pieces), add_special_tokens=False))
    special = sorted(tokenizer.all_special_ids)
    for _ in range(len(ids) // 20):
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
    return ids


def random_stops(rng: random.Random, text: str) -> tuple[str, ...]:
    """A stop string taken from the text (so it spans tokens), one that never occurs, or none."""
    kind = rng.randrange(3)
    if kind == 0 or len(text) < 4:
        return ()
    start = rng.randrange(len(text) // 3, len(text) - 2)
    found = text[start : start + rng.randint(1, 6)].strip(REPLACEMENT_CHAR)
    return ("never once", found) if found and kind == 1 else ("<never>", "x😀y")


def check_against_full_decode(tokenizer: Any, tokens: list[int], stop: tuple[str, ...]) -> None:
    request, deltas, _ = stream(tokenizer, tokens, stop)
    final, stopped = cut_at_stop(decode(tokenizer, request.output_token_ids), stop)
    assert "".join(deltas) == request.text == final
    assert all(final.startswith(released) for released in itertools.accumulate(deltas))
    assert request.finish_reason == ("stop" if stopped else "length")
    assert deltas == reference_deltas(tokenizer, tokens, stop)


@pytest.mark.parametrize("seed", range(12))
def test_streamed_text_of_plausible_outputs_is_their_decode(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    tokens = text_tokens(tokenizer, rng, 60)
    stop = random_stops(rng, decode(tokenizer, tokens))
    check_against_full_decode(tokenizer, tokens, stop)


@pytest.mark.parametrize("seed", range(12))
def test_streamed_text_of_random_byte_level_tokens_is_their_decode(
    byte_level: Any, seed: int
) -> None:
    """Any token sequence: bytes that never make a whole character, special tokens anywhere.
    (Byte fallback turns a whole run of byte tokens to U+FFFD when one is bad: not this test.)"""
    rng = random.Random(seed)
    tokens = [rng.randrange(len(byte_level)) for _ in range(rng.randint(1, 150))]
    stop = random_stops(rng, decode(byte_level, tokens))
    check_against_full_decode(byte_level, tokens, stop)


@pytest.mark.parametrize("seed", range(12))
def test_random_tokens_release_what_decoding_everything_each_step_released(
    tokenizer: Any, seed: int
) -> None:
    """Even a sequence whose later tokens change earlier text (a stray byte after a run of byte
    tokens) releases, step by step, what decoding the whole output every step released."""
    rng = random.Random(1000 + seed)
    tokens = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 150))]
    stop = random_stops(rng, decode(tokenizer, tokens))
    assert stream(tokenizer, tokens, stop)[1] == reference_deltas(tokenizer, tokens, stop)


@pytest.mark.parametrize("stop", [(), ("never seen",)])
def test_each_step_decodes_a_few_tokens_whatever_the_output_length(
    tokenizer: Any, stop: tuple[str, ...]
) -> None:
    """Also through long runs of special tokens (a model going on past its end of sequence)."""
    eos = tokenizer.eos_token_id
    tokens = text_tokens(tokenizer, random.Random(7), 1500)
    tokens = [eos] * 300 + tokens[:1000] + [eos] * 300 + tokens[1000:]
    request, deltas, work = stream(tokenizer, tokens, stop)
    assert "".join(deltas) == decode(tokenizer, tokens)
    assert max(work) <= MAX_STEP_IDS  # the last step too: the end needs no whole decode
    # The text kept for stop strings and what is not released yet stays short too.
    assert request.detok is not None and len(request.detok.text) < 20


def test_a_sentencepiece_space_is_kept_after_special_tokens_and_lone_spaces() -> None:
    """Decoding "▁world" first drops its space; inside the output the space stays."""
    tokenizer = llama_style()
    vocab = tokenizer.get_vocab()
    bos, eos, space, hello = (vocab[t] for t in ("<s>", "</s>", "▁", "▁hello"))
    for tokens in (
        [bos, hello, eos, bos, hello],
        [space, hello, space, space, eos, hello, bos, space],
        [bos, space, eos, hello],
        [hello, *tokenizer.encode(" 😀 😀€😀", add_special_tokens=False), eos, hello],
    ):
        check_against_full_decode(tokenizer, tokens, ())
        check_against_full_decode(tokenizer, tokens, ("o ", "😀€"))


def test_an_output_that_ends_half_way_through_a_run_of_byte_tokens() -> None:
    """The unfinished character turns the whole run, € included, to U+FFFD: the end releases
    what decoding everything at every step released."""
    tokenizer = llama_style()
    tokens = list(tokenizer.encode("x €😀", add_special_tokens=False))[:-2]
    assert stream(tokenizer, tokens)[1] == reference_deltas(tokenizer, tokens, ())
    assert decode(tokenizer, tokens).endswith(REPLACEMENT_CHAR * 5)


def test_a_decoder_that_strips_every_leading_space() -> None:
    """A token that is only spaces decodes to nothing as the first one, yet the spaces of the
    token after it stay: it must not become the first token of later decodes."""

    class Lstrip:
        words = ("a", " ", " b", "  ", "c")

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(self.words[i] for i in ids).lstrip(" ")

    for tokens in ([0, 1, 2, 3, 4], [1, 1, 2, 3, 3, 4, 1], [0, 3, 1, 4, 1, 1, 2]):
        request, deltas, _ = stream(Lstrip(), tokens)
        assert "".join(deltas) == request.text == Lstrip().decode(tokens)


def test_stop_strings_are_found_across_tokens_and_steps(tokenizer: Any) -> None:
    tokens = list(tokenizer.encode("Hello world 😀😀 café über", add_special_tokens=False))
    for stop in [("world 😀",), ("😀😀",), ("é ü",), ("o w", "lo"), ("over",)]:
        check_against_full_decode(tokenizer, tokens, stop)


def test_a_stop_string_start_before_a_half_character_is_held_back() -> None:
    """ "h" may start "h€" while the € is half there: it is not released before the € is whole."""
    tokenizer = byte_level_bpe()
    tokens = list(tokenizer.encode("xh€", add_special_tokens=False))
    request, deltas, _ = stream(tokenizer, tokens, ("h€",))
    assert (deltas[-1], request.text, request.finish_reason) == ("", "x", "stop")
    assert "h" not in "".join(deltas)


def test_a_tokenizer_that_cleans_up_spaces_is_decoded_whole_each_step() -> None:
    """ " ." becomes "." across tokens: no window can reproduce that, so the old way is kept."""

    class Words:
        clean_up_tokenization_spaces = True
        words = ("Hi", " there", " .", " ok", " !")

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(self.words[i] for i in ids).replace(" .", ".").replace(" !", "!")

    request, deltas, work = stream(Words(), [0, 1, 2, 3, 4])
    assert "".join(deltas) == request.text == "Hi there. ok!"
    assert work == [1, 2, 3, 4, 5]
