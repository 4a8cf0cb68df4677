"""One progress display for every runner: rows/s, shards done, ETA."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(
        self, total_rows: int | None, shards_total: int, shards_done: int, enabled: bool = True
    ) -> None:
        self.shards_total = shards_total
        self.shards_done = shards_done
        self.failed = 0
        self.bar = tqdm(
            total=total_rows,
            unit=" rows",
            # Whole rows (`12/34 rows`), not tqdm's scaled floats (`12.0/34.0`).
            unit_scale=False,
            dynamic_ncols=True,
            disable=not enabled,
            file=sys.stderr,
            smoothing=0.1,
        )
        self._postfix()

    def _postfix(self) -> None:
        text = f"shards {self.shards_done}/{self.shards_total}"
        if self.failed:
            text += f", {self.failed} failed"
        self.bar.set_postfix_str(text, refresh=False)

    def rows(self, n: int) -> None:
        self.bar.update(n)

    def shard_finished(self, ok: bool) -> None:
        if ok:
            self.shards_done += 1
        else:
            self.failed += 1
        self._postfix()
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
