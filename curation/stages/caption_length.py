"""Caption length in words and characters (DataComp's basic filter: more than 2 words, more than 5 characters).

Measured on the caption exactly as the input has it, as DataComp's
`basic_filter` does: `caption_words` = `len(caption.split())` (runs of
whitespace separate words), `caption_chars` = `len(caption)` in Unicode code
points. A null caption has 0 words and 0 characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.params import param
from curation.stages.base import Stage

# whitespace-separated words and Unicode code points of the raw caption
LENGTH_COLUMNS: dict[str, pa.DataType] = {"caption_words": pa.int32(), "caption_chars": pa.int32()}


@dataclass(frozen=True)
class CaptionLengthParams:
    # Keep captions with min_words <= words <= max_words and min_chars <= chars <= max_chars.
    # Defaults are DataComp's basic filter (words > 2, chars > 5); null max = no upper bound.
    min_words: int = param(3, ge=0)
    max_words: int | None = param(None, ge="min_words")
    min_chars: int = param(6, ge=0)
    max_chars: int | None = param(None, ge="min_chars")


class CaptionLength(Stage):
    """Drop captions shorter (or longer) than the configured number of words or characters."""

    name = "caption_length"
    columns: ClassVar[dict[str, pa.DataType]] = LENGTH_COLUMNS
    bins: ClassVar[dict[str, tuple[float, float, float]]] = {
        "caption_words": (0, 1024, 1),
        "caption_chars": (0, 4096, 4),
    }
    Params = CaptionLengthParams

    def compute(self, table: pa.Table) -> pa.Table:
        captions = table.column("caption").to_pylist()
        words = np.fromiter((len(c.split()) if c else 0 for c in captions), np.int32, len(captions))
        chars = np.fromiter((len(c) if c else 0 for c in captions), np.int32, len(captions))
        return pa.table({"caption_words": words, "caption_chars": chars})

    def decide(self, table: pa.Table) -> pa.Array:
        p = self.params
        words = table.column("caption_words").to_numpy(zero_copy_only=False)
        chars = table.column("caption_chars").to_numpy(zero_copy_only=False)
        bad = (words < p.min_words) | (chars < p.min_chars)
        if p.max_words is not None:
            bad |= words > p.max_words
        if p.max_chars is not None:
            bad |= chars > p.max_chars
        null = pa.scalar(None, pa.string())
        return pc.if_else(pa.array(bad), pa.scalar("caption_length"), null)

    def thresholds(self) -> dict[str, tuple[str, float]]:
        # One line per column: the lower bound, or the upper bound where there is no lower one.
        p = self.params
        out: dict[str, tuple[str, float]] = {}
        for column, low, high in (
            ("caption_words", p.min_words, p.max_words),
            ("caption_chars", p.min_chars, p.max_chars),
        ):
            if low > 0:
                out[column] = (">=", float(low))
            elif high is not None:
                out[column] = ("<=", float(high))
        return out
