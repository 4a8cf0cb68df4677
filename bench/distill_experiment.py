"""Concept distillation and the few-shot probe on the built-in Fashion-MNIST benchmark, measured end to end.

Phases (each one's results are cached under --out, so an interrupted run resumes where it stopped):

  throughput  the `concepts` stage (EfficientNet-Lite0 teacher, batch 32) vs the plain loop a user writes
              (PIL decode, timm transform, model(x[None]) one image at a time, fp32), images/s on the same
              images, in interleaved rounds; ratio per round, median reported (target >= 3x)
  targets     the user's path: the 6,000 training images as webdataset shards -> `curate run` with a
              concepts stage -> `curate select` (shards with {key}.concepts.json + vocabulary.txt);
              prints which ImageNet concepts the teacher gives each Fashion-MNIST class, with examples
  ablation    curate-tiny, train/configs/fashion_mnist.yaml (200 steps x 128), on those shards:
              infonce, hn_nce, infonce + distill, hn_nce + distill, seeds 0..2 (`curate train`);
              zero-shot top-1 on the 2,000 committed test images and class-level retrieval R@1
  fewshot     `curate eval --few-shot 0,1,2,4,8,16 --draws 5` on one checkpoint per variant (seed 0)
  fewshot_shift  the same on shifted tasks the models never saw (grey levels inverted; upside down), as
              image-folder tasks (--task DIR with train/ and test/): zero-shot drops, the shots matter
  steptime    training step time with vs without distillation, interleaved rounds (target <= 1.05x)

    PYTHONPATH=. python bench/distill_experiment.py                      # everything
    PYTHONPATH=. python bench/distill_experiment.py --phases throughput steptime --rounds 5

Retrieval: the test pairs are the 2,000 test images with class captions (templates rotating as in
the training shards). Many captions are identical strings, so pair-level recall (only caption i for
image i) is ill-posed; a retrieved caption/image counts as a hit when it belongs to the same class
(`train.evaluate.retrieval_recall(..., groups=labels)`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {
    "infonce": {"loss.name": "infonce"},
    "hn_nce": {"loss.name": "hn_nce"},
    "infonce+distill": {"loss.name": "infonce", "distill.weight": 1.0, "distill.loss": "bce"},
    "hn_nce+distill": {"loss.name": "hn_nce", "distill.weight": 1.0, "distill.loss": "bce"},
}
RECIPE = REPO / "train" / "configs" / "fashion_mnist.yaml"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _curate(*args: str) -> str:
    cmd = [sys.executable, "-m", "curation.cli", *args]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _save(path: Path, data: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------- throughput


def plain_loop(images: list[bytes], top_k: int) -> list[list[int]]:
    """What a user writes: one image at a time through timm's model and transform, fp32."""
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from curation.models.efficientnet_lite0 import default_checkpoint, load_efficientnet_lite0

    model = load_efficientnet_lite0(default_checkpoint()).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    out = []
    with torch.no_grad():
        for data in images:
            x = transform(Image.open(io.BytesIO(data)).convert("RGB"))[None]
            out.append(model(x).softmax(-1)[0].topk(top_k).indices.tolist())
    return out


def throughput(args: argparse.Namespace, out: Path) -> dict:
    import numpy as np
    import pyarrow as pa
    import torch
    from PIL import Image

    from curation.core.devices import cpu_has_native_bf16
    from curation.stages import StageContext
    from curation.stages.concepts import Concepts, ConceptsParams
    from train import fashion_mnist

    torch.set_num_threads(args.threads)
    images_np, _ = fashion_mnist.load("train")
    rng = np.random.default_rng(0)
    pngs = []
    for i in rng.choice(len(images_np), args.images, replace=False):
        buf = io.BytesIO()
        Image.fromarray(images_np[i], mode="L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    table = pa.table({"image": pa.array(pngs, pa.binary())})
    stages = {}
    for precision in ("bf16", "fp32"):
        params = ConceptsParams(batch_size=32, precision=precision, device="cpu", cpus=args.threads)
        stage = Concepts(params, StageContext(out))
        stage.setup()
        stage.compute(table.slice(0, 32))  # warm-up: first-call allocations
        stages[precision] = stage
    plain_loop(pngs[:8], 20)  # warm-up
    rows: dict[str, list[float]] = {"plain_loop_fp32": [], "stage_b32_fp32": [], "stage_b32_bf16": []}
    outputs: dict[str, pa.Table] = {}
    for r in range(args.rounds):
        t = time.perf_counter()
        plain = plain_loop(pngs, 20)
        rows["plain_loop_fp32"].append(len(pngs) / (time.perf_counter() - t))
        for precision in ("fp32", "bf16"):
            t = time.perf_counter()
            result = stages[precision].compute(table)
            rows[f"stage_b32_{precision}"].append(len(pngs) / (time.perf_counter() - t))
            outputs[precision] = result
        ids = outputs["fp32"].column("concept_ids").to_pylist()
        same_top1 = float(np.mean([a[0] == b[0] for a, b in zip(ids, plain)]))
        print(f"round {r}: " + ", ".join(f"{k}={v[-1]:.1f} img/s" for k, v in rows.items()), flush=True)
    ratios = {
        k: [s / p for s, p in zip(rows[k], rows["plain_loop_fp32"])]
        for k in ("stage_b32_fp32", "stage_b32_bf16")
    }
    # What bf16 changes in the stored targets: top-1 agreement, largest change of a stored probability
    # (a concept that leaves the top-k counts with its whole fp32 probability).
    p32 = outputs["fp32"].to_pydict()
    pau = outputs["bf16"].to_pydict()
    top1_agree = float(np.mean([a[0] == b[0] for a, b in zip(p32["concept_ids"], pau["concept_ids"])]))
    max_dp = max(
        abs(dict(zip(ia, pa_))[i] - p) if i in ia else p
        for ib, pb, ia, pa_ in zip(
            p32["concept_ids"], p32["concept_probs"], pau["concept_ids"], pau["concept_probs"]
        )
        for i, p in zip(ib, pb)
    )
    return {
        "bf16_vs_fp32_top1_agreement": top1_agree,
        "bf16_vs_fp32_max_abs_prob_change": max_dp,
        "images": len(pngs),
        "threads": args.threads,
        "cpu_has_native_bf16": cpu_has_native_bf16(),
        "images_per_s": rows,
        "ratio_per_round": ratios,
        "median_ratio": {k: statistics.median(v) for k, v in ratios.items()},
        "stage_fp32_top1_same_as_plain_loop": same_top1,
        "loadavg": _loadavg(),
    }


# --------------------------------------------------------------------------- targets


def targets(args: argparse.Namespace, out: Path) -> dict:
    from train import fashion_mnist

    raw, run, sel = out / "fmnist_raw", out / "fmnist_concepts_run", out / "fmnist_distill_shards"
    if not (sel / "sizes.json").exists():
        if not (raw / "sizes.json").exists():
            fashion_mnist.write_shards(raw, "train")
        pipeline = out / "concepts.yaml"
        pipeline.write_text(
            f"""input: {{format: webdataset, path: "{raw}/*.tar", rows_per_shard: 1000}}
output: {run}
runner: {{type: local, workers: 1, batch_rows: 1000, progress: false}}
stages:
  - concepts: {{teacher: efficientnet_lite0, top_k: 20, batch_size: 32, cpus: {args.threads}}}
"""
        )
        t = time.perf_counter()
        print(_curate("run", str(pipeline)), flush=True)
        seconds = time.perf_counter() - t
        print(_curate("select", str(run), "--out", str(sel)), flush=True)
        _save(out / "targets_timing.json", {"curate_run_seconds": seconds, "loadavg": _loadavg()})
    return {**analyse_targets(run), **(_load(out / "targets_timing.json") or {})}


def analyse_targets(run: Path) -> dict:
    """Which ImageNet concepts the teacher gives each Fashion-MNIST class: top-1 frequencies and examples."""
    from curation.models.teachers import imagenet_vocabulary
    from curation.query import connect

    vocab = imagenet_vocabulary()
    con = connect(str(run))
    rows = con.execute("SELECT caption, concept_ids, concept_probs FROM samples ORDER BY url").fetchall()
    by_class: dict[str, list] = {}
    from train.fashion_mnist import CLASSES

    for caption, ids, probs in rows:
        cls = next(c for c in sorted(CLASSES, key=len, reverse=True) if f" {c}." in f" {caption}")
        by_class.setdefault(cls, []).append((ids, probs))
    # How much class information the targets carry: predict each image's class as the majority class of
    # its top-1 concept (in-sample: the concept -> class map is counted on the same images).
    owner: dict[int, Counter] = {}
    for cls, items in by_class.items():
        for ids, _ in items:
            owner.setdefault(ids[0], Counter())[cls] += 1
    majority = sum(max(c.values()) for c in owner.values()) / max(1, sum(len(v) for v in by_class.values()))
    report: dict = {}
    for cls in CLASSES:
        items = by_class.get(cls, [])
        top1 = Counter(ids[0] for ids, _ in items)
        mass = Counter()
        for ids, probs in items:
            for i, p in zip(ids, probs):
                mass[i] += p / len(items)
        report[cls] = {
            "images": len(items),
            "top1_most_common": [(vocab[i].split(",")[0], n / len(items)) for i, n in top1.most_common(5)],
            "mean_prob_top_concepts": [(vocab[i].split(",")[0], round(m, 4)) for i, m in mass.most_common(5)],
            "mean_top1_prob": sum(p[0] for _, p in items) / max(1, len(items)),
            "mean_top20_mass": sum(sum(p) for _, p in items) / max(1, len(items)),
            "examples": [
                [(vocab[i].split(",")[0], round(p, 3)) for i, p in zip(ids[:3], probs[:3])]
                for ids, probs in items[:3]
            ],
        }
    return {
        "concepts_by_class": report,
        "class_from_top1_concept_accuracy": majority,
        "distinct_top1_concepts": len(owner),
    }


# --------------------------------------------------------------------------- ablation


def train_variant(out: Path, name: str, seed: int, shards: Path) -> Path:
    run = out / "runs" / f"{name}_seed{seed}"
    final = run / "checkpoints" / "step_00000200.pt"
    if final.exists():
        return final
    sets = {
        "data.shards": f"{shards}/{{00000..00005}}.tar",
        "output_dir": str(run),
        "train.seed": seed,
        "train.progress": False,
        **VARIANTS[name],
    }
    argv = ["train", str(RECIPE)]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    t = time.perf_counter()
    _curate(*argv)
    (run / "wall_seconds.txt").write_text(f"{time.perf_counter() - t:.1f} loadavg {_loadavg()}\n")
    return final


def evaluate_checkpoint(checkpoint: Path) -> dict:
    import numpy as np

    from curation.models.clip import encode_images, encode_texts, load_for_eval
    from train import fashion_mnist
    from train.evaluate import retrieval_recall, zero_shot_accuracy

    built = load_for_eval(str(checkpoint))
    images, labels = fashion_mnist.load("test")
    images = list(images)
    zs = zero_shot_accuracy(built, images, labels, fashion_mnist.CLASSES, fashion_mnist.TEMPLATES)
    captions = [fashion_mnist.TEMPLATES[i % 4].format(fashion_mnist.CLASSES[y]) for i, y in enumerate(labels)]
    rec = retrieval_recall(
        encode_images(built, images), encode_texts(built, captions), (1, 5), groups=np.asarray(labels)
    )
    return {"zero_shot_top1": zs.top1, "zero_shot_top5": zs.top5, **{f"class_{k}": v for k, v in rec.items()}}


def ablation(args: argparse.Namespace, out: Path) -> dict:
    shards = out / "fmnist_distill_shards"
    if not (shards / "sizes.json").exists():
        raise SystemExit("run the targets phase first")
    results = _load(out / "ablation.json") or {}
    for seed in args.seeds:
        for name in VARIANTS:
            key = f"{name}/seed{seed}"
            if key in results:
                continue
            ck = train_variant(out, name, seed, shards)
            results[key] = {**evaluate_checkpoint(ck), "final_metrics": _last_metrics(ck.parents[1])}
            _save(out / "ablation.json", results)
            print(key, json.dumps(results[key]), flush=True)
    table = {}
    for name in VARIANTS:
        runs = [results[f"{name}/seed{s}"] for s in args.seeds if f"{name}/seed{s}" in results]
        table[name] = {
            metric: _mean_std([r[metric] for r in runs])
            for metric in ("zero_shot_top1", "class_image_to_text_R@1", "class_text_to_image_R@1")
        }
    return {"runs": results, "table": table}


def _last_metrics(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


# --------------------------------------------------------------------------- few-shot


def fewshot(args: argparse.Namespace, out: Path) -> dict:
    results = {}
    for name in args.fewshot_variants:
        ck = out / "runs" / f"{name}_seed0" / "checkpoints" / "step_00000200.pt"
        path = out / f"few_shot_{name}.json"
        if not path.exists():
            if not ck.exists():
                print(f"skip few-shot {name}: no checkpoint {ck}")
                continue
            _curate(
                "eval", "--checkpoint", str(ck), "--few-shot", "0,1,2,4,8,16", "--task", "fashion-mnist",
                "--draws", "5", "--json", str(path),
            )  # fmt: skip
        curves = json.loads(path.read_text())["few_shot"]["curves"]
        results[name] = {k: [(p["shots"], p["mean"], p["std"]) for p in v] for k, v in curves.items()}
    return results


# Shifted versions of Fashion-MNIST the models never saw: zero-shot drops (to 0.07-0.08 inverted, ~0.45 upside
# down), so the shots carry information the zero-shot classifier lacks.
SHIFTS = {"inverted": lambda a: 255 - a, "upside_down": lambda a: a[::-1]}


def shifted_task(out: Path, shift: str) -> Path:
    """An image-folder task (--task DIR): DIR/train/CLASS (100 per class, the shot pool), DIR/test/CLASS (the
    2,000 test images), with `shift` applied to every image."""
    from PIL import Image

    from train import fashion_mnist

    root = out / f"fmnist_{shift}_task"
    if (root / "done").exists():
        return root
    for split, per_class in (("train", 100), ("test", None)):
        images, labels = fashion_mnist.load(split)
        for c, name in enumerate(fashion_mnist.CLASSES):
            folder = root / split / name.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            idx = [i for i, y in enumerate(labels) if y == c][:per_class]
            for i in idx:
                Image.fromarray(SHIFTS[shift](images[i]), mode="L").save(folder / f"{i:05d}.png")
    (root / "templates.txt").write_text("\n".join(fashion_mnist.TEMPLATES) + "\n")
    (root / "done").write_text("")
    return root


def fewshot_shift(args: argparse.Namespace, out: Path) -> dict:
    results: dict = {}
    for shift in SHIFTS:
        root = shifted_task(out, shift)
        for name in args.fewshot_variants:
            ck = out / "runs" / f"{name}_seed0" / "checkpoints" / "step_00000200.pt"
            path = out / f"few_shot_{shift}_{name}.json"
            if not path.exists():
                _curate(
                    "eval", "--checkpoint", str(ck), "--few-shot", "0,1,2,4,8,16", "--task", str(root),
                    "--templates", str(root / "templates.txt"), "--draws", "5", "--json", str(path),
                )  # fmt: skip
            curves = json.loads(path.read_text())["few_shot"]["curves"]
            results[f"{shift}/{name}"] = {
                k: [(p["shots"], p["mean"], p["std"]) for p in v] for k, v in curves.items()
            }
    return results


# --------------------------------------------------------------------------- step time


def steptime(args: argparse.Namespace, out: Path) -> dict:
    from train.config import parse_train_config
    from train.loop import train

    shards = out / "fmnist_distill_shards"
    rows: dict[str, list[float]] = {"without": [], "with": []}
    for r in range(args.rounds):
        for variant in ("without", "with"):
            run = out / "steptime" / f"{variant}_{r}"
            cfg = {
                "data": {"shards": f"{shards}/{{00000..00005}}.tar", "workers": 1, "shuffle_buffer": 1000},
                "output_dir": str(run),
                "model": {"name": "curate-tiny"},
                "optim": {"lr": 1e-3, "warmup_steps": 10},
                "train": {"batch_size": 128, "steps": args.steps, "log_every": 5, "progress": False},
            }
            if variant == "with":
                cfg["distill"] = {"weight": 1.0, "loss": "bce"}
            train(parse_train_config(json.dumps(cfg)))
            recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
            timed = [x for x in recs if x["step"] > 10]
            # each record carries its window's samples/s: seconds per step = batch / sps
            rows[variant].append(statistics.mean(128 / x["samples_per_s"] for x in timed))
        print(f"round {r}: s/step without {rows['without'][-1]:.3f}, with {rows['with'][-1]:.3f}", flush=True)
    ratios = [w / wo for w, wo in zip(rows["with"], rows["without"])]
    micro = distill_loss_microbench()
    return {
        "seconds_per_step": rows,
        "ratio_per_round": ratios,
        "median_ratio": statistics.median(ratios),
        "loss_and_head_only_ms": micro,
        "loadavg": _loadavg(),
    }


def distill_loss_microbench(batch: int = 128, dim: int = 128, vocab: int = 1000, k: int = 20) -> dict:
    """The distillation's own cost: head + loss forward and backward on random features (median of 50)."""
    import torch
    import torch.nn.functional as F

    from train.losses import ConceptDistillationLoss

    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    head = torch.nn.Linear(dim, vocab)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(batch)])
    probs = torch.rand(batch, k, generator=g).sort(dim=1, descending=True).values / k
    out = {}
    for kind in ("bce", "kl"):
        fn = ConceptDistillationLoss(kind)
        times = []
        for _ in range(50):
            t = time.perf_counter()
            fn(head(feats), ids, probs).backward()
            times.append(time.perf_counter() - t)
        out[kind] = statistics.median(times) * 1e3
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--phases",
        nargs="+",
        default=["throughput", "targets", "ablation", "fewshot", "fewshot_shift", "steptime"],
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "distill")
    p.add_argument("--images", type=int, default=256, help="throughput: images per measurement")
    p.add_argument("--rounds", type=int, default=3, help="throughput / steptime: interleaved rounds")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the teacher")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40, help="steptime: steps per run (first 10 not timed)")
    p.add_argument("--fewshot-variants", nargs="+", default=["hn_nce+distill", "hn_nce", "infonce"])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    phases = {
        "throughput": throughput,
        "targets": targets,
        "ablation": ablation,
        "fewshot": fewshot,
        "fewshot_shift": fewshot_shift,
        "steptime": steptime,
    }
    for name in args.phases:
        print(f"== {name} (loadavg {_loadavg()})", flush=True)
        t = time.perf_counter()
        result = phases[name](args, args.out)
        result["phase_seconds"] = time.perf_counter() - t
        result["date"] = time.strftime("%Y-%m-%d %H:%M")
        _save(args.out / f"{name}.result.json", result)
        print(json.dumps(result, indent=1)[:6000], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
