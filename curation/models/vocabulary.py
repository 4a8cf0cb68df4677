"""Vocabulary files: class names, one per line, in a classifier's output order.

The `concepts` stage reads them, `curate select` writes the run's beside the
subset, and the trainer reads that one back for distillation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class VocabularyError(ValueError):
    """A vocabulary file cannot be read or is malformed."""


def read_vocabulary(path: str | os.PathLike) -> list[str]:
    """Class names, one per line, in the classifier's output order; trailing blank lines are ignored."""
    from curation.core.storage import StorageError, is_url, open_store

    try:
        if is_url(path):
            # beside shards that `curate select` wrote to object storage
            parent, name = str(path).rsplit("/", 1)
            text = open_store(parent).get_bytes(name).decode("utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
    except (OSError, StorageError, UnicodeDecodeError) as e:
        raise VocabularyError(
            f"cannot read vocabulary {str(path)!r}: {getattr(e, 'strerror', None) or e}"
        ) from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise VocabularyError(f"vocabulary {str(path)!r} is empty (one class name per line)")
    blank = [i + 1 for i, n in enumerate(names) if not n]
    if blank:
        # A blank line would shift every later name onto the wrong output.
        raise VocabularyError(f"vocabulary {str(path)!r} has blank line(s) {blank[:5]} between class names")
    return names


def vocabulary_text(names: list[str]) -> str:
    """One name per line, the format `read_vocabulary` reads back."""
    if any("\n" in n or "\r" in n or not n.strip() for n in names):
        raise VocabularyError("vocabulary names must be non-empty single lines")
    return "".join(f"{n}\n" for n in names)


def vocabulary_sha256(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()
