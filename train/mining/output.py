"""hard_pairs.parquet: the format `curate mine` writes and `curate train` (`hard_pairs:`) reads."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from curation.core.storage import Store, is_url, open_store

METADATA_KEY = b"curate.mine"
FILE = "hard_pairs.parquet"


def write_hard_pairs(store: Store, uids: list[str], idx, scores, params: dict[str, Any]) -> None:
    """`store`/hard_pairs.parquet: uid, hard_uids, hard_scores (padding dropped), parameters in the file
    metadata; written atomically through the storage layer (local: temp + rename; object store: one PUT)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    valid = idx.numpy() >= 0
    counts = valid.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat_idx = idx.numpy()[valid]  # row-major: each row's valid entries, in descending score order
    uid_arr = pa.array(uids, pa.string())
    table = pa.table(
        {
            "uid": uid_arr,
            "hard_uids": pa.ListArray.from_arrays(pa.array(offsets), uid_arr.take(pa.array(flat_idx))),
            "hard_scores": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(scores.float().numpy()[valid], pa.float32())
            ),
        }
    )
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(params).encode()})
    folder = Path(store.path()) if store.local else store.staging()
    tmp = folder / f".{FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        store.put_file(tmp, FILE)
    finally:
        tmp.unlink(missing_ok=True)


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The mining parameters stored in a hard_pairs.parquet (a path or a URL)."""
    import io

    import pyarrow.parquet as pq

    if is_url(path):
        folder, _, name = str(path).rpartition("/")
        path = io.BytesIO(open_store(folder).get_bytes(name))
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}"))
