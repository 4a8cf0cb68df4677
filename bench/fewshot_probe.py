"""DiHT's PGD few-shot probe against the plain linear probe and the L2 variant, on Fashion-MNIST and two shifted tasks.

    PYTHONPATH=. python bench/fewshot_probe.py                          # trains the checkpoint if missing
    PYTHONPATH=. python bench/fewshot_probe.py --checkpoint CK --draws 5 --shots 0,1,2,4,8

The checkpoint is curate-tiny trained with train/configs/fashion_mnist.yaml (200 steps, infonce, seed 0) on the
committed Fashion-MNIST training subset, as bench/distill_experiment.py trains its `infonce` arm. The tasks:
Fashion-MNIST (shots from the committed training split, the 2,000 test images) and the same images with grey
levels inverted and upside down (bench/distill_experiment.py's shifted tasks: 100 shot-pool images per class).
Every probe sees the same draws of the shots. `zero_shot_pgd_hindsight` is the PGD probe at the grid point that
was best on the test split: the ceiling of the δ choice, not a method. Results: OUT/fewshot_probe.json and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

NAMES = {
    "zero_shot_pgd": "PGD in norm balls (DiHT, default)",
    "zero_shot_pgd_hindsight": "PGD, δ best on test (ceiling)",
    "zero_shot_l2": "λ‖W − W_0‖² (previous)",
    "linear_probe": "plain linear probe",
}


def main() -> int:
    import distill_experiment as dx

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "distill")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--shots", default="0,1,2,4,8")
    p.add_argument("--tasks", nargs="+", default=["fashion-mnist", "inverted", "upside_down"])
    p.add_argument(
        "--probes", nargs="+", default=["zero_shot_pgd", "linear_probe", "zero_shot_l2"],
        help="which probes (the PGD ceiling in hindsight is always added)",
    )  # fmt: skip
    args = p.parse_args()
    out = args.out.resolve()
    ck = args.checkpoint
    if ck is None:
        from train import fashion_mnist

        shards = out / "fmnist_plain_shards"
        if not (shards / "sizes.json").exists():
            fashion_mnist.write_shards(shards, "train")
        ck = dx.train_variant(out, "infonce", 0, shards)

    from curation.models.clip import load_for_eval
    from train.probe import few_shot_curves, load_task

    built = load_for_eval(str(ck))
    built.model.eval()
    shots = [int(s) for s in args.shots.split(",")]
    path = out / "fewshot_probe.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.tasks:
        if name in results:
            continue
        if name == "fashion-mnist":
            task = load_task("fashion-mnist")
        else:
            root = dx.shifted_task(out, name)
            task = load_task(
                str(root),
                templates=[
                    ln.strip() for ln in (root / "templates.txt").read_text().splitlines() if ln.strip()
                ],
            )
        t = time.perf_counter()
        r = few_shot_curves(
            built, task, shots, draws=args.draws, probes=tuple(args.probes),
            hindsight=True,
        )  # fmt: skip
        r["seconds"] = time.perf_counter() - t
        results[name] = r
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name}: {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    for name in args.tasks:
        r = results[name]
        print(
            f"\n{name} (zero-shot {100 * r['zero_shot_top1']:.2f}%, {r['draws']} draws, test n={r['n_test']})\n"
        )
        print("| probe | " + " | ".join(str(n) for n in r["shots"]) + " |")
        print("|---|" + "---:|" * len(r["shots"]))
        for key, label in NAMES.items():
            points = {p["shots"]: p for p in r["curves"].get(key, [])}
            cells = [
                f"{100 * points[n]['mean']:.2f} ± {100 * points[n]['std']:.2f}" if n in points else "-"
                for n in r["shots"]
            ]
            print(f"| {label} | " + " | ".join(cells) + " |")
        chosen = {p["shots"]: p["chosen"] for p in r["curves"]["zero_shot_pgd"] if p["shots"]}
        print(
            "\nPGD δ/‖W_0‖, δ_b/‖W_0‖ chosen per draw: " + "; ".join(f"{n}: {c}" for n, c in chosen.items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
