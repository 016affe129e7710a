"""The quoting helpers every error message uses for client input."""

from __future__ import annotations

from sealserve.errors import quote, quote_shape


def test_quote_keeps_short_input_whole() -> None:
    assert quote("digits") == "'digits'"
    assert quote(b"kid-1") == "'kid-1'"


def test_quote_long_input_is_prefix_and_length() -> None:
    text = quote("x" * 65536)
    assert text == "'" + "x" * 64 + "'... (65536 chars)"


def test_quote_escapes_control_characters() -> None:
    assert "\n" not in quote("a\nb" * 100)


def test_quote_shape() -> None:
    assert quote_shape([1, 64]) == "[1, 64]"
    assert quote_shape(list(range(8192))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...] (8192 dims)"
