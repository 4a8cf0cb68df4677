"""The shard task: what every runner executes for one shard, and how its outcome is counted.

Read (or receive from an earlier actor pool), run stages, write and commit, or
record the failure: written once here, mapped by the local runner's processes and
by the Ray runner's actors alike (as img2dataset's distributors map one callable).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from curation.core.storage import StoreUnavailable
from curation.engine.progress import Progress
from curation.engine.summary import RunSummary
from curation.pipeline import Pipeline
from curation.rundir import RunDir, ShardResult, to_manifest
from curation.sources import Shard
from curation.stages import apply_stage
from curation.stats import ShardStats, StatsFolder, write_summary


@dataclass
class ShardOutcome:
    shard: int
    result: ShardResult | None = None  # committed
    error: str | None = None  # failed (recorded in the ledger)
    tables: list[pa.Table] | None = None  # processed, for the next actor pool to write (Ray)
    stats: ShardStats | None = None  # the committed shard's summary, for the driver's fold


class ShardTask:
    """One shard through `pipeline.stages[stages]`; failures are recorded and returned, never raised.

    `read`: the first task of a shard reads it from the source (otherwise its batches come
    from the caller). `write`: the last task writes the manifest and its ledger entry
    (otherwise the processed batches are returned). `skip_committed`: a shard whose ledger
    entry exists is reported, not redone (a retried Ray task whose first attempt committed).
    """

    def __init__(
        self,
        run: RunDir,
        pipeline: Pipeline,
        schema: pa.Schema,
        stages: slice = slice(None),
        *,
        read: bool = True,
        write: bool = True,
        skip_committed: bool = False,
    ) -> None:
        self.run, self.pipeline, self.schema = run, pipeline, schema
        self.stages = pipeline.stages[stages]
        self.read, self.write, self.skip_committed = read, write, skip_committed
        self.batch_rows = pipeline.config.runner.batch_rows

    def setup(self) -> None:
        """Load the models of this task's stages; once per worker. A stage that fails to load releases
        what the ones before it took."""
        try:
            for stage in self.stages:
                stage.setup()
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        """Release the stages' models and threads; once, when the worker finishes (failed shards included)."""
        for stage in self.stages:
            stage.teardown()

    def __call__(
        self,
        shard: Shard,
        upstream: Iterator[pa.Table] | None = None,
        on_rows: Callable[[int], None] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> ShardOutcome:
        """`before_commit` runs just before the shard is committed (a worker checks there that its driver
        is still alive)."""
        if self.skip_committed and self.write:
            done = self.run.committed(shard.index)
            if done is not None:
                return ShardOutcome(shard.index, result=ShardResult(**done))
        writer = None
        try:
            batches = self.pipeline.source.read(shard, self.batch_rows) if self.read else upstream or iter(())
            if not self.write:
                return ShardOutcome(shard.index, tables=[self.process(t) for t in batches])
            writer = self.run.writer(shard.index, self.schema)
            stats = ShardStats()
            for batch in batches:
                table = to_manifest(self.process(batch), self.schema)
                stats.add(table)
                writer.write(table)
                if on_rows:
                    on_rows(batch.num_rows)
            if before_commit:
                before_commit()
            # the summary before the ledger entry: a committed shard always has one (`curate stats`)
            write_summary(self.run, shard.index, stats)
            return ShardOutcome(shard.index, result=writer.commit(), stats=stats)
        except Exception as e:
            if writer is not None:
                writer.abort()
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            try:
                self.run.record_failure(shard.index, f"{detail}\n{traceback.format_exc(limit=-3)}")
            except Exception as store_down:  # the store itself failed: the driver still hears of it
                detail += f" (and recording the failure failed: {type(store_down).__name__})"
            return ShardOutcome(shard.index, error=detail)

    def process(self, table: pa.Table) -> pa.Table:
        """One batch through this task's stages (after `setup`)."""
        for stage in self.stages:
            table = apply_stage(stage, table)
        return table


STORE_DOWN_AFTER = 3  # shards in a row failed by the store itself before the run stops


def account(
    summary: RunSummary, outcome: ShardOutcome, progress: Progress, folder: StatsFolder, *, rows_shown: bool
) -> None:
    """Count a finished shard in the run summary, the progress display and the folded ledger
    (`rows_shown`: its rows were already reported to `progress` batch by batch).

    Raises StoreUnavailable once STORE_DOWN_AFTER shards in a row failed on the store itself
    (each already after its retry budget): a store that stopped answering fails every shard left."""
    store_down = outcome.result is None and "StorageError:" in (outcome.error or "")
    summary.store_failures_in_a_row = summary.store_failures_in_a_row + 1 if store_down else 0
    if outcome.result is not None:
        summary.shards_ok += 1
        summary.rows += outcome.result.rows
        summary.kept += outcome.result.kept
        folder.add(outcome.result.to_json(), outcome.stats)
        if not rows_shown:
            progress.rows(outcome.result.rows)
    else:
        summary.failures[outcome.shard] = outcome.error or "unknown error"
    progress.shard_finished(outcome.result is not None)
    if summary.store_failures_in_a_row >= STORE_DOWN_AFTER:
        last = (outcome.error or "").splitlines()[0].split("StorageError: ", 1)[-1]
        raise StoreUnavailable(
            f"stopped: the store failed {summary.store_failures_in_a_row} shards in a row ({last}); "
            "committed shards are kept: run the same command again once it answers"
        )
