"""hard_pairs.parquet: the format `curate mine` writes and `curate train` (`hard_pairs:`) reads."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from curation.core.storage import is_url, open_store

METADATA_KEY = b"curate.mine"


def write_hard_pairs(path: str | Path, uids: list[str], idx, scores, params: dict[str, Any]) -> None:
    """Parquet uid, hard_uids, hard_scores (padding dropped), parameters in the file metadata, at `path`
    (a local file or a URL); written atomically through the storage layer (local: temp file + rename;
    object store: one PUT)."""
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
    parent, name = _split(path)
    store = open_store(parent)
    # Local: beside the file (the commit is a rename); object stores: this machine's temp folder.
    folder = Path(store.path()) if store.local else store.staging()
    tmp = folder / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        store.put_file(tmp, name)
    finally:
        tmp.unlink(missing_ok=True)


def _split(path: str | Path) -> tuple[str, str]:
    """(folder, file name) of a local path or a URL."""
    text = str(path)
    if is_url(text):
        parent, _, name = text.rpartition("/")
        return parent, name
    return os.path.split(os.path.abspath(text))


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The mining parameters stored in a hard_pairs.parquet (a path or a URL)."""
    import io

    import pyarrow.parquet as pq

    if is_url(path):
        folder, name = _split(path)
        path = io.BytesIO(open_store(folder).get_bytes(name))
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}"))
