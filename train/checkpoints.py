"""Training checkpoints in `output_dir`: a local folder or a URL (s3://bucket/prefix, ...).

    OUTPUT_DIR/checkpoints/step_00000004.pt   one per checkpoint, each written atomically
    OUTPUT_DIR/checkpoints/latest             object stores: the newest checkpoint's name, written after it
    OUTPUT_DIR/metrics.jsonl, config.json     object stores: uploaded after every checkpoint

Every write goes through `curation.core.storage`: on local disk a temp file, fsync
and rename; on an object store one PUT (a multipart upload for large checkpoints),
visible only when complete, so `--resume` never finds half a checkpoint. On an
object store the metrics and TensorBoard files are written to a local work folder
during the run (metrics.jsonl is fetched from the store first, so a resume on
another machine continues it) and uploaded with each checkpoint and at the end
of the run (`sync`): metrics.jsonl, config.json and tensorboard/events.* (each
event file whole, one PUT, whenever it grew; a resumed run writes a new event
file beside the old ones, with TensorBoard's purge marker at its first step, so
the steps a crash replays are not drawn twice).
"""

from __future__ import annotations

import io
import logging
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from curation.core.storage import open_store

CKPT_RE = re.compile(r"step_(\d+)\.pt$")
LATEST = "checkpoints/latest"
SYNCED = ("metrics.jsonl", "config.json")
TENSORBOARD = "tensorboard"

log = logging.getLogger(__name__)


class CheckpointDir:
    """Where a run's checkpoints live, and the local folder its metrics are written to meanwhile."""

    def __init__(self, output_dir: str | Path) -> None:
        self.store = open_store(output_dir)
        self.url = self.store.url
        self._work_dir = Path(output_dir) if self.store.local else None
        self._synced: dict[str, int] = {}  # work-folder file -> bytes uploaded
        if not self.store.local:
            self.store.check()  # wrong credentials or no bucket: one line before the model is built

    @property
    def work_dir(self) -> Path:
        """The local folder metrics and TensorBoard files are written to (created on first use for a URL)."""
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="curate-train-"))
            log.info(
                "output_dir %s: metrics and TensorBoard files are written to %s and uploaded with each "
                "checkpoint",
                self.url,
                self._work_dir,
            )
            for name, data in self.store.get_many(list(SYNCED)).items():
                (self._work_dir / name).write_bytes(data)
        return self._work_dir

    def names(self) -> list[str]:
        """Checkpoint file names, oldest step first."""
        if self.store.local:
            folder = self.work_dir / "checkpoints"
            listed = [p.name for p in folder.glob("step_*.pt")]
        else:
            listed = self.store.list("checkpoints")
        found = [(int(m.group(1)), n) for n in listed if (m := CKPT_RE.search(n)) and m.group(0) == n]
        return [n for _, n in sorted(found)]

    def where(self, name: str) -> str | Path:
        """A checkpoint as a user names it: a local path, or a URL."""
        if self.store.local:
            return self.work_dir / "checkpoints" / name
        return self.store.url_of(f"checkpoints/{name}")

    def latest(self) -> str | Path | None:
        if not self.store.local:
            # One GET instead of a listing; a pointer to a checkpoint since pruned falls back to the listing.
            try:
                name = self.store.get_bytes(LATEST).decode().strip()
                if CKPT_RE.fullmatch(name) and self.store.exists(f"checkpoints/{name}"):
                    return self.where(name)
            except FileNotFoundError:
                pass
        names = self.names()
        return self.where(names[-1]) if names else None

    def load(self, checkpoint: str | Path) -> dict[str, Any]:
        return load_checkpoint(checkpoint)

    def save(self, step: int, payload: dict[str, Any]) -> str | Path:
        """Write the checkpoint of `step` atomically (then, on object stores, metrics and `latest`)."""
        name = f"step_{step:08d}.pt"
        # Local: checkpoints/.tmp, so the commit (fsync, rename) stays on one filesystem.
        folder = self.store.child("checkpoints")
        tmp = folder.staging() / f"{uuid.uuid4().hex}-{name}"
        try:
            torch.save(payload, tmp)
            folder.put_file(tmp, name)  # removes tmp
        finally:
            tmp.unlink(missing_ok=True)
        if self.store.local:
            return self.where(name)
        self.sync()  # the run's metrics, complete up to this checkpoint
        self.store.put_bytes(LATEST, name.encode())
        return self.where(name)

    def sync(self) -> None:
        """Object stores: upload metrics.jsonl, config.json and the TensorBoard event files that changed
        since the last sync (each one whole, one PUT). Local output_dir: nothing to do."""
        if self.store.local or self._work_dir is None:
            return
        tb = self._work_dir / TENSORBOARD
        files = [*SYNCED, *(f"{TENSORBOARD}/{p.name}" for p in sorted(tb.glob("events.*")) if p.is_file())]
        for rel in files:
            local = self._work_dir / rel
            if not local.exists():
                continue
            data = local.read_bytes()
            if self._synced.get(rel) != len(data):  # event files and metrics only ever grow
                self.store.put_bytes(rel, data)
                self._synced[rel] = len(data)

    def prune(self, keep: int) -> None:
        """Remove all but the newest `keep` checkpoints."""
        for name in self.names()[:-keep]:
            if self.store.local:
                (self.work_dir / "checkpoints" / name).unlink(missing_ok=True)
            else:
                self.store.remove(f"checkpoints/{name}")


def list_checkpoints(output_dir: str | Path) -> list[str | Path]:
    d = CheckpointDir(output_dir)
    return [d.where(n) for n in d.names()]


def latest_checkpoint(output_dir: str | Path) -> str | Path | None:
    return CheckpointDir(output_dir).latest()


def load_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint file or URL, tensors only; from an object store it is read into memory, not to disk."""
    text = str(checkpoint)
    folder, _, name = text.rpartition("/")
    store = open_store(folder or ".")
    if store.local:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    return torch.load(io.BytesIO(store.get_bytes(name)), map_location="cpu", weights_only=True)
