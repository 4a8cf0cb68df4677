"""`curate select --balance`: MetaCLIP's balancing against a brute-force reference, and through the CLI."""

from __future__ import annotations

import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.balance import BalanceError, BalanceSpec, balance, match_entries, parse_spec
from curation.cli import main
from tests.helpers import write_config

WORDS = ["cat", "dog", "car", "tree", "house", "bird", "boat", "flower"]


def _pool(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Captions with a skewed entry distribution (cat in most of them, flower in few), uids shuffled."""
    rng = random.Random(seed)
    weights = [40, 20, 10, 5, 3, 2, 1, 1]
    captions = []
    for _ in range(n):
        k = rng.choice([0, 1, 1, 2])
        captions.append(" and ".join(rng.choices(WORDS, weights, k=k)) or "nothing at all")
    uids = [f"{i:08x}" for i in rng.sample(range(10 * n), n)]
    return uids, captions


def matches(caption: str, entry: str, match: str) -> bool:
    """The documented rules, written as regular expressions (not the library's code path)."""
    pattern = re.escape(entry) if match == "substring" else r"(?<!\w)" + re.escape(entry) + r"(?!\w)"
    return re.search(pattern, caption.lower()) is not None


def reference(uids, captions, metadata, t, seed, match="substring"):
    """MetaCLIP's rule written out plainly, with the documented draw order."""
    matched = {u: [e for e in metadata if matches(c, e, match)] for u, c in zip(uids, captions)}
    count = {e: sum(e in m for m in matched.values()) for e in metadata}
    rng = np.random.default_rng(seed)
    kept = set()
    for u in sorted(uids):
        keep = False
        for e in matched[u]:
            if rng.random() < min(1.0, t / count[e]):
                keep = True
        if keep:
            kept.add(u)
    return kept, count


@pytest.mark.parametrize("t,seed", [(5, 0), (20, 1), (1000, 2)])
def test_balance_matches_the_brute_force_reference(t, seed):
    uids, captions = _pool(600, seed)
    result = balance(uids, match_entries(captions, WORDS), t, seed)
    kept, count = reference(uids, captions, WORDS, t, seed)
    assert set(result.kept) == kept
    assert result.entry_counts == {e: c for e, c in count.items() if c}
    assert result.unmatched == sum(c == "nothing at all" for c in captions)
    # Entries at or below t keep every pair matched to them.
    for e, c in count.items():
        if 0 < c <= t:
            assert result.kept_per_entry[e] == c


GLUED = ["cats", "bobcat", "cat_dog", "cat-dog", "Cat.", "dogcar", "(bird)", "tree2", "boat's", "car car"]


@pytest.mark.parametrize("t,seed", [(5, 0), (20, 1)])
def test_word_matching_matches_the_brute_force_reference(t, seed):
    """Entries inside longer words ("bobcat", "cats") match as substrings, not as words."""
    rng = random.Random(seed)
    uids, captions = _pool(600, seed)
    captions = [f"{c} {rng.choice(GLUED)}" if rng.random() < 0.5 else c for c in captions]
    entries = match_entries(captions, WORDS, match="word")
    assert entries == [[e for e in WORDS if matches(c, e, "word")] for c in captions]
    assert entries != match_entries(captions, WORDS)  # the rules differ on this pool
    result = balance(uids, entries, t, seed)
    kept, count = reference(uids, captions, WORDS, t, seed, match="word")
    assert set(result.kept) == kept
    assert result.entry_counts == {e: c for e, c in count.items() if c}


def test_word_matching_examples():
    metadata = ["ram", "sea", "lemon", "hot dog"]
    rows = match_entries(
        ["Gramastar", "RAM 3", "rams", "Sea-lion", "seal", "lemon_svg", "A hot dog.", "hot dogs"],
        metadata,
        match="word",
    )
    assert rows == [[], ["ram"], [], ["sea"], [], [], ["hot dog"], []]
    assert match_entries(["Gramastar"], metadata) == [["ram"]]  # the default: MetaCLIP's substring rule
    with pytest.raises(BalanceError, match="match must be one of substring, word"):
        match_entries(["x"], metadata, match="token")


def test_balance_caps_the_head_near_t_and_keeps_the_tail():
    uids, captions = _pool(5000, 3)
    t = 100
    result = balance(uids, match_entries(captions, WORDS), t, 0)
    assert result.entry_counts["cat"] > 10 * t
    # A pair kept for another entry also counts for cat, so cat's kept count is t plus the pairs kept
    # through their other entries; without them it is Binomial(count, t/count): mean t, sd < 10.
    only_cat = [u for u, c in zip(uids, captions) if set(match_entries([c], WORDS)[0]) == {"cat"}]
    alone = sum(u in set(result.kept) for u in only_cat)
    assert abs(alone - t * len(only_cat) / result.entry_counts["cat"]) < 40
    assert result.kept_per_entry["flower"] == result.entry_counts["flower"]


def test_balance_is_deterministic_per_seed_and_independent_of_row_order():
    uids, captions = _pool(800, 4)
    entries = match_entries(captions, WORDS)
    a = balance(uids, entries, 10, seed=7)
    perm = np.random.default_rng(0).permutation(len(uids))
    b = balance([uids[i] for i in perm], [entries[i] for i in perm], 10, seed=7)
    c = balance(uids, entries, 10, seed=8)
    assert a.kept == b.kept
    assert a.kept != c.kept


def test_concept_entries_and_spec_errors(tmp_path):
    rows = match_entries(["A cat.", "A dog.", None], ["cat"], concepts=[3, 3, None])
    assert rows == [["cat", "concept:3"], ["concept:3"], []]
    with pytest.raises(BalanceError, match="no entries"):
        BalanceSpec(t=1)
    with pytest.raises(BalanceError, match="t must be > 0"):
        BalanceSpec(t=0, concepts=True)
    with pytest.raises(BalanceError, match="not `concepts`"):
        parse_spec(str(tmp_path / "missing.txt"), 10)
    meta = tmp_path / "meta.txt"
    meta.write_text("Cat\n\ndog\ncat\n")
    assert parse_spec(f"{meta},concepts", 1e3).metadata == ("cat", "dog")


def test_select_balance_through_the_cli(tmp_path, capsys):
    _, captions = _pool(300, 5)
    pq.write_table(
        pa.table({"URL": [f"https://example.com/{i}.jpg" for i in range(300)], "TEXT": captions}),
        tmp_path / "pairs.parquet",
    )
    cfg = write_config(
        tmp_path / "p.yaml",
        tmp_path / "pairs.parquet",
        tmp_path / "run",
        stages="  - caption_length: {min_words: 1, min_chars: 1}\n",
    )
    assert main(["run", str(cfg)]) == 0
    meta = tmp_path / "meta.txt"
    meta.write_text("\n".join(WORDS) + "\n")
    out = tmp_path / "bal.parquet"
    argv = ["select", str(tmp_path / "run"), "--where", "true", "--balance", str(meta), "--balance-t", "1e1"]
    assert main([*argv, "--uids-only", "--out", str(out)]) == 0
    assert "balance (t=10)" in capsys.readouterr().out
    chosen = set(pq.read_table(out).column("uid").to_pylist())
    # The same as the library on the run's own uids and captions.
    import duckdb

    manifest = duckdb.sql(f"SELECT uid, caption FROM '{tmp_path}/run/manifests/*.parquet'").fetchall()
    # The CLI's default is whole-word matching (MetaCLIP's space-padded match).
    kept, _ = reference([r[0] for r in manifest], [r[1] for r in manifest], WORDS, 10, 0, "word")
    assert chosen == kept
    assert main([*argv, "--balance-seed", "1", "--uids-only", "--out", str(tmp_path / "b1.parquet")]) == 0
    assert set(pq.read_table(tmp_path / "b1.parquet").column("uid").to_pylist()) != chosen
    # Word matching: "ca" and "an" are inside "cat" and "and" but never words of these captions.
    meta.write_text("\n".join([*WORDS, "ca", "an"]) + "\n")
    by = {}
    for match in ("substring", "word"):
        dest = tmp_path / f"{match}.parquet"
        assert main([*argv, "--balance-match", match, "--uids-only", "--out", str(dest)]) == 0
        by[match] = set(pq.read_table(dest).column("uid").to_pylist())
        uids, caps = [r[0] for r in manifest], [r[1] for r in manifest]
        assert by[match] == reference(uids, caps, [*WORDS, "ca", "an"], 10, 0, match)[0]
    assert by["substring"] != by["word"]
    capsys.readouterr()
    bad = [
        "select",
        str(tmp_path / "run"),
        "--balance",
        "concepts",
        "--uids-only",
        "--out",
        str(tmp_path / "c.pq"),
    ]
    assert main(bad) == 2
    assert "concept_ids" in capsys.readouterr().err
