"""Every CUDA path of the project in one command: timings and pass/fail in one JSON.

    python bench/gpu_check.py                 # on a GPU machine: the full check (< 10 minutes on one GPU)
    python bench/gpu_check.py --cpu           # the same code paths, reduced, on the CPU (tests run this)

Paths: the text_spotting, clip_score and concepts stages at their default batch sizes;
exact hard-pair mining; the trainer in bf16 (auto precision) with and without
torch.compile, with GradCache micro-batches, with concept distillation and hard-pair
batches + HNML together; DDP (NCCL on the GPU, a 1-rank process group; gloo with 2
ranks on the CPU) training steps with the local loss and micro-batches. Each record
holds `ok`, `seconds`, what was measured, and the GPU target from BENCHMARKS.md beside
it (`target`); where the target is a ratio to a baseline that lives in another bench
script, the record names that script. A failed path is recorded with its error and the
others still run; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# GPU targets as BENCHMARKS.md states them.
TARGETS = {
    "text_spotting": "OCR stage vs `readtext` loop, GPU >= 5x (ratio: bench/ocr_throughput.py --device cuda)",
    "clip_score": "clip_score stage vs plain open_clip loop >= 3x (ratio: bench/clip_score_throughput.py)",
    "concepts": "concepts stage vs per-image timm loop >= 3x (ratio: bench/distill_experiment.py --phases throughput)",
    "mining_exact": "hard-pair mining matmul FLOP/s >= 50% of torch.mm on the same device",
    "train": "trainer vs open_clip_train >= 1.0x (ratio: bench/train_throughput.py --precision bf16)",
    "train_compile": "torch.compile: measured, no target (compare samples/s with `train`)",
    "train_micro_batch": "GradCache step time <= 1.3x the unsplit step at equal contrastive batch",
    "train_distill_hard_pairs": "distillation step overhead <= 5% (bench/distill_experiment.py --phases steptime)",
    "ddp": "DDP trains with the local loss and micro-batches (NCCL on GPU), no target",
}


class Setup:
    """Inputs shared by the checks, written once into a temporary folder."""

    def __init__(self, root: Path, cuda: bool) -> None:
        self.root, self.cuda = root, cuda
        self.device = "cuda" if cuda else "cpu"
        self.n_images = 512 if cuda else 16
        self.model = "ViT-B-32" if cuda else "curate-tiny"

    def images(self, n: int, size: int = 256) -> list[bytes]:
        """JPEGs with a line of dark text on a light photo-like gradient (OCR finds text in them)."""
        import numpy as np
        from PIL import Image, ImageDraw

        out = []
        rng = np.random.default_rng(0)
        for i in range(n):
            base = np.linspace(150, 250, size, dtype=np.float32)[None, :, None] + rng.normal(
                0, 8, (size, size, 3)
            )
            img = Image.fromarray(base.clip(0, 255).astype("uint8"))
            ImageDraw.Draw(img).text((20, size // 2), f"SALE {i} OPEN", fill=(10, 10, 10), font_size=32)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
        return out

    def table(self):
        import pyarrow as pa

        n = self.n_images
        return pa.table(
            {
                "image": pa.array(self.images(n), pa.binary()),
                "caption": [f"a sign reading sale {i}" for i in range(n)],
            }
        )

    def checkpoint(self) -> Path:
        import torch

        from curation.models.clip import build_model

        path = self.root / "clip.pt"
        if not path.exists():
            torch.manual_seed(0)
            torch.save(
                {"model_name": self.model, "state_dict": build_model(self.model).model.state_dict()}, path
            )
        return path

    def shards(self) -> Path:
        """Fashion-MNIST shards with concept targets and vocabulary.txt, and a hard-pair table over them."""
        out = self.root / "shards"
        if out.exists():
            return out
        import tarfile

        import torch
        import torch.nn.functional as F

        from train.fashion_mnist import write_shards
        from train.hard_pairs import TarIndex
        from train.mining.output import write_hard_pairs
        from train.mining.search import mine_hard_pairs

        plain = self.root / "plain"
        write_shards(plain, "train", limit=1024 if self.cuda else 128, samples_per_shard=128)
        out.mkdir()
        for src in sorted(plain.glob("*.tar")):
            with tarfile.open(src) as tin, tarfile.open(out / src.name, "w") as tout:
                for member in tin:
                    data = tin.extractfile(member).read()
                    tout.addfile(member, io.BytesIO(data))
                    if member.name.endswith(".json"):
                        label = json.loads(data)["label"]
                        payload = json.dumps(
                            {"ids": [3 * label, 3 * label + 1], "probs": [0.7, 0.2]}
                        ).encode()
                        info = tarfile.TarInfo(f"{member.name.split('.')[0]}.concepts.json")
                        info.size = len(payload)
                        tout.addfile(info, io.BytesIO(payload))
        (out / "sizes.json").write_text((plain / "sizes.json").read_text())
        (out / "vocabulary.txt").write_text("".join(f"concept {i}\n" for i in range(30)))
        uids = TarIndex(sorted(str(p) for p in out.glob("*.tar"))).uids
        g = torch.Generator().manual_seed(0)
        u = F.normalize(torch.randn(len(uids), 16, generator=g), dim=1)
        v = F.normalize(u + 0.5 * torch.randn(len(uids), 16, generator=g), dim=1)
        idx, scores = mine_hard_pairs(u, v, 10)
        write_hard_pairs(self.root / "hard_pairs.parquet", uids, idx, scores, {"k": 10})
        return out

    def train_config(self, name: str, **train_keys) -> dict:
        shards = self.shards()
        batch = 256 if self.cuda else 16
        return {
            "data": {
                "shards": str(shards / "*.tar"),
                "workers": 4 if self.cuda else 0,
                "shuffle_buffer": 256,
            },
            "output_dir": str(self.root / "runs" / name),
            "model": {"name": self.model},
            "loss": {"name": "hn_nce"},
            "optim": {"lr": 1e-4, "warmup_steps": 1},
            "train": {
                "batch_size": batch,
                "steps": 12 if self.cuda else 2,
                "log_every": 1,
                "progress": False,
                "device": self.device,
                **train_keys,
            },
        }


def _stage(setup: Setup, name: str, params: dict) -> dict:
    from curation.stages import STAGES, StageContext

    cls = STAGES[name]
    stage = cls(cls.Params(device=setup.device, **params), StageContext(output_dir=setup.root))
    stage.setup()
    table = setup.table()
    stage.compute(table.slice(0, 2))  # warm-up (cuDNN autotuning, allocations)
    t0 = time.perf_counter()
    out = stage.compute(table)
    seconds = time.perf_counter() - t0
    status = out.column(next(c for c in out.column_names if c.endswith("status"))).to_pylist()
    ok_rows = sum(s == "ok" for s in status)
    return {
        "ok": ok_rows == table.num_rows,
        "rows": table.num_rows,
        "rows_ok": ok_rows,
        "images_per_s": table.num_rows / seconds,
        "batch_size": stage.params.batch_size if hasattr(stage.params, "batch_size") else None,
    }


def check_text_spotting(setup: Setup) -> dict:
    return _stage(setup, "text_spotting", {})


def check_clip_score(setup: Setup) -> dict:
    return _stage(setup, "clip_score", {"checkpoint": str(setup.checkpoint())})


def check_concepts(setup: Setup) -> dict:
    return _stage(setup, "concepts", {})


def check_mining_exact(setup: Setup) -> dict:
    import torch
    import torch.nn.functional as F

    from train.mining.search import mine_hard_pairs

    n, d = (200_000, 512) if setup.cuda else (4_000, 64)
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(n, d, generator=g), dim=1)
    v = F.normalize(u + torch.randn(n, d, generator=g), dim=1)
    sync = torch.cuda.synchronize if setup.cuda else (lambda: None)
    mine_hard_pairs(u[:4096], v[:4096], 50, device=setup.device)  # warm-up
    t0 = time.perf_counter()
    idx, _ = mine_hard_pairs(u, v, 50, device=setup.device)
    sync()
    seconds = time.perf_counter() - t0
    flops = 2 * 2 * n * n * d  # two n x n x d products (image and text similarities)
    a = torch.randn(4096, d, device=setup.device)
    b = torch.randn(d, 16384, device=setup.device)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    mm = 10 * 2 * 4096 * 16384 * d / (time.perf_counter() - t0)
    in_range = bool(((idx >= 0) & (idx < n)).all()) and bool((idx != torch.arange(n)[:, None]).all())
    return {
        "ok": in_range and idx.shape == (n, 50),
        "pairs": n,
        "seconds_mining": seconds,
        "tflops": flops / seconds / 1e12,
        "share_of_torch_mm": flops / seconds / mm,
    }


def _train(setup: Setup, name: str, distill: bool = False, hard: bool = False, **train_keys) -> dict:
    from train.config import parse_train_config
    from train.loop import train

    cfg = setup.train_config(name, **train_keys)
    if distill:
        cfg["distill"] = {"weight": 1.0}
    if hard:
        cfg["hard_pairs"] = {"path": str(setup.root / "hard_pairs.parquet"), "top": 5}
        cfg["loss"]["hnml"] = 0.3
    result = train(parse_train_config(json.dumps(cfg)))
    recs = [json.loads(ln) for ln in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs]
    return {
        "ok": len(recs) == cfg["train"]["steps"] and all(x == x and abs(x) < 1e4 for x in losses),
        "samples_per_s": result.samples_per_s,
        "peak_mem_gb": recs[-1]["mem_gb"],
        "final_loss": losses[-1],
        "keys": sorted(k for k in recs[-1] if k.endswith("_loss")),
    }


def check_train(setup: Setup) -> dict:
    return _train(setup, "bf16")  # precision auto: bf16 on CUDA, fp32 on the CPU


def check_train_compile(setup: Setup) -> dict:
    return _train(setup, "compile", compile=True)


def check_train_micro_batch(setup: Setup) -> dict:
    base = _train(setup, "unsplit")
    micro = _train(setup, "micro", micro_batch=setup.train_config("x")["train"]["batch_size"] // 4)
    return {
        **micro,
        "ok": base["ok"] and micro["ok"],
        "time_ratio_vs_unsplit": base["samples_per_s"] / micro["samples_per_s"],
        "memory_ratio_vs_unsplit": micro["peak_mem_gb"] / base["peak_mem_gb"],
    }


def check_train_distill_hard_pairs(setup: Setup) -> dict:
    out = _train(setup, "distill_hard", distill=True, hard=True, micro_batch=4 if not setup.cuda else 64)
    out["ok"] = out["ok"] and {"distill_loss", "hard_negative_margin_loss"} <= set(out["keys"])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, cuda: bool, out) -> None:
    import torch
    import torch.distributed as dist

    from curation.models.clip import build_model
    from train.loop import forward_backward
    from train.losses import TrainingObjective, build_loss

    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        device = torch.device(f"cuda:{rank}" if cuda else "cpu")
        torch.manual_seed(0)
        model = build_model("curate-tiny", device=device).model
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        g = torch.Generator().manual_seed(rank)
        batch = {
            "image": torch.randn(32, 3, 28, 28, generator=g).to(device),
            "text": torch.randint(1, 1000, (32, 12), generator=g).to(device),
        }
        objective = TrainingObjective(build_loss("hn_nce"))
        t0 = time.perf_counter()
        terms = forward_backward(ddp, objective, batch, micro_batch=8, precision="bf16" if cuda else "fp32")
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        gathered = [torch.empty_like(grad) for _ in range(world)]
        dist.all_gather(gathered, grad)
        out[rank] = {
            "seconds": time.perf_counter() - t0,
            "finite": bool(torch.isfinite(grad).all()) and bool(torch.isfinite(terms["contrastive_loss"])),
            "same_on_all_ranks": all(torch.equal(gathered[0], x) for x in gathered),
        }
    finally:
        dist.destroy_process_group()


def check_ddp(setup: Setup) -> dict:
    import torch.multiprocessing as mp

    world = 1 if setup.cuda else 2
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _ddp_rank, args=(world, _free_port(), setup.cuda, out), nprocs=world, start_method="spawn"
        )
        res = dict(out)
    return {
        "ok": len(res) == world and all(r["finite"] and r["same_on_all_ranks"] for r in res.values()),
        "backend": "nccl" if setup.cuda else "gloo",
        "world_size": world,
        "step_s": max(r["seconds"] for r in res.values()),
    }


CHECKS: dict[str, Callable[[Setup], dict]] = {
    "text_spotting": check_text_spotting,
    "clip_score": check_clip_score,
    "concepts": check_concepts,
    "mining_exact": check_mining_exact,
    "train": check_train,
    "train_compile": check_train_compile,
    "train_micro_batch": check_train_micro_batch,
    "train_distill_hard_pairs": check_train_distill_hard_pairs,
    "ddp": check_ddp,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the reduced CPU form (default when CUDA is absent)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run these checks only")
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    records: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        setup = Setup(Path(tmp), cuda)
        for name, check in CHECKS.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                rec = check(setup)
            except Exception as e:  # recorded, and the other paths still run
                rec = {
                    "ok": False,
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-2000:],
                }
            rec.update(seconds=round(time.perf_counter() - t0, 2), target=TARGETS[name])
            records[name] = rec
            status = "ok" if rec["ok"] else "FAILED"
            print(f"{name:26s} {status:7s} {rec['seconds']:8.1f} s  {rec.get('error', '')}", flush=True)
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (reduced form)",
        "torch": torch.__version__,
        "total_seconds": round(time.perf_counter() - started, 1),
        "all_ok": all(r["ok"] for r in records.values()),
        "checks": records,
    }
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}: {'all ok' if report['all_ok'] else 'FAILURES'} in {report['total_seconds']} s")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
