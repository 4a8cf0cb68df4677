"""`curate mine`: flags and YAML -> MineConfig -> mine(), errors as one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from curation.config import ConfigError
from curation.engine.errors import RunnerError
from curation.manifest import RunLocked
from curation.models.encoders import MINILM
from train.mining.config import parse_mine_config
from train.mining.run import mine
from train.mining.store import MineConflict

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

HELP = """\
Embed every pair of a `curate select` subset with frozen encoders and mine, for each
pair, its k hardest pairs (HELIP, docs/methods.md §3a): score_ij = <u_i,u_j>·<v_i,v_j>,
j = i and near-duplicates (either cosine > near_duplicate) excluded.

  curate mine train/configs/mine_fashion_mnist.yaml
  curate mine --shards "subset/{00000..00009}.tar" --checkpoint runs/x/checkpoints/step_00001000.pt \\
      --output runs/mined
  curate mine CONFIG.yaml --set mining.k=20          # re-mine: stored embeddings are reused
  curate mine CONFIG.yaml --text-model all-MiniLM-L6-v2   # texts embedded by MiniLM (offline package)
  curate mine --shards "subset/*.tar" --image-teacher efficientnet_lite0 --text-model all-MiniLM-L6-v2 \
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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mine",
        help="embed a selected subset and mine HELIP hard pairs (for `curate train` hard_pairs)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config", nargs="?", help="mine YAML (see train/configs/mine_fashion_mnist.yaml); or use flags"
    )
    p.add_argument("--shards", help="data.shards: brace pattern or glob of the subset's tars")
    p.add_argument("--output", "-o", help="output directory")
    p.add_argument("--checkpoint", help="encoders.checkpoint: CLIP checkpoint whose towers embed")
    p.add_argument("--model", help="encoders.model: open_clip name, for a checkpoint that does not name it")
    p.add_argument("--text-model", help=f"encoders.text_model: sentence-transformers folder or {MINILM!r}")
    p.add_argument(
        "--image-teacher",
        help="encoders.image_teacher: embed images with a `concepts` teacher's pooled features instead "
        "(efficientnet_lite0, or timm/torchvision/open_clip with --set encoders.image_teacher_model=... "
        "image_teacher_checkpoint=... image_teacher_vocabulary=...)",
    )
    p.add_argument("--device", help="encoders.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--k", type=int, help="mining.k: hard pairs per pair (default 50)")
    p.add_argument(
        "--near-duplicate", type=float, help="mining.near_duplicate: cosine threshold (default 0.98)"
    )
    p.add_argument("--method", choices=["exact", "pool", "faiss"], help="mining.method (default exact)")
    p.add_argument("--runner", choices=["local", "ray"], help="runner.type (default local)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any key, e.g. mining.k=20",
    )
    p.add_argument("--no-progress", action="store_true", help="no per-shard lines on stderr")
    p.set_defaults(func=run_mine)


def run_mine(args: argparse.Namespace) -> int:
    from train.config import parse_overrides

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
        cfg = parse_mine_config(text, source=source, overrides=overrides)
    except ConfigError as e:
        print(f"curate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = mine(cfg, progress=not args.no_progress)
    except RunLocked:
        print(f"curate: error: another process is writing to {cfg.output}", file=sys.stderr)
        return EXIT_USAGE
    except (MineConflict, FileNotFoundError, ValueError, RunnerError) as e:
        print(f"curate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        logging.getLogger("train").exception("mining failed")
        return EXIT_FAILED
    print(
        f"{result.output}: {result.pairs:,} pairs; {result.shards_embedded} shard(s) embedded, "
        f"{result.shards_reused} reused ({result.seconds_embedding:.1f}s); mined in {result.seconds_mining:.1f}s"
    )
    return EXIT_OK
