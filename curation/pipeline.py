"""A configured pipeline: the source, the stages, the manifest schema, and how one shard is processed.

Runners decide where and how many shards run at once; what happens to a shard
is defined once, here.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from curation.config import Config
from curation.manifest import RunDir, ShardResult
from curation.schema import manifest_schema
from curation.sources import Shard, make_source
from curation.stages import Stage, apply_stage, build_stages


@dataclass
class ShardOutcome:
    shard: int
    result: ShardResult | None = None
    error: str | None = None


class Pipeline:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.source = make_source(config.input)
        self.stages: list[Stage] = build_stages(config)
        self._ready = False

    @property
    def schema(self) -> pa.Schema:
        columns = [c for stage in self.stages for c in stage.columns]
        return manifest_schema(self.source.carried_schema(), columns)

    def setup(self) -> None:
        """Load every stage's model; once per worker."""
        if not self._ready:
            for stage in self.stages:
                stage.setup()
            self._ready = True

    def process_batch(self, table: pa.Table) -> pa.Table:
        for stage in self.stages:
            table = apply_stage(stage, table)
        return table

    def run_shard(
        self,
        run: RunDir,
        shard: Shard,
        schema: pa.Schema,
        on_rows: Callable[[int], None] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> ShardOutcome:
        """Read, process and atomically write one shard. Failures are returned, not raised.

        `before_commit` runs just before the shard is renamed into place (a worker checks
        there that its driver is still alive).
        """
        self.setup()
        writer = None
        try:
            writer = run.writer(shard.index, schema)
            for batch in self.source.read(shard, self.config.runner.batch_rows):
                writer.write(self.process_batch(batch))
                if on_rows:
                    on_rows(batch.num_rows)
            if before_commit:
                before_commit()
            return ShardOutcome(shard.index, result=writer.commit())
        except Exception as e:
            if writer is not None:
                writer.abort()
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            run.record_failure(shard.index, f"{detail}\n{traceback.format_exc(limit=-3)}")
            return ShardOutcome(shard.index, error=detail)
