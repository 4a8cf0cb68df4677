"""Training throughput: curate's trainer vs open_clip's own training script, and HN-NCE's overhead.

One process, same model, batch, precision, data (Fashion-MNIST shards in `curate select`'s
layout) and DataLoader workers. The three configurations run interleaved for --rounds rounds
(ours/infonce, ours/hn_nce, open_clip_train.main) so that load from other processes on a
shared machine hits all of them alike; each round's samples/s counts only the steps after
--warmup-steps (DataLoader start, shuffle-buffer fill and first-step allocation excluded), and
the report gives the median over rounds. A second measurement times the loss alone
(forward + backward of the loss on random features) to isolate HN-NCE's own cost.

    python bench/train_throughput.py                                   # CPU, curate-tiny, batch 128
    python bench/train_throughput.py --model ViT-B-32 --precision bf16 --batch-size 256 --workers 8  # GPU
    python bench/train_throughput.py --accum 4          # contrastive batch 128 in 4 micro-batches of 32

With --accum K both trainers split each step's contrastive batch of --batch-size into K pieces
of --batch-size / K, and the runs are ours (infonce, `train.micro_batch`) and open_clip_train
(`--batch-size` / K with `--accum-freq K`); HN-NCE is not run. open_clip's accumulation keeps
the contrastive batch whole: it caches the features of K loader batches without gradients, then
re-forwards each with autograd and computes the loss over all K x (batch / K) features, stepping
the optimiser once. So both runs have the same contrastive batch and the same samples per
optimiser step (--batch-size), and both forward every sample twice; samples/s is per optimiser
step in both (open_clip's "Batch (t)" spans the K loader batches of a step).

Baseline note: open_clip_train 3.3.0 cannot read webdataset shards with webdataset 0.2.111
(its group_by_keys_nothrow raises KeyError 'fname' on the end-of-shard marker webdataset now
yields); this script turns that marker off for open_clip_train, the behaviour it was written for.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "amp": "amp"}


def ours(args: argparse.Namespace, loss: str, out: Path) -> float:
    from train.config import parse_train_config
    from train.loop import train

    cfg = parse_train_config(
        json.dumps(
            {
                "data": {"shards": args.shards, "workers": args.workers, "shuffle_buffer": 1000},
                "output_dir": str(out),
                "model": {"name": args.model},
                "loss": {"name": loss, "alpha": 1.0, "beta": 0.5},
                "optim": {"lr": 1e-3, "warmup_steps": 10, "weight_decay": 0.1},
                "train": {
                    "batch_size": args.batch_size,
                    "micro_batch": args.batch_size // args.accum if args.accum > 1 else None,
                    "steps": args.steps,
                    "precision": args.precision,
                    "log_every": args.log_every,
                    "progress": False,
                    "device": args.device,
                },
            }
        )
    )
    train(cfg)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if r["step"] > args.warmup_steps]
    # each record carries its logging window's average samples/s: per-step time = batch / sps
    return len(timed) * args.batch_size / sum(args.batch_size / r["samples_per_s"] for r in timed)


def open_clip_baseline(args: argparse.Namespace, logs: Path, name: str) -> float:
    import open_clip
    import open_clip_train.data as ocd
    from open_clip_train.main import main as oc_main
    from webdataset.tariterators import tar_file_expander

    from curation.models.clip import MODEL_CONFIG_DIR

    open_clip.add_model_config(MODEL_CONFIG_DIR)  # so "curate-tiny" resolves by name
    ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)  # see module docstring
    device = "cuda" if args.device == "auto" else args.device
    oc_main(
        [
            "--train-data",
            args.shards,
            "--dataset-type",
            "webdataset",
            "--train-num-samples",
            str(args.steps * args.batch_size),  # its loader batches are --batch-size / K: K per step
            "--epochs",
            "1",
            "--batch-size",
            str(args.batch_size // args.accum),
            "--accum-freq",
            str(args.accum),
            "--workers",
            str(args.workers),
            "--model",
            args.model,
            "--precision",
            OPEN_CLIP_PRECISION[args.precision],
            "--lr",
            "1e-3",
            "--warmup",
            "10",
            "--wd",
            "0.1",
            "--logs",
            str(logs),
            "--name",
            name,
            "--log-every-n-steps",
            str(args.log_every),
            "--report-to",
            "",
            "--save-frequency",
            "0",
            "--seed",
            "0",
            "--device",
            device,
        ]
    )
    # "Train Epoch: 0 [  640/5120 (12%)] Data (t): 0.001 Batch (t): 0.345, ..." ; Batch (t) = window mean
    # of optimiser-step times; the sample count is steps x loader batch x accum_freq = steps x --batch-size
    text = (logs / name / "out.log").read_text()
    prev, steps, seconds = 0, 0, 0.0
    for m in re.finditer(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([\d.]+)", text):
        count = int(m.group(1)) // args.batch_size
        if prev >= args.warmup_steps:
            steps += count - prev
            seconds += (count - prev) * float(m.group(2))
        prev = count
    return steps * args.batch_size / seconds


def loss_microbench(batch: int, dim: int, repeats: int, device: str) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from train.losses import HNNCELoss, InfoNCELoss

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device).requires_grad_()
    txt = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device)
    times: dict[str, list[float]] = {"infonce": [], "hn_nce": []}
    fns = {"infonce": InfoNCELoss(), "hn_nce": HNNCELoss(1.0, 0.5)}
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved, like the training runs
            t = time.perf_counter()
            fn(img, txt, scale).backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="curate-tiny")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["fp32", "bf16", "amp"], default="fp32")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--accum",
        type=int,
        default=1,
        help="K > 1: ours with train.micro_batch = batch/K vs open_clip_train --accum-freq K (no HN-NCE run)",
    )
    p.add_argument("--shards", default=None, help="default: Fashion-MNIST subset shards written under --out")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "train_throughput")
    args = p.parse_args()
    if args.warmup_steps % args.log_every:
        p.error("--warmup-steps must be a multiple of --log-every")
    if args.accum < 1 or args.batch_size % args.accum:
        p.error(f"--accum must be >= 1 and divide --batch-size ({args.batch_size})")

    import torch

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / stamp
    if args.shards is None:
        from train import fashion_mnist

        fashion_mnist.write_shards(out / "shards", "train")
        args.shards = str(out / "shards" / "{00000..00005}.tar")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(
        f"device={device} torch_threads={torch.get_num_threads()} model={args.model} batch={args.batch_size} "
        f"precision={args.precision} steps={args.steps} (timed: {args.steps - args.warmup_steps}) "
        f"workers={args.workers} rounds={args.rounds} accum={args.accum} "
        f"(micro-batch {args.batch_size // args.accum})",
        flush=True,
    )

    with_hn_nce = args.accum == 1
    results: dict[str, list[float]] = {"ours_infonce": [], "ours_hn_nce": [], "open_clip_train": []}
    if not with_hn_nce:
        del results["ours_hn_nce"]
    for r in range(args.rounds):
        results["ours_infonce"].append(ours(args, "infonce", out / f"ours_infonce_{r}"))
        if with_hn_nce:
            results["ours_hn_nce"].append(ours(args, "hn_nce", out / f"ours_hn_nce_{r}"))
        results["open_clip_train"].append(open_clip_baseline(args, out / "open_clip_logs", f"round{r}"))
        print(
            f"round {r}: " + ", ".join(f"{k}={v[-1]:.1f} samples/s" for k, v in results.items()), flush=True
        )

    med = {k: statistics.median(v) for k, v in results.items()}
    # per-round ratios: both members of a ratio ran back to back, under similar load
    ratio_oc = statistics.median(a / b for a, b in zip(results["ours_infonce"], results["open_clip_train"]))
    overhead = (
        statistics.median(a / b - 1 for a, b in zip(results["ours_infonce"], results["ours_hn_nce"]))
        if with_hn_nce
        else None
    )
    embed_dim = 512 if args.model.startswith("ViT-B") else 128
    micro = loss_microbench(args.batch_size, embed_dim, 50, device)
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"device": device},
        "samples_per_s": results,
        "median_samples_per_s": med,
        "ratio_ours_over_open_clip_train": ratio_oc,
        "hn_nce_step_overhead": overhead,
        "loss_only_ms": micro,
    }
    if device.startswith("cuda"):
        summary["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    print(f"| run | samples/s (median of {args.rounds}) | per round |")
    print("|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
    split = (
        f", micro_batch {args.batch_size // args.accum} vs --accum-freq {args.accum}"
        if args.accum > 1
        else ""
    )
    print(
        f"\nours / open_clip_train (infonce vs ClipLoss{split}), median of per-round ratios: {ratio_oc:.3f}"
        "  (target >= 1.0)"
    )
    if overhead is not None:
        print(
            f"hn_nce step-time overhead over infonce, median of per-round: {overhead * 100:+.1f}%  (target <= 5%)"
        )
    print(
        f"loss alone, forward+backward at global batch {args.batch_size}, dim {embed_dim}: "
        f"infonce {micro['infonce']:.3f} ms, hn_nce {micro['hn_nce']:.3f} ms"
    )
    if "peak_memory_gb" in summary:
        print(f"peak GPU memory: {summary['peak_memory_gb']:.2f} GiB")
    print(f"\nwritten: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
