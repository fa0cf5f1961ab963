"""When a request finishes, and the text it returns."""

from __future__ import annotations

import pytest

from server.engine.request import Request, SamplingParams
from server.engine.stopping import append_token, update_text

EOS = 2


class CharTokenizer:
    """Token i decodes to chr(ord('a') + i); EOS (2) is special and decodes to nothing."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("" if i == EOS else chr(ord("a") + i) for i in ids)


def run(params: SamplingParams, tokens: list[int], max_len: int = 100) -> Request:
    request = Request([0, 1], params)
    for token in tokens:
        append_token(request, token, eos_token_ids=frozenset({EOS}), max_len=max_len)
        update_text(request, CharTokenizer())
        if request.finished:
            break
    return request


def test_max_new_tokens_finishes_with_length() -> None:
    request = run(SamplingParams(max_new_tokens=3), [5, 6, 7, 8])
    assert (request.output_token_ids, request.finish_reason, request.text) == (
        [5, 6, 7],
        "length",
        "fgh",
    )


def test_eos_finishes_with_stop_and_is_not_in_the_text() -> None:
    request = run(SamplingParams(), [5, EOS, 6])
    assert (request.output_token_ids, request.finish_reason, request.text) == (
        [5, EOS],
        "stop",
        "f",
    )


def test_ignore_eos_keeps_going() -> None:
    request = run(SamplingParams(max_new_tokens=3, ignore_eos=True), [5, EOS, 6, 7])
    assert (request.output_token_ids, request.finish_reason) == ([5, EOS, 6], "length")


def test_stop_token_ids() -> None:
    request = run(SamplingParams(stop_token_ids=(7,)), [5, 6, 7, 8])
    assert (request.output_token_ids, request.finish_reason) == ([5, 6, 7], "stop")


@pytest.mark.parametrize(("stop", "text"), [(("gh",), "f"), (("zz", "h"), "fg"), (("fgh",), "")])
def test_stop_strings_spanning_tokens_cut_the_text(stop: tuple[str, ...], text: str) -> None:
    request = run(SamplingParams(stop=stop), [5, 6, 7, 8])  # f g h i
    assert (request.output_token_ids, request.finish_reason, request.text) == (
        [5, 6, 7],
        "stop",
        text,
    )


def test_running_out_of_positions_finishes_with_length() -> None:
    request = run(SamplingParams(max_new_tokens=50), [5] * 10, max_len=5)  # prompt holds 2
    assert request.finish_reason == "length"
    assert len(request.output_token_ids) == 4  # positions 2, 3, 4 fed back; the 4th never is


def test_streamed_text_holds_back_a_possible_stop_string_start() -> None:
    request = Request([0, 1], SamplingParams(stop=("hij",)), stream_text=True)
    released = []
    for token in [5, 6, 7, 8, 10]:  # f g h i k: "hi" could start "hij" until "k" arrives
        append_token(request, token, eos_token_ids=frozenset(), max_len=100)
        released.append(update_text(request, CharTokenizer()))
    assert released == ["f", "g", "", "", "hik"]
    assert request.text == "fghik"


def test_streamed_text_holds_back_half_characters() -> None:
    class ByteTokenizer:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    request = Request([0], SamplingParams(max_new_tokens=3), stream_text=True)
    released = []
    for token in "é!".encode():  # two bytes for é, then !
        append_token(request, token, eos_token_ids=frozenset(), max_len=100)
        released.append(update_text(request, ByteTokenizer()))
    assert released == ["", "é", "!"]


def test_stop_strings_count_only_from_min_tokens_on() -> None:
    # f g h f g h: "fg" ends at token 2, before min_tokens 3; the next one (tokens 4-5) stops
    request = run(SamplingParams(stop=("fg",), min_tokens=3), [5, 6, 7, 5, 6, 7])
    assert (request.output_token_ids, request.finish_reason, request.text) == (
        [5, 6, 7, 5, 6],
        "stop",
        "fgh",
    )
