"""`curate decontaminate RUN --against EVAL...`: pool images that are near-copies of evaluation images.

A model evaluated on images it was trained on scores what it memorised. DataComp removed from
its pool the near-duplicates of its evaluation sets' images and published the list of matches
with both sides' ids; this does the same for a run:

- the evaluation images (EVAL: image folders, webdataset tars or folders of them, each a path or
  a URL such as s3://bucket/eval/) are decoded and hashed here with the pool's own pHash
  definition (curation/stages/phash.py), so both sides are hashed alike;
- the pool's hashes are the run's `phash` column (the phash stage);
- a pool row matches an evaluation image when their hashes are at most `radius` bits apart
  (`match_hashes`, which never compares all pairs: the pigeonhole search of `curate dedup`,
  curation.near_duplicates, over the distinct values of both sides).

Output, beside the run's manifests on its own storage (atomic writes, one writer at a time):

    RUN/decontamination/matches.parquet   uid, pool_image_path, pool_key, eval_set, eval_id, kind,
                                          distance (phash bits), cosine (embedding)
    RUN/decontamination/decontamination.json   parameters, each eval set's image count, counts

`curate query` sees the matches as the view `decontamination`; `curate select` leaves every
matched uid out unless `--include-contaminated`. A re-run replaces both files (it is one pass
over hashes already computed: nothing to resume).

What it does not guarantee: a pHash match finds re-encodings, resizes and light crops, not
heavy crops, flips, overlays or a different photo of the same scene; the optional embedding match
(`--embedding-checkpoint`: the model whose embeddings the run stored, `match_embeddings`) finds more
of those, at a threshold that depends on the model. An evaluation image that cannot be decoded is
counted and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curation.core.params import param

FOLDER = "decontamination"
TABLE = "matches.parquet"
SUMMARY = "decontamination.json"
MATCH_COLUMNS: dict[str, pa.DataType] = {
    "uid": pa.string(),  # the pool sample
    "pool_image_path": pa.string(),
    "pool_key": pa.string(),
    "eval_set": pa.string(),  # the EVAL argument the image came from
    "eval_id": pa.string(),  # its file (relative to the set), or tar#key
    "kind": pa.string(),  # phash | embedding
    "distance": pa.int32(),  # phash: bits apart (null for embedding matches)
    "cosine": pa.float32(),  # embedding: cosine similarity (null for phash matches)
}


class DecontaminateError(Exception):
    pass


@dataclass(frozen=True)
class DecontaminateParams:
    radius: int = param(6, ge=0, le=16, hint="bits of 64; a larger radius matches unrelated images at scale")
    max_pixels: int = param(89_478_485, ge=1)
    # Also match by image embedding: the open_clip checkpoint whose embeddings the run stored (its
    # clip_score stage with keep_embedding: true), a local path or URL; null: pHash only.
    embedding_checkpoint: str | None = None
    embedding_model: str | None = None
    min_cosine: float = param(0.95, gt=0, le=1, hint="a cosine similarity")


def match_hashes(
    pool: np.ndarray, evals: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool index, eval index, distance) of every pair of 64-bit hashes (int64 or uint64 arrays) at
    most `radius` bits apart, sorted by pool index then eval index; every pair, none missed.

    Scales with the pool, not with pool x eval: the distinct values of both sides go through
    `near_pairs` once, and only value pairs with a pool side and an eval side are expanded to rows.
    """
    from curation.near_duplicates import near_pairs

    pool = np.ascontiguousarray(pool).view(np.uint64)
    evals = np.ascontiguousarray(evals).view(np.uint64)
    empty = np.zeros(0, np.int64)
    if len(pool) == 0 or len(evals) == 0:
        return empty, empty, empty.astype(np.int32)
    values = np.unique(np.concatenate([pool, evals]))
    pool_v = np.searchsorted(values, pool)
    eval_v = np.searchsorted(values, evals)
    in_pool = np.zeros(len(values), bool)
    in_pool[pool_v] = True
    in_eval = np.zeros(len(values), bool)
    in_eval[eval_v] = True
    a, b = near_pairs(values.view(np.int64), radius) if radius > 0 else (empty, empty)
    same = np.flatnonzero(in_pool & in_eval)
    # value pairs (pool value, eval value), both directions of each close pair, and shared values
    pv = np.concatenate([a, b, same])
    ev = np.concatenate([b, a, same])
    cross = in_pool[pv] & in_eval[ev]
    pv, ev = pv[cross], ev[cross]
    if len(pv) == 0:
        return empty, empty, empty.astype(np.int32)
    pool_rows = _rows_by_value(pool_v)
    eval_rows = _rows_by_value(eval_v)
    out_p, out_e = [], []
    for p, e in zip(pv.tolist(), ev.tolist()):
        rp, re_ = pool_rows[p], eval_rows[e]
        out_p.append(np.repeat(rp, len(re_)))
        out_e.append(np.tile(re_, len(rp)))
    pi, ei = np.concatenate(out_p), np.concatenate(out_e)
    order = np.lexsort((ei, pi))
    pi, ei = pi[order], ei[order]
    dist = np.bitwise_count(pool[pi] ^ evals[ei]).astype(np.int32)
    return pi.astype(np.int64), ei.astype(np.int64), dist


def match_embeddings(
    pool: np.ndarray, evals: np.ndarray, min_cosine: float, block: int = 65_536
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool index, eval index, cosine) of every pair of L2-normalised embeddings ([n, d], [m, d]) with
    cosine >= `min_cosine`, sorted by pool then eval index: an exact blocked product (pool x eval)."""
    evals_t = np.ascontiguousarray(evals, dtype=np.float32).T
    out_p, out_e, out_c = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for start in range(0, len(pool), block):
        sims = np.asarray(pool[start : start + block], dtype=np.float32) @ evals_t
        p, e = np.nonzero(sims >= min_cosine)
        out_p.append(p.astype(np.int64) + start)
        out_e.append(e.astype(np.int64))
        out_c.append(sims[p, e])
    return np.concatenate(out_p), np.concatenate(out_e), np.concatenate(out_c)


def _rows_by_value(value_index: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(value_index, kind="stable")
    sorted_v = value_index[order]
    starts = np.r_[0, np.flatnonzero(sorted_v[1:] != sorted_v[:-1]) + 1]
    ends = np.r_[starts[1:], len(sorted_v)]
    return {int(sorted_v[s]): order[s:e] for s, e in zip(starts, ends)}


# ---------------------------------------------------------------------------- evaluation images


def eval_images(location: str, storage_options: dict | None = None) -> Iterator[tuple[str, bytes | None]]:
    """(id, image bytes) of every image of one evaluation set: an image file, a webdataset tar, or a
    folder (local or a URL prefix) of either; ids are file names relative to the set, `tar#key` for
    tar members. Raises DecontaminateError when the location has no images or cannot be read."""
    from curation.core.shards import IMAGE_EXTENSIONS, ShardError, read_samples
    from curation.core.storage import StorageError, is_url, open_store

    def is_image(name: str) -> bool:
        return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS

    def from_tar(source: str, rel: str) -> Iterator[tuple[str, bytes | None]]:
        try:
            for sample in read_samples(source, read=lambda key, ext: ext.lower() in IMAGE_EXTENSIONS):
                image = next((v for k, v in sample.members.items() if k.lower() in IMAGE_EXTENSIONS), None)
                yield f"{rel}#{sample.key}", image
        except ShardError as e:
            raise DecontaminateError(f"--against {location}: {e}") from None

    found = False
    if is_url(location):
        try:
            if location.endswith(".tar") or is_image(location):
                parent, name = location.rstrip("/").rsplit("/", 1)
                names, store = [name], open_store(parent, storage_options)
            else:
                store = open_store(location.rstrip("/"), storage_options)
                names = sorted(n for n in store.list("") if n.endswith(".tar") or is_image(n))
            for name in names:
                found = True
                if name.endswith(".tar"):
                    yield from from_tar(store.url_of(name), name)
                else:
                    yield name, store.get_bytes(name)
        except (StorageError, OSError) as e:
            raise DecontaminateError(f"--against {location}: {e}") from None
    else:
        from curation.core.folders import FileRefused, list_files, read_inside

        path = Path(location)
        if path.is_file():
            files, root = [str(path)], str(path.parent)
        elif path.is_dir():
            files, root = list_files(str(path), (*IMAGE_EXTENSIONS, "tar")), str(path)
        else:
            raise DecontaminateError(f"--against {location}: no such file or folder")
        for file in files:
            found = True
            rel = os.path.relpath(file, root)
            if file.endswith(".tar"):
                yield from from_tar(file, rel)
                continue
            try:
                yield rel, read_inside(file, root, 64 * 2**20)
            except FileRefused:
                yield rel, None
    if not found:
        raise DecontaminateError(f"--against {location}: no images (image files or .tar shards) there")


def eval_hashes(
    locations: list[str],
    max_pixels: int,
    storage_options: dict | None = None,
    images: list[bytes] | None = None,
) -> tuple[pa.Table, int]:
    """(table of eval_set, eval_id, phash for every decodable evaluation image, count undecodable);
    `images`, when given, receives their bytes in the table's order."""
    from curation.core.imageio import ImageRefused, open_image
    from curation.core.phash import phash_image

    sets, ids, hashes = [], [], []
    unreadable = 0
    for location in locations:
        for eval_id, data in eval_images(location, storage_options):
            try:
                image = open_image(data, max_pixels)
            except ImageRefused:
                unreadable += 1
                continue
            sets.append(location)
            ids.append(eval_id)
            hashes.append(phash_image(image))
            if images is not None:
                images.append(data)
    table = pa.table(
        {
            "eval_set": pa.array(sets, pa.string()),
            "eval_id": pa.array(ids, pa.string()),
            "phash": pa.array(hashes, pa.int64()),
        }
    )
    return table, unreadable


# ---------------------------------------------------------------------------- the pass


def run_decontaminate(
    output: str | Path,
    against: list[str],
    params: DecontaminateParams,
    *,
    say: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Match the run's pool against the evaluation sets; write the matches and the summary."""
    import duckdb

    from curation.core.outputs import exclusive_lock_on
    from curation.core.storage import is_url
    from curation.dedup import _put_parquet
    from curation.query import NoManifests, connect
    from curation.rundir import RunDir

    for location in against:  # a mistyped path is refused before the manifests are read
        if not is_url(location) and not Path(location).exists():
            raise DecontaminateError(f"--against {location}: no such file or folder")
    run = RunDir(output)
    try:
        con = connect(output)
    except NoManifests as e:
        raise DecontaminateError(str(e)) from None
    columns = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    if "phash" not in columns:
        raise DecontaminateError(
            f"{output} has no phash column: add the phash stage to its pipeline (it hashes the pool's images)"
        )
    where = [c for c in ("image_path", "key") if c in columns]
    cols = ", ".join(["uid", "phash", *where])
    try:
        pool = con.sql(f"SELECT {cols} FROM samples WHERE phash IS NOT NULL").to_arrow_table()
    except duckdb.Error as e:
        raise DecontaminateError(f"cannot read the manifests: {e}") from None
    embedder = _embedder(params, con, columns, output) if params.embedding_checkpoint else None
    eval_bytes: list[bytes] | None = [] if embedder else None
    evals, unreadable = eval_hashes(against, params.max_pixels, images=eval_bytes)
    say(f"{pool.num_rows:,} pool images with a phash, {evals.num_rows:,} evaluation images")
    pi, ei, dist = match_hashes(
        pool.column("phash").to_numpy(), evals.column("phash").to_numpy(zero_copy_only=False), params.radius
    )
    take_p, take_e = pa.array(pi), pa.array(ei)

    def pool_col(name: str) -> pa.Array:
        if name in pool.column_names:
            return pool.column(name).take(take_p).combine_chunks()
        return pa.nulls(len(pi), pa.string())

    matches = pa.table(
        {
            "uid": pool_col("uid"),
            "pool_image_path": pool_col("image_path"),
            "pool_key": pool_col("key"),
            "eval_set": evals.column("eval_set").take(take_e).combine_chunks(),
            "eval_id": evals.column("eval_id").take(take_e).combine_chunks(),
            "kind": pa.array(["phash"] * len(pi), pa.string()),
            "distance": pa.array(dist, pa.int32()),
            "cosine": pa.nulls(len(pi), pa.float32()),
        },
        schema=pa.schema(MATCH_COLUMNS),
    )
    if embedder is not None:
        assert eval_bytes is not None
        matches = pa.concat_tables(
            [matches, _embedding_matches(con, embedder, evals, eval_bytes, params, say)]
        )
    per_set = {
        loc: int(np.sum(np.asarray(evals.column("eval_set").to_pylist(), dtype=object) == loc))
        for loc in against
    }
    summary = {
        "params": {**asdict(params), "embedding_checkpoint_sha256": embedder[1] if embedder else None},
        "kinds": ["phash", *(["embedding"] if embedder else [])],
        "against": per_set,
        "eval_images_unreadable": unreadable,
        "eval_hashes_sha256": hashlib.sha256(
            json.dumps(
                sorted(zip(evals.column("eval_id").to_pylist(), evals.column("phash").to_pylist()))
            ).encode()
        ).hexdigest(),
        "pool_images": pool.num_rows,
        "matches": matches.num_rows,
        "pool_samples_matched": len(set(matches.column("uid").to_pylist())),
        "eval_images_matched": len(
            set(zip(matches.column("eval_set").to_pylist(), matches.column("eval_id").to_pylist()))
        ),
    }
    folder = run.store.child(FOLDER)
    folder.makedirs()
    with exclusive_lock_on(folder, ".lock", f"another `curate decontaminate` is writing to {folder.url}"):
        _put_parquet(matches, folder, TABLE)
        folder.put_json(SUMMARY, summary)
    return summary


def _embedder(
    params: DecontaminateParams, con: Any, columns: set[str], output: str | Path
) -> tuple[Any, str]:
    """(a ClipScorer of the checkpoint the user names, its content hash), refused unless the run's stored
    embeddings came from that very checkpoint: two models' embeddings are not comparable."""
    from curation.core.devices import resolve_device
    from curation.core.storage import open_store
    from curation.models.checkpoints import file_sha256
    from curation.models.files import ModelFileError, local_model_path
    from curation.stages import EMBEDDING_COLUMN, ClipScoreParams, ClipScorer

    assert params.embedding_checkpoint is not None
    if EMBEDDING_COLUMN not in columns:
        raise DecontaminateError(
            f"{output} has no {EMBEDDING_COLUMN} column: its clip_score stage needs keep_embedding: true"
        )
    try:
        local = local_model_path(params.embedding_checkpoint)
        digest = file_sha256(local)
    except (ModelFileError, OSError) as e:
        raise DecontaminateError(f"--embedding-checkpoint: {e}") from None
    recorded = open_store(output).get_json("run.json").get("fingerprint", {}).get("stage_fingerprints", {})
    if recorded.get("clip_score", {}).get("checkpoint_sha256") != digest:
        raise DecontaminateError(
            f"--embedding-checkpoint {params.embedding_checkpoint} is not the checkpoint whose embeddings "
            f"{output} stored (its run.json records another): embeddings of two models are not comparable"
        )
    device = resolve_device("auto")
    scorer = ClipScorer(
        ClipScoreParams(
            checkpoint=local, model=params.embedding_model, max_pixels=params.max_pixels, batch_size=64
        ),
        device,
        "fp32",
    )
    return scorer, digest


def _embedding_matches(
    con: Any,
    embedder: tuple[Any, str],
    evals: pa.Table,
    eval_bytes: list[bytes],
    params: DecontaminateParams,
    say,
) -> pa.Table:
    """Pool rows whose stored embedding is within `min_cosine` of an evaluation image's, read in batches."""
    from curation.stages import EMBEDDING_COLUMN

    scorer, _ = embedder
    emb, _status = scorer.encode_images(eval_bytes)
    eval_emb = emb.float().cpu().numpy() if len(eval_bytes) else np.zeros((0, 1), np.float32)
    say(f"embedded {len(eval_bytes):,} evaluation images")
    have = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    cols = ", ".join(["uid", *[c for c in ("image_path", "key") if c in have], EMBEDDING_COLUMN])
    reader = con.sql(f"SELECT {cols} FROM samples WHERE {EMBEDDING_COLUMN} IS NOT NULL").to_arrow_reader(
        65_536
    )
    parts = []
    for batch in reader:
        values = batch.column(EMBEDDING_COLUMN)
        pool = np.asarray(values.values.to_numpy(zero_copy_only=False), np.float32).reshape(len(batch), -1)
        pi, ei, cos = match_embeddings(pool, eval_emb, params.min_cosine)
        take_p, take_e = pa.array(pi), pa.array(ei)

        def col(name: str, batch=batch, take_p=take_p) -> pa.Array:
            return (
                batch.column(name).take(take_p)
                if name in batch.schema.names
                else pa.nulls(len(take_p), pa.string())
            )

        parts.append(
            pa.table(
                {
                    "uid": col("uid"),
                    "pool_image_path": col("image_path"),
                    "pool_key": col("key"),
                    "eval_set": evals.column("eval_set").take(take_e).combine_chunks(),
                    "eval_id": evals.column("eval_id").take(take_e).combine_chunks(),
                    "kind": pa.array(["embedding"] * len(pi), pa.string()),
                    "distance": pa.nulls(len(pi), pa.int32()),
                    "cosine": pa.array(cos, pa.float32()),
                },
                schema=pa.schema(MATCH_COLUMNS),
            )
        )
    return pa.concat_tables(parts) if parts else pa.schema(MATCH_COLUMNS).empty_table()
