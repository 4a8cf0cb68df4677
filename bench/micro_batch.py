"""GradCache micro-batches vs the unsplit step at the same contrastive batch: peak memory and step time.

Each configuration runs in its own process (peak RSS is a process-wide high-water mark on
CPU; on CUDA the peak allocation is reset per process anyway): the model is built, one
warm-up step taken, then --steps timed steps of `train.loop.forward_backward` + AdamW on
random inputs. Peak memory is counted above the level after the model and the inputs exist,
so it is the step's own (activations, logits, gradients, optimizer state). Ratios are against
the unsplit step measured in the same run. On the CPU the step time is the process's CPU
time with one torch thread (wall time on a shared machine measures the other jobs; CPU time
of one thread does not), on CUDA the wall time.

    nice -n 10 python bench/micro_batch.py                                    # CPU, curate-tiny, batch 512
    python bench/micro_batch.py --model ViT-B-32 --batch-size 1024 --micro 256 128 --precision bf16   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _peak_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one(args: argparse.Namespace, micro: int | None) -> dict:
    """One configuration, in this process."""
    import torch

    from curation.models.clip import build_model
    from train.loop import forward_backward, resolve_precision
    from train.losses import HardNegativeMarginLoss, TrainingObjective, build_loss

    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cpu":
        torch.set_num_threads(1)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    torch.manual_seed(0)
    built = build_model(args.model, device=device)
    model = built.model
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    g = torch.Generator().manual_seed(0)
    b = args.batch_size
    partners = torch.zeros(b, b, dtype=torch.bool)
    for i in range(b // 2):
        partners[i, b // 2 + i] = partners[b // 2 + i, i] = True
    ctx = model.context_length if hasattr(model, "context_length") else 77
    batch = {
        "image": torch.randn(b, 3, size, size, generator=g).to(device),
        "text": torch.randint(1, 1000, (b, ctx), generator=g).to(device),
        "partners": partners.to(device),
    }
    objective = TrainingObjective(build_loss(args.loss), margin=HardNegativeMarginLoss(0.3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    precision = resolve_precision(args.precision, device)

    def step() -> None:
        forward_backward(model, objective, batch, micro, precision)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_bytes(device)
    step()  # warm-up: allocations, optimizer state
    times = []
    for _ in range(args.steps):
        t0 = clock()
        step()
        times.append(clock() - t0)
    return {
        "micro_batch": micro,
        "step_s": statistics.median(times),
        "peak_mb": (_peak_bytes(device) - (0 if device.type == "cuda" else base)) / 2**20,
        "device": str(device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="curate-tiny")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--micro", type=int, nargs="+", default=[128, 32])
    ap.add_argument("--loss", default="hn_nce")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: 0 = unsplit
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args, args.one or None)))
        return
    rows = []
    for micro in [0, *args.micro]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", str(micro)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    clock = "wall" if base["device"].startswith("cuda") else "CPU, 1 thread"
    print(
        f"model {args.model}, contrastive batch {args.batch_size}, {args.loss}+hnml, {base['device']}, {clock}"
    )
    print(f"{'micro_batch':>12} {'step s':>8} {'peak MB':>9} {'time ratio':>11} {'memory ratio':>13}")
    for r in rows:
        print(
            f"{r['micro_batch'] or 'unsplit'!s:>12} {r['step_s']:8.3f} {r['peak_mb']:9.1f} "
            f"{r['step_s'] / base['step_s']:11.2f} {r['peak_mb'] / base['peak_mb']:13.2f}"
        )


if __name__ == "__main__":
    main()
