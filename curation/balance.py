"""MetaCLIP's balancing: cap how many pairs each metadata entry contributes (`curate select --balance`).

MetaCLIP (Xu et al., "Demystifying CLIP Data", ICLR 2024) curates by (1) substring-matching every
caption against a metadata list (WordNet / Wikipedia terms) and dropping pairs that match no entry,
(2) counting the pairs matched to each entry, and (3) keeping each pair with probability
min(1, t / count(entry)) per entry: a pair matched to several entries is sampled once per entry and kept
if any of those draws keeps it. Entries rarer than t keep all their pairs (the tail); frequent entries
are cut down to about t each (the head).

Entries here come from:
- a metadata list: every line of a text file is an entry; a pair matches it when the entry occurs in the
  caption as a substring, both lowercased (MetaCLIP matches case-sensitively, its 500k entries carry the
  case variants; a short list of lowercase words needs case folding to match "Frog" and "frog").
  `match="word"` (`--balance-match word`) asks more: the occurrence must not have a word character
  (a letter, digit or underscore) right before or after it, so "ram" no longer matches
  "gramastar" or "program", and "sea" not "seal"; plural or inflected forms stop matching too ("ram" not
  "rams"). `curate select` uses word matching by default: MetaCLIP's own code (metaclip/substr_matching.py)
  pads each entry and the text with spaces before its substring search, i.e. matches whole tokens;
  this library's `match_entries` keeps `substring` as its own default for callers that ask for it;
- `concepts`: the `concepts` teacher's top-1 concept (`concept_ids[1]`) as one more entry per pair,
  named `concept:ID` (the image side of the pair, for runs whose captions match little).

Determinism: the pairs are ordered by uid, each pair's entries by metadata order (its concept last), and
one uniform draw per (pair, entry) is taken from `numpy.random.default_rng(seed)` in that order. The same
rows, entries, t and seed give the same subset, whatever order the manifests list the rows in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from curation.core.folders import FileRefused, read_named_file

CONCEPTS = "concepts"
MAX_METADATA_BYTES = 256 * 2**20  # MetaCLIP's 500k entries are ~6 MB
Match = Literal["substring", "word"]
MATCHES: tuple[Match, ...] = ("substring", "word")


class BalanceError(ValueError):
    """A --balance request that cannot run: bad spec, unreadable metadata, missing columns."""


@dataclass(frozen=True)
class BalanceSpec:
    t: float
    metadata: tuple[str, ...] = ()
    concepts: bool = False
    seed: int = 0
    match: Match = "substring"

    def __post_init__(self) -> None:
        if not self.t > 0:
            raise BalanceError(f"t must be > 0 (got {self.t})")
        if self.seed < 0:
            raise BalanceError(f"the seed must be >= 0 (got {self.seed})")
        if self.match not in MATCHES:
            raise BalanceError(f"match must be one of {', '.join(MATCHES)} (got {self.match!r})")
        if not self.metadata and not self.concepts:
            raise BalanceError("no entries: give a metadata file and/or `concepts`")


@dataclass
class BalanceResult:
    kept: Sequence[str]  # uids, sorted (an Arrow array from balance_run)
    rows: int  # rows considered
    unmatched: int  # rows matching no entry (dropped, as in MetaCLIP)
    entry_counts: dict[str, int] = field(default_factory=dict)  # pairs matched per entry, before sampling
    kept_per_entry: dict[str, int] = field(default_factory=dict)  # kept pairs matched per entry


def parse_spec(entries: str, t: float, seed: int = 0, match: Match = "substring") -> BalanceSpec:
    """`--balance` as users type it: comma-separated `concepts` and/or metadata files (one entry a line)."""
    metadata: list[str] = []
    concepts = False
    for part in (p.strip() for p in entries.split(",")):
        if not part:
            continue
        if part == CONCEPTS:
            concepts = True
            continue
        try:
            lines = read_named_file(part, MAX_METADATA_BYTES).decode("utf-8").splitlines()
        except (FileRefused, UnicodeDecodeError) as e:
            raise BalanceError(
                f"--balance {part!r}: not `concepts` and not a readable UTF-8 metadata file ({e})"
            ) from None
        metadata += [s for s in (line.strip().lower() for line in lines) if s]
    if not metadata and not concepts:
        raise BalanceError(f"--balance {entries!r}: no entries (empty metadata file?)")
    return BalanceSpec(
        t=t, metadata=tuple(dict.fromkeys(metadata)), concepts=concepts, seed=seed, match=match
    )


def match_entries(
    captions: Sequence[str | None],
    metadata: Sequence[str],
    concepts: Sequence[int | None] | None = None,
    match: Match = "substring",
) -> list[list[str]]:
    """Each row's entries: metadata entries occurring in its lowercased caption (as a substring, or with
    `match="word"` as a whole word: see the module docstring), in metadata order, then `concept:ID` for its
    top-1 concept when `concepts` is given. O(rows x entries) substring tests: meant for metadata lists of
    up to a few thousand entries."""
    if match not in MATCHES:
        raise BalanceError(f"match must be one of {', '.join(MATCHES)} (got {match!r})")
    out = []
    for i, caption in enumerate(captions):
        text = (caption or "").lower()
        if match == "word":
            row = [e for e in metadata if e in text and _occurs_as_word(text, e)]
        else:
            row = [e for e in metadata if e in text]
        if concepts is not None and concepts[i] is not None:
            row.append(f"concept:{concepts[i]}")
        out.append(row)
    return out


def _occurs_as_word(text: str, entry: str) -> bool:
    """Some occurrence of `entry` in `text` has no word character right before or after it."""
    start = text.find(entry)
    while start >= 0:
        end = start + len(entry)
        if not (start > 0 and _is_word(text[start - 1])) and not (end < len(text) and _is_word(text[end])):
            return True
        start = text.find(entry, start + 1)
    return False


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def balance(uids: Sequence[str], entries: Sequence[Sequence[str]], t: float, seed: int = 0) -> BalanceResult:
    """MetaCLIP's sampling over rows given with their matched entries (see the module docstring)."""
    if len(uids) != len(entries):
        raise BalanceError("one entry list per uid")
    if not t > 0:
        raise BalanceError(f"t must be > 0 (got {t})")
    order = sorted(range(len(uids)), key=lambda i: uids[i])
    counts: dict[str, int] = {}
    for row in entries:
        for e in row:
            counts[e] = counts.get(e, 0) + 1
    prob = {e: min(1.0, t / c) for e, c in counts.items()}
    draws = np.random.default_rng(seed).random(sum(len(entries[i]) for i in order))
    kept, kept_per_entry, used = [], dict.fromkeys(counts, 0), 0
    for i in order:
        row = entries[i]
        u = draws[used : used + len(row)]
        used += len(row)
        if any(u[j] < prob[e] for j, e in enumerate(row)):
            kept.append(uids[i])
            for e in row:
                kept_per_entry[e] += 1
    return BalanceResult(
        kept=kept,
        rows=len(uids),
        unmatched=sum(1 for row in entries if not row),
        entry_counts=counts,
        kept_per_entry=kept_per_entry,
    )


BATCH_ROWS = 65_536  # rows matched at a time: memory stays flat whatever the run's size


def balance_run(con: Any, where: str, spec: BalanceSpec, batch_rows: int = BATCH_ROWS) -> BalanceResult:
    """Balance the rows of a run's `samples` view that `where` selects (a locked-down `curation.query`
    connection; `where` is the user's SQL condition, run as one read-only SELECT); the same result as
    `balance` over those rows, streamed so memory does not grow with the run.

    Two passes over the columns it needs (uid, caption and, for `concepts`, the top-1 concept): the
    first counts each entry's pairs; the second reads the rows in uid order (DuckDB sorts, spilling to
    disk beyond its memory limit) and draws in that order, in batches of the same random stream
    (`Generator.random(a)` then `random(b)` gives what `random(a + b)` gives). What stays in memory:
    the entry counts, one batch, and the kept uids (an Arrow array, ~40 bytes a kept row).
    """
    import pyarrow as pa

    from curation.query import condition, select_statement

    columns = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    wanted = ["uid", "caption"] + (["concept_ids"] if spec.concepts else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        hint = " (run a `concepts` stage for --balance concepts)" if "concept_ids" in missing else ""
        raise BalanceError(f"--balance needs the column(s) {', '.join(missing)}{hint}")
    top1 = ", concept_ids[1] AS concept" if spec.concepts else ""
    sql = f"SELECT uid, caption{top1} FROM samples WHERE {condition(where)}"

    def batches(order: str) -> Any:
        reader = con.sql(select_statement(sql + order)).to_arrow_reader(batch_rows)
        for batch in reader:
            concepts = batch.column("concept").to_pylist() if spec.concepts else None
            entries = match_entries(batch.column("caption").to_pylist(), spec.metadata, concepts, spec.match)
            yield batch.column("uid"), entries

    counts: dict[str, int] = {}
    rows = unmatched = 0
    for _, entries in batches(""):
        rows += len(entries)
        for row in entries:
            unmatched += not row
            for e in row:
                counts[e] = counts.get(e, 0) + 1
    prob = {e: min(1.0, spec.t / c) for e, c in counts.items()}
    rng = np.random.default_rng(spec.seed)
    kept: list[Any] = []
    kept_per_entry = dict.fromkeys(counts, 0)
    for uids, entries in batches(" ORDER BY uid"):
        draws = rng.random(sum(len(row) for row in entries))
        used = 0
        take = np.zeros(len(entries), bool)
        for i, row in enumerate(entries):
            u = draws[used : used + len(row)]
            used += len(row)
            if any(u[j] < prob[e] for j, e in enumerate(row)):
                take[i] = True
                for e in row:
                    kept_per_entry[e] += 1
        kept.append(uids.filter(pa.array(take)))
    return BalanceResult(
        kept=pa.chunked_array(kept, pa.string()),
        rows=rows,
        unmatched=unmatched,
        entry_counts=counts,
        kept_per_entry=kept_per_entry,
    )


def balanced_where(con: Any, where: str, spec: BalanceSpec) -> tuple[str, BalanceResult]:
    """`where` restricted to the balanced rows: the kept uids are registered on `con` as `balanced_uids`."""
    import pyarrow as pa

    from curation.query import condition

    result = balance_run(con, where, spec)
    kept = result.kept if isinstance(result.kept, pa.ChunkedArray) else pa.array(result.kept, pa.string())
    con.register("balanced_uids", pa.table({"uid": kept}))
    # `condition`, as plain `select`: a comment in `where` (`keep) --`) cannot escape the restriction.
    return f"{condition(where)} AND uid IN (SELECT uid FROM balanced_uids)", result


def describe(result: BalanceResult, t: float) -> str:
    """One line for the terminal."""
    head = sum(1 for c in result.entry_counts.values() if c > t)
    return (
        f"balance (t={t:g}): {len(result.kept):,} of {result.rows:,} rows kept; {result.unmatched:,} matched "
        f"no entry; {len(result.entry_counts):,} entries matched, {head:,} of them above t"
    )
