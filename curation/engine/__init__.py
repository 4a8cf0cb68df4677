"""Runners: where shards execute. `local` (processes on this machine) and `ray` (Ray Data).

`execute` is the one entry point: it plans shards, takes the output's lock,
checks the run record, skips finished shards and hands the rest to a runner.
"""

from __future__ import annotations

import contextlib
import sys

from curation.config import Config
from curation.core.terminal import printable
from curation.engine.progress import Progress
from curation.engine.summary import RunSummary
from curation.rundir import RunDir
from curation.stats import StatsFolder

__all__ = ["RunSummary", "execute"]


def execute(config: Config, *, limit: int | None = None) -> RunSummary:
    from curation.pipeline import Pipeline

    pipeline = Pipeline(config)
    fingerprint, config_hash = config.run_fingerprint(pipeline.stages)
    run = RunDir(config.output, config.storage_options)
    run.store.check()  # wrong credentials, a missing bucket: one line, before any work
    joined = False
    if config.runner.type == "ray" and config.runner.address is not None:
        from curation.engine.ray import connect

        joined = connect(config.runner.address)  # join the cluster before anything is written
    try:
        return _execute(config, run, pipeline, fingerprint, config_hash, limit)
    finally:
        if joined:
            import ray

            ray.shutdown()


def _execute(config: Config, run: RunDir, pipeline, fingerprint: str, config_hash: str, limit: int | None):
    with run.lock():
        plan = run.prepare(
            fingerprint,
            config_hash,
            pipeline.source.plan(limit),
            [s.name for s in config.stages],
            limit=limit,
        )
        run.clean_tmp()
        ledger = run.ledger_state(plan, verify=True)  # the ledger is checked: a lying entry is redone
        for line in ledger.notes + [f"{why}: redoing the shard" for _, why in sorted(ledger.broken.items())]:
            print(f"curate: {printable(line)}", file=sys.stderr, flush=True)
        folder = StatsFolder(run, ledger)  # folds at once what a killed run left unfolded (and summaries)
        pending = [shard for shard in plan if shard.index not in ledger.done]
        total_rows = sum(s.rows for s in pending) if all(s.row_end >= 0 for s in pending) else None
        progress = Progress(total_rows, len(plan), len(plan) - len(pending), enabled=config.runner.progress)
        summary = RunSummary(shards_total=len(plan), shards_skipped=len(plan))
        if not pending:  # say what the run holds, not "0 rows"
            done = ledger.done.values()
            summary.run_rows = sum(r.get("rows", 0) for r in done)
            summary.run_kept = sum(r.get("kept", 0) for r in done)
        try:
            if config.runner.type == "ray" and pending:
                from curation.engine.ray import run_ray

                summary = run_ray(config, run, pending, pipeline.schema, progress, folder)
            elif pending:
                from curation.engine.local import run_local

                summary = run_local(config, run, pending, pipeline.schema, progress, folder)
        finally:
            progress.close()
            with contextlib.suppress(Exception):  # an optimisation for readers; the entries stay the truth
                folder.close()
        return summary
