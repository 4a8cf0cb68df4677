"""Test-only stages for tests/test_ray_runner.py, registered on import.

They live outside the test module so that only the processes that run them
register them: the drivers the tests start, the Ray workers that unpickle
their params, and the pytest process only within one test (the `test_stages`
fixture), so the rest of the suite sees STAGES as the product ships it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from curation.stages import STAGES, Resources, Stage


@dataclass(frozen=True)
class CharsParams:
    gpus: float = 0.5
    # While this file exists, a batch holding the row `poison_uid` raises: a
    # per-shard failure that a re-run (after removing the file) recovers from.
    fail_flag: str | None = None
    poison_uid: str = ""
    # A file where each worker appends "setup PID" and "teardown PID" (tests of the worker lifecycle).
    trace: str | None = None


class CaptionChars(Stage):
    """Counts caption characters; declares GPUs so the Ray runner gives it its own actor pool."""

    name = "test_chars"
    columns: ClassVar[dict[str, pa.DataType]] = {"test_chars": pa.int32()}
    reasons: ClassVar[tuple[str, ...]] = ("short",)
    cascade = True  # sees only rows the caption stages kept: exercises the skip path across pools
    Params = CharsParams

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1, gpus=self.params.gpus)

    def setup(self) -> None:
        self._trace("setup")

    def teardown(self) -> None:
        self._trace("teardown")

    def _trace(self, event: str) -> None:
        if self.params.trace:
            with open(self.params.trace, "a") as f:
                f.write(f"{event} {os.getpid()}\n")

    def compute(self, table: pa.Table) -> pa.Table:
        captions = table.column("caption")
        p = self.params
        if p.fail_flag and os.path.exists(p.fail_flag) and p.poison_uid in table.column("uid").to_pylist():
            raise RuntimeError(f"poisoned row {p.poison_uid} while {p.fail_flag} exists")
        return pa.table({"test_chars": pc.utf8_length(captions).cast(pa.int32())})

    def decide(self, table: pa.Table) -> pa.Array:
        short = pc.less(table.column("test_chars"), 20)
        return pc.if_else(short, pa.scalar("short"), pa.scalar(None, pa.string())).combine_chunks()


STAGES.setdefault(CaptionChars.name, CaptionChars)
