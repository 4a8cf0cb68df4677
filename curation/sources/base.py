"""What every input reader provides: a shard plan, batches of a shard, checks up front.

A shard is the unit of work and of resume. Batches come out normalised: `uid`,
`shard`, `url`, `caption`, then the input's other columns under their
manifest names (see `carried_name`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import pyarrow as pa

from curation.config import InputConfig
from curation.core.patterns import brace_expand, has_glob
from curation.schema import DECISION_COLUMNS, ID_COLUMNS, make_uids


@dataclass(frozen=True)
class Shard:
    index: int
    path: str
    row_start: int = 0
    row_end: int = -1  # exclusive; -1: to the end of the file

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Shard:
        return cls(**d)


Problem = tuple[tuple, str]


class Source(ABC):
    def __init__(self, cfg: InputConfig, stage_columns: Collection[str]) -> None:
        """`stage_columns`: every column a stage may add (`curation.stages.manifest_columns()`),
        passed in so that a reader loads no stage module."""
        self.cfg = cfg
        self._ours = {c.lower() for c in (*ID_COLUMNS, *stage_columns, *DECISION_COLUMNS)}

    def carried_name(self, input_column: str) -> str:
        """Name under which an input column is carried into the manifest.

        DuckDB resolves identifiers case-insensitively, so an input column that
        collides with one of ours in any case is prefixed rather than shadowed.
        """
        return f"input_{input_column}" if input_column.lower() in self._ours else input_column

    def files(self) -> list[str]:
        return expand_paths(self.cfg.path)

    def missing_files(self) -> list[str]:
        """Files a brace pattern in `input.path` names that do not exist (left out of the plan)."""
        return find_paths(self.cfg.path)[1]

    @abstractmethod
    def check(self) -> list[Problem]:
        """Problems with the input that can be found without reading the data."""

    @abstractmethod
    def plan(self, limit: int | None = None) -> list[Shard]:
        """Split the input into shards; with `limit`, only the first `limit` rows."""

    @abstractmethod
    def carried_schema(self) -> pa.Schema:
        """Input columns carried into the manifest, under their manifest names."""

    @abstractmethod
    def read(self, shard: Shard, batch_rows: int) -> Iterator[pa.Table]:
        """Normalised batches of at most `batch_rows` rows."""


def split_rows(shards: list[Shard], path: str, n: int, per: int, left: float) -> float:
    """Append shards of at most `per` of the `n` rows of `path`, stopping after `left` rows in all.

    Returns the rows still allowed (for `--limit` across files).
    """
    start = 0
    while start < n and left > 0:
        end = int(min(start + per, n, start + left))
        shards.append(Shard(index=len(shards), path=path, row_start=start, row_end=end))
        left -= end - start
        start = end
    return left


def expand_paths(path: str | list[str]) -> list[str]:
    """Local paths, brace patterns, globs and fsspec URLs, expanded and sorted; duplicates removed."""
    return find_paths(path)[0]


def find_paths(path: str | list[str]) -> tuple[list[str], list[str]]:
    """(`expand_paths`, the names a brace pattern spells out that do not exist: left out, to be named)."""
    out: list[str] = []
    missing: list[str] = []
    for pattern in [path] if isinstance(path, str) else path:
        names = brace_expand(pattern)
        for p in names:
            fs, _, paths = fsspec.get_fs_token_paths(p)
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            if len(names) > 1 and not has_glob(p) and not fs.exists(paths[0]):
                missing.append(p)
                continue
            for q in sorted(paths):
                if fs.isdir(q):
                    continue
                out.append(q if protocol in ("file", "local") else f"{protocol}://{q}")
    return list(dict.fromkeys(out)), missing


def normalise(
    table: pa.Table, shard: int, url_column: str | None, caption_column: str, carried: Mapping[str, str]
) -> pa.Table:
    """`carried`: input column -> its manifest name (`Source.carried_name`)."""
    n = table.num_rows
    url = table.column(url_column).cast(pa.string()) if url_column else pa.nulls(n, pa.string())
    caption = table.column(caption_column).cast(pa.string())
    cols: dict[str, Any] = {
        "uid": make_uids(url.to_pylist(), caption.to_pylist()),
        "shard": pa.array([shard] * n, ID_COLUMNS["shard"]),
        "url": url,
        "caption": caption,
    }
    for name, as_name in carried.items():
        cols[as_name] = table.column(name)
    return pa.table(cols)
