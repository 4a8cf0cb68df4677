"""Embeddings on a store (a local folder or a URL), resumable like `curate run` (layout in train/mining/__init__.py)."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from curation.core.outputs import explain_conflict
from curation.core.storage import Store, is_url, open_store, retrying
from curation.models.encoders import ImageEncoder, TextEncoder

RECORD = "mine.json"
HARD_PAIRS = "hard_pairs.parquet"


class MineDir:
    """A `curate mine` output: every object written atomically through `curation.core.storage`."""

    def __init__(self, output: str | Path) -> None:
        self.store: Store = open_store(output)
        self.url = self.store.url
        self.embeddings = self.store.child("embeddings")
        self.ledger = self.store.child("ledger")
        self._done: set[str] | None = None

    def check(self) -> None:
        """Wrong credentials, no bucket, no endpoint: one line (StorageError) before any lock or model."""
        if not self.store.local:
            self.store.check()

    @property
    def hard_pairs(self) -> str | Path:
        """hard_pairs.parquet, as a user names it: a local path or a URL."""
        return Path(self.store.path(HARD_PAIRS)) if self.store.local else self.store.url_of(HARD_PAIRS)

    def prepare(self, fingerprint: dict[str, Any]) -> None:
        """Create the layout or check that it holds embeddings of these encoders; clear stale temp files."""
        self.store.makedirs()
        if self.store.local:  # object stores stage in this machine's temp folder, under unique names
            import shutil

            staging = self.embeddings.staging()
            shutil.rmtree(staging, ignore_errors=True)  # only under the lock: no other writer
            staging.mkdir(parents=True)
            self.ledger.makedirs()
        if self.store.exists(RECORD):
            old = self.store.get_json(RECORD)["encoders"]
            if old != fingerprint:
                raise MineConflict(explain_conflict(self.url, old, fingerprint))
        else:
            self.store.put_json(RECORD, {"encoders": fingerprint})

    def is_done(self, shard: str) -> bool:
        """Embedded, from this very tar (same size and version): one listing of ledger/ and embeddings/
        for all shards, then one read of the shard's entry."""
        if self._done is None:
            self._done = {n.removesuffix(".json") for n in self.ledger.list("")} & {
                n.removesuffix(".parquet") for n in self.embeddings.list("")
            }
        if _stem(shard) not in self._done:
            return False
        try:
            entry = self.ledger.get_json(f"{_stem(shard)}.json")
        except (FileNotFoundError, ValueError):
            return False
        return entry.get("source") == _identity(shard)

    def read_embeddings(self, shard: str) -> Any:
        """The stored embeddings of `shard` (a pyarrow Table)."""
        import pyarrow.parquet as pq

        name = f"{_stem(shard)}.parquet"
        if self.embeddings.local:
            return pq.read_table(self.embeddings.path(name))
        return pq.read_table(io.BytesIO(self.embeddings.get_bytes(name)))

    def commit(self, shard: str, table: Any, entry: dict[str, Any]) -> None:
        """Embeddings first (complete or absent), then the ledger entry that says they are done."""
        import pyarrow.parquet as pq

        tmp = self.embeddings.staging() / f"{_stem(shard)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.parquet"
        try:
            pq.write_table(table, tmp, compression="none")  # float embeddings do not compress
            self.embeddings.put_file(tmp, f"{_stem(shard)}.parquet")
        finally:
            tmp.unlink(missing_ok=True)
        self.ledger.put_json(f"{_stem(shard)}.json", entry)


class MineConflict(Exception):
    """The output holds embeddings made by other encoders."""


def _stem(shard: str) -> str:
    """embeddings/<stem>.parquet and ledger/<stem>.json are named by the tar's file name."""
    return os.path.splitext(shard.rstrip("/").rsplit("/", 1)[-1])[0]


def _identity(shard: str) -> dict[str, Any]:
    """Which tar was embedded: its path and size, and its mtime (local) or its version (object stores:
    the ETag, which changes whenever the object is written again)."""
    if not is_url(shard):
        st = os.stat(shard)
        return {"path": str(Path(shard).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    folder, _, name = shard.rpartition("/")
    store = open_store(folder)
    info = retrying(lambda: store.fs.info(store.path(name)), store.retry_seconds, f"reading {shard}")
    version = next(
        (str(info[k]) for k in ("ETag", "etag", "md5Hash", "generation", "mtime") if k in info), ""
    )
    return {"path": shard, "size": int(info["size"]), "version": version}


def _samples(shard: str) -> Iterator[tuple[str | None, bytes | None, str]]:
    """(uid, image bytes, caption) of every sample of a tar, streaming."""
    from train.data import IMAGE_KEYS, _raw_samples, _uid

    for s in _raw_samples(shard):
        key = next((k for k in IMAGE_KEYS if k in s), None)
        yield _uid(s), (s[key] if key else None), s.get("txt", b"").decode("utf-8", "replace")


def embed_shard(
    mdir: MineDir, shard: str, image_enc: ImageEncoder, text_enc: TextEncoder, batch_size: int
) -> dict[str, Any]:
    """Embed one tar (a path or a URL) into embeddings/NAME.parquet, then write its ledger entry."""
    import numpy as np
    import pyarrow as pa

    from curation.core.imageio import ImageRefused, open_image

    started = time.perf_counter()
    uids: list[str] = []
    image_parts, text_parts = [], []
    refused: dict[str, int] = {}
    batch: list[tuple[str, Any, str]] = []

    def flush() -> None:
        if batch:
            image_parts.append(image_enc.encode_images([b[1] for b in batch]).float().numpy())
            text_parts.append(text_enc.encode_texts([b[2] for b in batch]).float().numpy())
            uids.extend(b[0] for b in batch)
            batch.clear()

    for uid, data, caption in _samples(shard):
        if uid is None:
            raise ValueError(f"{shard}: a sample has no uid in its .json (`curate select` writes one)")
        try:
            batch.append((uid, open_image(data), caption))
        except ImageRefused as e:  # left out of mining; counted in the ledger entry
            refused[e.status] = refused.get(e.status, 0) + 1
            continue
        if len(batch) >= batch_size:
            flush()
    flush()
    # An empty tar stores zero rows of width 1 (Arrow refuses width 0); load_embeddings skips it.
    dim_i = image_parts[0].shape[1] if image_parts else 1
    dim_t = text_parts[0].shape[1] if text_parts else 1
    img = np.concatenate(image_parts) if image_parts else np.zeros((0, dim_i), np.float32)
    txt = np.concatenate(text_parts) if text_parts else np.zeros((0, dim_t), np.float32)
    table = pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), dim_i),
            "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), dim_t),
        }
    )
    entry = {
        "shard": shard.rstrip("/").rsplit("/", 1)[-1],
        "rows": len(uids),
        "refused": refused,
        "seconds": time.perf_counter() - started,
        "source": _identity(shard),
    }
    mdir.commit(shard, table, entry)
    return entry


def load_embeddings(mdir: MineDir, shards: list[str]):
    """(uids, image [N, d], text [N, d']) over the shards' stored embeddings, in shard order."""
    import numpy as np
    import torch

    uids: list[str] = []
    images, texts = [], []
    for shard in shards:
        t = mdir.read_embeddings(shard)
        uids += t.column("uid").to_pylist()
        for col, out in (("image_emb", images), ("text_emb", texts)):
            arr = t.column(col).combine_chunks()
            width = arr.type.list_size
            out.append(arr.values.to_numpy(zero_copy_only=False).reshape(-1, width) if len(arr) else None)
    if len(set(uids)) != len(uids):
        raise ValueError("the subset holds some uid twice; hard pairs are keyed by uid")

    def stack(parts):
        parts = [p for p in parts if p is not None]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts))) if parts else torch.zeros(0, 1)

    return uids, stack(images), stack(texts)
