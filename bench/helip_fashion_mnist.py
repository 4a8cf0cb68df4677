"""HELIP on the built-in Fashion-MNIST benchmark: does continued training on hard pairs help?

1. base: curate-tiny trained with train/configs/fashion_mnist.yaml (200 steps, seed 0) on the
   6,000 committed training images;
2. `curate mine` with the base checkpoint's own towers (k=50, near_duplicate=0.98);
3. continued from the base checkpoint for the same number of steps (two epochs, 94 steps of
   128: every anchor once with its partner) with train/configs/helip.yaml's optimiser settings, three arms:
     a. random batches + InfoNCE        (the usual shuffled stream)
     b. hard-pair batches + InfoNCE
     c. hard-pair batches + InfoNCE + HNML (γ = 0.3)
   each with --seeds seeds (data order, partner draws and augmentations; the start is the same);
4. zero-shot top-1 on the 2,000 committed test images, and retrieval R@1 (both directions) on
   the same 2,000 test images with their captions (`curate eval --retrieval`);
5. what the mined pairs are: the class of each pair's hard partners against its own class.

    python bench/helip_fashion_mnist.py                    # ~1 h on 2 busy cores; results in runs/helip/
    python bench/helip_fashion_mnist.py --seeds 0 --steps 20   # a quick look

Runs already finished (their checkpoint and eval JSON exist) are reused, so the script resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARMS = {
    "a_random_infonce": {"hard_pairs": None, "loss": {"name": "infonce", "hnml": None}},
    "b_hard_infonce": {"hard_pairs": True, "loss": {"name": "infonce", "hnml": None}},
    "c_hard_infonce_hnml": {"hard_pairs": True, "loss": {"name": "infonce", "hnml": 0.3}},
}


def curate(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "curation.cli", *args], check=True, cwd=REPO, env=env)


def evaluate(checkpoint: Path, test_shards: str, out: Path) -> dict:
    if not out.exists():
        curate("eval", "--checkpoint", str(checkpoint), "--zero-shot", "fashion-mnist",
               "--retrieval", test_shards, "--json", str(out))  # fmt: skip
    r = json.loads(out.read_text())
    ret = r["retrieval"]
    return {
        "zero_shot_top1": r["zero_shot"]["top1"],
        "i2t_R@1": ret["image_to_text_R@1"],
        "t2i_R@1": ret["text_to_image_R@1"],
    }


def partner_classes(table: Path, shards_dir: Path, top: int) -> dict:
    """Class of anchor vs class of its hard partners (first `top`), over the whole table."""
    import pyarrow.parquet as pq

    from train.fashion_mnist import CLASSES, load

    _, labels = load("train", "subset")
    cls = {f"fmnist-train-{i:06d}": int(labels[i]) for i in range(len(labels))}
    t = pq.read_table(table).to_pylist()
    first = Counter()
    all_top = Counter()
    same_first = 0
    for row in t:
        a = cls[row["uid"]]
        hs = row["hard_uids"][:top]
        if hs:
            first[(a, cls[hs[0]])] += 1
            same_first += cls[hs[0]] == a
        for h in hs:
            all_top[(a, cls[h])] += 1
    per_class = {}
    for c, name in enumerate(CLASSES):
        row = {CLASSES[p]: n for (a, p), n in all_top.items() if a == c}
        total = sum(row.values())
        per_class[name] = {k: round(v / total, 3) for k, v in sorted(row.items(), key=lambda kv: -kv[1])[:3]}
    lengths = [len(r["hard_uids"]) for r in t]
    return {
        "rows": len(t),
        "same_class_top1_partner": same_first / len(t),
        "partner_list_length_min_median": [min(lengths), statistics.median(lengths)],
        "top3_partner_classes": per_class,
        "examples": [_example(r, cls) for r in t[:: max(1, len(t) // 5)][:5]],
    }


def _example(row: dict, cls: dict[str, int]) -> dict:
    from train.fashion_mnist import CLASSES

    pairs = zip(row["hard_uids"][:3], row["hard_scores"][:3])
    return {
        "uid": row["uid"],
        "class": CLASSES[cls[row["uid"]]],
        "partners": [(h, CLASSES[cls[h]], round(s, 3)) for h, s in pairs],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/helip")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=float, default=2.0, help="continued length in epochs (as train.epochs)")
    p.add_argument("--steps", type=int, default=None, help="continued steps (overrides --epochs)")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    root = (REPO / a.root).resolve()
    shards, test = root / "shards", root / "test_shards"
    from train.fashion_mnist import write_shards

    if not (shards / "sizes.json").exists():
        write_shards(shards, "train")
    if not (test / "sizes.json").exists():
        write_shards(test, "test")
    train_pattern, test_pattern = f"{shards}/{{00000..00005}}.tar", f"{test}/{{00000..00001}}.tar"

    base_dir = root / "base"
    base_ck = base_dir / "checkpoints" / "step_00000200.pt"
    if not base_ck.exists():
        curate("train", "train/configs/fashion_mnist.yaml", "--set", f"data.shards={train_pattern}",
               "--set", f"output_dir={base_dir}", "--set", "train.progress=false")  # fmt: skip
    mined = root / "mined" / "hard_pairs.parquet"
    if not mined.exists():
        curate("mine", "--shards", train_pattern, "--checkpoint", str(base_ck), "--output", str(mined.parent),
               "--no-progress")  # fmt: skip

    # Same length for every arm: `epochs` passes over the 6,000 samples at batch 128, as helip.yaml.
    steps = a.steps or -(-int(a.epochs * 6000) // 128)
    results: dict[str, list[dict]] = {"base": [evaluate(base_ck, test_pattern, root / "base_eval.json")]}
    # Seed-major: an interrupted run still has every arm for the seeds it finished.
    for seed in [int(s) for s in a.seeds.split(",")]:
        for arm, spec in ARMS.items():
            out = root / f"{arm}_s{seed}"
            ck = out / "checkpoints" / f"step_{steps:08d}.pt"
            if not ck.exists():
                sets = [f"data.shards={train_pattern}", f"output_dir={out}", f"model.pretrained={base_ck}",
                        f"train.steps={steps}", "train.epochs=null", f"train.seed={seed}",
                        "train.progress=false", f"data.workers={a.workers}",
                        f"loss.name={spec['loss']['name']}", f"loss.hnml={spec['loss']['hnml'] or 'null'}",
                        "hard_pairs=" + (json.dumps({"path": str(mined), "top": 50}) if spec["hard_pairs"] else "null")]  # fmt: skip
                curate("train", "train/configs/helip.yaml", *[x for s in sets for x in ("--set", s)])
            r = evaluate(ck, test_pattern, out / "eval.json")
            r["seed"] = seed
            results.setdefault(arm, []).append(r)
            print(arm, r, flush=True)

    summary = {"steps": steps, "runs": results, "mined_pairs": partner_classes(mined, shards, 50)}
    (root / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\ncontinued steps: {steps}; load average: {Path('/proc/loadavg').read_text().strip()}")
    print("| run | seeds | zero-shot top-1 | image→text R@1 | text→image R@1 |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        cells = []
        for key in ("zero_shot_top1", "i2t_R@1", "t2i_R@1"):
            vals = [r[key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(vals):.2f} ± {100 * sd:.2f}")
        print(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    print(json.dumps(summary["mined_pairs"], indent=1))


if __name__ == "__main__":
    main()
