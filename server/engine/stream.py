"""The consumer's side of a request: an async stream of chunks fed from the engine thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.engine.logprobs import ChosenLogprobs
from server.engine.request import NonFiniteOutput, Request, RequestFailed

__all__ = ["Chunk", "NonFiniteOutput", "RequestFailed", "RequestStream", "Result"]


@dataclass(frozen=True, slots=True)
class Chunk:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # set on the last chunk
    # With sampling.logprobs: each of token_ids' log-prob and top alternatives.
    logprobs: list[ChosenLogprobs] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    prefix_tokens: int
    logprobs: list[ChosenLogprobs] = field(default_factory=list)  # with sampling.logprobs
    # With sampling.prompt_logprobs: prompt token i's at index i - 1 (the first has none).
    prompt_logprobs: list[ChosenLogprobs] = field(default_factory=list)


class RequestStream:
    """`async for chunk in stream`, `await stream.text()`, `await stream.result()`, `cancel()`.

    The engine thread calls `push`; chunks cross to the consumer's event loop through
    `call_soon_threadsafe`, so the engine never blocks on a slow consumer.
    """

    def __init__(
        self,
        request: Request,
        loop: asyncio.AbstractEventLoop,
        on_cancel: Callable[[Request], None],
    ):
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._on_cancel = on_cancel
        self._done = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)  # fixed at submit

    @property
    def prefix_tokens(self) -> int:
        """Virtual tokens the request ran under (fixed at submit): a prompt ensemble's, every
        member row's prefix summed (its rows all ran); n choices share one prefix."""
        group = self.request.group
        if group is None or group.shares_prompt:
            return self.request.prefix_len
        return sum(member.prefix_len for member in group.members)

    def push(self, chunk: Chunk) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancel()

    def cancel(self) -> None:
        """Stop generating; the slot is freed by the engine's next step. Safe from any thread."""
        if not self.request.finished:
            self._on_cancel(self.request)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        if self._done:
            return
        try:
            while True:
                chunk = await self._queue.get()
                if chunk.finish_reason == "error":
                    raise self.request.error or RequestFailed("generation failed")
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self._done = True
            if not self.request.finished:  # the consumer walked away mid-stream
                self.cancel()

    async def result(self) -> Result:
        token_ids: list[int] = []
        text: list[str] = []
        logprobs: list[ChosenLogprobs] = []
        reason = "stop"
        async for chunk in self:
            token_ids += chunk.token_ids
            text.append(chunk.text)
            logprobs += chunk.logprobs
            reason = chunk.finish_reason or reason
        return Result(
            text="".join(text),
            token_ids=token_ids,
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,
            prefix_tokens=self.prefix_tokens,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )

    @property
    def prompt_logprobs(self) -> list[ChosenLogprobs]:
        """Complete once the first chunk has come (the prompt is scored before any token)."""
        return list(self.request.prompt_logprobs)

    async def text(self) -> str:
        return (await self.result()).text
