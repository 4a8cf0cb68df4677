"""Caption complexity and action (docs/methods.md §1a-1b) with a real spaCy model."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curation.stages import StageContext, apply_stage
from curation.stages.caption import CaptionAction, CaptionComplexity, clean_caption

CTX = StageContext(output_dir=None)  # caption stages write nothing


def naive(nlp, text: str) -> dict[str, int]:
    """docs/methods.md's definitions, written literally."""
    doc = nlp(text)
    heads_of_subjects = {t.head.i for t in doc if t.dep_ in ("nsubj", "nsubjpass") and t.head.i != t.i}
    return {
        "caption_complexity": max((len(list(t.children)) for t in doc), default=0),
        "caption_actions": sum(1 for i in heads_of_subjects if doc[i].pos_ == "VERB"),
        "caption_verbs": sum(1 for t in doc if t.pos_ == "VERB"),
        "caption_tokens": len(doc),
    }


@pytest.mark.parametrize(
    ("caption", "actions"),
    [
        ("a man rides a horse on the beach", 1),
        ("Tavern Brawl by velinov", 0),
        ("The dog is chasing a ball while the children play in the park", 2),
        ("red leather sofa, 3 seater", 0),
        ("A woman is holding an umbrella", 1),
    ],
)
def test_hand_checked_actions(scorer, caption, actions):
    assert scorer.score([caption])["caption_actions"][0] == actions


def test_hand_checked_complexity(scorer):
    out = scorer.score(
        ["a man rides a horse on the beach", "two dogs play with a red ball in the snow", "sofa", ""]
    )
    # spaCy attaches "on the beach" to "horse": rides{man, horse}, horse{a, on} -> 2.
    # "ball" has children a, red, in -> 3.
    assert list(out["caption_complexity"]) == [2, 3, 0, 0]
    assert list(out["caption_tokens"]) == [8, 10, 1, 0]


def test_vectorised_scores_equal_the_literal_definition_on_real_laion(scorer, laion_1k):
    captions = [clean_caption(c) for c in laion_1k.column("TEXT").to_pylist()[:400]]
    captions = [c[: scorer.max_chars] for c in captions if c]
    got = scorer.score(captions)
    nlp = scorer.load()
    for i, c in enumerate(captions):
        want = naive(nlp, c)
        assert {k: int(got[k][i]) for k in want} == want, c


def test_edge_cases_each_get_a_result(scorer):
    weird = [
        None,
        "",
        "   \t\n ",
        "\x00\x01\x02",
        "🐶🐱🐭 a dog chases a cat 🎉",
        "Tom &amp; Jerry &quot;run&quot; away",
        "Ein Hund läuft über die Wiese",
        "一只狗在草地上跑",
        "a" * 50_000,
        "word " * 5_000,
    ]
    out = scorer.score(weird)
    assert out["caption_status"] == [
        "empty", "empty", "empty", "empty", "ok", "ok", "ok", "ok", "truncated", "truncated",
    ]  # fmt: skip
    assert out["caption_complexity"][0] == 0 and out["caption_tokens"][1] == 0
    assert out["caption_actions"][4] >= 1  # emoji do not hide the verb
    assert out["caption_tokens"][9] <= scorer.max_chars


def test_html_entities_and_control_characters_are_cleaned():
    assert clean_caption("Tom &amp; Jerry\x00\x07 &lt;3") == "Tom & Jerry <3"
    assert clean_caption("a\u200bb\r\nc") == "a b c"


def test_duplicates_are_parsed_once_and_scored_identically(scorer):
    calls = []
    nlp = scorer.load()
    original = nlp.pipe

    def counting_pipe(texts, **kw):
        texts = list(texts)
        calls.append(len(texts))
        return original(texts, **kw)

    nlp.pipe = counting_pipe
    try:
        out = scorer.score(["a man rides a horse"] * 5 + ["a cat sleeps"] * 3)
    finally:
        nlp.pipe = original
    assert calls == [2]
    assert len(set(out["caption_actions"][:5])) == 1


def test_stages_share_one_parse_and_decide_in_order(scorer):
    table = pa.table(
        {
            "caption": ["a man rides a horse on the beach", "sofa", "red leather sofa with three cushions"],
        }
    )
    complexity = CaptionComplexity(CaptionComplexity.Params(min=2), CTX)
    action = CaptionAction(CaptionAction.Params(min=1), CTX)
    out = apply_stage(action, apply_stage(complexity, table))
    assert out.column("keep").to_pylist() == [True, False, False]
    assert out.column("drop_reason").to_pylist() == [None, "complexity", "action"]
    assert out.column("drop_stage").to_pylist() == [None, "caption_complexity", "caption_action"]
    assert out.column_names[-3:] == ["keep", "drop_reason", "drop_stage"]


def test_every_registered_stage_declares_its_contract():
    import dataclasses

    from curation.schema import STAGE_COLUMNS
    from curation.stages import STAGES, Stage

    for name, cls in STAGES.items():
        assert issubclass(cls, Stage) and cls.name == name
        assert dataclasses.is_dataclass(cls.Params), name
        cls.Params()  # every parameter has a default
        assert cls.columns and set(cls.columns) <= set(STAGE_COLUMNS), name
