"""Near-duplicate hash grouping (`curate dedup`'s phash step) at 100k, 1M and 10M hashes vs all-pairs at 100k.

Synthetic 64-bit hashes with a realistic share of near-duplicates: 80% are
independent uniform hashes; 20% are copies of one of them with 0 bit flips
(40% of the copies: byte-identical re-posts) or 1 to radius+2 flips (re-encoded,
resized, cropped copies; some beyond the radius, which must not link).

Each size runs in a fresh process, which reports its wall and CPU time (pairs +
groups; numpy runs single-threaded here, so on a shared machine CPU time is the
steadier measure) and its peak RSS (VmHWM). The all-pairs baseline at 100k compares every pair in
blocks (popcount of XOR) and must give the same groups.

    python bench/dedup_scaling.py                   # radius 6 (curate dedup's default): 100k (+ all-pairs), 1M, 10M
    python bench/dedup_scaling.py --radius 4 --sizes 100000,1000000,10000000
    python bench/dedup_scaling.py --radius 4 --blocks 7 --baseline-size 0   # one m at every size
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic(n: int, radius: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    n_copies = n // 5
    base = rng.integers(0, 2**64, size=n - n_copies, dtype=np.uint64)
    src = base[rng.integers(0, len(base), n_copies)]
    flips = np.where(rng.random(n_copies) < 0.4, 0, rng.integers(1, radius + 3, n_copies))
    noise = np.zeros(n_copies, np.uint64)
    for k in range(1, radius + 3):  # k distinct random bits for the copies that get k flips
        rows = np.flatnonzero(flips == k)
        for _ in range(k):
            while True:
                bits = rng.integers(0, 64, len(rows)).astype(np.uint64)
                fresh = (noise[rows] >> bits) & np.uint64(1) == 0
                noise[rows[fresh]] |= np.uint64(1) << bits[fresh]
                rows_left = rows[~fresh]
                if not len(rows_left):
                    break
                rows = rows_left
    hashes = np.concatenate([base, src ^ noise])
    return hashes[rng.permutation(n)].view(np.int64)


def all_pairs(hashes, radius: int, block: int = 256):
    import numpy as np

    h = hashes.view(np.uint64)
    a, b = [], []
    for i in range(0, len(h), block):
        d = np.bitwise_count(h[i : i + block, None] ^ h[None, :])
        x, y = np.nonzero(d <= radius)
        x = x + i
        keep = x < y
        a.append(x[keep])
        b.append(y[keep])
    return np.concatenate(a), np.concatenate(b)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(n: int, radius: int, method: str, blocks: int | None = None) -> dict:
    import numpy as np

    from curation.near_duplicates import choose_blocks, components, near_pairs

    hashes = synthetic(n, radius)
    base_rss = peak_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    if method == "all-pairs":
        a, b = all_pairs(hashes, radius)
    else:
        a, b = near_pairs(hashes, radius, blocks=blocks)
    labels = components(n, a, b)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    sizes = np.bincount(labels, minlength=n)
    return {
        "n": n,
        "method": method,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": base_rss,
        "pairs": len(a),
        "rows_in_groups": int((sizes[labels] > 1).sum()),
        "groups": int((sizes > 1).sum()),
        "blocks": blocks or choose_blocks(len(np.unique(hashes)), radius),
        "labels_sha": __import__("hashlib").sha256(labels.tobytes()).hexdigest()[:16],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--radius", type=int, default=6)
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--baseline-size", type=int, default=100_000, help="all-pairs baseline size (0: none)")
    ap.add_argument("--blocks", type=int, help="fix the number of bit blocks m (default: the cost model's)")
    ap.add_argument("--one", nargs=2, metavar=("N", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.radius, args.one[1], args.blocks)))
        return

    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")
    runs = [(args.baseline_size, "all-pairs")] if args.baseline_size else []
    runs += [(int(s), "blocks") for s in args.sizes.split(",")]
    results = {}
    for n, method in runs:
        cmd = [sys.executable, __file__, "--radius", str(args.radius), "--one", str(n), method]
        cmd += ["--blocks", str(args.blocks)] if args.blocks else []
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        results[(n, method)] = r
        print(
            f"{method:>9} n={n:>10,}  {r['seconds']:8.2f} s wall  {r['cpu_seconds']:8.2f} s CPU  "
            f"peak RSS {r['peak_rss_mb']:7.0f} MB (data {r['rss_before_mb']:.0f} MB)  pairs {r['pairs']:,}  "
            f"groups {r['groups']:,} ({r['rows_in_groups']:,} rows)  m={r['blocks']}",
            flush=True,
        )
    base, fast = results.get((args.baseline_size, "all-pairs")), results.get((args.baseline_size, "blocks"))
    if base and fast:
        same = base["labels_sha"] == fast["labels_sha"]
        print(
            f"at {args.baseline_size:,}: blocks / all-pairs speed {base['seconds'] / fast['seconds']:.1f}x, same groups: {same}"
        )
    sizes = sorted(n for n, m in results if m == "blocks")
    for small, large in itertools.pairwise(sizes):
        t = results[(large, "blocks")]["seconds"] / results[(small, "blocks")]["seconds"]
        c = results[(large, "blocks")]["cpu_seconds"] / results[(small, "blocks")]["cpu_seconds"]
        print(f"{small:,} -> {large:,} ({large / small:.0f}x rows): wall time x{t:.1f}, CPU time x{c:.1f}")
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
