"""Caption complexity and action (docs/methods.md §1a-1b) with a real spaCy model."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curation.core.text import clean_caption
from curation.stages import StageContext, apply_stage
from curation.stages.caption import CaptionAction, CaptionComplexity

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

    from curation.stages import STAGES, Stage

    for name, cls in STAGES.items():
        assert issubclass(cls, Stage) and cls.name == name
        assert dataclasses.is_dataclass(cls.Params), name
        cls.Params()  # every parameter has a default
        assert cls.columns and all(isinstance(t, pa.DataType) for t in cls.columns.values()), name
    # stages writing the same column (the caption stages, sha256 of download and phash) agree on its type
    declared: dict[str, pa.DataType] = {}
    for name, cls in STAGES.items():
        for column, typ in cls.columns.items():
            assert declared.setdefault(column, typ) == typ, (name, column)
    assert "sha256" in STAGES["download"].columns and "sha256" in STAGES["phash"].columns


def test_action_rule_counts_verbs_by_default_and_subject_verbs_on_request(scorer):
    table = pa.table({"caption": ["a man rides a horse", "woman walking on the beach", "red leather sofa"]})
    default = CaptionAction(CaptionAction.Params(), CTX)
    strict = CaptionAction(CaptionAction.Params(count="actions"), CTX)
    assert apply_stage(default, table).column("keep").to_pylist() == [True, True, False]
    assert apply_stage(strict, table).column("keep").to_pylist() == [True, False, False]
    assert default.thresholds() == {"caption_verbs": (">=", 1)}
    assert strict.thresholds() == {"caption_actions": (">=", 1)}


def test_action_rule_pass_rates_on_the_committed_sample(laion_1k):
    """docs/methods.md §1b: with complexity >= 2, `count: verbs` keeps ~27.8% of the committed 1k LAION
    captions and `count: actions` ~14.6%. DiHT kept ~23% after text spotting too, which only removes more:
    only the verbs rule leaves room for it."""
    table = pa.table({"caption": laion_1k.column("TEXT")})
    complexity = CaptionComplexity(CaptionComplexity.Params(min=2), CTX)
    scored = apply_stage(complexity, table)
    rates = {}
    for count in ("verbs", "actions"):
        out = apply_stage(CaptionAction(CaptionAction.Params(min=1, count=count), CTX), scored)
        keep = out.column("keep").to_pylist()
        column = {"verbs": "caption_verbs", "actions": "caption_actions"}[count]
        assert keep == [
            c >= 2 and v >= 1 for c, v in zip(out["caption_complexity"].to_pylist(), out[column].to_pylist())
        ]
        rates[count] = sum(keep) / len(keep)
    print(f"pass rates on {len(keep)} captions: {rates}")
    # A parse may differ by a row or two between CPUs; the rates may not move by a point.
    assert rates["verbs"] == pytest.approx(0.278, abs=0.01)
    assert rates["actions"] == pytest.approx(0.146, abs=0.01)
    assert rates["actions"] < 0.23 < rates["verbs"]
