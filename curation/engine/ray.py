"""The Ray runner: the same stages on Ray Data, from this machine's cores to a cluster.

Shape of the job (one Ray Data dataset, executed streaming):

    from_items([shard, ...], one block per shard)
      -> map_batches(_ShardWorker[group 0], actor pool, batch_size=1)   reads the shard, runs its stages
      -> map_batches(_ShardWorker[group 1], ...)                         only when resources differ (GPU)
      -> ...                                                              last group writes the shard
      -> the driver iterates one tiny summary row per shard (progress, failures)

Consecutive stages with the same needs run fused in one actor ("group"): the
caption stages share a spaCy parse and a CPU, so a caption pipeline is a single
actor pool whose actors read, score and write whole shards, with no data going
through the object store at all. A GPU stage (OCR) gets its own pool with
`num_gpus` from its `Resources`; between pools a shard travels as ONE row
holding its Arrow IPC stream. One row cannot be split by Ray Data's block
sizing, so a shard's rows always arrive together at the actor that writes
them, and the writer keeps the local runner's batch boundaries (batches of
`runner.batch_rows` rows), so scores are identical between runners.

Why actors read and write themselves (rather than separate read/write tasks):
an actor pool sized to the cluster's CPUs holds every CPU, so 1-CPU read/write
tasks would starve behind it; and every hop through the object store costs a
copy that the local runner does not pay.

Failures:
- A per-shard exception (unreadable file, a stage bug) is caught in the actor,
  recorded by the shard task (`curation.engine.task`), and comes back as an error row; the
  other shards go on and the run exits 1 (a re-run retries only those).
- A worker process that dies (killed, OOM, segfault) is restarted by Ray
  (`max_restarts=-1`) and its task retried (`max_task_retries`). A retry
  first looks at the ledger: a shard an earlier attempt committed is reported,
  not rewritten; otherwise `ShardWriter` writes a fresh temp file and renames
  it into place, so a shard file is complete or absent, never duplicated.
- A shard still failing after the retries is dropped by Ray Data
  (`max_errored_blocks`) rather than failing the whole run; the driver notices
  it never reported and records it as failed.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from curation.config import Config, RunnerConfig
from curation.core.cluster import RunnerError, connect
from curation.engine.progress import Progress
from curation.engine.summary import RunSummary
from curation.engine.task import ShardOutcome, ShardTask, account
from curation.rundir import RunDir, ShardResult
from curation.sources import Shard
from curation.stages import Stage, build_stages
from curation.stats import StatsFolder

# Retries of a shard whose worker process died. Finite, so a shard that
# crashes its worker every time (a segfault in a native decoder) ends up
# failed instead of looping forever; the actor itself restarts without limit.
MAX_TASK_RETRIES = 3

# The rows that flow between the pools and back to the driver: one per shard.
ROW_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # Shard as JSON
        ("data", pa.large_binary()),  # Arrow IPC stream of the shard so far; null once written
        ("result", pa.string()),  # ShardResult as JSON, once written
        ("error", pa.string()),  # why the shard failed
        ("node", pa.string()),  # Ray node that wrote it (or failed it)
    ]
)


@dataclass(frozen=True)
class Group:
    """Consecutive stages that run fused in one actor pool."""

    first: int  # index into the pipeline's stages
    stop: int
    names: tuple[str, ...]
    cpus: float
    gpus: float

    @property
    def label(self) -> str:
        return "+".join(self.names)


def plan_groups(stages: list[Stage]) -> list[Group]:
    """Fuse consecutive stages with equal needs.

    CPU-only stages always fuse (the actor takes the largest CPU request among
    them): a hop between two CPU pools would only add a copy. GPU stages fuse
    only with neighbours asking for the same CPUs and GPUs.
    """
    groups: list[Group] = []
    for i, stage in enumerate(stages):
        res = stage.resources
        if groups:
            g = groups[-1]
            cpu_only = g.gpus == 0 and res.gpus == 0
            if cpu_only or (g.gpus == res.gpus and g.cpus == res.cpus):
                groups[-1] = Group(g.first, i + 1, (*g.names, stage.name), max(g.cpus, res.cpus), g.gpus)
                continue
        groups.append(Group(i, i + 1, (stage.name,), res.cpus, res.gpus))
    return groups


# ---------------------------------------------------------------------------- driver


def run_ray(
    config: Config,
    run: RunDir,
    pending: list[Shard],
    schema: pa.Schema,
    progress: Progress,
    folder: StatsFolder,
) -> RunSummary:
    plan_total = len(run.plan())
    summary = RunSummary(shards_total=plan_total, shards_skipped=plan_total - len(pending))
    groups = plan_groups(build_stages(config))
    owned = connect(config.runner.address, config.runner.workers)
    import ray  # after connect(): it decides how Ray is first imported

    try:
        sizes = size_pools(groups, config.runner, len(pending))
        env = ray_environment()
        pools = ", ".join(f"{g.label} x{n}" for g, n in zip(groups, sizes))
        _say(f"ray: {env['nodes']} node(s), {env['cpus']} CPU(s), {env['gpus']} GPU(s); actor pools: {pools}")
        started = time.perf_counter()
        ds = build_dataset(config, run, pending, schema, groups, sizes)
        reported: set[int] = set()
        per_node: Counter[str] = Counter()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    _account_row(row, summary, progress, folder, reported, per_node)
        except Exception as e:  # Ray Data gave up (e.g. actors that cannot start on some node)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunnerError(
                f"the Ray job failed after {summary.shards_ok} shard(s): {type(e).__name__}: {first}\n"
                "finished shards are kept; fix the cause and run the same command again to resume"
            ) from e
        for shard in pending:
            if shard.index not in reported:
                msg = f"lost: its Ray task failed {MAX_TASK_RETRIES + 1} times (worker processes died)"
                run.record_failure(shard.index, msg)
                summary.failures[shard.index] = msg
                progress.shard_finished(False)
        summary.seconds = time.perf_counter() - started
        if len(per_node) > 1:
            spread = ", ".join(f"{node[:8]}: {n}" for node, n in sorted(per_node.items()))
            _say(f"ray: shards per node: {spread}")
        return summary
    finally:
        if owned:
            ray.shutdown()


def _say(message: str) -> None:
    """A line on stderr that does not break the progress bar drawn there."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _account_row(
    row: dict[str, Any],
    summary: RunSummary,
    progress: Progress,
    folder: StatsFolder,
    reported: set[int],
    per_node: Counter[str],
) -> None:
    shard = Shard.from_json(json.loads(row["shard"]))
    if shard.index in reported:
        return  # never count a shard twice, whatever a retry delivers
    reported.add(shard.index)
    per_node[row["node"] or "?"] += 1
    result = ShardResult(**json.loads(row["result"])) if row["result"] is not None else None
    outcome = ShardOutcome(shard.index, result=result, error=None if result else row["error"])
    account(summary, outcome, progress, folder, rows_shown=False)


def size_pools(groups: list[Group], runner: RunnerConfig, n_pending: int) -> list[int]:
    """Actors per group from the cluster's resources; a need no node can meet fails here, before any work."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [n.get("Resources", {}) for n in nodes]
    total = ray.cluster_resources()
    best_cpu = max((r.get("CPU", 0.0) for r in per_node), default=0.0)
    best_gpu = max((r.get("GPU", 0.0) for r in per_node), default=0.0)
    cap = runner.workers if isinstance(runner.workers, int) else None
    sizes = []
    problems = []
    for g in groups:
        if g.gpus > 0 and best_gpu < g.gpus:
            have = f"{total.get('GPU', 0):g} GPU(s) in total" if total.get("GPU") else "no GPU"
            problems.append(
                f"stage(s) {g.label} need {g.gpus:g} GPU(s) per worker, but the Ray cluster has {have}"
                " (run on a cluster with GPU nodes, or set the stage's device to cpu)"
            )
            continue
        if best_cpu < g.cpus:
            problems.append(
                f"stage(s) {g.label} need {g.cpus:g} CPU(s) per worker, but the largest Ray node has {best_cpu:g}"
            )
            continue
        n = (
            int(total.get("GPU", 0) // g.gpus)
            if g.gpus > 0
            else int(total.get("CPU", 0) // max(g.cpus, 1e-9))
        )
        if cap is not None and g.gpus == 0:
            n = min(n, cap)
        sizes.append(max(1, min(n, n_pending)))
    if problems:
        raise RunnerError("the Ray cluster cannot run this pipeline:\n  - " + "\n  - ".join(problems))
    return sizes


def build_dataset(
    config: Config,
    run: RunDir,
    pending: list[Shard],
    schema: pa.Schema,
    groups: list[Group],
    sizes: list[int],
):
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own (curation.engine.progress)
    ctx.print_on_execution_start = False
    # A shard that keeps killing its worker is dropped after MAX_TASK_RETRIES and
    # reported as failed by the driver, instead of aborting every other shard.
    ctx.max_errored_blocks = -1
    ctx.execution_options.preserve_order = False

    items = [{"shard": json.dumps(s.to_json())} for s in pending]
    # One block per shard: an actor call gets exactly one shard, so the pool balances by shard.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    last = len(groups) - 1
    for i, (g, n) in enumerate(zip(groups, sizes)):
        # One pool: a fixed size starts every actor at once. Several pools share the
        # cluster: each grows and shrinks with its queue. One shard in flight per
        # actor: shards are seconds long, and a shard queued behind a busy actor is
        # one an idle actor could be doing at the end of the run.
        sizing = {"size": n} if len(groups) == 1 else {"min_size": 1, "max_size": n}
        pool = ActorPoolStrategy(**sizing, max_tasks_in_flight_per_actor=1)
        kwargs = {"config": config, "root": str(run.root), "schema": schema, "group": g}
        with warnings.catch_warnings():
            # max_restarts/max_task_retries have no named parameter; Ray Data documents
            # them as map_batches kwargs, which 2.60 flags as deprecated for 2.64.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(
                _ShardWorker,
                fn_constructor_kwargs={**kwargs, "read": i == 0, "write": i == last},
                batch_size=1,
                batch_format="pyarrow",
                compute=pool,
                num_cpus=g.cpus,
                num_gpus=g.gpus or None,
                max_restarts=-1,
                max_task_retries=MAX_TASK_RETRIES,
            )
    return ds


# ---------------------------------------------------------------------------- workers


class _ShardWorker:
    """Ray Data actor for one group of stages: loads their models once, then runs the shard task per shard."""

    def __init__(
        self, config: Config, root: str, schema: pa.Schema, group: Group, read: bool, write: bool
    ) -> None:
        import ray

        from curation.pipeline import Pipeline

        run = RunDir(root, config.storage_options)
        if run.local and not run.exists():
            node = ray.get_runtime_context().get_node_id()
            raise RunnerError(
                f"the output directory {root} is not visible on Ray node {node[:8]} "
                f"(host {socket.gethostname()}): on a cluster, write to object storage (s3://...) "
                "or to a filesystem every node mounts"
            )
        self.task = ShardTask(
            run,
            Pipeline(config),
            schema,
            slice(group.first, group.stop),
            read=read,
            write=write,
            skip_committed=True,  # a retry of a task whose first attempt got as far as the ledger
        )
        self.task.setup()
        self.node = ray.get_runtime_context().get_node_id()

    def __del__(self) -> None:
        # Ray Data's teardown hook: called when the actor exits gracefully (the pool is done).
        task = getattr(self, "task", None)  # absent when __init__ failed (setup tears itself down)
        if task is not None:
            task.teardown()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._one(row) for row in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("result") is not None or row.get("error") is not None:
            return row  # finished (or failed) upstream: pass it through
        shard = Shard.from_json(json.loads(row["shard"]))
        outcome = self.task(shard, upstream=_ipc_batches(row.get("data")))
        return {
            "shard": row["shard"],
            "data": _ipc_bytes(iter(outcome.tables)) if outcome.tables is not None else None,
            "result": json.dumps(outcome.result.to_json()) if outcome.result else None,
            "error": outcome.error,
            "node": self.node,
        }


def _ipc_bytes(tables: Iterator[pa.Table]) -> bytes:
    """A shard's batches as one IPC stream, one record batch per batch (boundaries kept)."""
    sink = pa.BufferOutputStream()
    writer = None
    for t in tables:
        if writer is None:
            writer = pa.ipc.new_stream(sink, t.schema)
        for b in t.combine_chunks().to_batches(max_chunksize=None):
            writer.write_batch(b)
    if writer is None:
        return b""
    writer.close()
    return sink.getvalue().to_pybytes()


def _ipc_batches(data: bytes | None) -> Iterator[pa.Table]:
    if not data:
        return
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        for b in reader:
            yield pa.Table.from_batches([b])


def ray_environment() -> dict[str, str]:
    """Facts about the connected cluster, for logs and the benchmark."""
    import ray

    res = ray.cluster_resources()
    return {
        "nodes": str(len([n for n in ray.nodes() if n.get("Alive")])),
        "cpus": f"{res.get('CPU', 0):g}",
        "gpus": f"{res.get('GPU', 0):g}",
    }
