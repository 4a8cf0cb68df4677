from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunSummary:
    shards_total: int
    shards_skipped: int = 0  # already done before this invocation
    shards_ok: int = 0
    rows: int = 0
    kept: int = 0
    seconds: float = 0.0
    failures: dict[int, str] = field(default_factory=dict)
    store_failures_in_a_row: int = 0
    # Rows and kept rows of the whole run, when this invocation found every shard already done.
    run_rows: int = 0
    run_kept: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures
