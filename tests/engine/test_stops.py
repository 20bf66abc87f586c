"""The engine stops a row on the text the client gets: a stop string of characters split over many
byte tokens, or spanning special tokens (which the answer's text skips), is found when its last
token comes; one that only the special tokens' own text would make is not."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.stops import StopFinder
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(FIXTURES / "tiny-llama")


def _ids(tok, *parts: str | int) -> list[int]:
    """Token ids of text parts and raw ids, in order."""
    return [i for p in parts for i in ([p] if isinstance(p, int) else tok.encode(p, add_special_tokens=False))]


def _each_prefix_found(tok, ids: list[int], stops: tuple[str, ...]) -> list[bool]:
    finder = StopFinder(tok)
    return [finder.found(ids[:n], stops) for n in range(1, len(ids) + 1)]


def test_a_stop_of_characters_split_over_byte_tokens_is_found_at_its_last_token(tok):
    ids = _ids(tok, "ab 😀😀😀")
    assert len(ids) > len("😀😀😀") + 4  # more tokens than characters: one per byte
    assert _each_prefix_found(tok, ids, ("😀😀😀",)) == [False] * (len(ids) - 1) + [True]


def test_a_stop_spanning_special_tokens_is_found_as_the_answer_text_shows_it(tok):
    eos = tok.eos_token_id
    ids = _ids(tok, "say foo", *[eos] * 20, "bar")
    assert tok.decode(ids, skip_special_tokens=True) == "say foobar"
    assert _each_prefix_found(tok, ids, ("foobar",))[-1]


def test_the_special_tokens_own_text_is_not_a_stop(tok):
    ids = _ids(tok, "say", tok.eos_token_id, "more")
    assert not any(_each_prefix_found(tok, ids, (tok.eos_token,)))
