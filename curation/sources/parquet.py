"""LAION-style Parquet metadata: one row per pair (url + caption + anything else)."""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from curation.sources.base import Problem, Shard, Source, normalise, split_rows


def _open(path: str) -> pq.ParquetFile:
    if "://" in path:
        return pq.ParquetFile(fsspec.open(path, "rb").open())
    return pq.ParquetFile(path)


class ParquetSource(Source):
    def check(self) -> list[Problem]:
        cfg = self.cfg
        try:
            files = self.files()
        except Exception as e:  # a bad URL scheme, a missing bucket...
            return [(("input", "path"), f"cannot list {cfg.path!r}: {e}")]
        if not files:
            return [(("input", "path"), f"no files match {cfg.path!r}")]
        problems: list[Problem] = []
        wanted = {"url_column": cfg.url_column, "caption_column": cfg.caption_column}
        for f in files:
            try:
                schema = _open(f).schema_arrow
            except Exception as e:
                problems.append(
                    (("input", "path"), f"{f} is not a readable Parquet file ({type(e).__name__}: {e})")
                )
                continue
            names = schema.names
            for key, col in wanted.items():
                if col not in names:
                    problems.append(
                        (("input", key), f"column {col!r} not in {f}; it has: {', '.join(names)}")
                    )
            for col in cfg.columns or []:
                if col not in names:
                    problems.append(
                        (("input", "columns"), f"column {col!r} not in {f}; it has: {', '.join(names)}")
                    )
            by_name: dict[str, str] = {}
            for col in self._carried(schema) if all(c in names for c in cfg.columns or []) else []:
                first = by_name.setdefault(self.carried_name(col).lower(), col)
                if first != col:  # DuckDB names are case-insensitive: `x` and `X` collide too
                    problems.append(
                        (
                            ("input", "columns"),
                            f"columns {first!r} and {col!r} of {f} would both be carried as "
                            f"{self.carried_name(col)!r}; list the ones to keep in input.columns",
                        )
                    )
            if len(problems) >= 10:
                problems.append((("input", "path"), "(stopped after 10 problems)"))
                break
        return problems

    def plan(self, limit: int | None = None) -> list[Shard]:
        shards: list[Shard] = []
        left = limit if limit is not None else float("inf")
        per = self.cfg.rows_per_shard
        for f in self.files():
            left = split_rows(shards, f, _open(f).metadata.num_rows, per, left)
            if left <= 0:
                break
        return shards

    def _carried(self, schema: pa.Schema) -> list[str]:
        used = {self.cfg.url_column, self.cfg.caption_column}
        if self.cfg.columns is not None:
            return [c for c in self.cfg.columns if c not in used]
        # pandas writes its index as __index_level_N__: an artifact, not data
        return [c for c in schema.names if c not in used and not c.startswith("__index_level_")]

    def carried_schema(self) -> pa.Schema:
        schema = _open(self.files()[0]).schema_arrow
        return pa.schema(
            [pa.field(self.carried_name(c), schema.field(c).type) for c in self._carried(schema)]
        )

    def read(self, shard: Shard, batch_rows: int) -> Iterator[pa.Table]:
        pf = _open(shard.path)
        carried = self._carried(pf.schema_arrow)
        columns = [self.cfg.url_column, self.cfg.caption_column, *carried]
        # Only the row groups overlapping [row_start, row_end) are read.
        groups, first_row, row = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > shard.row_start and row < shard.row_end:
                groups.append(g)
                first_row = row if first_row is None else first_row
            row += n
        if not groups:
            return
        pos = first_row
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
            lo = max(shard.row_start - pos, 0)
            hi = min(shard.row_end - pos, batch.num_rows)
            pos += batch.num_rows
            if hi > lo:
                table = pa.Table.from_batches([batch.slice(lo, hi - lo)])
                yield normalise(
                    table,
                    shard.index,
                    self.cfg.url_column,
                    self.cfg.caption_column,
                    {c: self.carried_name(c) for c in carried},
                )
            if pos >= shard.row_end:
                break
