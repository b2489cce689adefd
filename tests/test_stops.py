"""Tests for StopMatcher: stop strings across pieces, held-back prefixes, and a property check."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from mycellm.engines.stops import StopMatcher


def run(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], str]:
    """Each piece's output, and the flushed tail."""
    outputs = [matcher.feed(piece) for piece in pieces]
    return outputs, matcher.flush()


def test_stop_string_split_across_pieces() -> None:
    matcher = StopMatcher(["</end>"])
    outputs, tail = run(matcher, ["Hello </", "en", "d> ignored"])
    assert "".join(outputs) == "Hello "
    assert matcher.stopped
    assert tail == ""


def test_stop_within_one_piece() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abcSTOPdef") == "abc"
    assert matcher.stopped
    assert matcher.feed("more") == ""


def test_possible_prefix_is_held_then_released() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("a </e") == "a "  # "</e" could start the stop string
    assert not matcher.stopped
    assert matcher.feed("xample") == "</example"
    assert not matcher.stopped


def test_possible_prefix_is_released_by_flush() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.feed("total ##") == "total "
    assert matcher.flush() == "##"
    assert not matcher.stopped


def test_held_text_counts_toward_the_next_match() -> None:
    matcher = StopMatcher(["abc"])
    assert matcher.feed("xa") == "x"
    assert matcher.feed("b") == ""
    assert matcher.feed("c tail") == ""
    assert matcher.stopped


def test_multiple_stops_earliest_wins() -> None:
    matcher = StopMatcher(["STOP", "END"])
    assert matcher.feed("one END two STOP three") == "one "
    assert matcher.stopped


def test_multiple_stops_earliest_wins_across_pieces() -> None:
    matcher = StopMatcher(["\n\n", "User:"])
    outputs, tail = run(matcher, ["Sure.", "\nUse", "r: hi\n\nbye"])
    assert "".join(outputs) == "Sure.\n"
    assert tail == ""


def test_no_stops_passes_through() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("anything <") == "anything <"
    assert matcher.feed("goes") == "goes"
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_empty_stop_strings_are_ignored() -> None:
    matcher = StopMatcher(["", "x"])
    assert matcher.feed("abc") == "abc"
    assert matcher.feed("dxe") == "d"
    assert matcher.stopped


def test_flush_returns_nothing_after_a_stop() -> None:
    matcher = StopMatcher(["END", "ENDING"])
    assert matcher.feed("fin") == "fin"
    assert matcher.feed("ENDIN") == ""
    assert matcher.stopped
    assert matcher.flush() == ""


@st.composite
def split_text(draw: st.DrawFn) -> tuple[str, list[str], str]:
    alphabet = st.sampled_from("ab\n<>")
    text = draw(st.text(alphabet, max_size=40))
    stop = draw(st.text(alphabet, min_size=1, max_size=5))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    pieces = [text[start:end] for start, end in pairwise(bounds)]
    return text, pieces, stop


@settings(max_examples=500, deadline=None)
@given(split_text())
def test_emitted_text_is_the_text_before_the_first_stop(case: tuple[str, list[str], str]) -> None:
    text, pieces, stop = case
    matcher = StopMatcher([stop])
    outputs, tail = run(matcher, pieces)
    emitted = "".join(outputs) + tail
    index = text.find(stop)
    assert emitted == (text[:index] if index >= 0 else text)
    assert matcher.stopped == (index >= 0)
