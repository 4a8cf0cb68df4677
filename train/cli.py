"""`curate train` and `curate eval`. torch is imported inside the handlers so `curate --help` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from curation.argtypes import at_least

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

  curate eval --checkpoint runs/fmnist/checkpoints/step_00000400.pt --zero-shot fashion-mnist
  curate eval train/configs/fashion_mnist.yaml          # newest checkpoint of that run
  curate eval --checkpoint CK.pt --retrieval "shards/{00000..00003}.tar" --limit 5000
  curate eval --model ViT-B-32 --checkpoint openclip.pt --zero-shot imagenet_val/ \\
      --templates templates.txt                          # folder of CLASS_NAME/*.jpg
  curate eval train/configs/fashion_mnist.yaml --few-shot 0,1,2,4,8,16 --task fashion-mnist --draws 5

Prints JSON (top1/top5; R@1/5/10 image->text and text->image); --json also writes it.
--few-shot runs DiHT's probe (the zero-shot classifier plus a residual and bias learned by projected
gradient descent in norm balls, radii chosen on the shots only) and a plain linear
probe, for each shot count over --draws random draws; it writes the JSON (--json, default
OUTPUT_DIR/few_shot_TASK.json for a config) and an accuracy-vs-shots plot beside it (.png).
Exit codes: 0 done, 1 evaluation failed, 2 bad usage.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` and `eval` to the `curate` CLI's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
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
    e.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the training config, as `curate train --set` did (repeatable)",
    )
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
        "--limit", type=at_least(1), default=None, help="evaluate at most this many (test) images (>= 1)"
    )
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--json", dest="json_out", help="also write the results to this file")
    e.set_defaults(func=run_eval)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training YAML (see train/configs/ and train/README.md)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (YAML value), e.g. --set train.steps=100; repeatable",
    )


def _setup_logging() -> None:
    # Our logger at INFO on rank 0; the root logger (where open_clip's chatty factory logs) at WARNING.
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("train").setLevel(logging.INFO if rank == "0" else logging.WARNING)


def run_train(args: argparse.Namespace) -> int:
    from train.config import ConfigError, load_train_config, parse_overrides

    _setup_logging()
    try:
        cfg = load_train_config(args.config, overrides=parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from train.loop import train

    try:
        result = train(cfg, resume=args.resume)
    except (FileNotFoundError, ValueError) as e:  # missing shards, bad sizes.json, unknown model: usage
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:
        logging.getLogger("train").exception("training failed")
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(
            json.dumps(
                {
                    "steps": result.steps,
                    "final_loss": result.final_loss,
                    "samples_per_s": round(result.samples_per_s, 2),
                    "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                }
            )
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    _setup_logging()
    import torch

    from train.config import ConfigError, load_train_config, parse_overrides

    checkpoint = args.checkpoint
    try:
        args.shots = _parse_shots(args.few_shot) if args.few_shot is not None else None
    except ValueError as e:
        print(f"error: --few-shot: {e}", file=sys.stderr)
        return 2
    if args.overrides and not args.config:
        print("error: --set overrides keys of a training config: give the config", file=sys.stderr)
        return 2
    if args.shots is not None and args.json_out is None and not args.config:
        print(
            "error: --few-shot writes a JSON and a plot: give --json PATH (or a training config)",
            file=sys.stderr,
        )
        return 2
    if checkpoint is None and args.config:
        try:
            cfg = load_train_config(args.config, overrides=parse_overrides(args.overrides))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from train.loop import latest_checkpoint

        found = latest_checkpoint(cfg.output_dir)
        if found is None:
            print(f"error: no checkpoint in {cfg.output_dir}/checkpoints", file=sys.stderr)
            return 2
        checkpoint = str(found)
        if args.shots is not None and args.json_out is None:
            task = "fashion-mnist" if args.task == "fashion-mnist" else Path(args.task).name
            args.json_out = str(Path(cfg.output_dir) / f"few_shot_{task}.json")
    if checkpoint is None and args.model is None:
        print("error: give a config, --checkpoint, or --model", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        return _eval(args, checkpoint, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:
        logging.getLogger("train").exception("evaluation failed")
        return 1


def _eval(args: argparse.Namespace, checkpoint: str | None, device: str) -> int:
    from curation.models import clip
    from train import evaluate, fashion_mnist

    built = clip.load_for_eval(checkpoint, args.model, device=device)
    results: dict = {"checkpoint": checkpoint, "model": built.name}
    templates = None
    if args.templates:
        templates = [ln.strip() for ln in Path(args.templates).read_text().splitlines() if ln.strip()]
    zero_shot = args.zero_shot or (None if args.retrieval or args.shots is not None else "fashion-mnist")
    if zero_shot == "fashion-mnist":
        images, labels = fashion_mnist.load("test", args.fashion_mnist_source)
        classes, templates = fashion_mnist.CLASSES, templates or fashion_mnist.TEMPLATES
    elif zero_shot is not None:
        images, labels, classes = evaluate.read_image_folder(Path(zero_shot))
        templates = templates or ["a photo of a {}."]
    if zero_shot is not None:
        if args.limit:
            images, labels = images[: args.limit], labels[: args.limit]
        zs = evaluate.zero_shot_accuracy(built, list(images), labels, classes, templates, device=device)
        results["zero_shot"] = {"dataset": zero_shot, "top1": zs.top1, "top5": zs.top5, "n": zs.n}
    if args.retrieval:
        from train.data import expand_shards

        imgs, caps = evaluate.read_pairs(expand_shards(args.retrieval), args.limit)
        rec = evaluate.retrieval_recall(
            clip.encode_images(built, imgs, device=device),
            clip.encode_texts(built, caps, device=device),
        )
        results["retrieval"] = {"n": len(imgs), **rec}
    if args.shots is not None:
        from train import probe

        task = probe.load_task(args.task, args.fashion_mnist_source, templates)
        if args.limit:
            task.test_images, task.test_labels = (
                task.test_images[: args.limit],
                task.test_labels[: args.limit],
            )
        results["few_shot"] = probe.few_shot_curves(
            built, task, args.shots, draws=args.draws, seed=args.seed, device=device
        )
    text = json.dumps(results, indent=1)
    print(text)
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        if args.shots is not None:
            from train import probe

            png = probe.plot_curves(results["few_shot"], path.with_suffix(".png"))
            print(f"wrote {path} and {png}", file=sys.stderr)
    return 0


def _parse_shots(text: str) -> list[int]:
    try:
        shots = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"expected comma-separated integers, e.g. 0,1,2,4,8,16; got {text!r}") from None
    if not shots or shots[0] < 0:
        raise ValueError(f"shot counts must be integers >= 0; got {text!r}")
    return shots


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m train ...`, torchrun): `train CONFIG` is the default command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m train", description="curate's trainer (train | eval)")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    if argv and argv[0] not in {"train", "eval", "-h", "--help"}:
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    return args.func(args)
