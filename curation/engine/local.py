"""The local runner: shards in parallel worker processes on this machine.

Each worker loads the stages' models once (process initializer) and runs with
one BLAS/OpenMP thread, so throughput scales with processes, not threads
fighting over cores. Memory stays flat: a worker holds one batch at a time and
streams its shard into the manifest writer.

Workers die with the driver. A `kill -9` of `curate run` gives the driver no
chance to stop its pool, so each worker asks the kernel for SIGKILL when its
parent dies (Linux `prctl(PR_SET_PDEATHSIG)`), and checks that its parent is
still the driver before it commits a shard: no shard is written after the
driver is gone, and nothing is left running. multiprocessing's resource tracker
exits on its own once the driver and the workers, which hold its pipe, are gone.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from contextlib import contextmanager
from multiprocessing.util import Finalize

import pyarrow as pa

from curation.config import Config
from curation.engine.progress import Progress
from curation.engine.summary import RunSummary
from curation.engine.task import ShardOutcome, ShardTask, account
from curation.pipeline import Pipeline
from curation.rundir import RunDir
from curation.sources import Shard
from curation.stats import StatsFolder

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_workers(config: Config, n_pending: int) -> int:
    workers = config.runner.workers
    n = available_cpus() if workers == "auto" else int(workers)
    return max(1, min(n, n_pending))


def run_local(
    config: Config,
    run: RunDir,
    pending: list[Shard],
    schema: pa.Schema,
    progress: Progress,
    folder: StatsFolder,
) -> RunSummary:
    total = len(run.plan())
    summary = RunSummary(shards_total=total, shards_skipped=total - len(pending))
    started = time.perf_counter()
    workers = resolve_workers(config, len(pending))
    if workers == 1:
        task = ShardTask(run, Pipeline(config), schema)
        task.setup()
        try:
            for shard in pending:
                account(summary, task(shard, on_rows=progress.rows), progress, folder, rows_shown=True)
        finally:
            task.teardown()
    else:
        _run_pool(config, run, pending, schema, progress, workers, summary, folder)
    summary.seconds = time.perf_counter() - started
    return summary


# ---------------------------------------------------------------------------- pool

_worker: dict = {}
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _init_worker(config: Config, root: str, schema: pa.Schema, rows_queue, driver_pid: int) -> None:
    _die_with_driver(driver_pid)
    _worker["driver"] = driver_pid
    _worker["task"] = ShardTask(RunDir(root, config.storage_options), Pipeline(config), schema)
    _worker["queue"] = rows_queue
    _worker["task"].setup()
    # When the pool stops this worker, the process exits through multiprocessing's exit handlers.
    Finalize(None, _worker["task"].teardown, exitpriority=10)


def _die_with_driver(driver_pid: int) -> None:
    """SIGKILL this process when its parent (the driver, which spawned it) dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _exit_if_orphaned(driver_pid)  # the driver may have died before the prctl


def _exit_if_orphaned(driver_pid: int) -> None:
    if os.getppid() != driver_pid:
        os._exit(1)  # nothing to clean: the shard's temp file is removed by the next run


def _work(shard: Shard) -> ShardOutcome:
    return _worker["task"](
        shard, on_rows=_worker["queue"].put, before_commit=lambda: _exit_if_orphaned(_worker["driver"])
    )


@contextmanager
def _single_threaded_children():
    """Children inherit the environment at spawn; numeric libraries read it at import."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    for k in THREAD_VARS:
        os.environ.setdefault(k, "1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_pool(config, run, pending, schema, progress, workers, summary, folder) -> None:
    ctx = mp.get_context("spawn")  # fork after pyarrow/tqdm threads start is unsafe
    rows_queue = ctx.Queue()
    with (
        _single_threaded_children(),
        cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(config, str(run.root), schema, rows_queue, os.getpid()),
        ) as pool,
    ):
        futures = {pool.submit(_work, shard): shard for shard in pending}
        not_done = set(futures)
        try:
            while not_done:
                done, not_done = cf.wait(not_done, timeout=0.25, return_when=cf.FIRST_COMPLETED)
                _drain(rows_queue, progress)
                for fut in done:
                    shard = futures[fut]
                    try:
                        outcome = fut.result()
                    except Exception as e:  # a worker died (OOM kill, segfault in a native library)
                        msg = f"worker process failed: {type(e).__name__}: {e}"
                        run.record_failure(shard.index, msg)
                        outcome = ShardOutcome(shard.index, error=msg)
                    account(summary, outcome, progress, folder, rows_shown=True)
        except BaseException:  # Ctrl-C, or the store stopped answering: start no further shard
            for fut in not_done:
                fut.cancel()
            raise
    _drain(rows_queue, progress)


def _drain(rows_queue, progress: Progress) -> None:
    total = 0
    try:
        while True:
            total += rows_queue.get_nowait()
    except queue.Empty:
        pass
    if total:
        progress.rows(total)
