"""`curate train`, `curate eval` and `curate mine`: the trainer's commands.

torch is imported inside the handlers so `curate --help` stays fast. This is the one
place in `curation` that imports `train` (the CLI sees every layer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import pickle
import sys
import tarfile
from pathlib import Path

from curation.cli.argtypes import at_least
from curation.cli.common import EXIT_OK, Formatter, UsageError, fail, fail_config, note
from curation.core.shards import ShardError
from curation.core.storage import StorageError
from curation.core.terminal import printable

TRAIN_HELP = """\
Train a CLIP model (any open_clip architecture) contrastively on webdataset shards,
e.g. the subset `curate select` wrote.

  curate train train/configs/fashion_mnist.yaml
  curate train my.yaml --set train.steps=2000 --set loss.name=hn_nce
  curate train my.yaml --resume                   # continue from the newest checkpoint
  torchrun --nproc_per_node 8 -m train my.yaml    # several GPUs (nccl) or CPU ranks (gloo)

Writes OUTPUT_DIR/checkpoints/step_N.pt (loadable by open_clip:
create_model_and_transforms(name, pretrained=PATH)), OUTPUT_DIR/metrics.jsonl and
OUTPUT_DIR/config.json. Every config key is documented in train/README.md.
Exit codes: 0 done, 1 training failed, 2 bad config or usage.
"""

EVAL_HELP = """\
Evaluate a checkpoint: zero-shot classification, image-text retrieval, few-shot linear probes.

  curate eval --checkpoint runs/fmnist/checkpoints/step_00000200.pt --zero-shot fashion-mnist
  curate eval train/configs/fashion_mnist.yaml          # newest checkpoint of that run
  curate eval --checkpoint CK.pt --retrieval "shards/{00000..00003}.tar" --limit 5000
  curate eval --model ViT-B-32 --checkpoint openclip.pt --zero-shot imagenet_val/ \\
      --templates templates.txt                          # folder of CLASS_NAME/*.jpg
  curate eval train/configs/fashion_mnist.yaml --few-shot 0,1,2,4,8,16 --task fashion-mnist --draws 5

Prints JSON (top1/top5; R@1/5/10 image->text and text->image); --json also writes it.
With --few-shot it prints a table (mean ± std top-1 per shot count) and the JSON goes to its file.
--few-shot runs DiHT's probe (the zero-shot classifier plus a residual and bias learned by projected
gradient descent in norm balls, radii chosen on the shots only) and a plain linear
probe, for each shot count over --draws random draws; it writes the JSON (--json, default
OUTPUT_DIR/few_shot_TASK.json for a config) and an accuracy-vs-shots plot beside it (.png).
Exit codes: 0 done, 1 evaluation failed, 2 bad usage.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train`, `eval` and `mine` to the `curate` CLI's subparsers."""
    fmt = Formatter
    p = subparsers.add_parser(
        "train", help="contrastive training on webdataset shards", description=TRAIN_HELP, formatter_class=fmt
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    e = subparsers.add_parser(
        "eval",
        help="zero-shot and retrieval evaluation of a checkpoint",
        description=EVAL_HELP,
        formatter_class=fmt,
    )
    e.add_argument("config", nargs="?", help="training config: evaluates that run's newest checkpoint")
    _add_set(e, "override a key of the training config, as `curate train --set` did (repeatable)")
    e.add_argument("--checkpoint", help="checkpoint file (curate or open_clip state dict)")
    e.add_argument(
        "--model", help="open_clip model name or JSON config (default: the one the checkpoint names)"
    )
    e.add_argument(
        "--zero-shot",
        default=None,
        metavar="fashion-mnist|DIR",
        help="'fashion-mnist' (built in) or an image folder DIR/CLASS_NAME/*.jpg (default: fashion-mnist "
        "unless --retrieval is given)",
    )
    e.add_argument(
        "--fashion-mnist-source",
        choices=["subset", "debian"],
        default="subset",
        help="subset: 2,000 committed test images; debian: all 10,000 (apt package dataset-fashion-mnist)",
    )
    e.add_argument("--templates", help="text file, one prompt template per line with {} for the class name")
    e.add_argument(
        "--retrieval",
        metavar="SHARDS",
        help="webdataset shards (brace or glob pattern) of image-caption pairs",
    )
    e.add_argument(
        "--few-shot",
        metavar="N,N,...",
        help="shot counts per class for the few-shot probes, e.g. 0,1,2,4,8,16 (0 = zero-shot)",
    )
    e.add_argument(
        "--task",
        default="fashion-mnist",
        metavar="fashion-mnist|DIR",
        help="few-shot task: 'fashion-mnist' (shots from its training split) or DIR with train/CLASS_NAME/* "
        "and test/CLASS_NAME/*",
    )
    e.add_argument(
        "--draws", type=at_least(1), default=5, help="few-shot: random draws of the shots (default 5)"
    )
    e.add_argument("--seed", type=int, default=0, help="few-shot: seed of the first draw")
    e.add_argument(
        "--limit",
        type=at_least(1),
        default=None,
        help="evaluate at most this many (test) images (>= 1; default: all)",
    )
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--json", dest="json_out", help="also write the results to this file")
    e.set_defaults(func=run_eval)
    register_mine(subparsers)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training YAML (see train/configs/ and train/README.md)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    _add_set(p, "override a config key (YAML value), e.g. --set train.steps=100; repeatable")


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _setup_logging() -> None:
    # Our logger at INFO on rank 0; the root logger (where open_clip's chatty factory logs) at WARNING.
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("train").setLevel(logging.INFO if rank == "0" else logging.WARNING)


# What a bad input raises (missing or unreadable shards, a bad sizes.json, an unknown model, an empty
# training set, a checkpoint that does not load): the user's to fix, one line and exit 2.
# StorageError: an unusable store (credentials, bucket, endpoint) of an s3:// path; one line, no traceback.
USAGE_ERRORS = (
    FileNotFoundError,
    ValueError,
    ShardError,
    tarfile.TarError,
    EOFError,
    pickle.UnpicklingError,
    StorageError,
)


def _message(e: BaseException) -> str:
    """One line for a usage error; webdataset appends the stream and URL to a tar error's args."""
    if isinstance(e, tarfile.TarError) and len(e.args) > 1:
        return f"{e.args[-1]}: not a readable tar ({str(e.args[0]).split(' @ ')[0]})"
    return str(e)


def run_train(args: argparse.Namespace) -> int:
    from train.config import ConfigError, parse_overrides
    from train.validation import load_checked_train_config

    _setup_logging()
    try:
        cfg = load_checked_train_config(args.config, overrides=parse_overrides(args.overrides))
    except ConfigError as e:
        return fail_config(e)
    from curation.core.outputs import RunLocked
    from train.data import all_shards, check_shards, data_sources
    from train.loop import train

    try:
        sources = data_sources(cfg.data)
        check_shards(all_shards(sources))
        with _output_lock(cfg.output_dir):
            if args.resume and (finished := _finished_run(cfg, sources)) is not None:
                step, n_steps, checkpoint = finished
                note(f"already at step {step} of {n_steps}: nothing to train (raise train.steps to continue)")
                _print_result(step, None, None, checkpoint)
                return EXIT_OK
            result = train(cfg, resume=args.resume)
    except (*USAGE_ERRORS, RunLocked) as e:
        return fail(_message(e))
    _print_result(result.steps, result.final_loss, result.samples_per_s, result.checkpoint)
    return EXIT_OK


def _rounded(value):
    """Metrics as decimals people read: 0.204, not float32's 0.20399999618530273 (6 significant digits)."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


@contextlib.contextmanager
def _output_lock(output_dir: str):
    """The lock `run`, `dedup` and `mine` take on their outputs (`.lock`): a second `curate train`
    on the same output_dir is refused instead of writing checkpoints beside the first. Rank 0 holds it
    for all ranks of one torchrun. A start that fails leaves no folder behind (only the lock was in it)."""
    from curation.core.outputs import exclusive_lock_on
    from curation.core.storage import open_store

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    store = open_store(output_dir)
    folder = Path(output_dir) if store.local else None
    created = folder is not None and not folder.exists()
    try:
        with exclusive_lock_on(store, ".lock", f"another `curate train` is writing to {store.url}"):
            yield
    finally:
        if created and folder is not None and [p.name for p in folder.iterdir()] == [".lock"]:
            (folder / ".lock").unlink()
            folder.rmdir()


def _finished_run(cfg, sources) -> tuple[int, int, str] | None:
    """(newest step, the run's steps, its checkpoint) when output_dir's newest checkpoint is the run's last step: a resume
    has nothing to do, and loading the model and data to find that out takes a while."""
    from train.checkpoints import CKPT_RE, latest_checkpoint
    from train.data import count_source_samples
    from train.loop import total_steps

    latest = latest_checkpoint(cfg.output_dir)
    match = CKPT_RE.search(str(latest)) if latest is not None else None
    if match is None:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        n_steps = total_steps(cfg, world, count_source_samples(sources) if cfg.train.steps is None else None)
    except ValueError:
        return None  # train() says why
    step = int(match.group(1))
    return (step, n_steps, str(latest)) if step >= n_steps else None


def _print_result(steps: int, loss: float | None, samples_per_s: float | None, checkpoint) -> None:
    """The run's summary as one JSON line (rank 0); a loss that is not a number is null (valid JSON)."""
    if os.environ.get("RANK", "0") != "0":
        return
    finite = loss is not None and math.isfinite(loss)
    summary = {
        "steps": steps,
        "final_loss": loss if finite else None,
        "samples_per_s": round(samples_per_s, 2) if samples_per_s is not None else None,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    print(json.dumps(summary, allow_nan=False))


def run_eval(args: argparse.Namespace) -> int:
    _setup_logging()
    from train.config import ConfigError, load_train_config, parse_overrides

    checkpoint = args.checkpoint
    try:
        shots = parse_shots(args.few_shot) if args.few_shot is not None else None
    except ValueError as e:
        raise UsageError(f"--few-shot: {e}") from None
    json_out = args.json_out
    if args.overrides and not args.config:
        raise UsageError("--set overrides keys of a training config: give the config")
    if shots is not None and json_out is None and not args.config:
        raise UsageError("--few-shot writes a JSON and a plot: give --json PATH (or a training config)")
    if checkpoint is None and args.config:
        try:
            cfg = load_train_config(args.config, overrides=parse_overrides(args.overrides))
        except ConfigError as e:
            return fail_config(e)
        from train.loop import latest_checkpoint

        found = latest_checkpoint(cfg.output_dir)
        if found is None:
            return fail(f"no checkpoint in {cfg.output_dir}/checkpoints")
        checkpoint = str(found)
        if shots is not None and json_out is None:
            task = "fashion-mnist" if args.task == "fashion-mnist" else Path(args.task).name
            json_out = str(Path(cfg.output_dir) / f"few_shot_{task}.json")
    if checkpoint is None and args.model is None:
        raise UsageError("give a config, --checkpoint, or --model")
    templates = None
    if args.templates:
        from train.evaluate import read_templates

        try:
            templates = read_templates(args.templates)
        except ValueError as e:
            return fail(str(e))
    zero_shot = args.zero_shot or (None if args.retrieval or shots is not None else "fashion-mnist")

    from curation.core.devices import resolve_device
    from train.eval_suite import evaluate

    device = resolve_device(args.device)
    try:
        results = evaluate(
            checkpoint,
            args.model,
            device=device,
            zero_shot=zero_shot,
            fashion_mnist_source=args.fashion_mnist_source,
            templates=templates,
            retrieval=args.retrieval,
            shots=shots,
            task=args.task,
            draws=args.draws,
            seed=args.seed,
            limit=args.limit,
        )
    except USAGE_ERRORS as e:
        return fail(_message(e))
    if checkpoint is not None:
        results = {"checkpoint": str(checkpoint), **results}  # which one, when a config chose the newest
    text = json.dumps(_rounded(results), indent=1)
    if "few_shot" in results:
        print(few_shot_table(results))  # the full curves (every draw) stay in the JSON file
    else:
        print(text)
    if json_out:
        from curation.core.storage import open_store

        path = Path(json_out)
        open_store(path.parent).put_bytes(path.name, (text + "\n").encode())
        if "few_shot" in results:
            from train import probe

            png = probe.plot_curves(results["few_shot"], path.with_suffix(".png"))
            note(f"wrote {path} and {png}")
        else:
            note(f"wrote {path}")
    return EXIT_OK


def few_shot_table(results: dict) -> str:
    """The few-shot curves as a table: mean accuracy (and std over draws) per shot count and probe."""
    fs = results["few_shot"]
    lines = []
    if "zero_shot" in results:
        zs = results["zero_shot"]
        lines.append(
            f"zero-shot {zs['dataset']}: top-1 {100 * zs['top1']:.1f}%  top-5 {100 * zs['top5']:.1f}%"
        )
    if "retrieval" in results:
        r = results["retrieval"]
        lines.append(
            f"retrieval (n={r['n']:,}): image->text R@1 {100 * r['image_to_text_R@1']:.1f}%  "
            f"text->image R@1 {100 * r['text_to_image_R@1']:.1f}%"
        )
    lines.append(
        printable(
            f"few-shot {fs['task']}: {fs['classes']} classes, {fs['n_test']:,} test images, {fs['draws']} draw(s); "
            f"zero-shot top-1 {100 * fs['zero_shot_top1']:.1f}%"
        )
    )
    names = list(fs["curves"])
    header = ["shots"] + [f"{n} (top-1 %, ± std)" for n in names]
    rows = []
    for shots in fs["shots"]:
        cells = [str(shots)]
        for n in names:
            point = next((p for p in fs["curves"][n] if p["shots"] == shots), None)
            if point is None:  # 0 shots: the zero-shot classifier itself
                cells.append(f"{100 * fs['zero_shot_top1']:.1f}")
            else:
                cells.append(f"{100 * point['mean']:.1f} ± {100 * point['std']:.1f}")
        rows.append(cells)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    return "\n".join(lines)


def parse_shots(text: str) -> list[int]:
    try:
        shots = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"expected comma-separated integers, e.g. 0,1,2,4,8,16; got {text!r}") from None
    if not shots or shots[0] < 0:
        raise ValueError(f"shot counts must be integers >= 0; got {text!r}")
    return shots


MINE_HELP = """\
Embed every pair of a `curate select` subset with frozen encoders and mine, for each
pair, its k hardest pairs (HELIP, docs/methods.md §3a): score_ij = <u_i,u_j>·<v_i,v_j>,
j = i and near-duplicates (either cosine > near_duplicate) excluded.

  curate mine train/configs/mine_fashion_mnist.yaml
  curate mine --shards "subset/{00000..00009}.tar" --checkpoint runs/x/checkpoints/step_00001000.pt \\
      --output runs/mined
  curate mine CONFIG.yaml --set mining.k=20          # re-mine: stored embeddings are reused
  curate mine CONFIG.yaml --text-model all-MiniLM-L6-v2   # texts embedded by MiniLM (offline package)
  curate mine --shards "subset/*.tar" --image-teacher efficientnet_lite0 --text-model all-MiniLM-L6-v2 \\
      --output runs/mined_frozen          # HELIP's set-up: two frozen encoders, no CLIP checkpoint
  curate mine CONFIG.yaml --runner ray                # query blocks as Ray tasks
  curate query runs/mined "SELECT uid, hard_uids[1], hard_scores[1] FROM hard_pairs LIMIT 5"

Writes OUTPUT/hard_pairs.parquet for `curate train` (`hard_pairs: {path: ...}`).
Killed at any moment, the same command resumes. Exit codes: 0 done, 1 failed, 2 bad usage or config.
"""


# flag -> config key
_FLAGS = {
    "shards": "data.shards",
    "output": "output",
    "checkpoint": "encoders.checkpoint",
    "model": "encoders.model",
    "text_model": "encoders.text_model",
    "image_teacher": "encoders.image_teacher",
    "device": "encoders.device",
    "k": "mining.k",
    "near_duplicate": "mining.near_duplicate",
    "method": "mining.method",
    "runner": "runner.type",
}


def register_mine(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mine",
        help="embed a selected subset and mine HELIP hard pairs (for `curate train` hard_pairs)",
        description=MINE_HELP,
        formatter_class=Formatter,
    )
    p.add_argument(
        "config", nargs="?", help="mine YAML (see train/configs/mine_fashion_mnist.yaml); or use flags"
    )
    p.add_argument(
        "--shards", help="data.shards: brace pattern or glob of the subset's tars (paths or s3://... URLs)"
    )
    p.add_argument("--output", "-o", help="output directory or URL (s3://bucket/prefix)")
    p.add_argument(
        "--checkpoint", help="encoders.checkpoint: CLIP checkpoint whose towers embed (a file or a URL)"
    )
    p.add_argument("--model", help="encoders.model: open_clip name, for a checkpoint that does not name it")
    p.add_argument(
        "--text-model", help="encoders.text_model: sentence-transformers folder or 'all-MiniLM-L6-v2'"
    )
    p.add_argument(
        "--image-teacher",
        help="encoders.image_teacher: embed images with a `concepts` teacher's pooled features instead "
        "(efficientnet_lite0, or timm/torchvision/open_clip with --set encoders.image_teacher_model=... "
        "image_teacher_checkpoint=... image_teacher_vocabulary=...)",
    )
    p.add_argument("--device", help="encoders.device: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--k", type=int, help="mining.k: hard pairs per pair (default 50)")
    p.add_argument(
        "--near-duplicate", type=float, help="mining.near_duplicate: cosine threshold (default 0.98)"
    )
    p.add_argument("--method", choices=["exact", "pool", "faiss"], help="mining.method (default exact)")
    p.add_argument("--runner", choices=["local", "ray"], help="runner.type (default local)")
    _add_set(p, "any key, e.g. mining.k=20")
    p.add_argument("--no-progress", action="store_true", help="no per-shard lines on stderr")
    p.set_defaults(func=run_mine)


def run_mine(args: argparse.Namespace) -> int:
    from curation.config import ConfigError
    from curation.core.cluster import RunnerError
    from curation.core.outputs import RunLocked
    from train.config import parse_overrides
    from train.mining.run import mine
    from train.mining.store import MineConflict
    from train.validation import parse_checked_mine_config

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        overrides = parse_overrides(args.overrides)
        for flag, key in _FLAGS.items():
            if getattr(args, flag) is not None:
                overrides[key] = getattr(args, flag)
        if args.config:
            text, source = Path(args.config).read_text(), args.config
        else:
            text, source = "{}", "<flags>"
        cfg = parse_checked_mine_config(text, source=source, overrides=overrides)
    except ConfigError as e:
        return fail_config(e)
    try:
        result = mine(cfg, say=(lambda m: None) if args.no_progress else note)
    except RunLocked:
        return fail(f"another process is writing to {cfg.output}")
    except (MineConflict, RunnerError, *USAGE_ERRORS) as e:
        return fail(_message(e))
    print(
        printable(  # the output as the user named it (relative stays relative), as `run` prints it
            f"{cfg.output}: {result.pairs:,} pairs; {result.shards_embedded} shard(s) embedded, "
            f"{result.shards_reused} reused ({result.seconds_embedding:.1f}s); mined in {result.seconds_mining:.1f}s"
        )
    )
    return EXIT_OK
