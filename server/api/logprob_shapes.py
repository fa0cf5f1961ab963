"""Log-probabilities in each protocol's shape: OpenAI's legacy completions object, the chat
`content` list, and the native API's token ids. Which distribution they come from is the
engine's business (server/engine/logprobs.py); here they only get their tokens' text.
"""

from __future__ import annotations

from typing import Any

from server.engine.logprobs import ChosenLogprobs

# A token of a model with no tokenizer is named by its id, as vLLM names them on request.
NO_TOKENIZER_TOKEN = "token_id:{}"


class TokenText:
    """Each token's own text (decoded alone), remembered: a prompt scored with echo repeats
    many tokens, and each alternative is named too."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = NO_TOKENIZER_TOKEN.format(token_id)
            else:
                text = self.tokenizer.decode([token_id])
            self._texts[token_id] = text
        return text


# One token's entry: its id and, when asked for, its log-prob and alternatives (None: the
# first prompt token, which nothing precedes).
Scored = tuple[int, ChosenLogprobs | None]


def scored_prompt(prompt: list[int], logprobs: list[ChosenLogprobs]) -> list[Scored]:
    """The prompt's tokens with their log-probs; a request that ended before its prompt was
    all scored (cancelled mid-prefill) has null for the rest."""
    missing: list[ChosenLogprobs | None] = [None] * (len(prompt) - 1 - len(logprobs))
    return [(prompt[0], None), *zip(prompt[1:], [*logprobs, *missing], strict=True)]


def scored_output(token_ids: list[int], logprobs: list[ChosenLogprobs]) -> list[Scored]:
    return list(zip(token_ids, logprobs, strict=True))


class LegacyLogprobs:
    """OpenAI's completions `logprobs` object, built chunk by chunk: `text_offset` counts
    characters of the choice's text from its start."""

    def __init__(self, text_of: TokenText) -> None:
        self.text_of = text_of
        self.offset = 0

    def encode(self, scored: list[Scored]) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for token_id, found in scored:
            text = self.text_of(token_id)
            tokens.append(text)
            text_offset.append(self.offset)
            self.offset += len(text)
            if found is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            logprob, top = found
            token_logprobs.append(logprob)
            top_logprobs.append({self.text_of(t): lp for t, lp in top})
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }


def chat_content(text_of: TokenText, scored: list[Scored]) -> list[dict[str, Any]]:
    """The chat completions `logprobs.content` list."""
    content = []
    for token_id, found in scored:
        assert found is not None  # generated tokens always have theirs
        logprob, top = found
        content.append(
            {
                **_chat_token(text_of(token_id), logprob),
                "top_logprobs": [_chat_token(text_of(t), lp) for t, lp in top],
            }
        )
    return content


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def native(scored: list[Scored]) -> list[dict[str, Any] | None]:
    """The native API's entries: token ids, no text."""
    return [
        None
        if found is None
        else {
            "token_id": token_id,
            "logprob": found[0],
            "top_logprobs": [{"token_id": t, "logprob": lp} for t, lp in found[1]],
        }
        for token_id, found in scored
    ]
