"""Incremental detokenization: each step decodes the last few output tokens, not the whole output.

Decoding tokens[i:] alone can give a different start than the same tokens inside the whole
output: sentencepiece decoders drop the leading space of the first token, byte-level ones see
half a character. So each decode starts at an anchor, the last tokens whose text became stable,
and only what decoding anchor + new tokens adds to decoding the anchor alone is new text: both
decodes start at the same token, so whatever the decoder does to a first token it does to both
(the prefix_offset/read_offset technique of vLLM's and TGI's detokenizers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what a decoder gives for half a character


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    return str(tokenizer.decode(token_ids, skip_special_tokens=True))


@dataclass
class DecodeWindow:
    """The output's last tokens: an anchor whose own text is known, then the tokens after it."""

    ids: list[int] = field(default_factory=list)
    text: str = ""  # `ids` decoded
    anchor_len: int = 0  # ids[:anchor_len] is the anchor; none at the output's start
    anchor_text: str = ""  # the anchor decoded alone
    pending_text: str = ""  # text after the anchor that may still change

    def push(self, tokenizer: Any, new_ids: list[int], final: bool) -> tuple[str, str] | None:
        """Add tokens; return (text that became stable, text after it that may still change).

        None when the window's text no longer starts with the anchor's and no character still
        to complete can set that right: the decoder changed text before the window.
        """
        if not new_ids:
            return "", self.pending_text
        self.ids.extend(new_ids)
        text = decode(tokenizer, self.ids)
        if text == self.text:  # special tokens, or more bytes of a character not whole yet
            self._drop_silent(tokenizer, len(new_ids))
            return "", self.pending_text
        self.text = text
        if not text.startswith(self.anchor_text):
            if final or not text.endswith(REPLACEMENT_CHAR):
                return None
            # A byte-fallback decoder decodes a run of byte tokens as a whole: until the run's
            # last character is complete, the anchor's characters in it read as U+FFFD too.
            self.pending_text = REPLACEMENT_CHAR
            return "", self.pending_text
        new = text[len(self.anchor_text) :]
        if new.endswith(REPLACEMENT_CHAR):
            self.pending_text = new  # the rest of the character's bytes may follow
            return "", new
        self.pending_text = ""
        if new:
            self._reanchor(tokenizer)
        else:
            self._drop_silent(tokenizer, len(new_ids))
        return new, ""

    def _reanchor(self, tokenizer: Any) -> None:
        """Make the tokens after the anchor the new anchor, so the window stays a few tokens.

        Only when they decode to some text alone: a first token a decoder strips to nothing (a
        lone space) could strip the spaces of the token after it too. Then the anchor grows.
        """
        if self.anchor_len:
            tail = self.ids[self.anchor_len :]
            tail_text = decode(tokenizer, tail)
            if tail_text:
                self.ids, self.text = tail, tail_text
        self.anchor_len, self.anchor_text = len(self.ids), self.text

    def _drop_silent(self, tokenizer: Any, count: int) -> None:
        """Drop new tokens that added no text, so a run of them does not make every decode
        longer: after an anchor, with no half character pending, all of them; otherwise only
        special tokens (decode skips those before anything else: a token a decoder strips as
        the first one, or a byte of a character not whole yet, must stay)."""
        if self.anchor_text and not self.pending_text:
            del self.ids[self.anchor_len :]
            return
        new = self.ids[-count:]
        del self.ids[-count:]
        self.ids.extend(t for t in new if not _skipped(tokenizer, t))


def _skipped(tokenizer: Any, token: int) -> bool:
    """Whether decode skips this token as a special token."""
    return not decode(tokenizer, [token]) and bool(
        tokenizer.decode([token], skip_special_tokens=False)
    )


@dataclass
class IncrementalDetokenizer:
    """One request's decoding state. `text` is the output's text from `start` on: the end of the
    text already released (for stop strings spanning steps), the text not yet released, and
    last `unstable`, which may still change (half a character so far)."""

    # None: the whole output is decoded each step (a decoder a window cannot reproduce).
    window: DecodeWindow | None = field(default_factory=DecodeWindow)
    consumed: int = 0  # output tokens pushed so far
    start: int = 0
    stable: str = ""
    unstable: str = ""

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> IncrementalDetokenizer:
        # Cleaning up tokenization spaces (" ." to ".") rewrites text across token boundaries.
        if getattr(tokenizer, "clean_up_tokenization_spaces", False):
            return cls(window=None)
        return cls()

    @property
    def text(self) -> str:
        return self.stable + self.unstable

    def push(self, tokenizer: Any, token_ids: list[int], final: bool) -> int:
        """Decode the tokens not pushed yet; return where `text` may differ from the last push's
        (its stable text before that did not change)."""
        new_ids = token_ids[self.consumed :]
        self.consumed = len(token_ids)
        result = None if self.window is None else self.window.push(tokenizer, new_ids, final)
        if result is None:
            return self._decode_whole(tokenizer, token_ids)
        stable, self.unstable = result
        changed_from = len(self.stable)
        self.stable += stable
        return changed_from

    def _decode_whole(self, tokenizer: Any, token_ids: list[int]) -> int:
        self.window = None  # for good: the decoder's text depends on more than a window
        self.start, self.stable, self.unstable = 0, "", decode(tokenizer, token_ids)
        return 0

    def keep_from(self, position: int) -> None:
        """Forget the stable text before `position` in the output's text."""
        position = min(max(position, self.start), self.start + len(self.stable))
        self.stable = self.stable[position - self.start :]
        self.start = position
