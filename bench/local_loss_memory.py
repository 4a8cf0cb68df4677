"""Local vs global contrastive loss: memory per rank as the simulated world size N grows.

One rank's loss computation at world size N, without N processes: the gathered features
are random [N·B, d] tensors (what all_gather returns), the rank's own B rows are a slice.
Global = every rank computes the whole N·B x N·B logits (what `local_loss=False` does);
local = the rank's B x N·B rows (the default, exact: train/losses.py). Forward and backward
of InfoNCE, HN-NCE and the hard negative margin loss, each configuration in its own process;
peak memory above the inputs (CUDA: max allocated; CPU: peak RSS).

    nice -n 10 python bench/local_loss_memory.py                       # CPU, B=64 per rank, N up to 64
    python bench/local_loss_memory.py --per-rank 256 --world 8 32 128 512   # GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one(args: argparse.Namespace, world: int, local: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from train.losses import HardNegativeMarginLoss, HNNCELoss, InfoNCELoss

    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    b, n = args.per_rank, args.per_rank * world
    g = torch.Generator().manual_seed(0)
    all_image = F.normalize(torch.randn(n, args.dim, generator=g), dim=-1).to(device).requires_grad_()
    all_text = F.normalize(torch.randn(n, args.dim, generator=g), dim=-1).to(device).requires_grad_()
    partners = torch.zeros(b, b, dtype=torch.bool)
    for i in range(b // 2):
        partners[i, b // 2 + i] = partners[b // 2 + i, i] = True
    rank = world // 2
    first = rank * b
    if local:
        hard = torch.zeros(b, n, dtype=torch.bool)
        hard[:, first : first + b] = partners
        rows_i, rows_t, offset = all_image[first : first + b], all_text[first : first + b], first
    else:
        hard = torch.block_diag(*[partners] * world)
        rows_i, rows_t, offset = all_image, all_text, 0
    hard = hard.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    scale = torch.tensor(1 / 0.07, device=device)
    loss = InfoNCELoss().rows_loss(rows_i, rows_t, all_image, all_text, offset, scale)
    loss = loss + HNNCELoss().rows_loss(rows_i, rows_t, all_image, all_text, offset, scale)
    loss = loss + HardNegativeMarginLoss(0.3).rows_loss(rows_i, all_text, hard, offset)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - 2 * all_image.numel() * 4
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"world": world, "local": local, "peak_mb": peak / 2**20, "s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-rank", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--world", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--one", nargs=2, type=int, default=None, help=argparse.SUPPRESS)  # child: world, local
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args, args.one[0], bool(args.one[1]))))
        return
    print(f"B={args.per_rank} per rank, d={args.dim}; InfoNCE + HN-NCE + HNML forward+backward, one rank")
    print(f"{'N ranks':>8} {'global B':>9} {'global MB':>10} {'local MB':>9} {'local/global':>13}")
    first_local = None
    for world in args.world:
        res = {}
        for local in (0, 1):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", str(world), str(local)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[local] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
        first_local = first_local or (world, res[1])
        print(f"{world:>8} {world * args.per_rank:>9} {res[0]:10.1f} {res[1]:9.1f} {res[1] / res[0]:13.3f}")
    print(f"local MB grows {res[1] / first_local[1]:.1f}x for {world / first_local[0]:.0f}x the ranks")


if __name__ == "__main__":
    main()
