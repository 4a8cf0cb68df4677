"""Word tokens: the one definition text spotting's caption overlap and the report's highlighting share."""

from __future__ import annotations

import re
from collections.abc import Iterator

_WORD = re.compile(r"[^\W_]+")  # maximal runs of Unicode letters/digits ('_' and '-' split)


def words(text: str) -> Iterator[re.Match[str]]:
    """Every word of `text` with its position, as written."""
    return _WORD.finditer(text)


def tokens(text: str | None) -> set[str]:
    """Word tokens for the overlap: runs of letters/digits, lower-cased, at least 2 characters."""
    if not text:
        return set()
    return {t for t in _WORD.findall(text.lower()) if len(t) >= 2}
