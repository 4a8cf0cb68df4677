"""Hard-pair mining speed: exact blocked search vs the naive full-matrix top-k vs FAISS flat IP.

Synthetic L2-normalised embeddings (d=512, clustered, seeded; see `_embeddings`), k=50, near_duplicate=0.98.
Each measurement runs in a fresh subprocess so its peak memory (VmHWM) is its own; the
embeddings are generated before the clock starts. The exact search's process also measures this
machine's torch.mm peak on the search's block shape (best of 5) right before and right after
the search (their mean is the peak: load from other processes hits both alike), and reports the exact search's achieved matmul FLOP/s against it:

    useful FLOPs = 2 matmuls x 2·Q·N·d   (Q queries against N candidates)

Where a configuration would take too long on this machine, the search runs on the first
--queries-subset queries (against all N candidates) and the table says "subset"; the full-run
time is then Q_total/Q x the measured time (an extrapolation, marked as such). The naive
baseline (full N x N similarity matrices + torch.topk) is run where its matrices fit in
--naive-max-gb; beyond that its memory need is computed, not measured.

    python bench/mining.py                           # 10k, 100k, 1M on this machine (~30 min on 2 cores)
    python bench/mining.py --sizes 10000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

K, D, NEAR_DUP = 50, 512, 0.98


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _embeddings(n: int, seed: int = 0, clusters: int = 1000):
    """Clustered like real data: each pair belongs to one of `clusters` concepts (image and text
    centres of a concept are independent), plus Gaussian noise of the centre's norm, so pairs of
    one concept have cosine ~0.5 in each space and other pairs ~0. Built in chunks, in place, so
    the process's peak memory is the two [n, d] matrices plus what the search itself takes."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, clusters, (n,), generator=g)
    out = []
    for _ in range(2):
        centres = F.normalize(torch.randn(clusters, D, generator=g), dim=1)
        emb = torch.empty(n, D)
        for s in range(0, n, 65536):
            chunk = emb[s : s + 65536]
            torch.randn(chunk.shape, generator=g, out=chunk)
            chunk.div_(D**0.5).add_(centres[label[s : s + 65536]])
            chunk.div_(chunk.norm(dim=1, keepdim=True))
        out.append(emb)
    return out[0], out[1]


def _naive(u, v, k: int, near_duplicate: float):
    """What a user would write: full similarity matrices, mask, torch.topk."""
    su, sv = u @ u.T, v @ v.T
    score = su * sv
    score[(su > near_duplicate) | (sv > near_duplicate)] = float("-inf")
    score.fill_diagonal_(float("-inf"))
    return score.topk(k, dim=1)


def one(method: str, n: int, queries: int, out: str | None) -> None:
    """Child process: one timed search; prints a JSON record."""
    import torch

    from train.mining.search import mine_hard_pairs

    u, v = _embeddings(n)
    base_rss = _peak_rss_mb()
    peak_before = mm_peak() if method == "exact" else None
    t = time.perf_counter()
    if method == "naive":
        scores, idx = _naive(u, v, K, NEAR_DUP)
    elif method == "exact":
        idx, scores = mine_hard_pairs(u, v, K, NEAR_DUP, queries=range(queries))
    elif method == "faiss":
        idx, scores = mine_hard_pairs(u, v, K, NEAR_DUP, method="faiss", queries=range(queries))
    elif method.startswith("pool"):
        pool = int(method.split(":")[1])
        idx, scores = mine_hard_pairs(
            u, v, K, NEAR_DUP, method="pool", pool_size=pool, pool_refresh=queries, queries=range(queries)
        )
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t
    peak_after = mm_peak() if method == "exact" else None
    if out:
        torch.save({"idx": idx[:queries], "scores": scores[:queries]}, out)
    print(
        json.dumps(
            {
                "method": method,
                "n": n,
                "queries": queries,
                "seconds": seconds,
                "peak_rss_mb": _peak_rss_mb(),
                "embeddings_rss_mb": base_rss,
                "threads": torch.get_num_threads(),
                # torch.mm's GFLOP/s on the search's block shape, right before and right after it
                "mm_peak_gflops": None if peak_before is None else (peak_before + peak_after) / 2,
                "mm_peak_before_after": [peak_before, peak_after],
            }
        )
    )


def mm_peak(bq: int = 2048, bc: int = 16384, reps: int = 5) -> float:
    """Best-of-reps GFLOP/s of torch.mm on the exact search's block shape ([bq,d] @ [d,bc])."""
    import torch

    a, b = torch.randn(bq, D), torch.randn(bc, D)
    out = torch.empty(bq, bc)
    torch.mm(a, b.T, out=out)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b.T, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * bq * bc * D / best / 1e9


def run_child(method: str, n: int, queries: int, out: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", method, str(n), str(queries)] + (["--save", out] if out else [])
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def recall(a_path: str, b_path: str) -> float:
    """Fraction of the exact top-k (valid entries) that the other search also returned."""
    import torch

    a, b = torch.load(a_path)["idx"], torch.load(b_path)["idx"]
    hit = total = 0
    for x, y in zip(a.tolist(), b.tolist()):
        xs = {i for i in x if i >= 0}
        hit += len(xs & set(y))
        total += len(xs)
    return hit / total if total else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=3, metavar=("METHOD", "N", "QUERIES"), help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument(
        "--queries-subset", type=int, default=4096, help="queries timed where a full run is too long"
    )
    p.add_argument(
        "--full-exact-max", type=int, default=100_000, help="largest N whose exact search runs in full"
    )
    p.add_argument(
        "--faiss-full-max", type=int, default=10_000, help="largest N whose FAISS search runs in full"
    )
    p.add_argument("--faiss-max", type=int, default=100_000, help="largest N searched with FAISS (memory)")
    p.add_argument("--naive-max-gb", type=float, default=6.0, help="run the naive baseline only below this")
    p.add_argument(
        "--pool", type=int, default=100_000, help="pool size for the pool-mode row at the largest N"
    )
    p.add_argument("--json", help="also write the records here")
    a = p.parse_args()
    if a.one:
        one(a.one[0], int(a.one[1]), int(a.one[2]), a.save)
        return

    import tempfile

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in a.sizes.split(",")]:
            full = n <= a.full_exact_max
            q = n if full else min(n, a.queries_subset)
            rows = []
            ex = run_child("exact", n, q, f"{tmp}/exact-{n}.pt")
            rows.append(ex)
            naive_gb = 3 * n * n * 4 / 2**30 + n * n / 2**30  # su, sv, score (fp32) + the bool mask
            if naive_gb <= a.naive_max_gb:
                rows.append(run_child("naive", n, n))
            else:
                rows.append({"method": "naive", "n": n, "skipped": f"needs ~{naive_gb:,.0f} GiB"})
            fq = n if n <= a.faiss_full_max else min(n, a.queries_subset)
            if n > a.faiss_max:
                # the index copies [u, v] (8 bytes x 2d per pair) beside the embeddings: 12 GB at 1M
                rows.append({"method": "faiss", "n": n, "skipped": f"--faiss-max {a.faiss_max:,} (memory)"})
            else:
                fx = run_child("faiss", n, fq, f"{tmp}/faiss-{n}.pt")
                if fq != q:  # compare on the same queries
                    run_child("exact", n, fq, f"{tmp}/exact-{n}-f.pt")
                    fx["recall_vs_exact"] = recall(f"{tmp}/exact-{n}-f.pt", f"{tmp}/faiss-{n}.pt")
                else:
                    fx["recall_vs_exact"] = recall(f"{tmp}/exact-{n}.pt", f"{tmp}/faiss-{n}.pt")
                rows.append(fx)
            if n > a.pool:
                px = run_child(f"pool:{a.pool}", n, q, f"{tmp}/pool-{n}.pt")
                px["recall_vs_exact"] = recall(f"{tmp}/exact-{n}.pt", f"{tmp}/pool-{n}.pt")
                rows.append(px)
            for r in rows:
                if "seconds" in r:
                    r["queries_per_s"] = r["queries"] / r["seconds"]
                    r["scored_pairs_per_s"] = r["queries"] * n / r["seconds"]
                    r["extrapolated_full_s"] = None if r["queries"] == n else r["seconds"] * n / r["queries"]
                if r["method"] == "exact":
                    r["achieved_gflops"] = 4 * r["queries"] * n * D / r["seconds"] / 1e9
                    r["fraction_of_mm_peak"] = r["achieved_gflops"] / r["mm_peak_gflops"]
                print(json.dumps(r), flush=True)
            records += rows
    print()
    print(f"load average at end: {Path('/proc/loadavg').read_text().strip()}")
    hdr = "| N | method | queries timed | s | queries/s | scored pairs/s | peak RSS MB | GFLOP/s (% of mm peak, same process) | recall | full-run s |"
    print(hdr)
    print("|---" * 10 + "|")
    for r in records:
        if "skipped" in r:
            print(f"| {r['n']:,} | {r['method']} | - | - | - | - | - | - | - | not run: {r['skipped']} |")
            continue
        eff = (
            f"{r['achieved_gflops']:.0f} of {r['mm_peak_gflops']:.0f} ({100 * r['fraction_of_mm_peak']:.0f}%)"
            if "achieved_gflops" in r
            else "-"
        )
        rec = f"{r['recall_vs_exact']:.3f}" if "recall_vs_exact" in r else "-"
        ext = (
            f"~{r['extrapolated_full_s']:,.0f} (extrapolated)"
            if r["extrapolated_full_s"]
            else f"{r['seconds']:.1f}"
        )
        print(
            f"| {r['n']:,} | {r['method']} | {r['queries']:,} | {r['seconds']:.2f} | {r['queries_per_s']:,.0f} | "
            f"{r['scored_pairs_per_s']:.3g} | {r['peak_rss_mb']:,.0f} | {eff} | {rec} | {ext} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
