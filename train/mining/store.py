"""Embeddings on disk, resumable like `curate run` (layout in train/mining/__init__.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from curation.manifest import explain_conflict, write_json_atomic
from curation.models.encoders import ImageEncoder, TextEncoder


class MineDir:
    def __init__(self, output: str | Path) -> None:
        self.root = Path(output)
        self.embeddings = self.root / "embeddings"
        self.ledger = self.root / "ledger"
        self.tmp = self.embeddings / ".tmp"
        self.record = self.root / "mine.json"
        self.hard_pairs = self.root / "hard_pairs.parquet"

    def prepare(self, fingerprint: dict[str, Any]) -> None:
        """Create the layout or check that it holds embeddings of these encoders; clear stale temp files."""
        shutil.rmtree(self.tmp, ignore_errors=True)  # only under the lock: no other writer
        for d in (self.root, self.embeddings, self.ledger, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        if self.record.exists():
            old = json.loads(self.record.read_text())["encoders"]
            if old != fingerprint:
                raise MineConflict(explain_conflict(self.root, old, fingerprint))
        else:
            write_json_atomic(self.record, {"encoders": fingerprint})

    def embedding_path(self, shard: str) -> Path:
        return self.embeddings / (Path(shard).stem + ".parquet")

    def ledger_path(self, shard: str) -> Path:
        return self.ledger / (Path(shard).stem + ".json")

    def is_done(self, shard: str) -> bool:
        entry = self.ledger_path(shard)
        if not entry.exists() or not self.embedding_path(shard).exists():
            return False
        return json.loads(entry.read_text()).get("source") == _identity(shard)


class MineConflict(Exception):
    """The output holds embeddings made by other encoders."""


def _identity(shard: str) -> dict[str, Any]:
    st = os.stat(shard)
    return {"path": str(Path(shard).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _samples(shard: str) -> Iterator[tuple[str | None, bytes | None, str]]:
    """(uid, image bytes, caption) of every sample of a tar, streaming."""
    from train.data import IMAGE_KEYS, _raw_samples, _uid

    for s in _raw_samples(shard):
        key = next((k for k in IMAGE_KEYS if k in s), None)
        yield _uid(s), (s[key] if key else None), s.get("txt", b"").decode("utf-8", "replace")


def embed_shard(
    mdir: MineDir, shard: str, image_enc: ImageEncoder, text_enc: TextEncoder, batch_size: int
) -> dict[str, Any]:
    """Embed one tar into embeddings/NAME.parquet (temp file + rename), then write its ledger entry."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.imageio import ImageRefused, open_image

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
    final = mdir.embedding_path(shard)
    tmp = mdir.tmp / f"{final.stem}.{os.getpid()}.{time.monotonic_ns()}.parquet"
    try:
        pq.write_table(table, tmp, compression="none")  # float embeddings do not compress
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    entry = {
        "shard": Path(shard).name,
        "rows": len(uids),
        "refused": refused,
        "seconds": time.perf_counter() - started,
        "source": _identity(shard),
    }
    write_json_atomic(mdir.ledger_path(shard), entry)
    return entry


def load_embeddings(mdir: MineDir, shards: list[str]):
    """(uids, image [N, d], text [N, d']) over the shards' stored embeddings, in shard order."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    uids: list[str] = []
    images, texts = [], []
    for shard in shards:
        t = pq.read_table(mdir.embedding_path(shard))
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
