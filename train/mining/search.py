"""Hard-pair mining (HELIP, docs/methods.md §3a) over in-memory embeddings.

For pairs i (query) and j (candidate) with L2-normalised image embeddings u and
text embeddings v:

    score_ij = <u_i, u_j> · <v_i, v_j>

j = i and near-duplicates (<u_i,u_j> > near_duplicate or <v_i,v_j> > near_duplicate)
are never hard pairs. A pair's hard pairs are its k best candidates by score,
in descending order.

Three searches behind one function, `mine_hard_pairs`:

- "exact": a blocked matrix product with a running top-k. Memory is bounded by
  the blocks (three query_block x candidate_block float matrices), not by N²;
  it runs on CUDA when present, else on the CPU's BLAS.
- "pool": for very large sets, each run of `pool_refresh` consecutive queries
  is searched exactly against a random pool of `pool_size` candidates (drawn
  without replacement, seeded by the run's index, so the result does not depend
  on how queries are split between tasks). With pool_size >= N it is "exact".
- "faiss": an inner-product FAISS index over [u, v]/√2 (so <.,.> is the mean of
  the two cosines) returns `faiss_candidates`·k + `faiss_extra` candidates per
  query, which are then re-scored exactly with the product and filtered. The
  mean ranks differently from the product, so this is approximate; its recall
  against "exact" is measured in bench/mining.py.

Rows with fewer than k valid candidates (N <= k, or a row whose candidates are
mostly near-duplicates) are padded at the end with index -1 and score -inf.

`mine_hard_pairs_ray` splits the queries into blocks run as Ray tasks over one
shared copy of the embeddings in Ray's object store.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from curation.core.devices import resolve_device

__all__ = ["Method", "mine_hard_pairs", "mine_hard_pairs_ray"]

Method = Literal["exact", "pool", "faiss"]
PAD = -1


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(resolve_device("auto" if device is None else str(device)))


def _check(image_emb: torch.Tensor, text_emb: torch.Tensor, k: int) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(
            f"expected image and text embeddings [N, d] with the same N, got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def mine_hard_pairs(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    k: int = 50,
    near_duplicate: float = 0.98,
    *,
    method: Method = "exact",
    queries: range | None = None,
    device: str | torch.device | None = None,
    query_block: int = 2048,
    candidate_block: int = 16384,
    pool_size: int = 3_000_000,
    pool_refresh: int = 100_000,
    seed: int = 0,
    faiss_index: str = "Flat",
    faiss_candidates: int = 4,
    faiss_extra: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k hard pairs of every query: (indices int64 [Q, k], scores [Q, k]), on the CPU.

    `image_emb`, `text_emb`: L2-normalised [N, d_img] and [N, d_txt] (any float dtype; scores keep it).
    `queries`: the query rows (a range of 0..N-1, default all; candidates are always all N),
    so a caller can split the work. Padding: index -1, score -inf. See the module docstring.
    """
    _check(image_emb, text_emb, k)
    n = image_emb.shape[0]
    queries = range(n) if queries is None else queries
    if queries.step != 1 or queries.start < 0 or queries.stop > n:
        raise ValueError(f"queries must be a contiguous range within 0..{n}, got {queries}")
    dev = _device(device)
    if method == "faiss":
        return _faiss_search(image_emb, text_emb, k, near_duplicate, queries, faiss_index,
                             faiss_candidates, faiss_extra, query_block)  # fmt: skip
    if method not in ("exact", "pool"):
        raise ValueError(f"unknown method {method!r}; expected 'exact', 'pool' or 'faiss'")
    if method == "pool" and pool_size < n:
        if pool_refresh < 1 or pool_size < 1:
            raise ValueError("pool_size and pool_refresh must be >= 1")
        parts = []
        # Pools belong to global runs of pool_refresh queries: any split of the queries sees the same pools.
        for run in range(queries.start // pool_refresh, math.ceil(queries.stop / pool_refresh)):
            lo, hi = max(queries.start, run * pool_refresh), min(queries.stop, (run + 1) * pool_refresh)
            g = torch.Generator().manual_seed(seed * 1_000_003 + run)
            pool = torch.randperm(n, generator=g)[:pool_size].sort().values
            parts.append(_exact(image_emb, text_emb, k, near_duplicate, range(lo, hi), pool, dev,
                                query_block, candidate_block))  # fmt: skip
        if not parts:
            return torch.empty(0, k, dtype=torch.int64), torch.empty(0, k, dtype=image_emb.dtype)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return _exact(image_emb, text_emb, k, near_duplicate, queries, None, dev, query_block, candidate_block)


# --------------------------------------------------------------------------- exact blocked search


def _candidate_blocks(
    n: int, pool: torch.Tensor | None, size: int
) -> Iterator[tuple[torch.Tensor | None, int, int]]:
    """(pool ids of the block or None for a contiguous slice, start, stop)."""
    total = n if pool is None else pool.numel()
    for start in range(0, total, size):
        stop = min(total, start + size)
        yield (None if pool is None else pool[start:stop]), start, stop


def _exact(
    u: torch.Tensor,
    v: torch.Tensor,
    k: int,
    near_duplicate: float,
    queries: range,
    pool: torch.Tensor | None,
    dev: torch.device,
    query_block: int,
    candidate_block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, dtype = u.shape[0], u.dtype
    out_idx = torch.full((len(queries), k), PAD, dtype=torch.int64)
    out_score = torch.full((len(queries), k), float("-inf"), dtype=dtype)
    if len(queries) == 0:
        return out_idx, out_score
    # Candidates live on the device once (copied per block when they are a random pool).
    uc_all, vc_all = (u.to(dev), v.to(dev)) if pool is None else (u, v)
    bq = min(query_block, len(queries))
    bc = min(candidate_block, n if pool is None else pool.numel())
    # Preallocated block buffers: no allocation (or page faults) per block.
    su = torch.empty(bq, bc, dtype=dtype, device=dev)
    sv = torch.empty(bq, bc, dtype=dtype, device=dev)
    score = torch.empty(bq, bc, dtype=dtype, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=dev)
    for q0 in range(queries.start, queries.stop, bq):
        q1 = min(queries.stop, q0 + bq)
        b = q1 - q0
        uq, vq = u[q0:q1].to(dev), v[q0:q1].to(dev)
        q_ids = torch.arange(q0, q1, device=dev)
        best_s = torch.full((b, k), float("-inf"), dtype=dtype, device=dev)
        best_i = torch.full((b, k), PAD, dtype=torch.int64, device=dev)
        for ids, c0, c1 in _candidate_blocks(n, pool, bc):
            c = c1 - c0
            if ids is None:
                uc, vc = uc_all[c0:c1], vc_all[c0:c1]
                c_ids = torch.arange(c0, c1, device=dev)
            else:
                uc, vc = u.index_select(0, ids).to(dev), v.index_select(0, ids).to(dev)
                c_ids = ids.to(dev)
            bsu, bsv, bs = su[:b, :c], sv[:b, :c], score[:b, :c]
            torch.mm(uq, uc.T, out=bsu)
            torch.mm(vq, vc.T, out=bsv)
            torch.mul(bsu, bsv, out=bs)
            _exclude_self(bs, q_ids, c_ids, neg_inf)
            top_s, top_i = _block_topk(bs, bsu, bsv, k, near_duplicate, neg_inf)
            merged_s = torch.cat([best_s, top_s], dim=1)
            merged_i = torch.cat([best_i, torch.where(top_i >= 0, c_ids[top_i.clamp(min=0)], PAD)], dim=1)
            best_s, pos = merged_s.topk(k, dim=1)
            best_i = merged_i.gather(1, pos)
        best_i[best_s == float("-inf")] = PAD
        out_idx[q0 - queries.start : q1 - queries.start] = best_i.cpu()
        out_score[q0 - queries.start : q1 - queries.start] = best_s.cpu()
    return out_idx, out_score


def _exclude_self(
    score: torch.Tensor, q_ids: torch.Tensor, c_ids: torch.Tensor, neg_inf: torch.Tensor
) -> None:
    """score[r, j] = -inf where candidate j is query r itself (c_ids is sorted)."""
    pos = torch.searchsorted(c_ids, q_ids).clamp(max=c_ids.numel() - 1)
    rows = torch.nonzero(c_ids[pos] == q_ids).squeeze(1)
    score[rows, pos[rows]] = neg_inf


def _block_topk(
    score: torch.Tensor,
    su: torch.Tensor,
    sv: torch.Tensor,
    k: int,
    near_duplicate: float,
    neg_inf: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's k best non-near-duplicate candidates per row (positions in the block; -1 = none).

    Fast path: take the 2k best by score and test only those for near-duplicates (most candidates
    can never enter a top-k, so masking all of them would cost more than the top-k itself). Rows
    where more than k of those 2k are near-duplicates are redone with the whole row masked.
    """
    c = score.shape[1]
    m = min(c, 2 * k)
    cand_s, cand_i = score.topk(m, dim=1)
    dup = (su.gather(1, cand_i) > near_duplicate) | (sv.gather(1, cand_i) > near_duplicate)
    cand_s = cand_s.masked_fill(dup, float("-inf"))
    # Invalid: near-duplicates, and the query itself (already -inf in `score`).
    invalid = cand_s == float("-inf")
    redo = torch.nonzero(invalid.sum(dim=1) > m - k).squeeze(1) if m < c else cand_s.new_empty(0).long()
    if redo.numel():
        rs = score[redo]
        rs.masked_fill_((su[redo] > near_duplicate) | (sv[redo] > near_duplicate), neg_inf)
        r_s, r_i = rs.topk(m, dim=1)
        cand_s[redo], cand_i[redo] = r_s, r_i
    kk = min(k, m)
    top_s, pos = cand_s.topk(kk, dim=1)
    top_i = cand_i.gather(1, pos).masked_fill(top_s == float("-inf"), PAD)
    if kk < k:  # a block narrower than k
        pad = k - kk
        top_s = torch.cat([top_s, top_s.new_full((top_s.shape[0], pad), float("-inf"))], dim=1)
        top_i = torch.cat([top_i, top_i.new_full((top_i.shape[0], pad), PAD)], dim=1)
    return top_s, top_i


# --------------------------------------------------------------------------- FAISS


def _faiss_search(
    u: torch.Tensor,
    v: torch.Tensor,
    k: int,
    near_duplicate: float,
    queries: range,
    index_spec: str,
    oversample: int,
    extra: int,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss

    n = u.shape[0]
    joint = (torch.cat([u.float(), v.float()], dim=1) / math.sqrt(2.0)).cpu().numpy()
    index = faiss.index_factory(joint.shape[1], index_spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(joint)
    index.add(joint)
    kc = min(n, oversample * k + extra)
    out_idx = torch.full((len(queries), k), PAD, dtype=torch.int64)
    out_score = torch.full((len(queries), k), float("-inf"), dtype=u.dtype)
    # Re-scoring gathers [rows, kc, d] candidates: rows chosen to keep that near 256 MB.
    block = max(1, min(block, (64 << 20) // max(1, kc * max(u.shape[1], v.shape[1]))))
    for q0 in range(queries.start, queries.stop, block):
        q1 = min(queries.stop, q0 + block)
        _, cand = index.search(joint[q0:q1], kc)
        cand_t = torch.from_numpy(cand)
        valid = cand_t >= 0
        safe = cand_t.clamp(min=0)
        su = torch.einsum("bd,bcd->bc", u[q0:q1], u[safe])
        sv = torch.einsum("bd,bcd->bc", v[q0:q1], v[safe])
        score = (su * sv).masked_fill(~valid | (su > near_duplicate) | (sv > near_duplicate), float("-inf"))
        score.masked_fill_(cand_t == torch.arange(q0, q1)[:, None], float("-inf"))
        kk = min(k, kc)
        s, pos = score.topk(kk, dim=1)
        out_score[q0 - queries.start : q1 - queries.start, :kk] = s
        idx = cand_t.gather(1, pos).masked_fill(s == float("-inf"), PAD)
        out_idx[q0 - queries.start : q1 - queries.start, :kk] = idx
    return out_idx, out_score


# --------------------------------------------------------------------------- Ray


def _ray_block(image_np: np.ndarray, text_np: np.ndarray, start: int, stop: int, threads: int, kwargs: dict):
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        # Arrays from the object store are read-only and shared; the search never writes to them.
        warnings.simplefilter("ignore", UserWarning)
        u, v = torch.from_numpy(image_np), torch.from_numpy(text_np)
    idx, score = mine_hard_pairs(u, v, queries=range(start, stop), **kwargs)
    return idx.numpy(), score.numpy()


def mine_hard_pairs_ray(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    k: int = 50,
    near_duplicate: float = 0.98,
    *,
    queries_per_task: int = 65536,
    cpus_per_task: int = 1,
    gpus_per_task: float = 0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mine_hard_pairs` with the queries split into Ray tasks; same result as one process.

    The embeddings are put into Ray's object store once and every task reads that one copy
    (zero-copy on a node). Joins the running Ray instance if this process has one
    (`curation.engine.ray.connect` beforehand), else starts a local one. Results come back in query order.
    """
    _check(image_emb, text_emb, k)
    from curation.core.cluster import connect

    connect(None)  # a no-op when this process has joined one; never joins a running instance by itself
    import ray  # after connect(): it decides how Ray is first imported

    n = image_emb.shape[0]
    shared_u = ray.put(image_emb.contiguous().numpy())
    shared_v = ray.put(text_emb.contiguous().numpy())
    task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task)(_ray_block)
    if gpus_per_task > 0:
        kwargs.setdefault("device", "cuda")
    else:
        kwargs.setdefault("device", "cpu")
    kwargs.update(k=k, near_duplicate=near_duplicate)
    refs = [
        task.remote(shared_u, shared_v, s, min(n, s + queries_per_task), cpus_per_task, kwargs)
        for s in range(0, n, queries_per_task)
    ]
    parts = ray.get(refs)
    if not parts:
        return torch.empty(0, k, dtype=torch.int64), torch.empty(0, k, dtype=image_emb.dtype)
    return (
        torch.cat([torch.from_numpy(p[0]) for p in parts]),
        torch.cat([torch.from_numpy(p[1]) for p in parts]),
    )
