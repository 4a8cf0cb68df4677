"""hard_pairs.parquet: the format `curate mine` writes and `curate train` (`hard_pairs:`) reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METADATA_KEY = b"curate.mine"


def write_hard_pairs(path: Path, uids: list[str], idx, scores, params: dict[str, Any]) -> None:
    """Parquet uid, hard_uids, hard_scores (padding dropped), parameters in the file metadata; atomic."""
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The mining parameters stored in a hard_pairs.parquet."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}"))
