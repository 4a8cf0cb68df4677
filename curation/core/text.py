"""Caption text: the one cleaning (caption stages, exact dedup) and the one word tokenizer (text
spotting's caption overlap, the report's highlighting)."""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterator

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]")
_SPACE = re.compile(r"\s+")


def clean_caption(text: str | None) -> str:
    """Text as a human reads it: HTML entities decoded, control characters and runs of space removed."""
    if not text:
        return ""
    text = html.unescape(text)
    text = _CONTROL.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    return _SPACE.sub(" ", text).strip()


_WORD = re.compile(r"[^\W_]+")  # maximal runs of Unicode letters/digits ('_' and '-' split)


def words(text: str) -> Iterator[re.Match[str]]:
    """Every word of `text` with its position, as written."""
    return _WORD.finditer(text)


def tokens(text: str | None) -> set[str]:
    """Word tokens for the overlap: runs of letters/digits, lower-cased, at least 2 characters."""
    if not text:
        return set()
    return {t for t in _WORD.findall(text.lower()) if len(t) >= 2}
