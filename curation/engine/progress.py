"""One progress display for every runner: rows/s, shards done, ETA."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from curation.core.terminal import rate


class Progress:
    def __init__(
        self, total_rows: int | None, shards_total: int, shards_done: int, enabled: bool = True
    ) -> None:
        self.shards_total = shards_total
        self.shards_done = shards_done
        self.failed = 0
        # Into a log (stderr not a terminal), tqdm's `\r` frames are noise: one line per shard instead.
        self.lines = enabled and not sys.stderr.isatty()
        self.total_rows = total_rows
        self.rows_done = 0
        self.started = time.monotonic()
        self.bar = tqdm(
            total=total_rows,
            unit=" rows",
            # Whole rows (`12/34 rows`), not tqdm's scaled floats (`12.0/34.0`).
            unit_scale=False,
            dynamic_ncols=True,
            disable=not enabled or self.lines,
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
        self.rows_done += n

    def shard_finished(self, ok: bool) -> None:
        if ok:
            self.shards_done += 1
        else:
            self.failed += 1
        self._postfix()
        self.bar.refresh()
        if self.lines:
            print(f"curate: {self._line()}", file=sys.stderr, flush=True)

    def _line(self) -> str:
        """`shard 3/25 done, 1 failed; 1,500 rows, 410 rows/s, about 2m left`."""
        text = f"shard {self.shards_done}/{self.shards_total} done"
        text += f", {self.failed} failed" if self.failed else ""
        seconds = time.monotonic() - self.started
        text += f"; {self.rows_done:,} rows"
        if self.rows_done and seconds > 0:
            speed = self.rows_done / seconds
            text += f", {rate(speed)} rows/s"
            if self.total_rows:
                left = max(self.total_rows - self.rows_done, 0) / speed
                text += f", about {left / 60:.0f}m left" if left >= 90 else f", about {left:.0f}s left"
        return text

    def close(self) -> None:
        self.bar.close()
