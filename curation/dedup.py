"""`curate dedup OUTPUT`: duplicate groups over a whole run, written beside its manifests.

Three kinds of duplicate link, each between two rows of the run (one row per uid):

- `exact`: the same image bytes (`sha256`) and the same caption after
  `clean_caption` (HTML entities, control characters and runs of space removed);
- `phash`: perceptual hashes (`phash` column) at most `radius` bits apart;
- `semantic`: SemDeDup on stored image embeddings (`clip_image_embedding`):
  spherical k-means, then within each cluster the pairs with cosine > 1 - eps.

A group is a connected component of all links (so A~B and B~C put A, B, C in
one group even if A and C are further apart). Within a group rows are ranked by
the representative rule: rows the pipeline kept first, then the highest
`clip_score`, then the largest original image (img2dataset's original width x
height, or `min_side`^2 x `aspect_ratio` from the image_size stage), then the
smallest uid; rank 0 is the representative (`dup_keep`). A rule's column that
the run lacks is skipped.

Near-duplicate hashes are found without comparing all pairs, and without
missing any pair within the radius (the pigeonhole rule of Manku et al.,
"Detecting near-duplicates for web crawling", WWW 2007): split the 64 bits
into m blocks; two hashes at most r bits apart differ in at most r blocks, so
they agree exactly on at least m - r of them. For every choice of m - r blocks,
sort the hashes by those blocks and compare only hashes that agree on them.
m is chosen per run from a cost model (more blocks: more sorts, far fewer
candidate pairs). Identical hashes are collapsed first, so a million copies of
one image cost one entry.

Output (written atomically, so readers never see half a table):

    OUTPUT/dedup/dedup.parquet   uid, dup_group, dup_rank, dup_keep, dup_kind: rows in a group of >= 2
    OUTPUT/dedup/dedup.json      parameters, the manifests it covers, counts per kind

Rows absent from the table have no duplicate. `curate query` sees the table as
the view `dedup`; `curate select --dedup` keeps one row per group.

Resume: each step (exact, phash, k-means, each block of clusters) saves its
links under `dedup/.work/<fingerprint>/` with an atomic rename; a killed run
re-run with the same manifests and parameters redoes only missing steps, and
every step is deterministic (seeded k-means), so the groups are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curation.manifest import RunDir, RunLocked, exclusive_lock, write_json_atomic

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
KINDS = ("exact", "phash", "semantic")  # strictest first: a row's dup_kind is its strictest link
TABLE = "dedup.parquet"
SUMMARY = "dedup.json"


@dataclass(frozen=True)
class DedupParams:
    radius: int = 6
    eps: float = 0.03
    clusters: int | None = None  # null: about one cluster per 1,000 embeddings
    iterations: int = 20
    seed: int = 0
    kinds: tuple[str, ...] = KINDS


# ---------------------------------------------------------------------------- CLI


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "dedup",
        help="find duplicate groups over a whole run (exact, perceptual hash, embeddings); resumable",
        description=(
            "Group the duplicates of OUTPUT (a `curate run` output) over all its finished manifests and write "
            "OUTPUT/dedup/dedup.parquet (uid, dup_group, dup_rank, dup_keep, dup_kind), one row per sample "
            "that has a duplicate. Kinds: exact (same sha256 and cleaned caption), phash (perceptual hashes "
            "at most --radius bits apart; needs the phash stage), semantic (SemDeDup: k-means on "
            "clip_image_embedding, cosine > 1 - --eps within a cluster; needs clip_score with "
            "keep_embedding: true). Each group's representative (dup_keep) is the first by: kept by the "
            "pipeline, highest clip_score, largest original image, smallest uid. Killed, it resumes where "
            "it stopped; re-run on unchanged manifests, it does nothing."
        ),
        epilog=(
            "examples:\n"
            "  curate dedup runs/laion                       # every kind whose columns the run has\n"
            "  curate dedup runs/laion --radius 4 --kinds phash       # stricter, faster\n"
            '  curate query runs/laion "SELECT dup_kind, count(*) FROM dedup GROUP BY 1"\n'
            "  curate select runs/laion --where keep --dedup --out subsets/dedup"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", help="a `curate run` output directory")
    p.add_argument(
        "--radius", type=int, default=6, help="phash: max Hamming distance in bits, 0-16 (default 6)"
    )
    p.add_argument(
        "--eps", type=float, default=0.03, help="semantic: link when cosine > 1 - eps (default 0.03)"
    )
    p.add_argument(
        "--clusters", type=int, help="semantic: k-means clusters (default: one per ~1,000 embeddings)"
    )
    p.add_argument("--iterations", type=int, default=20, help="semantic: k-means iterations (default 20)")
    p.add_argument("--seed", type=int, default=0, help="semantic: k-means seed (default 0)")
    p.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help="comma-separated subset of exact,phash,semantic (default: all; kinds whose columns the run "
        "lacks are skipped with a note)",
    )
    p.add_argument("--force", action="store_true", help="recompute even if the table is up to date")
    p.set_defaults(func=cmd_dedup)


def cmd_dedup(args: argparse.Namespace) -> int:
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        return _fail(f"--kinds: unknown kind(s) {unknown or kinds}; choose from {', '.join(KINDS)}")
    if not 0 <= args.radius <= 16:
        return _fail("--radius must be 0..16 bits (a larger radius links unrelated images at scale)")
    if not 0 < args.eps < 1:
        return _fail("--eps must be in (0, 1)")
    if args.clusters is not None and args.clusters < 1:
        return _fail("--clusters must be >= 1")
    if args.iterations < 1:
        return _fail("--iterations must be >= 1")
    params = DedupParams(args.radius, args.eps, args.clusters, args.iterations, args.seed, kinds)
    try:
        summary = run_dedup(args.output, params, force=args.force, say=_say)
    except (DedupError, RunLocked) as e:
        return _fail(str(e))
    groups = summary["groups"]
    print(
        f"{summary['rows']:,} rows, {summary['rows_in_groups']:,} in {groups:,} duplicate group(s), "
        f"{summary['rows_in_groups'] - groups:,} redundant; by kind: "
        + ", ".join(f"{k} {n:,}" for k, n in summary["rows_by_kind"].items())
        + f" -> {Path(args.output) / 'dedup' / TABLE}"
    )
    return EXIT_OK


def _fail(msg: str) -> int:
    print(f"curate: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _say(msg: str) -> None:
    print(f"dedup: {msg}", file=sys.stderr, flush=True)


class DedupError(Exception):
    pass


# ---------------------------------------------------------------------------- the pass


def run_dedup(
    output: str | Path,
    params: DedupParams,
    *,
    force: bool = False,
    say: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Compute (or resume) the duplicate table of a run; returns the summary written to dedup.json."""
    import duckdb

    from curation.query import NoManifests, connect

    run = RunDir(output)
    folder = run.root / "dedup"
    try:
        con = connect(output)
    except NoManifests as e:
        raise DedupError(str(e)) from None
    folder.mkdir(exist_ok=True)
    with exclusive_lock(folder / ".lock", f"another `curate dedup` is writing to {folder}"):
        manifests = sorted(run.manifests.glob("shard-*.parquet"))
        fingerprint = _fingerprint(params, manifests)
        summary_path = folder / SUMMARY
        if not force and (folder / TABLE).exists() and summary_path.exists():
            old = json.loads(summary_path.read_text())
            if old.get("fingerprint") == fingerprint:
                say("up to date (same manifests and parameters); --force recomputes")
                return old
        work = folder / ".work" / fingerprint
        for stale in (folder / ".work").glob("*"):
            if stale != work:
                shutil.rmtree(stale, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)

        try:
            rows = _load(con, params.kinds)
        except duckdb.Error as e:
            raise DedupError(f"cannot read the manifests: {e}") from None
        n = rows.num_rows
        say(f"{n:,} rows from {len(manifests)} manifest(s)")
        links: list[tuple[np.ndarray, np.ndarray, int]] = []
        skipped: dict[str, str] = {}
        for code, kind in enumerate(KINDS):
            if kind not in params.kinds:
                continue
            need = {"exact": "sha256", "phash": "phash", "semantic": "clip_image_embedding"}[kind]
            if need not in rows.column_names:
                skipped[kind] = f"no {need} column"
                say(f"{kind}: skipped, the run has no {need} column")
                continue
            start = time.perf_counter()
            a, b = {"exact": _exact_links, "phash": _phash_links, "semantic": _semantic_links}[kind](
                rows, params, work, say
            )
            links.append((a, b, code))
            say(f"{kind}: {len(a):,} links ({time.perf_counter() - start:.1f} s)")

        table, counts = _groups(rows, links)
        _write_parquet_atomic(table, folder / TABLE)
        summary = {
            "fingerprint": fingerprint,
            "params": asdict(params),
            "manifests": [m.name for m in manifests],
            "run_in_progress": run.is_locked(),
            "rows": n,
            "rows_in_groups": table.num_rows,
            "groups": int(table.column("dup_keep").to_numpy(zero_copy_only=False).sum())
            if table.num_rows
            else 0,
            "rows_by_kind": counts,
            "skipped": skipped,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(summary_path, summary)
        shutil.rmtree(folder / ".work", ignore_errors=True)
        return summary


def _fingerprint(params: DedupParams, manifests: list[Path]) -> str:
    """Parameters and the exact manifest files (finished shards are never rewritten, so name+size+mtime)."""
    files = [(m.name, m.stat().st_size, m.stat().st_mtime_ns) for m in manifests]
    blob = json.dumps({"params": asdict(params), "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load(con: Any, kinds: tuple[str, ...]) -> pa.Table:
    """One row per uid (its first manifest row), ordered by uid: the columns the links and the rule need."""
    have = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    wanted = ["keep"]
    wanted += [
        c
        for c in ("clip_score", "original_width", "original_height", "min_side", "aspect_ratio")
        if c in have
    ]
    if "exact" in kinds:
        wanted += [c for c in ("sha256", "caption") if c in have]
    if "phash" in kinds and "phash" in have:
        wanted.append("phash")
    if "semantic" in kinds and "clip_image_embedding" in have:
        wanted.append("clip_image_embedding")
    cols = ", ".join(f'"{c}"' for c in ["uid", *dict.fromkeys(wanted)])
    # A uid repeated in the input (the same url and caption twice) is one sample: its first row.
    sql = f"SELECT {cols} FROM samples QUALIFY row_number() OVER (PARTITION BY uid ORDER BY shard) = 1 ORDER BY uid"
    return con.sql(sql).to_arrow_table()


# ---------------------------------------------------------------------------- links


def _cached(
    path: Path, compute: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """A step's links, from its file when a previous (killed) run finished it."""
    if path.exists():
        with np.load(path) as f:
            return f["a"], f["b"]
    a, b = compute()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, a=a, b=b)
    os.replace(tmp, path)
    return a, b


def _exact_links(rows: pa.Table, params: DedupParams, work: Path, say) -> tuple[np.ndarray, np.ndarray]:
    def compute() -> tuple[np.ndarray, np.ndarray]:
        import pyarrow.compute as pc

        from curation.stages.caption import clean_caption

        # Only rows whose image bytes repeat need their caption cleaned and compared.
        codes = pc.dictionary_encode(rows.column("sha256")).combine_chunks().indices
        valid = codes.is_valid().to_numpy(zero_copy_only=False)
        code = codes.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        repeated = np.flatnonzero(valid & (np.bincount(code[valid], minlength=int(code.max()) + 2)[code] > 1))
        captions = rows.column("caption").take(pa.array(repeated)).to_pylist() if len(repeated) else []
        first: dict[tuple[int, str], int] = {}
        a, b = [], []
        for i, caption in zip(repeated.tolist(), captions):
            j = first.setdefault((int(code[i]), clean_caption(caption)), i)
            if j != i:
                a.append(j)
                b.append(i)
        return np.array(a, np.int64), np.array(b, np.int64)

    return _cached(work / "exact.npz", compute)


def _phash_links(rows: pa.Table, params: DedupParams, work: Path, say) -> tuple[np.ndarray, np.ndarray]:
    def compute() -> tuple[np.ndarray, np.ndarray]:
        column = rows.column("phash")
        valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
        hashes = column.to_numpy(zero_copy_only=False)[valid].astype(np.int64)
        a, b = near_pairs(hashes, params.radius)
        return valid[a], valid[b]

    return _cached(work / "phash.npz", compute)


def near_pairs(
    hashes: np.ndarray, radius: int, max_pairs: int = 5_000_000, blocks: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of 64-bit hashes at most `radius` bits apart, without comparing all pairs.

    Identical hashes are linked to the first of their kind; distinct values are
    compared only when they agree on m - radius of m bit blocks (see the module
    doc), and each close pair is reported once. `blocks` fixes m (> radius)
    instead of the cost model's choice.
    """

    values, first, inverse = _unique(hashes.view(np.uint64))
    # rows repeating a value link to the value's first row
    same = np.flatnonzero(first[inverse] != np.arange(len(hashes)))
    a_parts, b_parts = [first[inverse[same]]], [same]
    if blocks is not None and blocks <= radius:
        raise ValueError(f"blocks must exceed the radius ({radius}), got {blocks}")
    if radius > 0 and len(values) > 1:
        edges = _block_edges(blocks if blocks is not None else _choose_blocks(len(values), radius))
        masks = [np.uint64(((1 << (hi - lo)) - 1) << lo) for lo, hi in edges]
        for chosen in combinations(range(len(edges)), len(edges) - radius):
            key_mask = np.bitwise_or.reduce([masks[k] for k in chosen])
            # A pair agreeing on several block sets is reported only by the first set in this
            # enumeration (the m - r lowest blocks it agrees on): it must differ on every
            # unchosen block below the highest chosen one.
            must_differ = [masks[k] for k in range(max(chosen)) if k not in chosen]
            order, sorted_keys = _sort_by_blocks(values, [edges[k] for k in chosen])
            for x, y in _runs_pairs(sorted_keys, max_pairs):
                x, y = order[x], order[y]
                diff = values[x] ^ values[y]
                # agreeing on the chosen blocks: a hashed key can put others in one run
                keep = (np.bitwise_count(diff) <= radius) & ((diff & key_mask) == 0)
                for m in must_differ:
                    keep &= (diff & m) != 0
                a_parts.append(first[x[keep]])
                b_parts.append(first[y[keep]])
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    return np.minimum(a, b), np.maximum(a, b)


def _unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique(values, return_index=True, return_inverse=True) for uint64, without its slow argsort."""
    distinct = np.sort(values)
    distinct = distinct[np.r_[True, distinct[1:] != distinct[:-1]]]
    inverse = np.searchsorted(distinct, values)
    first = np.full(len(distinct), len(values), np.int64)
    np.minimum.at(first, inverse, np.arange(len(values)))
    return distinct, first, inverse


def _block_edges(m: int) -> list[tuple[int, int]]:
    """(low bit, high bit) of m contiguous bit blocks covering 64 bits, sizes differing by at most one."""
    edges = np.linspace(0, 64, m + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in pairwise(edges)]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier (odd: a bijection mod 2^64)


def _sort_by_blocks(values: np.ndarray, chosen: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(order, sorted keys): `values` ordered by the bits of the chosen blocks.

    The blocks' bits are packed into one key and the value's index into the low
    bits of the same uint64, so a plain sort does the work of an argsort (which
    is 2.5x slower at 1M values and 6x at 10M here: its indirect accesses miss
    the cache). A key too wide to share 64 bits with the index is hashed down;
    hash collisions only add candidates, which the caller checks.
    """
    idx_bits = max(1, (len(values) - 1).bit_length())
    key = np.zeros(len(values), np.uint64)
    width = 0
    for lo, hi in chosen:
        key |= ((values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)) << np.uint64(width)
        width += hi - lo
    room = 64 - idx_bits
    if width > room:
        key = (key * _GOLDEN) >> np.uint64(64 - room)
    packed = np.sort((key << np.uint64(idx_bits)) | np.arange(len(values), dtype=np.uint64))
    return (packed & np.uint64((1 << idx_bits) - 1)).astype(np.int64), packed >> np.uint64(idx_bits)


def _choose_blocks(n: int, radius: int) -> int:
    """Blocks m minimising the estimated cost: C(m, r) sorts of n keys + candidate pairs to check.

    Uniform hashes agree on k key bits with probability 2^-k, so each of the C(m, r)
    tables yields about n^2/2 * 2^-k candidates, k = 64 (m - r) / m; sorting costs
    about as much per key as checking one candidate pair (both ~0.3 us with numpy here).
    """
    best, best_cost = radius + 1, math.inf
    for m in range(radius + 1, min(64, 3 * radius + 6) + 1):
        tables = math.comb(m, radius)
        key_bits = 64 * (m - radius) / m
        cost = tables * (n + n * n / 2 * 2.0**-key_bits)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _runs_pairs(sorted_keys: np.ndarray, max_pairs: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All position pairs (i < j) within runs of equal keys, in chunks of about max_pairs."""
    # Two passes over the keys; the rest works on the (few) positions inside multi-member runs.
    inside = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])  # i where key[i] == key[i + 1]
    if not len(inside):
        return
    breaks = np.flatnonzero(np.diff(inside) != 1)
    starts = inside[np.r_[0, breaks + 1]]
    ends = inside[np.r_[breaks, len(inside) - 1]] + 2
    run_len = ends - starts
    # every position of a multi-member run, and how many later positions of its run it pairs with
    pos = np.repeat(starts, run_len) + (
        np.arange(run_len.sum()) - np.repeat(np.cumsum(run_len) - run_len, run_len)
    )
    later = np.repeat(ends, run_len) - pos - 1
    done = np.cumsum(later)
    lo = 0
    while lo < len(pos):
        before = int(done[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(done, before + max_pairs, side="right")))
        p, k = pos[lo:hi], later[lo:hi]
        total = int(k.sum())
        if total:
            x = np.repeat(p, k)
            yield x, x + 1 + (np.arange(total) - np.repeat(np.cumsum(k) - k, k))
        lo = hi


def _semantic_links(rows: pa.Table, params: DedupParams, work: Path, say) -> tuple[np.ndarray, np.ndarray]:
    column = rows.column("clip_image_embedding")
    valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
    if len(valid) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = column.combine_chunks().take(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
    emb = flat.astype(np.float32).reshape(len(valid), -1)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    k = params.clusters or max(1, round(len(valid) / 1000))
    k = min(k, len(valid))

    path = work / "kmeans.npy"
    if path.exists():
        labels = np.load(path)
    else:
        labels = spherical_kmeans(emb, k, params.iterations, params.seed)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, labels)
        os.replace(tmp, path)
    say(f"semantic: k-means with {k:,} clusters over {len(valid):,} embeddings")

    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    a_parts, b_parts = [], []
    per_file = 256  # clusters per resumable step
    for first in range(0, k, per_file):

        def compute(first: int = first) -> tuple[np.ndarray, np.ndarray]:
            a, b = [], []
            for c in range(first, min(first + per_file, k)):
                members = order[bounds[c] : bounds[c + 1]]
                x, y = _close_pairs(emb[members], 1.0 - params.eps)
                a.append(members[x])
                b.append(members[y])
            return np.concatenate(a), np.concatenate(b)

        a, b = _cached(work / f"semantic-{first:07d}.npz", compute)
        a_parts.append(valid[a])
        b_parts.append(valid[b])
    return np.concatenate(a_parts), np.concatenate(b_parts)


def spherical_kmeans(emb: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """Cluster labels of unit vectors by cosine k-means, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    centroids = emb[np.sort(rng.choice(len(emb), size=k, replace=False))].copy()
    labels = np.full(len(emb), -1, np.int64)
    for _ in range(iterations):
        new = np.concatenate(
            [np.argmax(emb[i : i + 65536] @ centroids.T, axis=1) for i in range(0, len(emb), 65536)]
        )
        if np.array_equal(new, labels):
            break
        labels = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, emb)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        # an emptied cluster keeps its old centroid
        centroids = np.where(norms > 0, sums / np.maximum(norms, 1e-12), centroids)
    return labels


def _close_pairs(emb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows with cosine > threshold, in row blocks so memory stays bounded."""
    n = len(emb)
    a, b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    step = max(1, min(n, 2**24 // max(n, 1)))
    for i in range(0, n, step):
        sims = emb[i : i + step] @ emb.T
        x, y = np.nonzero(sims > threshold)
        x = x + i
        keep = x < y
        a.append(x[keep].astype(np.int64))
        b.append(y[keep].astype(np.int64))
    return np.concatenate(a), np.concatenate(b)


# ---------------------------------------------------------------------------- groups


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label (the smallest member index) of each of n nodes, given edges a-b."""
    parent = np.arange(n)
    while len(a):
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        ra, rb = ra[differ], rb[differ]
        lo = np.minimum(ra, rb)
        # hook the larger root under the smaller; ra and rb are roots after the full compression below
        np.minimum.at(parent, np.maximum(ra, rb), lo)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        a, b = a[differ], b[differ]
    return parent


def _groups(
    rows: pa.Table, links: list[tuple[np.ndarray, np.ndarray, int]]
) -> tuple[pa.Table, dict[str, int]]:
    n = rows.num_rows
    a = np.concatenate([x for x, _, _ in links]) if links else np.zeros(0, np.int64)
    b = np.concatenate([y for _, y, _ in links]) if links else np.zeros(0, np.int64)
    label = components(n, a, b)
    kind = np.full(n, len(KINDS), np.int64)
    for x, y, code in links:
        np.minimum.at(kind, x, code)
        np.minimum.at(kind, y, code)
    size = np.bincount(label, minlength=n)
    member = np.flatnonzero(size[label] > 1)

    # the representative rule, as a sort: kept, clip_score desc, pixels desc, uid asc
    keys = [np.arange(n)]  # rows are ordered by uid
    pixels = _pixels(rows)
    if pixels is not None:
        keys.append(-np.nan_to_num(pixels, nan=-1.0))
    if "clip_score" in rows.column_names:
        keys.append(
            -np.nan_to_num(
                rows.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64), nan=-2.0
            )
        )
    keys.append(~rows.column("keep").to_numpy(zero_copy_only=False).astype(bool))
    keys.append(label)
    order = np.lexsort(keys)  # last key is the primary one: group, then the rule
    order = order[size[label[order]] > 1]
    # (an empty `order`, a run without duplicates, must give empty columns, not one stray True)
    group_start = np.r_[True, label[order][1:] != label[order][:-1]] if len(order) else np.zeros(0, bool)
    starts = np.flatnonzero(group_start)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    # groups are numbered in the order of their smallest uid
    group_no = np.cumsum(group_start) - 1
    table = pa.table(
        {
            "uid": rows.column("uid").take(pa.array(order)),
            "dup_group": pa.array(group_no, pa.int64()),
            "dup_rank": pa.array(rank, pa.int32()),
            "dup_keep": pa.array(rank == 0),
            "dup_kind": pa.array([KINDS[k] for k in kind[order]], pa.string()),
        }
    )
    counts = {k: int((kind[member] == code).sum()) for code, k in enumerate(KINDS)}
    return table, counts


def _pixels(rows: pa.Table) -> np.ndarray | None:
    """Original image area: img2dataset's original size, else (image inputs) the image_size stage's."""

    def col(name: str) -> np.ndarray:
        return rows.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

    if "original_width" in rows.column_names:
        return col("original_width") * col("original_height")
    if "min_side" in rows.column_names:
        return col("min_side") ** 2 * col("aspect_ratio")
    return None


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
