"""An output folder a command writes (a run, a dedup table, mined pairs): its lock, and the message
when it holds work made with another config.

In core because every writer of an output shares them, the pipeline's run directory and
`train`'s `curate mine` alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from curation.core.storage import LockHeld, Store


class RunLocked(LockHeld):
    """Another driver is writing to this output directory."""


@contextlib.contextmanager
def exclusive_lock_on(store: Store, rel: str, held_message: str, *, remove: bool = False) -> Iterator[None]:
    """Hold `rel` on `store` as the output's lock (`remove`: a lock file lying beside the output, removed
    on release); RunLocked(held_message) if a live process holds it."""
    try:
        with store.lock(rel, held_message, remove=remove):
            yield
    except LockHeld as e:
        if isinstance(e, RunLocked):
            raise
        raise RunLocked(str(e)) from None


def explain_conflict(root: Path | str, old: dict, new: dict) -> str:
    diffs = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{key}[{i}]")
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")

    walk(old, new, "")
    return (
        f"{root} holds a run made with a different config, which would change results:\n    "
        + "\n    ".join(diffs[:10])
        + "\nChoose a new output (--output DIR), or restore the original config to resume. A new threshold "
        f'needs no re-run: the scores are recorded, so select on them (curate select {root} --where "...").'
    )
