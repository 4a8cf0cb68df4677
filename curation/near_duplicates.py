"""Duplicate-finding algorithms over arrays: `curate dedup` (curation/dedup.py) runs them over a run.

- exact: same image bytes and same cleaned caption (`exact_pairs`);
- phash: 64-bit hashes at most r bits apart (`near_pairs`);
- semantic: SemDeDup's spherical k-means, then close pairs within each cluster
  (`spherical_kmeans`, `close_pairs`);
- groups: connected components of all links, ranked by the representative rule
  (`components`, `rank_groups`).

Near-duplicate hashes are found without comparing all pairs, and without
missing any pair within the radius (the pigeonhole rule of Manku et al.,
"Detecting near-duplicates for web crawling", WWW 2007): split the 64 bits
into m blocks; two hashes at most r bits apart differ in at most r blocks, so
they agree exactly on at least m - r of them. For every choice of m - r blocks,
sort the hashes by those blocks and compare only hashes that agree on them.
m is chosen per run from a cost model (more blocks: more sorts, far fewer
candidate pairs). Identical hashes are collapsed first, so a million copies of
one image cost one entry.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import combinations, pairwise

import numpy as np
import pyarrow as pa

from curation.core.text import clean_caption

# The columns the representative rule reads (besides the row's position in uid order).
RULE_COLUMNS = ("keep", "clip_score", "original_width", "original_height", "min_side", "aspect_ratio")


def exact_pairs(
    sha256: pa.ChunkedArray | pa.Array, captions: pa.ChunkedArray | pa.Array
) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs with the same image bytes and the same caption after `clean_caption`, each linked to
    the first row of its kind."""
    import pyarrow.compute as pc

    if not len(sha256):  # (`curate dedup` passes only the rows whose sha256 repeats: maybe none)
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Only rows whose image bytes repeat need their caption cleaned and compared.
    codes = pc.dictionary_encode(sha256).combine_chunks().indices
    valid = codes.is_valid().to_numpy(zero_copy_only=False)
    code = codes.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    repeated = np.flatnonzero(valid & (np.bincount(code[valid], minlength=int(code.max()) + 2)[code] > 1))
    texts = captions.take(pa.array(repeated)).to_pylist() if len(repeated) else []
    first: dict[tuple[int, str], int] = {}
    a, b = [], []
    for i, caption in zip(repeated.tolist(), texts):
        j = first.setdefault((int(code[i]), clean_caption(caption)), i)
        if j != i:
            a.append(j)
            b.append(i)
    return np.array(a, np.int64), np.array(b, np.int64)


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
    del inverse  # 8 bytes a row, not needed by the block tables
    if blocks is not None and blocks <= radius:
        raise ValueError(f"blocks must exceed the radius ({radius}), got {blocks}")
    if radius > 0 and len(values) > 1:
        edges = _block_edges(blocks if blocks is not None else choose_blocks(len(values), radius))
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
            del order, sorted_keys  # before the next table's arrays are made
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
    # In place, one temporary at a time: at 10^8 hashes each array of them is 800 MB.
    key = np.zeros(len(values), np.uint64)
    part = np.empty_like(key)
    width = 0
    for lo, hi in chosen:
        np.right_shift(values, np.uint64(lo), out=part)
        part &= np.uint64((1 << (hi - lo)) - 1)
        part <<= np.uint64(width)
        key |= part
        width += hi - lo
    del part
    room = 64 - idx_bits
    if width > room:
        key *= _GOLDEN  # wraps mod 2^64
        key >>= np.uint64(64 - room)
    key <<= np.uint64(idx_bits)
    key |= np.arange(len(values), dtype=np.uint64)
    key.sort()
    order = (key & np.uint64((1 << idx_bits) - 1)).view(np.int64)
    key >>= np.uint64(idx_bits)
    return order, key


def choose_blocks(n: int, radius: int) -> int:
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


def close_pairs(emb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
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


def rank_groups(
    rows: pa.Table, links: list[tuple[np.ndarray, np.ndarray, int]], kinds: Sequence[str]
) -> tuple[pa.Table, dict[str, int]]:
    """Groups (connected components of all links) with each row's rank under the representative rule.

    `rows` are in uid order (a row's position breaks the rule's ties); `links`: (a, b, code) per kind,
    code indexing `kinds` (strictest first: a row's dup_kind is its strictest link). Returns the dedup
    table of the rows in a group of >= 2, with `row` (the position in `rows`) where the uid goes, and
    the member count per kind. Arrays over all rows: the components' labels and counts (~25 bytes a
    row at the peak); the rule's columns are read for the members only.
    """
    n = rows.num_rows
    a = np.concatenate([x for x, _, _ in links]) if links else np.zeros(0, np.int64)
    b = np.concatenate([y for _, y, _ in links]) if links else np.zeros(0, np.int64)
    label = components(n, a, b)
    member = np.flatnonzero(np.bincount(label, minlength=n)[label] > 1)
    kind = np.full(n, len(kinds), np.int8)
    for x, y, code in links:
        np.minimum.at(kind, x, code)
        np.minimum.at(kind, y, code)
    kind, label = kind[member], label[member]
    rule = rows.select([c for c in RULE_COLUMNS if c in rows.column_names]).take(pa.array(member))

    # the representative rule, as a sort: kept, clip_score desc, pixels desc, position (uid) asc
    keys = [member]
    pixels = _pixels(rule)
    if pixels is not None:
        keys.append(-np.nan_to_num(pixels, nan=-1.0))
    if "clip_score" in rule.column_names:
        keys.append(
            -np.nan_to_num(
                rule.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64), nan=-2.0
            )
        )
    keys.append(~rule.column("keep").to_numpy(zero_copy_only=False).astype(bool))
    keys.append(label)
    order = np.lexsort(keys)  # last key is the primary one: group, then the rule
    # (an empty `order`, a run without duplicates, must give empty columns, not one stray True)
    group_start = np.r_[True, label[order][1:] != label[order][:-1]] if len(order) else np.zeros(0, bool)
    starts = np.flatnonzero(group_start)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    # groups are numbered in the order of their smallest uid
    group_no = np.cumsum(group_start) - 1
    table = pa.table(
        {
            "row": pa.array(member[order], pa.int64()),
            "dup_group": pa.array(group_no, pa.int64()),
            "dup_rank": pa.array(rank, pa.int32()),
            "dup_keep": pa.array(rank == 0),
            "dup_kind": pa.array([kinds[k] for k in kind[order]], pa.string()),
        }
    )
    counts = {k: int((kind == code).sum()) for code, k in enumerate(kinds)}
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
